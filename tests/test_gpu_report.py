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


def _stub_python(tmp_path, failing_word: str = "") -> dict:
    """An environment whose `python` only echoes its arguments (exit 1 when they contain
    failing_word), so the script's own logic runs in a second."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(f'#!/bin/sh\necho "python $*"\ncase "$*" in *"{failing_word or "@@"}"*) exit 1;; esac\n')
    stub.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"),
            "GPU_REPORT_DIR": str(tmp_path / "run"), "GPU_WAIT": "30"}


def _members(archive) -> set[str]:
    import tarfile

    with tarfile.open(archive) as tar:
        return {m.name.lstrip("./") for m in tar.getmembers() if m.isfile()}


def test_background_run_is_collected_with_its_exit_status(tmp_path):
    env = _stub_python(tmp_path)
    run = subprocess.run(["bash", str(SCRIPT), "--start", "tests-ops", "bench-ops"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests-ops rc=0" in run.stdout and "bench-ops rc=0" in run.stdout
    assert {"summary.txt", "tests-ops.log", "bench-ops.log", "device.txt"} <= _members(tmp_path / "out" /
                                                                                       "gpu_report.tar.gz")
    log = (tmp_path / "run" / "report" / "tests-ops.log").read_text()
    assert "-m pytest -q -m gpu" in log and "tests/test_ops_norms.py" in log
    again = subprocess.run(["bash", str(SCRIPT), "--wait", "1"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "bench-ops rc=0" in again.stdout


def test_background_run_reports_a_failed_step(tmp_path):
    env = _stub_python(tmp_path, failing_word="bench ops")
    run = subprocess.run(["bash", str(SCRIPT), "--start", "tests-ops", "bench-ops"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 1 and "bench-ops rc=1" in run.stdout


def test_wait_and_start_refuse_what_they_cannot_do(tmp_path):
    env = _stub_python(tmp_path)
    nothing = subprocess.run(["bash", str(SCRIPT), "--wait", "1"], capture_output=True, text=True, env=env)
    assert nothing.returncode == 2 and "no background run" in nothing.stderr
    unknown = subprocess.run(["bash", str(SCRIPT), "--start", "tests-ops", "nonsense"], capture_output=True,
                             text=True, env=env)
    assert unknown.returncode == 2 and "unknown step: nonsense" in unknown.stderr
    assert not (tmp_path / "run" / "report").exists()
