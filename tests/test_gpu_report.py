""".ci/gpu-report, the script a session with a lent GPU runs: every test file with GPU tests is
in exactly one of its pytest steps, and every file it names exists."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu-report"


def _steps() -> dict[str, list[str]]:
    block = re.search(r"declare -A TESTS=\((.*?)\n\)", SCRIPT.read_text(), re.S).group(1)
    return {name: files.split() for name, files in re.findall(r'\[(tests-[a-z]+)\]="([^"]*)"', block)}


def test_every_gpu_test_file_is_in_exactly_one_step():
    listed = [f for files in _steps().values() for f in files]
    assert len(listed) == len(set(listed)), "a file is in two steps"
    with_gpu_tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                      if "mark.gpu" in p.read_text() and p.name != Path(__file__).name}
    assert with_gpu_tests == set(listed)
    assert all((ROOT / f).is_file() for f in listed)


def test_usage_and_unknown_steps(tmp_path):
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"OUT": str(tmp_path)})
    assert usage.returncode == 2 and "tests-decoding" in usage.stdout and "bench-generate" in usage.stdout
    unknown = subprocess.run(["bash", str(SCRIPT), "nonsense"], capture_output=True, text=True,
                             env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert unknown.returncode == 2 and "unknown step: nonsense" in unknown.stderr
