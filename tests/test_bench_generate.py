"""The generation benchmark's harness on CPU: a smoke run through `zoo bench generate`, the
accuracy gate, the table from a synthetic GPU report. The GPU run itself needs CUDA."""

import dataclasses
import json
import math

import pytest
import torch

import kernels
from tasks import bench_generate, cli
from tasks.bench_generate import Workload

pytest.importorskip("transformers")


def test_workloads():
    assert bench_generate.gpu_workloads() == [Workload(b, 512, 256) for b in (1, 8, 32)]
    assert bench_generate.gpu_workloads(quick=True) == [Workload(1, 512, 64), Workload(32, 512, 64)]
    ids, mask = bench_generate.make_prompts(Workload(5, 40, 3), vocab=50, device="cpu")
    lengths = mask.sum(1)
    assert ids.shape == (5, 40) and lengths[0] == 40 and bool((lengths >= 30).all())
    assert bool((mask[:, -1] == 1).all()) and bool((mask.diff(dim=1) >= 0).all())  # left padding


def test_cli_smoke_run_on_cpu(tmp_path, capsys):
    argv = ["bench", "generate", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert bench_generate.CPU_TITLE in printed
    report = json.loads((tmp_path / "generate.json").read_text())
    meta = report["metadata"]
    for key in ("device", "torch", "triton", "date", "command", "timing", "dtype", "hf"):
        assert meta[key], key
    assert meta["command"] == "zoo " + " ".join(argv)
    assert report["implementations"] == ["zoo-triton", "zoo-sdpa", "hf"]
    for row, w in zip(report["results"], bench_generate.cpu_workloads()):
        assert (row["batch"], row["prompt_len"], row["new_tokens"]) == (w.batch, w.prompt_len, w.new_tokens)
        # fp32, one set of weights: the same greedy tokens as Hugging Face, and logits within fp32 rounding
        assert row["token_agreement"] == {"zoo-triton vs hf": 1.0, "zoo-sdpa vs hf": 1.0}
        assert max(row["check"]["max_abs_logit_error"].values()) < 1e-4
        for name in report["implementations"]:
            t = row["timings"][name]
            assert "error" not in t, t
            assert math.isclose(t["tokens_per_s"], w.batch * w.new_tokens / t["seconds"])
            assert 0 < t["prefill_seconds"] and t["extra_peak_mib"] is None  # no CUDA memory on a CPU
    assert (tmp_path / "generate.md").read_text() in printed


def test_full_run_needs_a_gpu(capsys):
    with pytest.raises(ValueError, match="CUDA"):
        bench_generate.run(device="cpu", quick=False, out_dir=None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "generate", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--quick" in capsys.readouterr().err


def test_a_wrong_decoding_step_stops_the_run(monkeypatch):
    real = kernels.flash_attn_with_kvcache

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) + 0.05

    monkeypatch.setattr(kernels, "flash_attn_with_kvcache", wrong)
    with pytest.raises(bench_generate.AccuracyError, match="zoo-triton's cached logits"):
        bench_generate.run(device="cpu", quick=True, out_dir=None, workloads=[Workload(1, 8, 2)])


def test_every_row_generates_exactly_n_tokens():
    """Tokens/s counts N per row: a model that stops at GPT-2's end-of-text token must not be credited."""
    config = dict(preset="gpt2", overrides=dict(dim=32, depth=1, heads=2, vocab_size=50257, max_seq_len=32,
                                                dropout=0.0, attn_dropout=0.0))
    with kernels.reference_only():
        hf, _, zoo_models, template = bench_generate.build_models(config, "cpu", torch.float32)
    assert hf.config.eos_token_id == 50256  # what from_hf would copy
    assert template.cfg.eos_token_id is None and all(m.cfg.eos_token_id is None for m in zoo_models.values())
    model = zoo_models["zoo-sdpa"]
    with torch.no_grad():  # greedy decoding emits end-of-text: the final norm outputs v, aligned with row 50256
        v = torch.randn(32)
        model.backbone.norm.weight.zero_()
        model.backbone.norm.bias.copy_(v)
        model.token_embed.weight[50256] = 10 * v
    fns = bench_generate.generators(zoo_models, hf)
    ids, mask = bench_generate.make_prompts(Workload(2, 6, 5), 50257, "cpu")
    with kernels.reference_only(), torch.no_grad():
        assert fns["zoo-sdpa"](ids, mask, 5).shape == (2, 11)
        assert bool((fns["zoo-sdpa"](ids, mask, 5)[:, 6:] == 50256).all())
        stopping = bench_generate.generators({"stops": model}, None)["stops"]
        model.cfg = dataclasses.replace(model.cfg, eos_token_id=50256)
        with pytest.raises(RuntimeError, match=r"stops returned \(2, 7\) ids, not the prompts \+ 5 new tokens"):
            stopping(ids, mask, 5)


def test_table_from_synthetic_report():
    timings = {"zoo-triton": {"seconds": 2.0, "tokens_per_s": 4096.0, "prefill_seconds": 0.05,
                              "decode_tokens_per_s": 4180.0, "extra_peak_mib": 900.0},
               "zoo-sdpa": {"seconds": 3.0, "tokens_per_s": 2730.7, "prefill_seconds": 0.06,
                            "decode_tokens_per_s": 2780.0, "extra_peak_mib": 950.0},
               "hf": {"error": "RuntimeError: out of memory"}}
    report = {"metadata": {"title": bench_generate.GPU_TITLE, "device": "NVIDIA H100 (synthetic)", "torch": "2.11",
                           "triton": "3.6", "dtype": "bfloat16", "date": "2026-11-23", "command": "zoo bench generate",
                           "timing": "synthetic", "hf": "synthetic"},
              "model": {"preset": "gpt2"}, "implementations": list(timings),
              "results": [{"batch": 32, "prompt_len": 512, "new_tokens": 256, "timings": timings,
                           "token_agreement": {"zoo-triton vs zoo-sdpa": 0.875},
                           "check": {"max_abs_logit_error": {"zoo-triton": 0.02, "zoo-sdpa": 0.03}}}]}
    lines = bench_generate.format_table(report).splitlines()
    rows = {line.split("|")[4].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| 32 ")}
    assert rows["zoo-triton"][4:] == ["4,096", "4,180", "50", "900", "", "88%"]
    assert rows["zoo-sdpa"][4:9] == ["2,731", "2,780", "60", "950", "1.50x"]
    assert rows["hf"][4:9] == ["n/a"] * 4 + [""]
    assert "- hf, B=32: RuntimeError: out of memory" in lines


@pytest.mark.gpu
def test_quick_gpu_run(tmp_path):
    report = bench_generate.run(device="cuda", quick=True, out_dir=str(tmp_path))
    for row in report["results"]:
        assert all("tokens_per_s" in row["timings"][name] for name in ("zoo-triton", "zoo-sdpa"))
    assert (tmp_path / "generate.md").exists()
