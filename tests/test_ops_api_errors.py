"""The ops' public API (norms, rotary, cross-entropy) under unusual but valid input, on both paths.

Scalars given as numpy numbers or 0-dim tensors, where torch's own functions take them; every
token ignored under reduction="mean"; positions that leave the cos/sin table. Oracles: torch's
F.layer_norm / F.rms_norm / F.cross_entropy on the same input, a float64 rotation, and torch's
documented errors and values.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import (add_rms_norm, apply_rotary_emb, cross_entropy, fused_linear_cross_entropy, layer_norm,
                     reference_only, rms_norm)


@pytest.fixture(params=["triton", "reference"])
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


# --------------------------------------------------------------------------------------
# Norms: eps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25)], ids=type)
def test_norm_eps_takes_numpy_and_0dim_tensor_numbers(backend, eps):
    device, ctx = backend
    x, w, b = torch.randn(3, 8, device=device), torch.randn(8, device=device), torch.randn(8, device=device)
    with ctx():
        y = layer_norm(x, w, b, eps=eps)
        r = rms_norm(x, w, eps=eps)
        ar, _ = add_rms_norm(x, x, w, eps=eps)
    # eps = 0.25 (large, so that a wrong eps would show): torch's own norms with the same value.
    torch.testing.assert_close(y, F.layer_norm(x, (8,), w, b, 0.25))
    torch.testing.assert_close(r, F.rms_norm(x, (8,), w, 0.25))
    torch.testing.assert_close(ar, F.rms_norm(x + x, (8,), w, 0.25))


@pytest.mark.parametrize("eps", [True, math.nan, math.inf, 0.0, -1e-5, "1e-5", None, np.float32("nan"),
                                 torch.tensor(True), torch.tensor([1e-5])])
def test_norm_eps_that_is_not_a_finite_positive_number_is_named(eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        layer_norm(torch.randn(2, 8), eps=eps)


# --------------------------------------------------------------------------------------
# Cross-entropy: options as numpy numbers / 0-dim tensors
# --------------------------------------------------------------------------------------

_LOGITS, _TARGET = torch.randn(4, 10), torch.tensor([1, 2, 3, 9])


@pytest.mark.parametrize("wrap", [np.int64, torch.tensor], ids=["numpy", "tensor"])
def test_cross_entropy_takes_numpy_and_0dim_tensor_options(backend, wrap):
    device, ctx = backend
    logits, target = _LOGITS.to(device), _TARGET.to(device)
    ignore_index, smoothing = wrap(3), (np.float32 if wrap is np.int64 else torch.tensor)(0.25)
    with ctx():
        loss = cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=smoothing)
        hidden, weight = torch.randn(4, 6, device=device), torch.randn(10, 6, device=device)
        fused = fused_linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index,
                                           label_smoothing=smoothing, chunk_size=wrap(3))
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=3, label_smoothing=0.25))
    torch.testing.assert_close(fused, F.cross_entropy(hidden @ weight.t(), target, ignore_index=3,
                                                      label_smoothing=0.25))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(label_smoothing=math.nan), ValueError, "label_smoothing must be a number in \\[0, 1\\], got nan"),
    (dict(label_smoothing=True), ValueError, "label_smoothing must be a number in \\[0, 1\\], got True"),
    (dict(label_smoothing=torch.tensor(1.5)), ValueError, "label_smoothing must be a number in \\[0, 1\\], got 1.5"),
    (dict(ignore_index=np.float64(-100)), TypeError, "ignore_index must be an int"),
    (dict(ignore_index=torch.tensor(-100.0)), TypeError, "ignore_index must be an int"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an int"),
    (dict(reduction=["mean"]), ValueError, "reduction must be 'mean', 'sum' or 'none'"),
])
def test_cross_entropy_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(_LOGITS, _TARGET, **kwargs)


@pytest.mark.parametrize("chunk_size", [np.float64(2.0), 2.0, True, np.int64(0)])
def test_fused_linear_cross_entropy_bad_chunk_size_is_named(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
        fused_linear_cross_entropy(torch.randn(4, 6), torch.randn(10, 6), _TARGET, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------
# Cross-entropy: every token ignored, reduction "mean"
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_all_ignored_mean_is_nan_with_zero_gradient_as_torch(backend, dtype, smoothing):
    """torch: the loss 0 / 0 = NaN, the gradient 0 (every row's gradient is 0, whatever the scale)."""
    device, ctx = backend
    target = torch.full((4,), -100, device=device)
    logits = torch.randn(4, 10, device=device, dtype=dtype, requires_grad=True)
    ref = logits.detach().float().requires_grad_()
    torch_loss = F.cross_entropy(ref, target, label_smoothing=smoothing)
    torch_loss.backward()
    assert torch.isnan(torch_loss) and torch.equal(ref.grad, torch.zeros_like(ref.grad))  # the documented oracle
    with ctx():
        loss = cross_entropy(logits, target, label_smoothing=smoothing)
        (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isnan(loss)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_linear_all_ignored_mean_is_nan_with_zero_gradients(backend, dtype):
    device, ctx = backend
    target = torch.full((4,), -100, device=device)
    hidden = torch.randn(4, 6, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(10, 6, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(10, device=device, dtype=dtype, requires_grad=True)
    with ctx():
        loss = fused_linear_cross_entropy(hidden, weight, target, bias)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert torch.isnan(loss)
    for g in grads:  # torch: F.cross_entropy(hidden @ weight.T + bias, target) has zero gradients here
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Rotary: offsets as numpy / 0-dim tensor integers, positions out of the table
# --------------------------------------------------------------------------------------


def _tables(seqlen_ro, half):
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * (0.3 + torch.arange(half, dtype=torch.float64))
    return angles


def _rotated(x, angles, positions):
    """Rotate-half rotation of x (B, S, H, D) at positions (B, S), in float64 as complex numbers."""
    half = angles.shape[1]
    z = torch.complex(x[..., :half].double(), x[..., half:2 * half].double())
    z = z * torch.polar(torch.ones_like(angles), angles)[positions][:, :, None, :]
    return torch.cat((z.real, z.imag, x[..., 2 * half:].double()), dim=-1)


@pytest.mark.parametrize("offset", [np.int64(3), np.int32(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)],
                         ids=["np64", "np32", "t64", "t32"])
def test_rotary_seqlen_offsets_takes_numpy_and_0dim_tensor_integers(backend, offset):
    device, ctx = backend
    angles = _tables(12, 3)
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    x = torch.randn(2, 5, 2, 8, device=device)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device)
    with ctx():
        out = apply_rotary_emb(x, cos, sin, seqlen_offsets=offset)
    positions = torch.arange(5).expand(2, 5) + 3
    torch.testing.assert_close(out.double().cpu(), _rotated(x.cpu(), angles, positions), rtol=0, atol=1e-5)


def test_rotary_packed_takes_numpy_offsets_and_max_seqlen(backend):
    device, ctx = backend
    angles = _tables(12, 4)
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    x = torch.randn(7, 2, 8, device=device)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    with ctx():
        out = apply_rotary_emb(x, cos, sin, cu_seqlens=cu, max_seqlen=np.int64(4), seqlen_offsets=np.int64(2))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]]) + 2
    torch.testing.assert_close(out.double().cpu(), _rotated(x.cpu()[None], angles, positions)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("interleaved", [np.True_, np.False_], ids=["interleaved", "rotate_half"])
def test_rotary_flags_take_numpy_bools(backend, interleaved):
    """numpy bools for interleaved / inplace (no subclass of bool) are taken, as
    FlashAttention-2's apply_rotary_emb takes them; they were refused with a TypeError.
    Oracle: the rotation in float64 complex numbers, pairs as the layout defines them."""
    device, ctx = backend
    angles = _tables(12, 4)
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    x = torch.randn(2, 5, 2, 8, device=device)
    with ctx():
        out = apply_rotary_emb(x.clone(), cos, sin, interleaved=interleaved, inplace=np.False_)
    if interleaved:
        xd = x.cpu().double()
        rotation = torch.polar(torch.ones_like(angles), angles)[:5][None, :, None]
        z = torch.complex(xd[..., 0::2], xd[..., 1::2]) * rotation
        expected = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    else:
        expected = _rotated(x.cpu(), angles, torch.arange(5).expand(2, 5))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=1e-5)
    for flag in (1, "yes", torch.tensor(True)):
        with pytest.raises(TypeError, match="interleaved must be a bool"):
            apply_rotary_emb(x, cos, sin, interleaved=flag)


@pytest.mark.parametrize("offsets", [True, 1.0, np.float64(1.0), torch.tensor(1.0)])
def test_rotary_seqlen_offsets_that_are_not_integers_are_named(offsets):
    angles = _tables(12, 4)
    with pytest.raises(TypeError, match="seqlen_offsets must be"):
        apply_rotary_emb(torch.randn(2, 5, 2, 8), angles.cos().float(), angles.sin().float(), seqlen_offsets=offsets)


def test_rotary_packed_positions_out_of_the_table_name_cu_seqlens_not_position_ids():
    angles = _tables(3, 4)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    match = "^cu_seqlens with seqlen_offsets gives positions from 0 to 3; .*seqlen_ro = 3"
    with pytest.raises(ValueError, match=match):
        apply_rotary_emb(torch.randn(7, 2, 8), angles.cos().float(), angles.sin().float(), cu_seqlens=cu)
