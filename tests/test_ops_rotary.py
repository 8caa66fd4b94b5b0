"""apply_rotary_emb against a float64 oracle written with complex numbers.

The oracle treats each rotated pair as a complex number and multiplies it by
cos + i sin: an independent statement of the rotation, for both layouts. Each case runs
through the Triton kernels (interpreter on CPU, GPU when there is one) and through the
PyTorch path (`reference_only`).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from attention_oracle import assert_fa2_close
from kernels import reference_only
from kernels.rotary import apply_rotary_emb, apply_rotary_emb_qk


@pytest.fixture(params=["triton", "reference"])
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


def tables(seqlen_ro, rotary_dim, device="cpu", dtype=torch.float32, base=10000.0):
    """LLaMA's cos/sin tables (seqlen_ro, rotary_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def oracle(x, cos, sin, positions, interleaved, dtype=torch.float64):
    """Rotation as complex multiplication, in `dtype` (complex128 for float64)."""
    half = cos.shape[1]
    x = x.to(dtype)
    rot = x[..., :2 * half]
    if interleaved:
        pairs = rot.unflatten(-1, (half, 2))
        re, im = pairs[..., 0], pairs[..., 1]
    else:
        re, im = rot[..., :half], rot[..., half:]
    c, s = cos.to(dtype)[positions][:, :, None, :], sin.to(dtype)[positions][:, :, None, :]  # (B, S, 1, half)
    if dtype in (torch.float16, torch.bfloat16):
        # torch's complex half is incomplete: the same products written out, in dtype.
        out_re, out_im = re * c - im * s, re * s + im * c
    else:
        z = torch.complex(re, im) * torch.complex(c, s)
        out_re, out_im = z.real, z.imag
    rotated = torch.stack((out_re, out_im), -1).flatten(-2) if interleaved else torch.cat((out_re, out_im), -1)
    return torch.cat((rotated, x[..., 2 * half:]), -1)


def positions_for(mode, B, S, seqlen_ro, device):
    """(kwargs for apply_rotary_emb, the (B, S) positions they mean)."""
    if mode == "none":
        return {}, torch.arange(S).expand(B, S)
    if mode == "int":
        return {"seqlen_offsets": 7}, torch.arange(S).expand(B, S) + 7
    if mode == "tensor":
        offsets = torch.randint(0, seqlen_ro - S + 1, (B,))
        return {"seqlen_offsets": offsets.to(device, torch.int32)}, torch.arange(S)[None, :] + offsets[:, None]
    ids = torch.randint(0, seqlen_ro, (B, S))
    return {"position_ids": ids.to(device)}, ids


def run_case(device, ctx, shape, rotary_dim, dtype, interleaved, mode, inplace, table_dtype=torch.float32):
    B, S, H, D = shape
    seqlen_ro = S + 20
    cos, sin = tables(seqlen_ro, rotary_dim, device, table_dtype)
    kwargs, pos = positions_for(mode, B, S, seqlen_ro, device)
    leaf = torch.randn(shape).to(device, dtype).requires_grad_()
    x = leaf * 1 if inplace else leaf  # in place needs a non-leaf
    with ctx():
        out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, inplace=inplace, **kwargs)
        if inplace:
            assert out is x
        dout = torch.randn_like(out)
        (dx,) = torch.autograd.grad(out, leaf, dout)
    assert out.shape == shape and out.dtype == dtype
    # The oracle runs where the inputs are (float64 is fine on a GPU).
    pos = pos.to(device)
    ref_in = leaf.detach().double().requires_grad_()
    ref = oracle(ref_in, cos, sin, pos, interleaved)
    (ref_dx,) = torch.autograd.grad(ref, ref_in, dout.double())
    same_in = leaf.detach().clone().requires_grad_()
    same = oracle(same_in, cos, sin, pos, interleaved, dtype=dtype)
    (same_dx,) = torch.autograd.grad(same, same_in, dout)
    assert_fa2_close(out.detach(), ref, same, "out")
    assert_fa2_close(dx, ref_dx, same_dx, "dx")
    # Past rotary_dim, values and gradients pass through bit for bit.
    assert torch.equal(out[..., rotary_dim:].detach(), leaf[..., rotary_dim:].detach())
    assert torch.equal(dx[..., rotary_dim:], dout[..., rotary_dim:])


@pytest.mark.parametrize("mode", ["none", "int", "tensor", "position_ids"])
@pytest.mark.parametrize("rotary_dim", [16, 10], ids=["full", "partial"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_matches_oracle(backend, interleaved, rotary_dim, mode):
    device, ctx = backend
    run_case(device, ctx, (2, 19, 3, 16), rotary_dim, torch.float32, interleaved, mode, inplace=False)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("mode", ["none", "tensor"])
def test_inplace(backend, interleaved, mode):
    device, ctx = backend
    run_case(device, ctx, (2, 21, 5, 24), 18, torch.float32, interleaved, mode, inplace=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    device, ctx = backend
    run_case(device, ctx, (1, 33, 2, 32), 32, dtype, False, "int", inplace=False)
    run_case(device, ctx, (1, 33, 2, 32), 32, dtype, True, "int", inplace=False, table_dtype=dtype)


def test_odd_head_dim_and_single_pair(backend):
    device, ctx = backend
    run_case(device, ctx, (1, 5, 1, 33), 2, torch.float32, False, "int", inplace=False)
    run_case(device, ctx, (3, 1, 2, 7), 6, torch.float32, True, "position_ids", inplace=False)


def test_kv_cache_decoding_matches_full_sequence(backend):
    """Rotating token t alone at seqlen_offsets = t gives row t of the full-sequence rotation."""
    device, ctx = backend
    B, S, H, D = 3, 12, 2, 16
    cos, sin = tables(32, D, device)
    x = torch.randn(B, S, H, D, device=device)
    lengths = torch.tensor([3, 0, 11], device=device)  # each row's cache length: its next token's position
    with ctx():
        full = apply_rotary_emb(x, cos, sin)
        step = apply_rotary_emb(x[torch.arange(B), lengths][:, None], cos, sin, seqlen_offsets=lengths)
        by_ids = apply_rotary_emb(x[torch.arange(B), lengths][:, None], cos, sin, position_ids=lengths[:, None])
        strided = torch.tensor([3, 99, 0, 99, 11], device=device)[::2]  # the lengths as a view of stride 2
        step_strided = apply_rotary_emb(x[torch.arange(B), lengths][:, None], cos, sin, seqlen_offsets=strided)
    expected = full[torch.arange(B), lengths][:, None]
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_ids, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(step_strided, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("offsets", ["none", "int", "tensor"])
@pytest.mark.parametrize("inplace", [False, True])
def test_packed_sequences_with_cu_seqlens(backend, offsets, inplace):
    """FA2's varlen form: x (total, H, D) with cu_seqlens; token i of sequence b sits at
    i - cu_seqlens[b] + offset. The oracle rotates each sequence alone as a batch of one."""
    device, ctx = backend
    lengths = [5, 0, 9, 1]
    cu = torch.tensor([0, 5, 5, 14, 15], dtype=torch.int32, device=device)
    cos, sin = tables(24, 12, device)
    offset = {"none": 0, "int": 3, "tensor": torch.tensor([2, 7, 0, 11], dtype=torch.int32, device=device)}[offsets]
    leaf = torch.randn(15, 3, 14, device=device, requires_grad=True)
    x = leaf * 1 if inplace else leaf
    with ctx():
        out = apply_rotary_emb(x, cos, sin, False, inplace, offset, cu, max(lengths))
        assert (out is x) == inplace
        dout = torch.randn_like(out)
        (dx,) = torch.autograd.grad(out, leaf, dout)
    ref_in = leaf.detach().double().requires_grad_()
    parts = []
    for b, n in enumerate(lengths):
        start = int(cu[b])
        first = int(offset[b]) if isinstance(offset, torch.Tensor) else offset
        pos = (torch.arange(n) + first).view(1, n).to(device)
        parts.append(oracle(ref_in[start:start + n][None], cos, sin, pos, False)[0])
    ref = torch.cat(parts)
    (ref_dx,) = torch.autograd.grad(ref, ref_in, dout.double())
    torch.testing.assert_close(out.detach().double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=0, atol=1e-5)


def test_packed_sequences_bad_input_is_named():
    cos, sin = tables(16, 8)
    x = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    cases = [
        (dict(cu_seqlens=cu.long()), TypeError, "cu_seqlens must be a 1-D int32"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "end at total = 6"),
        (dict(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), ValueError, "not decrease"),
        (dict(cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen = 3 but a sequence holds 4"),
        (dict(cu_seqlens=cu, seqlen_offsets=13), ValueError, "positions must be in"),
        (dict(cu_seqlens=cu, position_ids=torch.zeros(1, 6, dtype=torch.long)), ValueError, "not both"),
        (dict(max_seqlen=4), ValueError, "max_seqlen applies only with cu_seqlens"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            apply_rotary_emb(x if "max_seqlen" not in kwargs or "cu_seqlens" in kwargs else x[None], cos, sin,
                             **kwargs)
    with pytest.raises(ValueError, match=r"packed \(total, nheads, headdim\)"):
        apply_rotary_emb(x[None], cos, sin, cu_seqlens=cu)


@pytest.mark.parametrize("layout", ["sin_row_stride", "cos_transposed", "both_column_stride"])
def test_tables_of_different_layouts(backend, layout):
    """cos and sin need not share a layout: the kernel walks both by one set of strides."""
    device, ctx = backend
    S, half = 10, 6
    cos, sin = tables(S + 4, 2 * half, device)
    if layout == "sin_row_stride":
        sin = torch.cat((sin, torch.full_like(sin, 99.0)), 1)[:, :half]
    elif layout == "cos_transposed":
        cos = cos.t().contiguous().t()
    else:
        cos = torch.stack((cos, torch.full_like(cos, 99.0)), -1)[..., 0]
        sin = torch.stack((sin, torch.full_like(sin, 99.0)), -1)[..., 0]
    x = torch.randn(2, S, 3, 2 * half + 2, device=device)
    with ctx():
        out = apply_rotary_emb(x, cos, sin, seqlen_offsets=2)
    ref = oracle(x, cos, sin, (torch.arange(S) + 2).expand(2, S).to(device), False)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_inplace_refuses_overlapping_elements():
    """In place on an expanded view would rotate the shared elements once per alias."""
    cos, sin = tables(16, 16)
    x = torch.randn(2, 5, 1, 16).expand(2, 5, 3, 16)
    with pytest.raises(ValueError, match="elements do not overlap"):
        apply_rotary_emb(x, cos, sin, inplace=True)


def test_qk_helper_handles_gqa(backend):
    device, ctx = backend
    cos, sin = tables(16, 8, device)
    q, k = torch.randn(2, 9, 4, 8, device=device), torch.randn(2, 9, 1, 8, device=device)
    with ctx():
        rq, rk = apply_rotary_emb_qk(q, k, cos, sin, seqlen_offsets=3)
    pos = torch.arange(9).expand(2, 9) + 3
    torch.testing.assert_close(rq.cpu().double(), oracle(q.cpu(), cos.cpu(), sin.cpu(), pos, False), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(rk.cpu().double(), oracle(k.cpu(), cos.cpu(), sin.cpu(), pos, False), rtol=0,
                               atol=1e-6)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_X = torch.randn(2, 5, 3, 16)
_COS, _SIN = tables(8, 16)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=_X[0]), ValueError, "x must have 4 dims"),
    (dict(x=_X.long()), TypeError, "x has dtype torch.int64"),
    (dict(cos=_COS[:, :4]), ValueError, "cos and sin must have the same shape"),
    (dict(cos=_COS[0], sin=_SIN[0]), ValueError, "cos must have 2 dims"),
    (dict(cos=tables(8, 18)[0], sin=tables(8, 18)[1]), ValueError, "rotary_dim = 2 \\* cos.shape\\[1\\] = 18"),
    (dict(cos=_COS.double(), sin=_SIN.double()), TypeError, "cos has dtype torch.float64"),
    (dict(seqlen_offsets=4), ValueError, r"seqlen_offsets = 4 with seqlen 5 gives positions from 4 to 8; .*\[0, 7\]"),
    (dict(seqlen_offsets=-1), ValueError, r"seqlen_offsets = -1 with seqlen 5 gives positions from -1 to 3;.*\[0, 7\]"),
    (dict(seqlen_offsets=torch.tensor([0, 4])), ValueError, "positions from 0 to 8"),
    (dict(seqlen_offsets=torch.tensor([0])), ValueError, "seqlen_offsets must have shape \\(2,\\)"),
    (dict(seqlen_offsets=torch.tensor([0.0, 1.0])), TypeError, "seqlen_offsets must be int32 or int64"),
    (dict(seqlen_offsets=1.5), TypeError, "seqlen_offsets must be an int or a \\(batch,\\) tensor"),
    (dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "position_ids must have shape \\(2, 5\\)"),
    (dict(position_ids=torch.full((2, 5), 8)), ValueError, "positions from 8 to 8"),
    (dict(position_ids=torch.zeros(2, 5, dtype=torch.long), seqlen_offsets=1), ValueError,
     "seqlen_offsets must be 0 when position_ids"),
    (dict(interleaved=1), TypeError, "interleaved must be a bool, got 1"),
    (dict(inplace="no"), TypeError, "inplace must be a bool, got 'no'"),
])
def test_bad_input_raises_naming_the_argument(kwargs, error, match):
    args = dict(x=_X, cos=_COS, sin=_SIN)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        apply_rotary_emb(**args)


# --------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile (the PyTorch path on CPU)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["offsets", "position_ids", "inplace"])
def test_opcheck(variant):
    x = torch.randn(2, 6, 3, 8, requires_grad=variant != "inplace")
    cos, sin = tables(10, 6)
    offsets = torch.tensor([1, 4]) if variant == "offsets" else None
    ids = torch.randint(0, 10, (2, 6)) if variant == "position_ids" else None
    op = torch.ops.tritonzoo.rotary_ if variant == "inplace" else torch.ops.tritonzoo.rotary
    with reference_only():
        torch.library.opcheck(op.default, (x, cos, sin, offsets, 0, ids, variant == "offsets", False))


class _RotaryAttentionInput(torch.nn.Module):
    """Scores q.k of rotated projections; q and k come from separate projections, so
    rotating them in place touches no view of a shared buffer."""

    def __init__(self, dim=32, heads=4, inplace=False):
        super().__init__()
        self.heads, self.inplace = heads, inplace
        self.q, self.k = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
        cos, sin = tables(64, dim // heads)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x, offsets):
        B, S, C = x.shape
        q = self.q(x).view(B, S, self.heads, C // self.heads)
        k = self.k(x).view(B, S, self.heads, C // self.heads)
        q, k = apply_rotary_emb_qk(q, k, self.cos, self.sin, interleaved=True, inplace=self.inplace,
                                   seqlen_offsets=offsets)
        return (q * k).sum(-1)


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(inplace):
    torch._dynamo.reset()
    model = _RotaryAttentionInput(inplace=inplace)
    x, offsets = torch.randn(2, 7, 32, requires_grad=True), torch.tensor([0, 5])
    with reference_only():
        eager = model(x, offsets)
        (g_eager,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, offsets)
        (g,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# GPU: real sizes, bf16, the compiled CUDA path
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rotary_dim", [128, 64], ids=["full", "partial"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("mode,inplace", [("none", False), ("tensor", False), ("position_ids", True)])
def test_gpu_real_sizes(rotary_dim, interleaved, mode, inplace):
    run_case("cuda", contextlib.nullcontext, (2, 2048, 16, 128), rotary_dim, torch.bfloat16, interleaved, mode,
             inplace)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes(dtype):
    run_case("cuda", contextlib.nullcontext, (2, 1000, 8, 128), 64, dtype, False, "tensor", False)
    run_case("cuda", contextlib.nullcontext, (2, 1000, 8, 80), 80, dtype, True, "none", True)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = tables(80, 64, "cuda")
    offsets = torch.tensor([3, 16], device="cuda")
    torch.library.opcheck(torch.ops.tritonzoo.rotary.default, (x, cos, sin, offsets, 0, None, False, False))
    torch._dynamo.reset()
    model = _RotaryAttentionInput(256, 4).cuda()
    xs = torch.randn(2, 50, 256, device="cuda")
    off = torch.tensor([0, 9], device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(xs, off), model(xs, off), rtol=1e-4, atol=1e-4)
