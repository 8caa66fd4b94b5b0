"""Cross-entropy over a large vocabulary in Triton, and a fused linear + cross-entropy.

    cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean")
    fused_linear_cross_entropy(hidden, weight, target, bias=None, ...same options...,
                               chunk_size=None)

Semantics are torch.nn.functional.cross_entropy's for (N, V) logits and (N,) class
targets: rows whose target is ignore_index add nothing (and get exactly zero gradient, for
finite logits: a NaN logit makes its row's gradient NaN even when ignored, as torch's does);
label smoothing eps mixes in the uniform distribution, loss = (1 - eps) * nll + eps *
(lse - mean(logits)); "mean" divides by the number of rows not ignored (NaN when all
are, with a zero gradient, as torch's). The loss is float32 whatever the logits' dtype.

One program per row makes two passes over the vocabulary in BLOCK_V chunks: an online
max / sum-exp (and the sum of the logits for smoothing), then the gradient
softmax - (1 - eps) * onehot - eps / V, scaled for the reduction, written in the same
kernel (Liger-Kernel's trick): the backward is a multiplication by grad_output.

The fused variant never holds the (N, V) logits: it walks the tokens in chunks; each
chunk's logits (chunk, V) = hidden_chunk @ weight^T go through the kernel above, which
overwrites them with their gradient in place, and then grad_hidden_chunk = dlogits @
weight and grad_weight += dlogits^T @ hidden_chunk, all in the forward. With
reduction "none" the per-row grad_output is not known then: the forward computes the
losses only and the backward walks the chunks again, scaling each row by its grad_output.
grad_weight accumulates in weight's dtype (as Liger-Kernel), one rounding per chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import (as_float, as_int, autocast_dtype, cdiv, launch, eager_op, on_device, INTERPRET,
                      next_power_of_2, run_backward, unit_stride, use_triton)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
#: Vocabulary chunk of one program's loop on the GPU; the interpreter uses a small one so
#: that small vocabularies still cross chunks.
GPU_MAX_BLOCK_V = 8192
_MAX_BLOCK_V = 256 if INTERPRET else GPU_MAX_BLOCK_V


@triton.jit
def _row_window(Base, row, stride, ALIGN: tl.constexpr):
    """A row's start rounded down to a multiple of ALIGN elements (16 bytes), and the row's
    offset `shift` in that window: window position w holds column w - shift."""
    offset = row * stride
    shift = offset % ALIGN
    return Base + tl.multiple_of(offset - shift, ALIGN), shift


@triton.jit
def _lse_update(x, valid, m, d, sum_x, SMOOTH: tl.constexpr):
    """Online max m, sum of exponentials d and (for smoothing) sum of the logits, one more block."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # A block of only -inf logits so far: keep the exponents finite (no -inf - -inf).
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_use) + tl.sum(tl.exp(x - m_use), axis=0)
    if SMOOTH:
        sum_x += tl.sum(tl.where(valid, x, 0.0), axis=0)
    return m_new, d, sum_x


@triton.jit
def _grad_block(L, G, cols, valid, target, lse, scale, smoothing, V, SMOOTH: tl.constexpr):
    """Writes G[cols] = (softmax - (1 - eps) onehot - eps / V) * scale, reading the logits at L[cols]."""
    x = tl.load(L + cols, mask=valid, other=0.0).to(tl.float32)
    g = tl.exp(x - lse) - tl.where(cols == target, 1.0 - smoothing, 0.0)
    if SMOOTH:
        g -= smoothing / V
    tl.store(G + cols, (g * scale).to(G.dtype.element_ty), mask=valid)


@triton.jit
def _ce_kernel(Logits, Grad, Target, Loss, NValid, RowScale, V, stride_l, stride_g, ignore_index, smoothing,
               HAS_GRAD: tl.constexpr, MEAN: tl.constexpr, SMOOTH: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
               LOGITS_ALIGNED: tl.constexpr, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    smoothing = tl.cast(smoothing, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    head = tl.arange(0, ALIGN)
    target = tl.load(Target + row).to(tl.int64)
    ignored = target == ignore_index
    # Masks change only at multiples of ALIGN elements (16 bytes) in the BLOCK_V blocks, so
    # their accesses are 16 bytes wide; a mask such as cols < V at V = 50257 would make each
    # one 2 bytes. The columns before the first and after the last multiple go in groups of
    # ALIGN. Pass 1 reads the logits in their row's aligned window (_row_window), so that this
    # holds whatever the logits' row stride (a contiguous (N, 50257) tensor's rows start at
    # every offset).
    win, shift = _row_window(Logits, row, stride_l, ALIGN)
    end = V + shift
    body_end = tl.maximum(end // ALIGN, 1) * ALIGN  # a multiple of ALIGN, as the compiler sees
    # Pass 1: online max and sum of exponentials (and sum of the logits when smoothing).
    m = float("-inf")
    d = 0.0
    sum_x = 0.0
    first = (head >= shift) & (head < end)
    x_first = tl.load(win + head, mask=first, other=float("-inf")).to(tl.float32)
    m, d, sum_x = _lse_update(x_first, first, m, d, sum_x, SMOOTH)
    for k in range(0, tl.cdiv(body_end - ALIGN, BLOCK_V)):
        w = ALIGN + k * BLOCK_V + offs
        valid = w < body_end
        x = tl.load(win + w, mask=valid, other=float("-inf")).to(tl.float32)
        m, d, sum_x = _lse_update(x, valid, m, d, sum_x, SMOOTH)
    last = body_end + head < end
    x_last = tl.load(win + body_end + head, mask=last, other=float("-inf")).to(tl.float32)
    m, d, sum_x = _lse_update(x_last, last, m, d, sum_x, SMOOTH)
    lse = m + tl.log(d)
    x_t = tl.load(Logits + row * stride_l + target, mask=target != ignore_index, other=0.0).to(tl.float32)
    loss = lse - x_t
    if SMOOTH:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - sum_x / V)
    tl.store(Loss + row, tl.where(ignored, 0.0, loss))
    if HAS_GRAD:
        scale = 1.0
        if MEAN:
            scale = 1.0 / tl.load(NValid)
        if HAS_ROW_SCALE:
            scale = scale * tl.load(RowScale + row).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        # Pass 2: the gradient, written over the logits when Grad is Logits (each block is
        # read before it is overwritten, by the same program). Grad's rows start at multiples
        # of ALIGN (the launcher's buffers are padded so): its stores are 16 bytes wide in the
        # blocks, and so are the loads when the logits' rows are aligned too (LOGITS_ALIGNED).
        g_row = Grad + tl.multiple_of(row * stride_g, ALIGN)
        if LOGITS_ALIGNED:
            l_row = Logits + tl.multiple_of(row * stride_l, ALIGN)
        else:
            l_row = Logits + row * stride_l
        body_end = V // ALIGN * ALIGN
        for k in range(0, tl.cdiv(body_end, BLOCK_V)):
            cols = k * BLOCK_V + offs
            _grad_block(l_row, g_row, cols, cols < body_end, target, lse, scale, smoothing, V, SMOOTH)
        cols_last = body_end + head
        _grad_block(l_row, g_row, cols_last, cols_last < V, target, lse, scale, smoothing, V, SMOOTH)


@triton.jit
def _scale_block(G, Out, cols, valid, scale):
    g = tl.load(G + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(Out + cols, (g * scale).to(Out.dtype.element_ty), mask=valid)


@triton.jit
def _scale_rows_kernel(G, Out, Scale, V, stride_g, stride_o, stride_s, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """Out[r] = G[r] * Scale[r * stride_s] in float32 (stride_s 0: one scale for every row). As in
    _ce_kernel, the masks change only at multiples of ALIGN: rows starting at multiples of 16
    bytes get 16-byte loads and stores at any V."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(Scale + row * stride_s)
    offs = tl.arange(0, BLOCK_V)
    g_row = G + row * stride_g
    o_row = Out + row * stride_o
    body_end = V // ALIGN * ALIGN
    for k in range(0, tl.cdiv(body_end, BLOCK_V)):
        cols = k * BLOCK_V + offs
        _scale_block(g_row, o_row, cols, cols < body_end, scale)
    cols_last = body_end + tl.arange(0, ALIGN)
    _scale_block(g_row, o_row, cols_last, cols_last < V, scale)


def _n_valid(target: Tensor, ignore_index: int) -> Tensor:
    """Rows not ignored, as a float32 tensor of one element (no host sync)."""
    return (target != ignore_index).sum().to(torch.float32).reshape(1)


def _row_blocks(V) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of a one-program-per-row kernel over rows of V elements: constants,
    concrete under dynamic shapes."""
    block_v = min(_MAX_BLOCK_V, max(16, next_power_of_2(int(V))))
    return block_v, 16 if block_v >= 4096 else 4


def ce_rows_triton(logits, grad, target, n_valid, row_scale, ignore_index, smoothing, mean):
    """Per-row losses (float32, 0 for ignored rows); writes the gradient into grad when given.

    grad may be logits itself (in place). The gradient is scaled by 1 / n_valid when
    mean, and by row_scale (N,) when given.
    """
    N, V = logits.shape
    loss = logits.new_empty(N, dtype=torch.float32)
    if N == 0:
        return loss
    block_v, warps = _row_blocks(V)
    dummy = logits
    align = 16 // logits.element_size()  # elements per 16 bytes
    stride_g = grad.stride(0) if grad is not None else 0
    if stride_g % align:
        raise RuntimeError(f"internal: the gradient's rows must start at multiples of {align} elements "
                           f"(aligned_rows_like), got row stride {stride_g}")
    launch(_ce_kernel)[(N,)](
        logits, grad if grad is not None else dummy, target, loss, n_valid,
        row_scale if row_scale is not None else loss, V, logits.stride(0), stride_g, ignore_index, smoothing,
        HAS_GRAD=grad is not None, MEAN=mean, SMOOTH=smoothing > 0, HAS_ROW_SCALE=row_scale is not None,
        LOGITS_ALIGNED=bool(logits.stride(0) % align == 0), ALIGN=align, BLOCK_V=block_v, num_warps=warps)
    return loss


def ce_rows_reference(logits, grad, target, n_valid, row_scale, ignore_index, smoothing, mean):
    """The PyTorch path of ce_rows_triton (float32 arithmetic).

    One log-softmax, then the gradient in place over its result: softmax * scale, the
    target's -(1 - smoothing) * scale added at one column, the smoothing term subtracted.
    """
    x = logits.float()
    V = x.shape[1]
    ignored = target == ignore_index
    safe_t = torch.where(ignored, 0, target).long()[:, None]
    # The log-probabilities go straight into the gradient buffer when it is float32 and not
    # the logits themselves (fused linear CE passes grad=logits, to overwrite them).
    own = grad is not None and grad.dtype == torch.float32 and grad is not logits
    logp = torch.log_softmax(x, 1, out=grad) if own else torch.log_softmax(x, 1)
    loss = -logp.gather(1, safe_t)[:, 0]
    if smoothing > 0:
        loss = (1 - smoothing) * loss - smoothing * logp.mean(1)
    loss = torch.where(ignored, 0.0, loss)
    if grad is not None:
        scale = torch.ones_like(loss)  # float32, whatever the default dtype (bf16-true sets it)
        if mean:
            scale = scale / n_valid
        if row_scale is not None:
            scale = scale * row_scale.float()
        # As the kernel: an ignored row's scale is 0 even when it is not finite (1 / 0 with every
        # row ignored, "mean"): its gradient is 0, as torch's, not 0 * inf = NaN.
        scale = torch.where(ignored, 0.0, scale)
        g = logp.exp_().mul_(scale[:, None])
        g.scatter_add_(1, safe_t, (-(1 - smoothing) * scale)[:, None])
        if smoothing > 0:
            g.sub_((smoothing / V) * scale[:, None])
        if not own:
            grad.copy_(g)
    return loss


def _reduce(loss_rows: Tensor, n_valid: Tensor, reduction: int) -> Tensor:
    if reduction == REDUCTIONS["none"]:
        return loss_rows
    total = loss_rows.sum()
    return total / n_valid[0] if reduction == REDUCTIONS["mean"] else total


# --------------------------------------------------------------------------------------
# Cross-entropy on given logits
# --------------------------------------------------------------------------------------


#: A float16 gradient is stored times this (and unscaled in the backward, in float32): softmax
#: entries of a large vocabulary (1e-5) over N tokens fall below float16's subnormals, while
#: |softmax - onehot| <= 1 times 2^14 stays below its largest value. A power of two: exact.
FP16_GRAD_SCALE = 2.0 ** 14


@on_device
def _cross_entropy_fwd(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, reduction: int,
                       compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss: float32, () or (N,) by reduction; dlogits for grad_output 1, or empty).

    In float16, dlogits is stored unreduced and times FP16_GRAD_SCALE; _ce_backward undoes both.
    """
    triton_path = use_triton(logits)
    rows = ce_rows_triton if triton_path else ce_rows_reference
    n_valid = _n_valid(target, ignore_index)
    mean = reduction == REDUCTIONS["mean"]
    row_scale = None
    if compute_grad:
        grad = aligned_rows_like(logits)
        if logits.dtype == torch.float16:
            row_scale = torch.full((logits.shape[0],), FP16_GRAD_SCALE, dtype=torch.float32, device=logits.device)
    else:
        grad = logits.new_empty(0)
    loss_rows = rows(logits, grad if compute_grad else None, target, n_valid, row_scale, ignore_index,
                     label_smoothing, mean and row_scale is None)
    return _reduce(loss_rows, n_valid, reduction), grad


cross_entropy_fwd = torch.library.triton_op("tritonzoo::cross_entropy_fwd", _cross_entropy_fwd, mutates_args=())


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, _, reduction, compute_grad = inputs
    ctx.per_row = reduction == REDUCTIONS["none"]
    ctx.fp16_mean = logits.dtype == torch.float16 and reduction == REDUCTIONS["mean"]
    ctx.save_for_backward(output[1], target if ctx.per_row or ctx.fp16_mean else None)
    ctx.ignore_index = ignore_index
    ctx.compute_grad = compute_grad
    ctx.reference = not use_triton(logits)
    # The gradient outputs are internal (the public functions drop them): no (N, V) zeros
    # are made for their incoming gradients, which the backward ignores.
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, _grad_dlogits):
    if grad_loss is None:
        return None, None, None, None, None, None
    dlogits, target = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("cross_entropy ran without computing its gradient (no input required grad then); "
                           "call it with logits that require grad to differentiate it")
    if dlogits.dtype == torch.float16:  # stored times FP16_GRAD_SCALE, and unreduced (_cross_entropy_fwd)
        grad_loss = grad_loss.float() / FP16_GRAD_SCALE
        if ctx.fp16_mean:
            # With every row ignored the stored gradient is all 0, and stays so (torch's is 0 too):
            # dividing by 1 there, not 0, keeps 0 * inf = NaN out.
            grad_loss = grad_loss / _n_valid(target, ctx.ignore_index)[0].clamp_min(1.0)
    per_row_target = target if ctx.per_row else None
    return scale_gradient(ctx, dlogits, grad_loss, per_row_target, ctx.ignore_index), None, None, None, None, None


def scale_gradient(ctx, grad: Tensor, grad_loss: Tensor, target: Optional[Tensor], ignore_index: int) -> Tensor:
    """grad (a gradient computed for a loss of 1) times the loss's incoming gradient grad_loss,
    in float32 and written in grad's dtype, in the backward of the op whose ctx is given.

    grad_loss is 0-dim, or per row (N,) with the rows' targets: an ignored row's gradient is
    0 whatever its grad_loss holds (torch gives 0 there even for an inf or NaN weight). The
    product is not taken in grad's dtype: a float16 gradient times GradScaler's 65536
    would overflow when the scale is cast to float16 first.
    """
    if target is not None:
        grad_loss = torch.where(target != ignore_index, grad_loss, 0.0)
    if grad.dim() != 2:
        return grad * grad_loss.float()
    return run_backward(ctx, scale_rows, _scale_rows, grad, grad_loss.float().reshape(-1, 1))


@on_device
def _scale_rows(grad: Tensor, scale: Tensor) -> Tensor:
    """grad (N, V) times scale (float32, (N, 1) or (1, 1)) in float32, in grad's dtype and layout
    (its padded rows kept). One Triton pass with 16-byte accesses; torch.mul with a 0-dim float32
    CUDA tensor instead casts on the fly, which runs torch's unvectorized elementwise kernel."""
    if grad.stride(-1) != 1 or grad.stride(0) < grad.shape[1]:  # not rows of unit stride (never ours)
        grad = grad.contiguous()
    out = torch.empty_strided(grad.shape, grad.stride(), dtype=grad.dtype, device=grad.device)
    if not use_triton(grad):
        return torch.mul(grad, scale, out=out)
    N, V = grad.shape
    if N == 0 or V == 0:
        return out
    block_v, warps = _row_blocks(V)
    launch(_scale_rows_kernel)[(N,)](grad, out, scale, V, grad.stride(0), out.stride(0),
                                     scale.stride(0) if scale.shape[0] > 1 else 0,
                                     ALIGN=16 // grad.element_size(), BLOCK_V=block_v, num_warps=warps)
    return out


scale_rows = torch.library.triton_op("tritonzoo::scale_rows", _scale_rows, mutates_args=())


def aligned_rows_like(x: Tensor) -> Tensor:
    """An uninitialized tensor of x's shape and dtype; for (N, V), one whose rows start at 16-byte
    multiples: contiguous when they already do, else a view of the first V columns of a (N, V
    rounded up to LOGITS_ROW_ALIGN) buffer. A (N, V) gradient at V = 50257 would otherwise reach
    the backward's GEMMs (hidden and weight gradients) with an odd leading dimension, which
    cuBLAS runs without its tensor cores' aligned kernels; and the kernel's own loads and stores
    would not be vectorized."""
    if x.dim() != 2 or (x.shape[1] * x.element_size()) % 16 == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N, V = x.shape
    return torch.empty((N, round_up(V, LOGITS_ROW_ALIGN)), dtype=x.dtype, device=x.device)[:, :V]


_call_cross_entropy_fwd = eager_op(cross_entropy_fwd, _cross_entropy_fwd, _ce_setup, _ce_backward)


# --------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------


#: Fewer tokens per chunk make GEMMs too small to fill a GPU (and the loop's overhead rule).
MIN_CHUNK_TOKENS = 256
#: Row stride (elements) of the chunk logits buffer is a multiple of this: 128 bytes in bf16.
LOGITS_ROW_ALIGN = 64


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: a chunk's logits hold about as many elements as the hidden states
    (Liger-Kernel's rule), rounded up to a power of two, at least MIN_CHUNK_TOKENS, and at
    most n_tokens rounded up to a power of two."""
    n = next_power_of_2(max(n_tokens, 1))
    chunks = cdiv(vocab, max(hidden, 1))
    return min(n, max(MIN_CHUNK_TOKENS, next_power_of_2(cdiv(n_tokens, chunks))))


def flce_chunks(hidden, weight, bias, target, ignore_index, smoothing, mean, row_scale, grad_hidden, grad_weight,
                grad_bias, chunk_size):
    """Walks the tokens in chunks; returns per-row losses and fills the gradient buffers given.

    grad_hidden: (N, H) written; grad_weight: (V, H) accumulated into (zeros in);
    grad_bias: (V,) float32 accumulated into. Each may be None (not computed). The
    gradients are those of the loss rows scaled by 1 / n_valid (mean) and row_scale.
    """
    N = hidden.shape[0]
    n_valid = _n_valid(target, ignore_index)
    need_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
    triton_path = use_triton(hidden)
    rows_fn = ce_rows_triton if triton_path else ce_rows_reference
    V = weight.shape[0]
    # One logits buffer for every chunk, its rows padded to an aligned stride: with
    # V = 50257 unpadded rows start at odd addresses, and cuBLAS's GEMMs reading or
    # writing them (all three here) lose their vectorized tensor-core kernels.
    buffer = hidden.new_empty(min(chunk_size, N), round_up(V, LOGITS_ROW_ALIGN))
    losses = []
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h = hidden[start:end]
        logits = buffer[:end - start, :V]
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        scale = row_scale[start:end] if row_scale is not None else None
        # The kernel overwrites the chunk's logits with their gradient (in place).
        losses.append(rows_fn(logits, logits if need_grad else None, target[start:end], n_valid, scale,
                              ignore_index, smoothing, mean))
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), h)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
    loss_rows = torch.cat(losses) if losses else hidden.new_empty(0, dtype=torch.float32)
    return loss_rows, n_valid


def _grad_buffers(hidden, weight, bias, needs_hidden, needs_weight):
    return (torch.empty_like(hidden) if needs_hidden else None,
            torch.zeros_like(weight) if needs_weight else None,
            bias.new_zeros(bias.shape, dtype=torch.float32) if bias is not None and needs_weight else None)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@on_device
def _fused_linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                    ignore_index: int, label_smoothing: float, reduction: int, chunk_size: int,
                                    grad_hidden_needed: bool, grad_weight_needed: bool
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias) for grad_output 1; gradients empty when not needed.

    With reduction "none" no gradient is computed here (see the module docstring).
    grad_bias is float32 (and computed with grad_weight).
    """
    per_row = reduction == REDUCTIONS["none"]
    gh, gw, gb = _grad_buffers(hidden, weight, bias, grad_hidden_needed and not per_row,
                               grad_weight_needed and not per_row)
    loss_rows, n_valid = flce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing,
                                     reduction == REDUCTIONS["mean"], None, gh, gw, gb, chunk_size)
    return (_reduce(loss_rows, n_valid, reduction), _or_empty(gh, hidden), _or_empty(gw, weight),
            _or_empty(gb, hidden))


@on_device
def _fused_linear_cross_entropy_bwd(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    target: Tensor, ignore_index: int, label_smoothing: float, chunk_size: int,
                                    grad_hidden_needed: bool, grad_weight_needed: bool
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Reduction "none": (grad_hidden, grad_weight, float32 grad_bias) for per-row grad_loss (N,)."""
    gh, gw, gb = _grad_buffers(hidden, weight, bias, grad_hidden_needed, grad_weight_needed)
    flce_chunks(hidden, weight, bias, target, ignore_index, label_smoothing, False, grad_loss.float(), gh, gw, gb,
                chunk_size)
    return _or_empty(gh, hidden), _or_empty(gw, weight), _or_empty(gb, hidden)


fused_linear_cross_entropy_fwd = torch.library.triton_op(
    "tritonzoo::fused_linear_cross_entropy_fwd", _fused_linear_cross_entropy_fwd, mutates_args=())
fused_linear_cross_entropy_bwd = torch.library.triton_op(
    "tritonzoo::fused_linear_cross_entropy_bwd", _fused_linear_cross_entropy_bwd, mutates_args=())


def _flce_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, smoothing, reduction, chunk, need_h, need_w = inputs
    _, gh, gw, gb = output
    ctx.per_row = reduction == REDUCTIONS["none"]
    if ctx.per_row:
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(gh, gw, gb)
    ctx.params = (ignore_index, smoothing, chunk, need_h, need_w, bias is not None,
                  bias.dtype if bias is not None else None)
    ctx.reference = not use_triton(hidden)
    ctx.set_materialize_grads(False)  # as in _ce_setup


def _flce_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 10
    ignore_index, smoothing, chunk, need_h, need_w, has_bias, bias_dtype = ctx.params
    if ctx.per_row:
        hidden, weight, bias, target = ctx.saved_tensors
        # An ignored row's loss has no gradient, whatever its incoming gradient (inf, NaN) holds.
        grad_loss = torch.where(target != ignore_index, grad_loss, 0.0)
        gh, gw, gb = run_backward(ctx, fused_linear_cross_entropy_bwd, _fused_linear_cross_entropy_bwd,
                                  grad_loss.contiguous(), hidden, weight, bias, target, ignore_index, smoothing,
                                  chunk, need_h, need_w)
    else:
        if not (need_h or need_w):
            raise RuntimeError("fused_linear_cross_entropy ran without computing its gradients (no input "
                               "required grad then); call it with inputs that require grad to differentiate it")
        gh, gw, gb = ctx.saved_tensors
        gh, gw, gb = (scale_gradient(ctx, g, grad_loss, None, ignore_index) if g.numel() else g
                      for g in (gh, gw, gb))
    return (gh if need_h else None, gw if need_w else None,
            gb.to(bias_dtype) if has_bias and need_w else None, None, None, None, None, None, None, None)


_call_flce_fwd = eager_op(fused_linear_cross_entropy_fwd, _fused_linear_cross_entropy_fwd, _flce_setup,
                          _flce_backward)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _check_options(ignore_index, label_smoothing, reduction) -> tuple[int, float, int]:
    """(ignore_index, label_smoothing, reduction code) as Python numbers. numpy scalars and 0-dim
    tensors are taken, as torch's F.cross_entropy takes them; bools, NaN and inf are refused."""
    ignore_index = as_int(ignore_index, "ignore_index", "an int", TypeError)
    label_smoothing = as_float(label_smoothing, "label_smoothing", "a number in [0, 1]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return ignore_index, label_smoothing, REDUCTIONS[reduction]


def _check_float(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")


def _check_target(target, n: int, vocab: int, ignore_index: int, device, rows_name: str) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if tuple(target.shape) != (n,):
        raise ValueError(f"target must have shape ({rows_name},) = ({n},), got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the inputs are on {device}")
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"ignore_index {ignore_index} does not fit the {target.dtype} target "
                         f"(it would wrap when compared)")
    if target.numel() == 0 or torch.compiler.is_compiling():
        return
    # A target out of range would make the kernel read out of bounds.
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if target.device.type != "cpu":
        # No host sync in a training step: a device-side assert, as torch's own cross-entropy.
        torch._assert_async(~bad.any(), f"target holds a value outside [0, {vocab}) and not ignore_index")
    elif bool(bad.any()):
        value = target[bad][0].item()
        raise ValueError(f"target holds {value}, outside [0, {vocab}) and not ignore_index ({ignore_index})")


def _requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> Tensor:
    """torch.nn.functional.cross_entropy for logits (N, V) and class targets (N,), fused.

    logits fp16/bf16/fp32 (any V >= 1); target int64/int32 in [0, V) or ignore_index.
    ignore_index, label_smoothing: Python, numpy or 0-dim tensor numbers (not bools, NaN or inf).
    Returns the float32 loss: a scalar ("mean", "sum") or (N,) ("none"); with "mean" and every
    row ignored, NaN with a zero gradient (as torch). The forward
    also computes the logits' gradient (one extra (N, V) buffer while the graph lives).
    Raises TypeError/ValueError naming the bad argument.
    """
    _check_float(logits, "logits")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have 2 dims (tokens, vocab) with vocab >= 1, got shape {tuple(logits.shape)}")
    ignore_index, label_smoothing, red = _check_options(ignore_index, label_smoothing, reduction)
    _check_target(target, logits.shape[0], logits.shape[1], ignore_index, logits.device, "tokens")
    logits = unit_stride(logits)
    loss, _ = _call_cross_entropy_fwd(logits, target.contiguous(), ignore_index, label_smoothing, red,
                                      _requires_grad(logits))
    return loss


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                               ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                               chunk_size: Optional[int] = None) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, target, ...) without the (N, V) logits.

    hidden (N, H), weight (V, H) (an nn.Linear's / tied embedding's layout), bias None
    or (V,), all of one dtype (fp16/bf16/fp32) and device; target (N,) as cross_entropy.
    chunk_size: tokens per chunk (default: default_chunk_size, chunk logits about the
    size of hidden). Under torch.autocast the three are cast to the autocast dtype first,
    as for a linear layer. Returns the float32 loss as cross_entropy. Gradients flow to
    hidden, weight and bias. Raises TypeError/ValueError naming the bad argument.
    """
    _check_float(hidden, "hidden")
    _check_float(weight, "weight")
    dtype = autocast_dtype(hidden.device.type)
    if dtype is not None:
        # As autocast runs the linear layer this replaces: in the autocast dtype.
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if isinstance(bias, Tensor) else bias
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have 2 dims (tokens, hidden), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (vocab, hidden) = (V, {hidden.shape[1]}) with V >= 1, "
                         f"got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_float(t, name)
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but hidden has {hidden.dtype}; they must match")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape (vocab,) = ({V},), got {tuple(bias.shape)}")
    ignore_index, label_smoothing, red = _check_options(ignore_index, label_smoothing, reduction)
    _check_target(target, hidden.shape[0], V, ignore_index, hidden.device, "tokens")
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], V, hidden.shape[1])
    else:
        chunk_size = as_int(chunk_size, "chunk_size", "a positive int or None")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    need_h = _requires_grad(hidden)
    need_w = _requires_grad(weight, bias)
    loss, _, _, _ = _call_flce_fwd(
        hidden.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        target.contiguous(), ignore_index, label_smoothing, red, chunk_size, need_h, need_w)
    return loss

