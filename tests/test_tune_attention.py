"""kernels.flash_attention.forced_config and tasks.tune_attention: a forced launch
configuration is the one launched, computes what the autotuned kernels do, and the tool
checks each config against torch's SDPA. In the interpreter on CPU (conftest sets it)."""

from __future__ import annotations

import pytest
import torch

from kernels import flash_attention, flash_attn_func
from tasks import tune_attention


class _Recorder:
    """Stands in for a Triton kernel: records the launch keywords, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _reference(q, k, v, causal):
    qd, kd, vd = (x.detach().double().transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
    return out.transpose(1, 2)


@pytest.mark.parametrize("kernel", flash_attention.FORCEABLE)
def test_forced_config_is_launched_and_computes_the_same(kernel, monkeypatch):
    if not flash_attention.INTERPRET:
        pytest.skip("checks the interpreter's launches")
    attr = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}[kernel]
    recorder = _Recorder(getattr(flash_attention, attr))
    monkeypatch.setattr(flash_attention, attr, recorder)
    q, k, v = (torch.randn(1, 40, 2, 32, requires_grad=True) for _ in range(3))
    config = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)
    with flash_attention.forced_config(kernel, config):
        out = flash_attn_func(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert len(recorder.launches) == 1 and {k: recorder.launches[0][k] for k in config} == config
    plain_out = flash_attn_func(q, k, v, causal=True)  # the interpreter's own tiles again
    plain_grads = torch.autograd.grad(plain_out, (q, k, v), torch.ones_like(plain_out))
    assert recorder.launches[1]["BLOCK_N"] != 64 and "num_stages" not in recorder.launches[1]
    torch.testing.assert_close(out.double(), _reference(q, k, v, True), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-6)
    for g, p in zip(grads, plain_grads):
        torch.testing.assert_close(g, p, rtol=0, atol=1e-5)


def test_forced_config_refuses_bad_input_and_restores():
    with pytest.raises(ValueError, match="kernel must be one of"):
        with flash_attention.forced_config("bwd", dict(BLOCK_M=16, BLOCK_N=16)):
            pass
    with pytest.raises(ValueError, match=r"config needs \['BLOCK_N'\]"):
        with flash_attention.forced_config("fwd", dict(BLOCK_M=16)):
            pass
    with flash_attention.forced_config("fwd", dict(BLOCK_M=16, BLOCK_N=16)):
        with flash_attention.forced_config("fwd", dict(BLOCK_M=32, BLOCK_N=32)):
            assert flash_attention._forced["fwd"]["BLOCK_M"] == 32
        assert flash_attention._forced["fwd"]["BLOCK_M"] == 16
    assert flash_attention._forced == {}


@pytest.mark.parametrize("text, expected", [
    ("64,32,8,3", dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3)),
    ("16,128,8,2,160", dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=2, maxnreg=160))])
def test_parse_config(text, expected):
    assert tune_attention.parse_config(text) == expected
    assert tune_attention.describe(expected) == text


@pytest.mark.parametrize("text", ["64,32,8", "64,32,8,3,1,1", "64,x,8,3", "64,0,8,3", ""])
def test_parse_config_refuses_malformed_text(text):
    with pytest.raises(ValueError, match="BLOCK_M,BLOCK_N,num_warps,num_stages"):
        tune_attention.parse_config(text)


def test_table_configs_are_the_candidate_rows():
    assert tune_attention.table_configs("dkdv", 128)[0] == dict(
        zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), flash_attention._DKDV_CANDIDATES[128][0]))
    assert len(tune_attention.table_configs("fwd", 80)) == len(flash_attention._FWD_CANDIDATES[128])


def test_tool_checks_each_config_against_sdpa():
    """Every config's gradients within float32 rounding of torch's SDPA; a tile the kernel
    cannot build (BLOCK_N not a power of 2) is reported as failed, not raised."""
    if not flash_attention.INTERPRET:
        pytest.skip("the interpreter's run of the tool")
    configs = [dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1), dict(BLOCK_M=32, BLOCK_N=24, num_warps=4,
                                                                            num_stages=1)]
    report = tune_attention.run("dkdv", 1, 33, 2, 32, True, configs, "cpu", warmup=1, rep=1)
    good, bad = report["rows"]
    assert good["ok"] and good["rel_error"] < 1e-5 and good["ms"] > 0
    assert "error" in bad and "ok" not in bad
    table = tune_attention.format_table(report)
    assert "| 16,32,4,1 |" in table and "| 32,24,4,1 | failed:" in table


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", flash_attention.FORCEABLE)
def test_every_table_config_is_right_when_forced_on_the_gpu(kernel):
    """On the GPU: each candidate of the D = 128 row, forced, matches SDPA flash (bf16), and
    a config outside the tables with maxnreg launches too."""
    configs = tune_attention.table_configs(kernel, 128) + [dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2,
                                                                maxnreg=168)]
    report = tune_attention.run(kernel, 2, 512, 4, 128, kernel != "dq", configs, "cuda", warmup=5, rep=10)
    assert all(row.get("ok") for row in report["rows"]), tune_attention.format_table(report)


@pytest.mark.parametrize("argv, says", [
    (["--kernel", "dkdv", "--head-dim", "300"], "--head-dim must be 1 to 256, got 300"),
    (["--kernel", "fwd", "--seqlen", "0"], "--seqlen must be at least 1, got 0"),
    (["--kernel", "dq", "--heads", "-2"], "--heads must be at least 1, got -2"),
    (["--kernel", "dq", "--configs", "64,64,8"], "a config is BLOCK_M,BLOCK_N,num_warps,num_stages"),
    (["--kernel", "bwd"], "invalid choice: 'bwd'")])
def test_tool_refuses_bad_arguments(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune_attention.main(argv)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err
