"""Input validation, torch.library registration (opcheck) and torch.compile of the attention op."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from kernels import flash_attn_func, flash_attn_varlen_func, reference_only


def _qkv(B=2, S=8, H=4, Hk=2, D=16, dtype=torch.float16):
    return (torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, Hk, D, dtype=dtype),
            torch.randn(B, S, Hk, D, dtype=dtype))


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q, k.float(), v), TypeError, "k has dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "q has dtype"),
    (lambda q, k, v: (q, k[:, :, :1], v), ValueError, "same shape"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of nheads_k"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "head dim"),
    (lambda q, k, v: (q[:1], k, v), ValueError, "batch size"),
    (lambda q, k, v: (torch.randn(1, 4, 2, 264, dtype=torch.float16),) * 3, ValueError, "head dim 264"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "at least one head each, got nheads = 0"),
])
def test_bad_tensors(mutate, error, match):
    with pytest.raises(error, match=match):
        flash_attn_func(*mutate(*_qkv()))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(window_size=(-2, 0)), ValueError, "window_size left"),
    (dict(window_size=(0, -3)), ValueError, "window_size right"),
    (dict(window_size=3), ValueError, "window_size must be a pair"),
    (dict(window_size=(True, False)), ValueError, "window_size left must be an int.*got True"),
    (dict(window_size=(2, 1.5)), ValueError, "window_size right must be an int.*got 1.5"),
    (dict(softcap="1"), ValueError, "softcap must be a finite number"),
    (dict(softmax_scale=torch.ones(2)), ValueError, "softmax_scale must be a finite number"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(nheads,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes must be float32"),
    # A flag is a bool (or a numpy bool): a string or None passed by mistake is not read by truthiness.
    (dict(causal="no"), TypeError, "causal must be a bool, got 'no'"),
    (dict(return_attn_probs=None), TypeError, "return_attn_probs must be a bool, got None"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attn_func(*_qkv(), **kwargs)


def _packed(lengths, H=2, D=16):
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(total, H, D), cu


@pytest.mark.parametrize("change,error,match", [
    (lambda cu: cu.long(), TypeError, "cu_seqlens_q must be int32"),
    (lambda cu: cu.tolist(), TypeError, "cu_seqlens_q must be a torch.Tensor, got list"),
    (lambda cu: cu[:1], ValueError, "length batch \\+ 1"),
    (lambda cu: torch.tensor([0, 5, 3, 9], dtype=torch.int32), ValueError, "never decrease"),
    (lambda cu: torch.tensor([0, 5, 9, 40], dtype=torch.int32), ValueError, "exceeds the"),
])
def test_bad_cu_seqlens(change, error, match):
    x, cu = _packed([5, 4, 3])
    with pytest.raises(error, match=match):
        flash_attn_varlen_func(x, x, x, change(cu), cu, 5, 5)


def test_max_seqlen_too_small_is_an_error_not_a_truncation():
    x, cu = _packed([5, 9, 3])
    with pytest.raises(ValueError, match="max_seqlen_q = 6 is less than the longest sequence"):
        flash_attn_varlen_func(x, x, x, cu, cu, 6, 9)


def test_max_seqlen_must_be_an_int():
    x, cu = _packed([5, 4, 3])
    for bad in (True, 5.0, torch.tensor(5.0)):
        with pytest.raises(ValueError, match="max_seqlen_q must be an int >= 0, got"):
            flash_attn_varlen_func(x, x, x, cu, cu, bad, 5)


def test_numpy_and_0dim_tensor_scalars_act_as_python_ones():
    """FA2's C++ binding reads numpy scalars and 0-dim tensors as numbers; so do these functions,
    with results equal to those of the Python numbers."""
    np = pytest.importorskip("numpy")
    q, k, v = _qkv(dtype=torch.float32)
    expected = flash_attn_func(q, k, v, softmax_scale=0.3, window_size=(2, 1), softcap=5.0)
    for scale, window, softcap in ((np.float32(0.3), (np.int64(2), np.int32(1)), np.float64(5.0)),
                                   (torch.tensor(0.3), (torch.tensor(2), torch.tensor(1)), torch.tensor(5.0))):
        got = flash_attn_func(q, k, v, softmax_scale=scale, window_size=window, softcap=softcap)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    x, cu = _packed([5, 4, 3])
    torch.testing.assert_close(flash_attn_varlen_func(x, x, x, cu, cu, np.int64(5), torch.tensor(5)),
                               flash_attn_varlen_func(x, x, x, cu, cu, 5, 5))


def test_meta_tensors_give_the_output_shapes():
    """Shape propagation on the meta device (as for building a model without memory): the
    outputs' shapes and dtypes are those of the same call on CPU tensors."""
    q, k, v = _qkv()
    x, cu = _packed([5, 4, 3])
    for fn, args in ((flash_attn_func, (q, k, v)), (flash_attn_varlen_func, (x, x, x, cu, cu, 5, 5))):
        expected = fn(*args, causal=True, return_attn_probs=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            on_meta = fn(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args), causal=True,
                         return_attn_probs=True)
        for got, want in zip(on_meta, expected):
            assert got.device.type == "meta" and (got.shape, got.dtype) == (want.shape, want.dtype)


def test_mismatched_cu_seqlens_lengths():
    x, cu = _packed([5, 4, 3])
    with pytest.raises(ValueError, match="same length"):
        flash_attn_varlen_func(x, x, x, cu, cu[:3], 5, 5)


# --------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile (on CPU through the PyTorch path; the
# interpreter's kernels cannot be traced: see tests/test_gpu.py for the CUDA kernels)
# --------------------------------------------------------------------------------------


def _fwd_args(dropout=False, varlen=False, bias=False):
    if varlen:
        q, cu = _packed([3, 6, 1], H=4)
        k, _ = _packed([3, 6, 1], H=2)
        v = torch.randn_like(k)
        args = [q, k, v, cu, cu.clone(), 6, 6]
    else:
        q, k, v = (x.float() for x in _qkv())
        args = [q, k, v, None, None, 8, 8]
    for x in args[:3]:
        x.requires_grad_()
    b = torch.randn(2, 1, 8, 8) if bias else None
    seed = torch.tensor([17], dtype=torch.int64) if dropout else None
    return (*args, b, torch.rand(4), seed, 0.2 if dropout else 0.0, 0.25, 0.0, 3, 0, True)


@pytest.mark.parametrize("variant", ["plain", "dropout", "varlen", "bias"])
def test_opcheck(variant):
    args = _fwd_args(dropout=variant == "dropout", varlen=variant == "varlen", bias=variant == "bias")
    with reference_only():
        torch.library.opcheck(torch.ops.tritonzoo.attention_fwd.default, args)
        out, lse = torch.ops.tritonzoo.attention_fwd(*args)
        bwd_args = (torch.randn_like(out), None, *(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3]),
                    out.detach(), lse.detach(), *args[3:])
        torch.library.opcheck(torch.ops.tritonzoo.attention_bwd.default, bwd_args)


class _TinyAttention(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        y = flash_attn_func(q, k, v, causal=True, dropout_p=0.1 if self.training else 0.0)
        return self.proj(y.reshape(B, S, C))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    model = _TinyAttention().eval()
    x = torch.randn(2, 10, 32, requires_grad=True)
    with reference_only():
        eager = model(x)
        (g_eager,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = compiled(x)
        (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_compile_fullgraph_varlen(causal):
    """Packed batches: the PyTorch path's checks of the lengths must not break the graph when traced."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 13, 14], dtype=torch.int32)
    q, k, v = (torch.randn(14, 4, 16, requires_grad=True) for _ in range(3))

    def loss(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, causal=causal).square().sum()

    with reference_only():
        eager = loss(q, k, v)
        eager_grads = torch.autograd.grad(eager, (q, k, v))
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v)
        grads = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_compile_with_dropout_in_training_mode():
    torch._dynamo.reset()
    model = _TinyAttention().train()
    x = torch.randn(2, 10, 32)
    with reference_only():
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# FlashAttention-2's public signatures (flash_attn 2.7: flash_attn_interface.py and
# layers/rotary.py), written out here as the oracle: code calling FA2 positionally or by
# name runs unchanged. Ours may add parameters after these, never before or between.
FA2_SIGNATURES = {
    "flash_attn_func": "q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                       "alibi_slopes=None, deterministic=False, return_attn_probs=False",
    "flash_attn_qkvpacked_func": "qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                                 "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    "flash_attn_kvpacked_func": "q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
                                "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False",
    "flash_attn_varlen_func": "q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, "
                              "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
                              "deterministic=False, return_attn_probs=False, block_table=None",
    "flash_attn_varlen_qkvpacked_func": "qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, "
                                        "window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, "
                                        "return_attn_probs=False",
    "flash_attn_varlen_kvpacked_func": "q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, "
                                       "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                                       "alibi_slopes=None, deterministic=False, return_attn_probs=False",
    "flash_attn_with_kvcache": "q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, "
                               "cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, "
                               "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                               "rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False",
    "apply_rotary_emb": "x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, "
                        "max_seqlen=None",
}


@pytest.mark.parametrize("name", sorted(FA2_SIGNATURES))
def test_signatures_start_with_flash_attention_2s(name):
    import inspect

    import kernels

    expected = []
    for part in re.split(r",\s*(?![^()]*\))", FA2_SIGNATURES[name]):
        param, _, default = part.partition("=")
        expected.append((param.strip(), eval(default) if default else inspect.Parameter.empty))
    params = list(inspect.signature(getattr(kernels, name)).parameters.values())[:len(expected)]
    got = [(p.name, p.default) for p in params]
    assert got == expected
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_outputs_are_contiguous_as_fa2s(path):
    """FA2 returns contiguous outputs, which callers reshape with .view: so do both paths, for
    every case the PyTorch path computes itself (softcap, ALiBi, GQA, causal with Sq != Sk, a
    key-padding mask, a multi-query decoding step)."""
    from kernels import attention, flash_attn_with_kvcache
    ctx = reference_only if path == "reference" else contextlib.nullcontext
    q, k, v = (torch.randn(2, 6, 4, 16) for _ in range(3))
    kg, vg = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    with ctx():
        outs = [flash_attn_func(q, k, v, softcap=1.0), flash_attn_func(q, k, v, alibi_slopes=torch.rand(4)),
                flash_attn_func(q, kg, vg), flash_attn_func(q[:, :3], kg, vg, causal=True),
                attention(q, k, v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))]
        k_cache, v_cache = torch.zeros(2, 16, 4, 16), torch.zeros(2, 16, 4, 16)
        outs.append(flash_attn_with_kvcache(torch.randn(2, 3, 4, 16), k_cache, v_cache, k=torch.randn(2, 3, 4, 16),
                                            v=torch.randn(2, 3, 4, 16), cache_seqlens=torch.tensor([2, 5]).int(),
                                            causal=True))
    for i, out in enumerate(outs):
        assert out.is_contiguous(), i
        out.view(out.shape[0], out.shape[1], -1)
