"""The decoding benchmark's harness on CPU: a smoke run end to end, the table from a synthetic
GPU report, the accuracy gate. The GPU sweep itself needs CUDA (one `gpu` test)."""

import json
import math

import pytest

from tasks import bench_decode
from tasks.bench_attention import write_json
from tasks.bench_decode import Shape

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = [Shape(1, 16, 8, 1, 32, "float32"), Shape(2, 24, 4, 2, 16, "float32")]


@pytest.fixture
def tiny_cpu_sweep(monkeypatch):
    """The CPU smoke sweep cut to two tiny shapes, so a run takes a second or two."""
    monkeypatch.setattr(bench_decode, "cpu_shapes", lambda: list(TINY))


def test_shapes_and_bytes():
    shapes = bench_decode.gpu_shapes()
    assert {(s.batch, s.cache_len) for s in shapes} == {(b, n) for b in (1, 4, 16)
                                                        for n in (4096, 8192, 16384, 32768, 65536)}
    assert all((s.nheads, s.nheads_k, s.head_dim, s.dtype) == (64, 8, 128, "bfloat16") for s in shapes)
    assert {(s.batch, s.cache_len) for s in bench_decode.gpu_shapes(quick=True)} == {(1, 4096), (1, 65536),
                                                                                    (16, 4096), (16, 65536)}
    # keys and values, B * L * Hk * D elements each
    assert Shape(3, 100, 8, 2, 64, "bfloat16").kv_bytes == 2 * 3 * 100 * 2 * 64 * 2


def test_cpu_smoke_run_writes_json_table_and_plot(tmp_path, capsys, tiny_cpu_sweep):
    assert bench_decode.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert bench_decode.CPU_TITLE in printed

    report = json.loads((tmp_path / "decode.json").read_text())
    meta = report["metadata"]
    for key in ("device", "torch", "triton", "date", "command", "timing", "mode", "title", "step"):
        assert meta[key], key
    assert meta["command"] == f"python -m tasks.bench_decode --quick --device cpu --out {tmp_path}"
    assert report["implementations"] == ["tritonzoo", "sdpa-cpu"]
    assert [(r["batch"], r["cache_len"], r["nheads_k"]) for r in report["results"]] == [(1, 16, 1), (2, 24, 2)]
    for row, shape in zip(report["results"], TINY):
        assert row["check"]["reference"] == "sdpa-cpu" and row["check"]["max_abs_diff"] < 1e-4
        for name in report["implementations"]:
            timing = row["timings"][name]["eager"]
            assert timing["ms"] > 0
            assert math.isclose(timing["tokens_per_s"], shape.batch / (timing["ms"] * 1e-3))
            assert math.isclose(timing["kv_gb_per_s"], shape.kv_bytes / timing["ms"] * 1e-6)
    table = (tmp_path / "decode.md").read_text()
    assert table in printed
    assert "| 2 | 24 | float32 | wall clock |" in table
    assert (tmp_path / "decode.png").read_bytes()[:8] == PNG_MAGIC


def test_full_sweep_needs_a_gpu(capsys):
    with pytest.raises(ValueError, match="CUDA"):
        bench_decode.run(device="cpu", quick=False, out_dir=None)
    with pytest.raises(SystemExit) as exit_info:
        bench_decode.main(["--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--quick" in capsys.readouterr().err


def test_wrong_output_stops_the_run(monkeypatch, tiny_cpu_sweep):
    def wrong(step):
        return bench_decode.flash_attn_with_kvcache(step.q, step.k_cache, step.v_cache, step.k, step.v,
                                                    cache_seqlens=step.cache_seqlens) + 0.1

    monkeypatch.setattr(bench_decode, "_ours", wrong)
    with pytest.raises(bench_decode.AccuracyError, match="differs from sdpa-cpu"):
        bench_decode.run(device="cpu", quick=True, out_dir=None)


def _synthetic_report():
    """Two shapes, both timing modes; sdpa-cudnn fails on one; times in ms."""
    ms = {"tritonzoo": (0.010, 0.008), "sdpa": (0.040, 0.030), "sdpa-flash": (0.025, 0.020),
          "sdpa-cudnn": (0.020, 0.016)}
    results = []
    for batch, length in ((1, 4096), (16, 65536)):
        shape = Shape(batch, length, 64, 8, 128, "bfloat16")
        timings = {}
        for name, (eager, graph) in ms.items():
            timings[name] = {mode: {"ms": t, "tokens_per_s": batch / (t * 1e-3),
                                    "kv_gb_per_s": shape.kv_bytes / t * 1e-6}
                             for mode, t in (("eager", eager * batch), ("graph", graph * batch))}
        if batch == 16:
            timings["sdpa-cudnn"] = {"eager": {"error": "RuntimeError: No available kernel."},
                                     "graph": {"error": "RuntimeError: No available kernel."}}
        results.append({**shape.__dict__, "kv_bytes": shape.kv_bytes,
                        "check": {"reference": "sdpa", "tolerance": 2e-2, "max_abs_diff": 3.9e-3},
                        "timings": timings})
    meta = {"device": "NVIDIA H100 80GB HBM3 (synthetic)", "mode": "GPU", "title": bench_decode.GPU_TITLE,
            "torch": "2.11.0", "triton": "3.6.0", "python": "3.12", "date": "2026-11-22T00:00:00+00:00",
            "command": "zoo bench decode", "timing": "synthetic", "step": "synthetic"}
    return {"metadata": meta, "implementations": list(ms), "results": results}


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_table_from_synthetic_report(tmp_path):
    report = _synthetic_report()
    table = bench_decode.format_table(report)
    lines = table.splitlines()
    header = _cells(next(line for line in lines if line.startswith("| B |")))
    assert header[4:8] == ["tritonzoo µs", "sdpa µs", "sdpa-flash µs", "sdpa-cudnn µs"]
    assert header[8:] == ["tritonzoo tokens/s", "tritonzoo KV GB/s", "ours/sdpa", "ours/best SDPA (which)",
                          "max abs diff"]
    rows = [_cells(line) for line in lines if line.startswith("| 1 ") or line.startswith("| 16 ")]
    assert [r[:4] for r in rows] == [["1", "4096", "bfloat16", "do_bench (cold L2)"],
                                     ["1", "4096", "bfloat16", "CUDA graph replay"],
                                     ["16", "65536", "bfloat16", "do_bench (cold L2)"],
                                     ["16", "65536", "bfloat16", "CUDA graph replay"]]
    # B=1 eager: 10 / 40 / 25 / 20 µs; 100,000 tokens/s; 16 MiB of KV in 10 µs; 40/10; best peer cudnn 20/10.
    assert rows[0][4:] == ["10.0", "40.0", "25.0", "20.0", "100,000", "1,678", "4.00", "2.00 (sdpa-cudnn)",
                           "3.9e-03"]
    # B=16 graph: cudnn failed, so the best peer is flash: 320 / 128.
    assert rows[3][7] == "n/a" and rows[3][11] == "2.50 (sdpa-flash)"
    assert "- sdpa-cudnn, B=16 L=65536 graph: RuntimeError: No available kernel." in lines

    write_json(report, tmp_path / "decode.json")
    assert json.loads((tmp_path / "decode.json").read_text()) == report
    bench_decode.plot(report, tmp_path / "decode.png")
    assert (tmp_path / "decode.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.gpu
def test_quick_gpu_benchmark(tmp_path):
    report = bench_decode.run(device="cuda", quick=True, out_dir=str(tmp_path))
    for row in report["results"]:
        assert row["check"]["max_abs_diff"] <= 2e-2
        assert all("ms" in t for t in row["timings"]["tritonzoo"].values())
    assert (tmp_path / "decode.md").exists() and (tmp_path / "decode.png").exists()
