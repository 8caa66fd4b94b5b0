"""flash_attn_func / flash_attn_varlen_func against the float64 oracle.

Each case runs twice: through the Triton kernels (the interpreter on CPU, the GPU when
there is one) and through the PyTorch path (`reference_only`). Sizes are small so the
interpreter gets through them; tests/test_gpu.py repeats the checks at real sizes.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import attention_oracle as oracle
from kernels import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func, reference_only

BACKENDS = ["triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


def _inputs(B, Sq, Sk, H, Hk, D, dtype, device, requires_grad=True):
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, Hk, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, Hk, D, dtype=dtype, device=device)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _check(run, q, k, v, name="", **oracle_kwargs):
    """Runs `run(q, k, v) -> out` and compares out and dq, dk, dv with the oracle by FA2's rule."""
    out = run(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    cpu = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    ref, _ = oracle.attention(*cpu, **oracle_kwargs)
    ref_grads = torch.autograd.grad(ref, cpu, dout.cpu().double())
    # Plain torch math in the inputs' dtype: the yardstick of FA2's rule.
    pt, _ = oracle.attention(*cpu, dtype=q.dtype, **oracle_kwargs)
    pt_grads = torch.autograd.grad(pt, cpu, dout.cpu())
    oracle.assert_fa2_close(out.cpu(), ref, pt, f"{name} out")
    for label, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        oracle.assert_fa2_close(g.cpu(), r, p, f"{name} {label}")
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", [(1, 1), (17, 17), (1, 40), (33, 17), (17, 70), (129, 129)])
def test_matches_oracle(backend, dtype, causal, seqlens):
    device, ctx = backend
    Sq, Sk = seqlens
    q, k, v = _inputs(2, Sq, Sk, 2, 2, 32, dtype, device)
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [8, 16, 40, 64, 80, 96, 128, 256])
def test_head_dims(backend, head_dim):
    device, ctx = backend
    q, k, v = _inputs(1, 20, 37, 2, 1, head_dim, torch.float16, device)
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("nheads_k", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query(backend, nheads_k, causal):
    device, ctx = backend
    q, k, v = _inputs(2, 24, 45, 6, nheads_k, 16, torch.float32, device)
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("window,causal", [((4, -1), False), ((-1, 3), False), ((5, 2), False), ((6, 6), True),
                                           ((0, 0), False)])
@pytest.mark.parametrize("seqlens", [(40, 40), (23, 61), (61, 23)])
def test_sliding_window(backend, window, causal, seqlens):
    device, ctx = backend
    q, k, v = _inputs(1, *seqlens, 2, 2, 16, torch.float32, device)
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=causal, window_size=window), q, k, v,
               causal=causal, window=window)


def test_window_at_least_seqlen_is_unbounded(backend):
    """FlashAttention-2's rule: a window side >= seqlen_k means no limit on that side."""
    device, ctx = backend
    q, k, v = _inputs(1, 30, 10, 1, 1, 16, torch.float32, device, requires_grad=False)
    with ctx():
        wide = flash_attn_func(q, k, v, window_size=(10, 10))
        full = flash_attn_func(q, k, v)
    torch.testing.assert_close(wide, full, rtol=0, atol=0)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi(backend, per_batch, causal):
    device, ctx = backend
    B, H = 2, 4
    q, k, v = _inputs(B, 19, 33, H, 2, 16, torch.float32, device)
    slopes = torch.rand(B, H) if per_batch else torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=causal, alibi_slopes=slopes.to(device)), q, k, v,
               causal=causal, alibi_slopes=slopes)


@pytest.mark.parametrize("softcap", [5.0, 1e4])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_and_scale(backend, causal, softcap):
    """A cap that bites, and a large one (scores near tanh's 0, where it must not lose precision)."""
    device, ctx = backend
    q, k, v = _inputs(2, 21, 34, 2, 2, 16, torch.float32, device)
    if softcap == 5.0:
        q.data *= 4  # large scores, so the cap bites
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=causal, softcap=softcap, softmax_scale=0.37), q, k, v,
               causal=causal, softcap=softcap, scale=0.37)


@pytest.mark.parametrize("scale", [0.0, -0.25])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_and_negative_scale(backend, causal, scale):
    """Any finite scale is accepted: 0 averages v over the visible keys. (torch's CPU flash kernel,
    which the PyTorch path uses for plain calls, returns NaN for causal with a scale <= 0.)"""
    device, ctx = backend
    q, k, v = _inputs(2, 17, 17, 2, 2, 16, torch.float32, device)
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=causal, softmax_scale=scale), q, k, v,
               causal=causal, scale=scale)
        # Packed, two sequences with as many queries as keys (the case the PyTorch path ran fused).
        packed = [x[0].detach().requires_grad_() for x in (q, k, v)]
        cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=device)
        out = flash_attn_varlen_func(*packed, cu, cu, 12, 12, causal=causal, softmax_scale=scale)
        grads = torch.autograd.grad(out.sum(), packed)
    cpu = [x.detach().cpu().double().requires_grad_() for x in packed]
    ref, _ = oracle.attention_varlen(*cpu, cu.cpu(), cu.cpu(), causal=causal, scale=scale)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), cpu)):
        torch.testing.assert_close(g.cpu().double(), r, rtol=0, atol=1e-4)


def test_returned_lse_and_its_gradient(backend):
    device, ctx = backend
    q, k, v = _inputs(2, 40, 20, 2, 2, 16, torch.float32, device)
    with ctx():
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    cpu = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = oracle.attention(*cpu, causal=True)
    # Rows 0..19 see no key (causal, bottom-right, Sq = 2 Sk): lse is +inf there.
    assert torch.isposinf(lse[:, :, :20]).all() and torch.isposinf(ref_lse[:, :, :20]).all()
    torch.testing.assert_close(lse.cpu().double()[:, :, 20:], ref_lse[:, :, 20:], rtol=0, atol=1e-5)
    # A loss that uses lse: its gradient must flow back through the kernels too.
    w = torch.randn_like(lse[:, :, 20:])
    loss = (out * 0.5).sum() + (lse[:, :, 20:] * w).sum()
    ref_loss = (ref_out * 0.5).sum() + (ref_lse[:, :, 20:] * w.cpu().double()).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_loss, cpu)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", ["sum", "transposed_weights"])
def test_lse_gradient_of_any_layout(backend, loss):
    """The gradient autograd hands to lse need not be laid out like lse: lse.sum() gives an
    expanded tensor (stride 0), a transposed weight a permuted one. Padded and packed."""
    device, ctx = backend
    q, k, v = _inputs(2, 24, 24, 2, 2, 16, torch.float32, device)
    cu = torch.tensor([0, 10, 30, 48], dtype=torch.int32)
    packed = [x.detach().reshape(48, 2, 16).requires_grad_() for x in (q, k, v)]
    for inputs, run, ref_run in [
        ((q, k, v), lambda *a: flash_attn_func(*a, return_attn_probs=True)[1],
         lambda *a: oracle.attention(*a)[1]),
        (packed, lambda *a: flash_attn_varlen_func(*a, cu.to(device), cu.to(device), 20, 20,
                                                   return_attn_probs=True)[1],
         lambda *a: oracle.attention_varlen(*a, cu, cu)[1]),
    ]:
        with ctx():
            lse = run(*inputs)
        w = torch.randn(lse.shape[::-1], dtype=torch.float64).t() if lse.dim() == 2 else \
            torch.randn(lse.shape[0], lse.shape[2], lse.shape[1], dtype=torch.float64).transpose(1, 2)

        def scalar(x):
            return x.sum() if loss == "sum" else (x * w.to(x.dtype).to(x.device)).sum()

        grads = torch.autograd.grad(scalar(lse), inputs)
        cpu = [x.detach().cpu().double().requires_grad_() for x in inputs]
        ref_grads = torch.autograd.grad(scalar(ref_run(*cpu)), cpu, allow_unused=True)  # lse does not use v
        for g, r, x in zip(grads, ref_grads, cpu):
            torch.testing.assert_close(g.cpu().double(), torch.zeros_like(x) if r is None else r, rtol=0, atol=1e-5)


def test_strided_alibi_slopes_and_cu_seqlens(backend):
    """Slopes and cumulative lengths given as strided views (x[::2], x.t()) are read by value."""
    device, ctx = backend
    B, H = 2, 4
    q, k, v = _inputs(B, 19, 33, H, 2, 16, torch.float32, device)
    per_batch = torch.rand(H, B).t()  # (B, H), stride (1, B)
    per_head = torch.rand(2 * H)[::2]
    for slopes in (per_batch, per_head):
        with ctx():
            _check(lambda *a: flash_attn_func(*a, causal=True, alibi_slopes=slopes.to(device)), q, k, v,
                   causal=True, alibi_slopes=slopes.contiguous())
    cu = torch.tensor([0, 99, 10, 99, 24], dtype=torch.int32)[::2]  # [0, 10, 24], stride 2
    packed = [x.detach()[:, :12].reshape(24, -1, 16).requires_grad_() for x in (q, k, v)]
    with ctx():
        out = flash_attn_varlen_func(*packed, cu.to(device), cu.to(device), 14, 14, causal=True)
    ref, _ = oracle.attention_varlen(*[x.detach().cpu().double() for x in packed], cu.contiguous(),
                                     cu.contiguous(), causal=True)
    torch.testing.assert_close(out.detach().cpu().double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["causal_short_keys", "window_gap"])
def test_rows_without_keys_are_zero(backend, case):
    device, ctx = backend
    if case == "causal_short_keys":
        q, k, v = _inputs(1, 50, 7, 2, 2, 16, torch.float32, device)
        kwargs, empty = dict(causal=True), slice(0, 43)
    else:
        # Window (0, 0) with Sq > Sk: query i sees only key i - 18.
        q, k, v = _inputs(1, 30, 12, 2, 2, 16, torch.float32, device)
        kwargs, empty = dict(window_size=(0, 0)), slice(0, 18)
    with ctx():
        out = flash_attn_func(q, k, v, **kwargs)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (out[:, empty] == 0).all()
    assert (dq[:, empty] == 0).all()


def test_backward_is_deterministic(backend):
    device, ctx = backend
    q, k, v = _inputs(2, 70, 70, 4, 1, 32, torch.float16, device)
    with ctx():
        out = flash_attn_func(q, k, v, causal=True)
        dout = torch.randn_like(out)
        first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_backward_takes_the_forwards_path():
    """A forward run under reference_only keeps its backward on the PyTorch path, even when
    the backward runs outside the block (or on another thread, as CUDA autograd does)."""
    q, k, v = _inputs(1, 20, 20, 2, 2, 16, torch.float32, "cpu")
    with reference_only():
        out = flash_attn_func(q, k, v, causal=True)
        inside = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True)
    outside = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))


def test_packed_qkv_strided_views(backend):
    """qkv (B, S, 3, H, D) unbinds into strided views; the kernels take them as they are."""
    device, ctx = backend
    qkv = torch.randn(2, 33, 3, 2, 16, device=device, requires_grad=True)
    with ctx():
        out = flash_attn_qkvpacked_func(qkv, causal=True)
    ref, _ = oracle.attention(*qkv.detach().cpu().unbind(2), causal=True)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# Variable-length (packed) batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 5))])
def test_varlen(backend, causal, window):
    device, ctx = backend
    lens_q, lens_k = [5, 0, 33, 17, 1], [9, 4, 33, 12, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    H, Hk, D = 4, 2, 16
    q = torch.randn(sum(lens_q), H, D, device=device, requires_grad=True)
    k = torch.randn(sum(lens_k), Hk, D, device=device, requires_grad=True)
    v = torch.randn(sum(lens_k), Hk, D, device=device, requires_grad=True)
    with ctx():
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q.to(device), cu_k.to(device), max(lens_q), max(lens_k),
                                             causal=causal, window_size=window, return_attn_probs=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    cpu = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = oracle.attention_varlen(*cpu, cu_q, cu_k, causal=causal, window=window)
    ref_grads = torch.autograd.grad(ref, cpu, dout.cpu().double())
    assert lse.shape == (H, sum(lens_q))
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu().double()[finite], ref_lse[finite], rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=0, atol=1e-5)


def test_varlen_rows_past_the_last_sequence_are_zero(backend):
    device, ctx = backend
    q = torch.randn(12, 2, 16, device=device)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    with ctx():
        out = flash_attn_varlen_func(q, q, q, cu, cu, 5, 5)
    assert (out[9:] == 0).all()
    ref, _ = oracle.attention_varlen(q.cpu(), q.cpu(), q.cpu(), cu.cpu(), cu.cpu())
    torch.testing.assert_close(out[:9].cpu().double(), ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------


def _dropout_run(q, k, v, p, **kwargs):
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **kwargs)
    return out, lse, probs


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_oracle_with_the_kernels_mask(backend, causal):
    """Forward and backward use one mask; it is the mask return_attn_probs reports."""
    device, ctx = backend
    p = 0.3
    q, k, v = _inputs(2, 33, 45, 2, 1, 16, torch.float32, device)
    with ctx():
        out, _, probs = _dropout_run(q, k, v, p, causal=causal)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = (probs >= 0).cpu()
    # Masked-out (causal) entries are 0 either way; check the draw where it matters.
    allowed = probs.cpu() != 0
    kept_fraction = keep[allowed].float().mean().item()
    assert abs(kept_fraction - (1 - p)) < 0.05, kept_fraction
    cpu = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref, _ = oracle.attention(*cpu, causal=causal, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, cpu, dout.cpu().double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=0, atol=1e-5)


def test_dropout_mask_is_the_same_on_both_paths(device):
    """The Triton kernels and the PyTorch path draw the same Philox stream."""
    from kernels import attention_reference, flash_attention

    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64, device=device)
    kernel_mask = flash_attention.dropout_mask(seed, 2, 3, 37, 53, 0.25, device)
    torch_mask = attention_reference.dropout_mask(seed.cpu(), 2, 3, 37, 53, 0.25, "cpu")
    assert torch.equal(kernel_mask.cpu(), torch_mask)
    assert abs(torch_mask.float().mean().item() - 0.75) < 0.03


def test_inductor_compiles_dropout_on_the_pytorch_path():
    """torch.compile (inductor) of attention with dropout on the PyTorch path: forward and backward
    use the mask return_attn_probs reports, and the traced Philox draws what the eager one does.
    Before: inductor failed lowering the eager draw's int64 -> int32 view (a stride-0 layout)."""
    from kernels import attention_reference

    torch._dynamo.reset()
    p = 0.3
    q, k, v = _inputs(2, 9, 13, 2, 1, 16, torch.float32, "cpu")
    with reference_only():
        out, _, probs = torch.compile(_dropout_run, fullgraph=True)(q, k, v, p, causal=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = probs >= 0
    cpu = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = oracle.attention(*cpu, causal=True, keep=keep, dropout_p=p)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, torch.autograd.grad(ref, cpu, dout.double())):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-5)
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    compiled = torch.compile(attention_reference.dropout_mask, fullgraph=True)(seed, 2, 3, 37, 53, 0.25, "cpu")
    assert torch.equal(compiled, attention_reference.dropout_mask(seed, 2, 3, 37, 53, 0.25, "cpu"))


def test_philox_mirror_matches_known_answer():
    """Philox4x32-10 known-answer vectors (Salmon et al., Random123 kat_vectors)."""
    from kernels.attention_reference import philox_uint32

    def first_word(counter, key):
        word = key[0] | (key[1] << 32)
        seed = torch.tensor([word - (1 << 64) if word >= 1 << 63 else word], dtype=torch.int64)  # same bits
        c = [torch.tensor(x, dtype=torch.int64) for x in counter]
        return philox_uint32(seed, *c).item()

    assert first_word((0, 0, 0, 0), (0, 0)) == 0x6627E8D5
    assert first_word((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == 0x408F276D
    assert first_word((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == 0xD16CFE09


def test_dropout_is_reproducible_under_manual_seed(backend):
    device, ctx = backend
    q, k, v = _inputs(1, 20, 20, 2, 2, 16, torch.float32, device, requires_grad=False)
    with ctx():
        torch.manual_seed(7)
        a = flash_attn_func(q, k, v, dropout_p=0.5)
        torch.manual_seed(7)
        b = flash_attn_func(q, k, v, dropout_p=0.5)
        c = flash_attn_func(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dropout_is_unbiased(backend):
    """E[dropout attention] = attention: the mean over many draws converges to it."""
    device, ctx = backend
    q, k, v = _inputs(1, 8, 8, 1, 1, 16, torch.float32, device, requires_grad=False)
    draws = 200
    with ctx():
        mean = sum(flash_attn_func(q, k, v, dropout_p=0.4) for _ in range(draws)) / draws
        exact = flash_attn_func(q, k, v)
    # Standard error of the mean of each entry is ~ |v| * sqrt(p/(1-p)) / sqrt(draws * keys).
    assert (mean - exact).abs().max().item() < 0.25


# --------------------------------------------------------------------------------------
# bf16 (in the interpreter, the kernels' dots upcast bf16 tiles: its bf16 tl.dot is broken)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlens", [(45, 45), (17, 70)])
def test_bfloat16(backend, seqlens):
    device, ctx = backend
    q, k, v = _inputs(2, *seqlens, 4, 2, 32, torch.bfloat16, device)
    with ctx():
        _check(lambda *a: flash_attn_func(*a, causal=True), q, k, v, causal=True)


def _spy_on_torchs_flash(monkeypatch) -> list:
    """The calls the PyTorch path makes to torch's flash attention: "fwd" and "bwd", in order."""
    from kernels import attention_reference as ref

    calls = []
    fast_fwd, fast_bwd = ref._torch_flash_forward, ref._torch_flash_backward
    monkeypatch.setattr(ref, "_torch_flash_forward", lambda *a: calls.append("fwd") or fast_fwd(*a))
    monkeypatch.setattr(ref, "_torch_flash_backward", lambda *a: calls.append("bwd") or fast_bwd(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "cross", "gqa", "causal, Sq != Sk"])
def test_reference_path_plain_attention_runs_torchs_flash(monkeypatch, dtype, case):
    """On the PyTorch path, plain attention runs torch's fused CPU flash attention (in float32):
    the same outputs, log-sum-exp and gradients as the chunked path, and the oracle's by
    FA2's rule. Causal with Sq != Sk (FA2's bottom-right diagonal, not torch's is_causal)
    stays on the chunked path."""
    from kernels import attention_reference as ref

    Sq, Sk, H, Hk = {"causal": (33, 33, 2, 2), "cross": (17, 40, 2, 2), "gqa": (29, 29, 4, 1),
                     "causal, Sq != Sk": (20, 30, 2, 1)}[case]
    causal = case != "cross"
    q, k, v = _inputs(2, Sq, Sk, H, Hk, 32, dtype, "cpu")
    calls = _spy_on_torchs_flash(monkeypatch)

    def run():
        with reference_only():
            out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
            return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    dout = torch.randn(2, Sq, H, 32, dtype=dtype)
    fast = run()
    assert calls == ([] if case == "causal, Sq != Sk" else ["fwd", "bwd"])
    monkeypatch.setattr(ref, "plain_causal", lambda *a: None)
    chunked = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), fast, chunked):
        tol = 1e-5 if dtype == torch.float32 or name == "lse" else 1e-2  # bf16: one rounding apart at most
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    with reference_only():
        _check(lambda *a: flash_attn_func(*a, causal=causal), q, k, v, causal=causal)


def test_reference_path_computes_the_same_under_autocast():
    """autocast stays on inside a custom op's body: the PyTorch path's float32 scores and
    log-sum-exp must not drop to bf16 there (they did: 10x torch's error). Inputs of one dtype
    go in unchanged (bf16 here), so the results are bit for bit those without autocast; also
    packed batches under a half default dtype (Lightning's bf16-true), whose mask took that dtype."""
    q, k, v = _inputs(2, 33, 40, 4, 2, 16, torch.bfloat16, "cpu")
    cu_q, cu_k = torch.tensor([0, 30, 60], dtype=torch.int32), torch.tensor([0, 30, 70], dtype=torch.int32)

    def packed(q, k, v):  # two sequences of as many queries as keys, and of 30 queries over 40 keys
        return flash_attn_varlen_func(q.flatten(0, 1)[:60], k.flatten(0, 1)[:70], v.flatten(0, 1)[:70], cu_q, cu_k,
                                      30, 40, causal=True)

    calls = {"chunked (softcap)": lambda *a: flash_attn_func(*a, softcap=20.0, causal=True), "packed": packed}
    with reference_only():
        for name, call in calls.items():
            plain = call(q, k, v)
            plain_grads = torch.autograd.grad(plain.float().square().sum(), (q, k, v))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = call(q, k, v)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            assert torch.equal(out, plain), name
            for g, p in zip(grads, plain_grads):
                assert torch.equal(g, p), name
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                assert torch.equal(call(q, k, v), plain), name
            finally:
                torch.set_default_dtype(default)


def test_autocast_casts_like_sdpa():
    q, k, v = _inputs(1, 16, 16, 2, 2, 16, torch.float32, "cpu")
    with reference_only(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attn_func(q, k, v)
    assert out.dtype == torch.bfloat16
    ref, _ = oracle.attention(*(x.detach().bfloat16() for x in (q, k, v)))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-2)


def test_empty_batch_and_zero_length_keys(backend):
    device, ctx = backend
    with ctx():
        out = flash_attn_func(*_inputs(0, 5, 5, 2, 2, 16, torch.float32, device, requires_grad=False))
        assert out.shape == (0, 5, 2, 16)
        q, k, v = _inputs(1, 5, 0, 2, 2, 16, torch.float32, device, requires_grad=False)
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert (out == 0).all() and torch.isposinf(lse).all()


@pytest.mark.parametrize("max_seqlen", [0, 5])
@pytest.mark.parametrize("path", ["backend", "torch_math"])
def test_varlen_without_any_packed_key_or_query(backend, path, max_seqlen):
    """total_k = 0 or total_q = 0 with max_seqlen above the real maximum, as a padded batch
    allows: out 0, lse +inf, probs 0, zero gradients. Before: IndexError on the PyTorch path
    (its padding slots read a row 0 that an empty packed tensor lacks)."""
    device, ctx = backend
    if path == "torch_math":  # the PyTorch path without torch's fused ops
        device, ctx = "cpu", lambda: reference_only(native=False)
    cu = dict(dtype=torch.int32, device=device)
    q = torch.randn(1, 2, 16, device=device, requires_grad=True)
    k, v = (torch.randn(0, 2, 16, device=device, requires_grad=True) for _ in range(2))
    with ctx():
        out, lse, probs = flash_attn_varlen_func(q, k, v, torch.tensor([0, 0, 1], **cu), torch.tensor([0, 0, 0], **cu),
                                                 1, max_seqlen, return_attn_probs=True)
        assert (out == 0).all() and torch.isposinf(lse).all()
        assert probs.shape == (2, 2, 1, max_seqlen) and (probs == 0).all()
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert (dq == 0).all() and dk.shape == dv.shape == (0, 2, 16)
        q0 = torch.randn(0, 2, 16, device=device, requires_grad=True)
        k3, v3 = (torch.randn(3, 2, 16, device=device, requires_grad=True) for _ in range(2))
        out, lse, probs = flash_attn_varlen_func(q0, k3, v3, torch.tensor([0, 0], **cu), torch.tensor([0, 3], **cu),
                                                 4, 3 + max_seqlen, return_attn_probs=True)
        assert out.shape == (0, 2, 16) and probs.shape == (1, 2, 4, 3 + max_seqlen) and (probs == 0).all()
        dq, dk, dv = torch.autograd.grad(out.sum(), (q0, k3, v3), allow_unused=True)
    assert all(g is None or (g == 0).all() for g in (dk, dv))


def test_attention_probs(backend):
    """return_attn_probs gives softmax(scores) with the masks: rows sum to 1, masked entries are 0."""
    device, ctx = backend
    B, Sq, Sk, H = 1, 12, 30, 2
    q, k, _ = _inputs(B, Sq, Sk, H, H, 16, torch.float32, device, requires_grad=False)
    v = torch.zeros(B, Sk, H, 16, device=device)
    with ctx():
        _, _, probs = flash_attn_func(q, k, v, causal=True, window_size=(4, 0), return_attn_probs=True)
    # Attention with v = identity returns the probability matrix itself.
    eye = torch.eye(Sk, dtype=torch.float64).view(1, Sk, 1, Sk).expand(B, Sk, H, Sk)
    expected, _ = oracle.attention(q.cpu(), k.cpu(), eye, causal=True, window=(4, 0))
    torch.testing.assert_close(probs.cpu().double(), expected.permute(0, 2, 1, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1).cpu(), torch.ones(B, H, Sq), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------
# kernels.attention: key-padding masks (the models' entry point)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(backend, causal):
    device, ctx = backend
    from kernels import attention

    B, Sq, Sk = 3, 19, 27
    q, k, v = _inputs(B, Sq, Sk, 4, 2, 16, torch.float32, device)
    keep = torch.ones(B, Sk, dtype=torch.bool)
    keep[1, 20:] = False  # right padding
    keep[2, :9] = False  # left padding
    with ctx():
        _check(lambda *a: attention(*a, causal=causal, key_padding_mask=keep.to(device)), q, k, v,
               causal=causal, bias=keep[:, None, None, :])


def test_key_padding_mask_errors():
    from kernels import attention

    q = torch.randn(2, 5, 2, 16)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        attention(q, q, q, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seqlen_k\) = \(2, 5\)"):
        attention(q, q, q, key_padding_mask=torch.ones(2, 1, 5, dtype=torch.bool))


@pytest.mark.parametrize("case", ["non-causal", "causal", "causal, lengths differ", "a sequence without keys"])
def test_reference_path_packed_plain_attention_runs_torchs_flash(monkeypatch, case):
    """Packed batches take torch's CPU flash attention too, padded with an additive mask over
    the padded keys, when every sequence has a key (and, causal, as many queries as keys):
    the chunked path's outputs, lse and gradients; rows of no sequence stay 0 / +inf."""
    from kernels import attention_reference as ref

    lens_q, lens_k = {"non-causal": ([5, 33, 1, 17], [9, 4, 33, 1]), "causal": ([5, 33, 1, 17], [5, 33, 1, 17]),
                      "causal, lengths differ": ([5, 33, 1], [9, 33, 1]),
                      "a sequence without keys": ([5, 3], [9, 0])}[case]
    causal = case.startswith("causal")
    fast = case in ("non-causal", "causal")
    cu_q = torch.tensor([0] + lens_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lens_k).cumsum(0).int()
    extra = 3  # rows past the last sequence: zero output and gradient, lse +inf
    q = torch.randn(sum(lens_q) + extra, 4, 16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 16, requires_grad=True) for _ in range(2))
    dout = torch.randn_like(q)
    calls = _spy_on_torchs_flash(monkeypatch)

    def run():
        with reference_only():
            out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                                 return_attn_probs=True)
            return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    got = run()
    assert calls == (["fwd", "bwd"] if fast else [])
    monkeypatch.setattr(ref, "plain_causal", lambda *a: None)
    chunked = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    out, lse, dq = got[:3]
    assert (out[-extra:] == 0).all() and torch.isposinf(lse[:, -extra:]).all() and (dq[-extra:] == 0).all()
    cpu = [x.detach().double().requires_grad_() for x in (q[:-extra], k, v)]
    oracle_out, _ = oracle.attention_varlen(*cpu, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(out[:-extra].double(), oracle_out, rtol=0, atol=1e-5)
