"""The `zoo` CLI and the attention benchmark's harness, on CPU.

The GPU sweep itself needs CUDA (one `gpu` test below); everything around it (shapes,
FLOP counting, failure recording, the accuracy gate, table, JSON and plot) runs here.
"""

import json
import math
import re

import pytest
import torch

from tasks import bench_attention, cli
from tasks.bench_attention import Shape

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_SHAPES = [Shape(1, 64, 2, 32, False, "float32"), Shape(1, 64, 2, 32, True, "float32")]


@pytest.fixture
def tiny_cpu_sweep(monkeypatch):
    """The CPU quick sweep cut to two tiny shapes, so the end-to-end runs take seconds."""
    monkeypatch.setattr(bench_attention, "cpu_shapes", lambda: list(TINY_SHAPES))


def test_attention_flops_follow_the_anchor_convention():
    # 4 * B * H * Sq * Sk * D, halved when causal; backward 2.5x the forward.
    assert bench_attention.attention_flops(Shape(2, 8, 3, 5, False, "bfloat16")) == (4 * 2 * 3 * 8 * 8 * 5,
                                                                                     2.5 * 4 * 2 * 3 * 8 * 8 * 5)
    assert bench_attention.attention_flops(Shape(2, 8, 3, 5, True, "bfloat16")) == (2 * 2 * 3 * 8 * 8 * 5,
                                                                                    2.5 * 2 * 2 * 3 * 8 * 8 * 5)


def test_gpu_sweep_shapes():
    shapes = bench_attention.gpu_shapes()
    assert len(shapes) == 2 * 6 * 2
    assert {s.seqlen for s in shapes} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {(s.head_dim, s.causal) for s in shapes} == {(64, False), (64, True), (128, False), (128, True)}
    for s in shapes:
        assert s.batch * s.seqlen == 16384 and s.nheads * s.head_dim == 2048 and s.dtype == "bfloat16"
    quick = bench_attention.gpu_shapes(quick=True)
    assert {(s.head_dim, s.seqlen) for s in quick} == {(128, 1024), (128, 4096)} and len(quick) == 4


def test_model_shapes_are_the_presets_attention():
    """Each model row's heads, head dim, tokens and masking are those of its zoo preset, at the
    batch ANCHORS.md measures the reference at."""
    import zoo

    anchors_batch = {"vit_base_patch16_224": 128, "bert_base": 32, "gpt2": 16, "whisper_base_encoder": 64}
    for (label, preset, *_), (name, shape) in zip(bench_attention.MODEL_SHAPES, bench_attention.model_shapes()):
        with torch.device("meta"):  # no memory
            model = zoo.create_model(preset)
        cfg = model.cfg
        backbone = cfg.backbone
        if preset.startswith("vit"):
            rows, cols = cfg.grid_size
            tokens = rows * cols + cfg.num_prefix_tokens  # patches + the class token
        elif preset.startswith("whisper"):
            tokens = backbone.max_seq_len  # 30 s of audio: 1500 frames after the stride-2 stem
        else:
            tokens = {"bert_base": 512, "gpt2": 1024}[preset]
            assert backbone.max_seq_len == tokens
        assert (shape.batch, shape.seqlen, shape.nheads, shape.head_dim, shape.causal) == (
            anchors_batch[preset], tokens, backbone.heads, backbone.dim // backbone.heads, backbone.causal)
        assert preset in name and label in name and shape.dtype == "bfloat16"


def test_model_rows_run_and_get_their_own_table(tmp_path, tiny_cpu_sweep):
    model = ("a tiny model (preset)", Shape(2, 24, 3, 16, True, "float32"))
    report = bench_attention.run(device="cpu", quick=True, out_dir=str(tmp_path), models=[model])
    [row] = report["model_results"]
    assert row["model"] == model[0] and (row["batch"], row["nheads"], row["seqlen"]) == (2, 3, 24)
    assert row["check"]["max_abs_diff"]["out"] <= bench_attention.TOLERANCE[torch.float32]
    assert json.loads((tmp_path / "attention.json").read_text())["model_results"] == [row]
    table = bench_attention.format_table(report, "ms", models=True)
    header = next(line for line in table.splitlines() if line.startswith("| model |"))
    assert header.startswith("| model | B | H | D | S | causal | dtype | tritonzoo fwd / bwd |")
    cells = [c.strip() for c in table.splitlines()[header_index(table) + 2].strip("|").split("|")]
    assert cells[:7] == [model[0], "2", "3", "16", "24", "yes", "float32"]
    # The sweep's table leaves the model rows out.
    assert model[0] not in bench_attention.format_table(report, "ms")


def header_index(table: str) -> int:
    return next(i for i, line in enumerate(table.splitlines()) if line.startswith("| model |"))


def test_cli_bench_attention_quick_cpu(tmp_path, capsys, tiny_cpu_sweep):
    assert cli.main(["bench", "attention", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert bench_attention.CPU_TITLE in printed

    report = json.loads((tmp_path / "attention.json").read_text())
    assert set(report) == {"metadata", "implementations", "results", "model_results"}
    assert report["model_results"] == []  # the models' shapes are for a full GPU run
    meta = report["metadata"]
    for key in ("device", "torch", "triton", "date", "command", "flops", "timing", "mode", "title"):
        assert meta[key], key
    assert meta["torch"] == torch.__version__
    assert meta["command"] == f"zoo bench attention --quick --device cpu --out {tmp_path}"
    assert report["implementations"] == ["tritonzoo", "sdpa-cpu"]
    assert len(report["results"]) == len(TINY_SHAPES)
    for row, shape in zip(report["results"], TINY_SHAPES):
        assert (row["seqlen"], row["causal"], row["head_dim"]) == (shape.seqlen, shape.causal, shape.head_dim)
        assert row["check"]["reference"] == "sdpa-cpu"
        assert row["check"]["max_abs_diff"]["out"] < 1e-4
        for name in report["implementations"]:
            timing = row["timings"][name]
            assert "error" not in timing, timing
            assert timing["fwd_ms"] > 0 and timing["fwd_bwd_ms"] > 0
            assert math.isclose(timing["fwd_tflops"], row["flops_fwd"] / timing["fwd_ms"] * 1e-9)
    assert (tmp_path / "attention.png").read_bytes()[:8] == PNG_MAGIC


def test_full_sweep_needs_a_gpu(capsys):
    with pytest.raises(ValueError, match="CUDA"):
        bench_attention.run(device="cpu", quick=False, out_dir=None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "attention", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--quick" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench", "nonsense"], ["nonsense"], [], ["bench"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: zoo" in capsys.readouterr().err


def test_help_does_not_import_torch():
    """`zoo --help` (and every subcommand's parser) builds without importing torch, as cli.py promises."""
    import subprocess
    import sys

    code = ("import sys; from tasks.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'lightning', 'yaml', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("below", [False, True])
@pytest.mark.parametrize("target", ["attention", "decode", "ops", "generate"])
def test_out_naming_a_file_is_refused_before_measuring(target, below, tmp_path, capsys, monkeypatch):
    """--out naming a file, or a folder below one (which cannot be created: before, the run
    measured, then failed with NotADirectoryError at its first write)."""
    import importlib

    def measured(*args, **kwargs):
        raise AssertionError("measured despite a bad --out")

    bench = importlib.import_module(f"tasks.bench_{target}")
    monkeypatch.setattr(bench, "run_metadata", measured)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    out = a_file / "sub" if below else a_file
    message = f"is below {str(a_file)!r}, a file" if below else "is a file"
    commands = [lambda: cli.main(["bench", target, "--quick", "--device", "cpu", "--out", str(out)])]
    if hasattr(bench, "main"):  # `python -m tasks.bench_<target>`
        commands.append(lambda: bench.main(["--quick", "--device", "cpu", "--out", str(out)]))
    for command in commands:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            command()
        assert exit_info.value.code == 2
        assert f"--out {str(out)!r} {message}; expected a folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{re.escape(message)}; expected a folder"):
        bench.run(device="cpu", quick=True, out_dir=str(out))


def test_unknown_ops_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "ops", "--quick", "--device", "cpu", "--ops", "rms_norm", "bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ops" in err and "'bogus'" in err and "layer_norm" in err


def test_wrong_output_stops_the_run(monkeypatch, tiny_cpu_sweep):
    def wrong(q, k, v, causal):
        return bench_attention.flash_attn_func(q, k, v, causal=causal) + 0.1

    monkeypatch.setattr(bench_attention, "_ours", wrong)
    with pytest.raises(bench_attention.AccuracyError, match="differs from sdpa-cpu"):
        bench_attention.run(device="cpu", quick=True, out_dir=None)


def test_a_failing_peer_is_recorded_not_raised():
    def unsupported(q, k, v, causal):
        raise RuntimeError("No available kernel. Aborting execution.")

    shape = TINY_SHAPES[0]
    entry = bench_attention.measure(unsupported, bench_attention.make_inputs(shape, "cpu"), shape, "cpu", 1, 1)
    assert entry == {"error": "RuntimeError: No available kernel. Aborting execution."}


# --------------------------------------------------------------------------------------
# Reporting from a synthetic GPU-like report (no CUDA needed)
# --------------------------------------------------------------------------------------

# (impl, fwd TFLOP/s, bwd TFLOP/s) used for every synthetic shape
RATES = [("tritonzoo", 300.0, 200.0), ("sdpa-flash", 250.0, 250.0), ("sdpa-cudnn", 500.0, 400.0),
         ("flex", 400.0, 320.0)]


def _synthetic_report():
    results = []
    for head_dim in (64, 128):
        for causal in (False, True):
            for seqlen in (512, 1024, 2048):
                shape = Shape(16384 // seqlen, seqlen, 2048 // head_dim, head_dim, causal, "bfloat16")
                flops_fwd, flops_bwd = bench_attention.attention_flops(shape)
                timings = {}
                for name, fwd, bwd in RATES:
                    fwd_ms, bwd_ms = flops_fwd / fwd * 1e-9, flops_bwd / bwd * 1e-9
                    timings[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_ms + bwd_ms, "bwd_ms": bwd_ms,
                                     "fwd_tflops": fwd, "bwd_tflops": bwd}
                if head_dim == 64 and seqlen == 512 and not causal:
                    timings["sdpa-cudnn"] = {"error": "RuntimeError: No available kernel."}
                results.append({"batch": shape.batch, "seqlen": seqlen, "nheads": shape.nheads,
                                "head_dim": head_dim, "causal": causal, "dtype": "bfloat16",
                                "flops_fwd": flops_fwd, "flops_bwd": flops_bwd,
                                "check": {"reference": "sdpa-flash", "tolerance": 2e-2,
                                          "max_abs_diff": {"out": 3.9e-3, "dq": 1e-2, "dk": 1e-2, "dv": 8e-3}},
                                "timings": timings})
    meta = {"device": "NVIDIA H100 80GB HBM3 (synthetic)", "mode": "GPU", "title": "synthetic report",
            "torch": "2.11.0", "triton": "3.6.0", "python": "3.12", "date": "2026-11-22T00:00:00+00:00",
            "command": "zoo bench attention", "flops": bench_attention.FLOP_CONVENTION, "timing": "synthetic"}
    return {"metadata": meta, "implementations": [name for name, _, _ in RATES], "results": results}


def test_table_from_synthetic_results():
    report = _synthetic_report()
    table = bench_attention.format_table(report)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| D |"))
    for column in ("tritonzoo fwd / bwd", "sdpa-flash fwd / bwd", "flex fwd / bwd", "ours/sdpa-cudnn fwd / bwd",
                   "max abs diff"):
        assert column in header
    rows = [line for line in lines if line.startswith("| ") and line is not header and "---" not in line]
    rows = [line for line in rows if not line.startswith("| D |")]
    assert len(rows) == len(report["results"])
    cells = [c.strip() for c in rows[1].strip("|").split("|")]  # D=64, S=1024, non-causal
    assert cells[:4] == ["64", "1024", "no", "bfloat16"]
    assert cells[4] == "300.0 / 200.0"
    # Speedups ours/peer, from the rates above: 300/250, 200/250; 300/500, 200/400; 300/400, 200/320.
    assert cells[8:11] == ["1.20 / 0.80", "0.60 / 0.50", "0.75 / 0.62"]
    first = [c.strip() for c in rows[0].strip("|").split("|")]
    assert first[6] == "n/a / n/a" and first[9] == "n/a / n/a"
    assert "- sdpa-cudnn, D=64 S=512 causal=False: RuntimeError: No available kernel." in lines
    assert "TFLOP/s" in table and "NVIDIA H100" in table


def test_json_and_plot_from_synthetic_results(tmp_path):
    report = _synthetic_report()
    bench_attention.write_json(report, tmp_path / "attention.json")
    assert json.loads((tmp_path / "attention.json").read_text()) == report
    report["results"][0]["timings"]["flex"]["fwd_tflops"] = float("nan")
    with pytest.raises(ValueError):  # strict JSON: a NaN is a bug upstream, not a number
        bench_attention.write_json(report, tmp_path / "bad.json")

    report = _synthetic_report()
    bench_attention.plot(report, tmp_path / "attention.png")
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "attention.png")
    # One row of panels per (head dim, causal), two columns (forward, backward).
    height, width = image.shape[:2]
    assert (tmp_path / "attention.png").read_bytes()[:8] == PNG_MAGIC
    assert height > width


@pytest.mark.gpu
def test_quick_gpu_benchmark(tmp_path):
    report = bench_attention.run(device="cuda", quick=True, out_dir=str(tmp_path))
    for row in report["results"]:
        assert row["check"]["reference"] is not None
        assert row["check"]["max_abs_diff"]["out"] <= 2e-2
        assert "error" not in row["timings"]["tritonzoo"]
    assert (tmp_path / "attention.png").exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, tiny_cpu_sweep):
    # The interpreted correctness check is the slow part (~10-20 s); the sweep is cut short.
    from tasks import demo

    monkeypatch.chdir(tmp_path)
    assert demo.main() == 0
    assert (tmp_path / "bench_out" / "demo" / "attention.json").exists()


def test_kernel_resources_compiles_for_hopper_without_a_gpu():
    """The attention forward compiles for sm_90a and its dots lower to wgmma, spill-free
    in an autotune candidate (run in a fresh process: this one has the interpreter on)."""
    import json
    import subprocess
    import sys

    code = ("import json; from tasks.kernel_resources import resources, FLAGS, KERNELS; "
            "fn = KERNELS['fwd'][0]; "
            "print(json.dumps(resources(fn, 'bf16', dict(FLAGS, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, "
            "BLOCK_N=64), 8, 3)))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["dot"] == "wgmma"
    assert report["spill_stores"] == 0
    assert 0 < report["registers"] <= 255


_COMPILE_EVERY_FEATURE = """
import json
from kernels import flash_attention as fa
from tasks.kernel_resources import KERNELS, feature_variant, resources
report = {}
for name in KERNELS:
    for dtype, d in (("bf16", 128), ("fp32", 64)):
        report[f"{name} {dtype} D={d}"] = resources(*feature_variant(name, dtype, d, "all"))
report["bwd preprocess bf16"] = resources(fa._attn_bwd_preprocess, "bf16", dict(
    HEAD_DIM=128, BLOCK_D=128, IS_VARLEN=True, HAS_DLSE=True, BLOCK_M=64), 4, 1)
block_m, block_n = fa.GPU_DROPOUT_MASK_BLOCK
report["dropout mask"] = resources(fa._dropout_mask_kernel, "i1", dict(BLOCK_M=block_m, BLOCK_N=block_n), 4, 1)
print(json.dumps(report))
"""


def test_every_attention_feature_compiles_for_hopper():
    """Each attention kernel with every feature on at once (packed batch, window, softcap,
    ALiBi, bias, dropout) compiles for sm_90a in bf16 and fp32, and fits in an H100's
    shared memory; so do the backward's preprocess and the dropout-mask kernel. The
    interpreter runs every branch but does not check types the way the compiler does."""
    import json
    import subprocess
    import sys

    from tasks.kernel_resources import H100_MAX_SHARED

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_EVERY_FEATURE], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report) == 8
    for name, r in report.items():
        assert 0 < r["registers"] <= 255 and r["shared"] <= H100_MAX_SHARED, (name, r)
        if "bf16" in name and "preprocess" not in name:
            assert r["dot"] == "wgmma", (name, r)


def test_progress_keeps_the_rows_measured_so_far(tmp_path, capsys):
    """A run stopped midway (a device call's time limit) still leaves its rows on disk."""
    import json

    from tasks.bench_attention import progress

    report = {"metadata": {}, "implementations": ["tritonzoo", "flash"], "results": [
        {"seqlen": 1024, "timings": {"tritonzoo": {"fwd_ms": 0.5, "fwd_tflops": 300.0, "bwd_ms": 1.25},
                                     "flash": {"error": "RuntimeError: no kernel"}}}]}
    progress(report, str(tmp_path / "out"), "attention", "D=64 S=1024 causal=True")
    assert json.loads((tmp_path / "out" / "attention.json").read_text()) == report
    line = capsys.readouterr().err
    assert "measured D=64 S=1024 causal=True: tritonzoo fwd_ms 0.5, bwd_ms 1.25; flash error" in line
