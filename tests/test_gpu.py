"""The Triton kernels on a CUDA GPU at real sizes (run with `pytest -m gpu` on the device).

bf16 at real sizes is checked here (the CPU suite runs bf16 in the interpreter at small
sizes only, where the kernels' dots upcast bf16 tiles: its bf16 tl.dot is broken). Each
launch configuration is a compile of about 2 seconds, so the cases are chosen to cover
features and shapes without compiling the same thing twice: .ci/gpu-report runs these
with TRITONZOO_AUTOTUNE=first (one candidate per key), and test_every_autotune_candidate
runs each candidate once.
"""

from __future__ import annotations

import pytest
import torch

import attention_oracle as oracle
from kernels import autotune, flash_attn_func, flash_attn_varlen_func, patch_sdpa, sdpa_stats
from kernels import flash_attention as fa

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _inputs(B, Sq, Sk, H, Hk, D, dtype):
    return [torch.randn(B, S, h, D, device=DEV, dtype=dtype, requires_grad=True)
            for S, h in ((Sq, H), (Sk, Hk), (Sk, Hk))]


def _check_against_oracle(q, k, v, out, grads, dout, **kwargs):
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    pt_in = [x.detach().requires_grad_() for x in (q, k, v)]
    ref, _ = oracle.attention(*ref_in, **kwargs)
    pt, _ = oracle.attention(*pt_in, dtype=q.dtype, **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    pt_grads = torch.autograd.grad(pt, pt_in, dout)
    oracle.assert_fa2_close(out, ref, pt, "out")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        oracle.assert_fa2_close(g, r, p, name)


# bf16 at every head-dim block (and 80, padded to 128); fp16 differs only in the dots'
# input type, so at the two common head dims.
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, d) for d in (64, 128, 256, 80)]
                         + [(torch.float16, d) for d in (64, 128)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(1024, 1024), (1000, 2047), (2047, 1000)])
def test_real_sizes(dtype, head_dim, causal, seqlens):
    q, k, v = _inputs(2, *seqlens, 8, 2, head_dim, dtype)
    out = flash_attn_func(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_against_oracle(q, k, v, out, grads, dout, causal=causal)


_TUNED = {"fwd": (fa._FWD_CANDIDATES, "_attn_fwd_tuned"), "dkdv": (fa._DKDV_CANDIDATES, "_attn_bwd_dkdv_tuned"),
          "dq": (fa._DQ_CANDIDATES, "_attn_bwd_dq_tuned")}


@pytest.mark.parametrize("kernel,head_dim,config", [(name, d, c) for name, (table, _) in _TUNED.items()
                                                    for d in (64, 128, 256) for c in table[d]], ids=str)
def test_every_autotune_candidate(monkeypatch, request, kernel, head_dim, config):
    """Each bf16 candidate of each kernel, forced, on unaligned lengths with GQA, causal:
    whatever the autotuner picks on any shape was run here once."""
    table, name = _TUNED[kernel]
    tuner = getattr(fa, name)
    monkeypatch.setenv(autotune.AUTOTUNE_VARIABLE, "first")
    monkeypatch.setitem(table, head_dim, [config])
    tuner.forget()  # the choices made for earlier keys
    request.addfinalizer(tuner.forget)  # and this forced one, for later tests
    q, k, v = _inputs(2, 777, 1500, 8, 2, head_dim, torch.bfloat16)
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    best = tuner.best_config
    assert (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages) == config
    _check_against_oracle(q, k, v, out, grads, dout, causal=True)


def test_parallel_compile_of_a_new_key(monkeypatch):
    """The default autotuning: a key no other test uses (head dim 96, GQA group 3, softcap)
    compiles the forward's candidates on threads, times each (all finite: every one compiled
    and ran) and keeps one; the output matches the oracle."""
    monkeypatch.setenv(autotune.AUTOTUNE_VARIABLE, "full")
    monkeypatch.delenv(autotune.THREADS_VARIABLE, raising=False)
    q, k, v = _inputs(2, 600, 600, 6, 2, 96, torch.bfloat16)
    out = flash_attn_func(q, k, v, softcap=20.0)
    timings = fa._attn_fwd_tuned.configs_timings
    assert len(timings) == len(fa._FWD_CANDIDATES[128])
    assert all(t[0] < float("inf") for t in timings.values()), timings
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_against_oracle(q, k, v, out, grads, dout, softcap=20.0)


@pytest.mark.parametrize("feature", ["window", "alibi", "softcap", "fp32"])
def test_features_at_real_sizes(feature):
    dtype = torch.float32 if feature == "fp32" else torch.bfloat16
    q, k, v = _inputs(2, 777, 1500, 4, 4, 128, dtype)
    kwargs, oracle_kwargs = {}, {}
    if feature == "window":
        kwargs, oracle_kwargs = dict(causal=True, window_size=(256, 0)), dict(causal=True, window=(256, 0))
    elif feature == "alibi":
        slopes = torch.rand(4, device=DEV)
        kwargs, oracle_kwargs = dict(alibi_slopes=slopes), dict(alibi_slopes=slopes)
    elif feature == "softcap":
        kwargs = oracle_kwargs = dict(softcap=30.0)
    out = flash_attn_func(q, k, v, **kwargs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_against_oracle(q, k, v, out, grads, dout, **oracle_kwargs)


def test_varlen_real_sizes():
    lengths = [1, 513, 2048, 77, 1200]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(lengths), 8, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lengths), 2, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for b in range(len(lengths)):
        s = slice(cu[b].item(), cu[b + 1].item())
        ref, _ = oracle.attention(q[s][None].double(), k[s][None].double(), v[s][None].double(), causal=True)
        pt, _ = oracle.attention(q[s][None], k[s][None], v[s][None], dtype=q.dtype, causal=True)
        oracle.assert_fa2_close(out[s][None], ref, pt, f"sequence {b}")
    assert all(torch.isfinite(g).all() for g in grads)


def test_dropout_mask_matches_cpu_mirror_and_oracle():
    from kernels import attention_reference, flash_attention

    seed = torch.tensor([123456789], dtype=torch.int64, device=DEV)
    gpu_mask = flash_attention.dropout_mask(seed, 2, 4, 300, 517, 0.1, DEV)
    cpu_mask = attention_reference.dropout_mask(seed.cpu(), 2, 4, 300, 517, 0.1, "cpu")
    assert torch.equal(gpu_mask.cpu(), cpu_mask)
    q, k, v = _inputs(2, 300, 517, 4, 4, 64, torch.float16)
    out, _, probs = flash_attn_func(q, k, v, dropout_p=0.1, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = probs >= 0
    _check_against_oracle(q, k, v, out, grads, dout, causal=True, keep=keep, dropout_p=0.1)


def test_deterministic_backward_at_size():
    q, k, v = _inputs(4, 2048, 2048, 16, 4, 128, torch.bfloat16)
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_opcheck_cuda():
    q, k, v = (x.detach().requires_grad_() for x in _inputs(2, 128, 200, 4, 2, 64, torch.bfloat16))
    args = (q, k, v, None, None, 128, 200, None, None, torch.tensor([5], device=DEV), 0.1, 0.125, 0.0, -1, 0, True)
    torch.library.opcheck(torch.ops.tritonzoo.attention_fwd.default, args)


def test_compile_fullgraph_inductor():
    torch._dynamo.reset()

    def block(q, k, v):
        return flash_attn_func(q, k, v, causal=True).float().square().mean()

    _check_compiled(block, _inputs(2, 512, 512, 8, 8, 64, torch.bfloat16))


def _check_compiled(block, inputs):
    """block(*inputs) (a scalar loss) compiled with inductor, fullgraph: its loss and gradients as eager's."""
    eager_loss = block(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    loss = torch.compile(block, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_inductor_varlen(causal):
    torch._dynamo.reset()
    lengths = [300, 1, 212, 511]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(sum(lengths), 8, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def block(q, k, v):
        out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
        return out.float().square().mean()

    _check_compiled(block, (q, k, v))


def test_patch_sdpa_timm_vit_bf16_autocast():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).to(DEV)
    x = torch.randn(8, 3, 224, 224, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(x).float()
        sdpa_stats(reset=True)
        with patch_sdpa():
            patched = model(x).float()
    assert sdpa_stats().get("served by the Triton kernel", 0) == 12
    torch.testing.assert_close(patched, plain, rtol=2e-2, atol=2e-2)
