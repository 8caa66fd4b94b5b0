"""LayerNorm and RMSNorm in Triton, each optionally fused with a residual add.

    y = (x - mean) * rstd * weight + bias          (LayerNorm; RMSNorm: mean = 0)
    rstd = 1 / sqrt(var + eps), var over the last dim, statistics in float32

The add variants compute s = x + residual (rounded to x's dtype, as an unfused
``x + residual`` would be), normalize s, and return both y and s: the pre-norm block's
residual stream in one pass over memory.

Kernels: rows are normalized in tiles of BLOCK_M rows x BLOCK_N = next_power_of_2(N)
columns while BLOCK_N <= MAX_FUSED_BLOCK (the whole row in registers: one read, one
write); longer rows loop over the row in BLOCK_N chunks (variance around the mean in a
second pass, then the output), so any hidden size runs without register spills. The
backward computes dx row by row, and dweight/dbias as per-program partial sums over a
fixed range of rows, reduced afterwards (no atomics: deterministic).

The launchers check nothing (the public functions at the bottom do); the torch.library
ops are tritonzoo::norm_fwd / norm_bwd; norm_reference_* is the PyTorch path of the
same semantics (CPU without the interpreter): in float32, torch's fused LayerNorm (forward
and backward) and RMSNorm (forward); otherwise elementwise ops with float32 statistics.
Eager float32 layer_norm / rms_norm calls on that path call F.layer_norm / F.rms_norm
themselves, under torch's autograd (_native_norm; kernels.runtime.torch_native).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .norms_looped import _bwd_looped, _dwdb_looped, _fwd_looped
from .runtime import (as_float, cdiv, launch, eager_op, on_device, INTERPRET, next_power_of_2, run_backward,
                      torch_native, unit_stride, use_triton)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest hidden size accepted (the looped kernels have no limit of their own).
MAX_HIDDEN = 1 << 20
#: Rows up to this many (power-of-two padded) elements are held whole in registers; on
#: an H100 8192 fp32 values over 16 warps is 16 per thread per live tensor, no spills.
#: The interpreter uses a small limit so that the tests reach the looped kernels.
GPU_MAX_FUSED_BLOCK = 8192
MAX_FUSED_BLOCK = 1024 if INTERPRET else GPU_MAX_FUSED_BLOCK
#: Tile size of the short-row kernels: several rows per program when rows are short.
_TILE_ELEMENTS = 4096


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_fused(X, R, W, B, Y, S, Mean, Rstd, M, N, stride_x, stride_r, stride_y, stride_s, eps,
               IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the stream's dtype before normalizing, as unfused code
        # does; the backward recomputes from the stored sum and so sees the same values.
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + r64 * stride_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        tl.store(Mean + rows, mean, mask=row_ok)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_fused(X, W, DY, DS, DX, Mean, Rstd, DW, DB, M, N, stride_x, stride_dy, stride_ds, stride_dx,
               rows_per_program,
               IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DS: tl.constexpr,
               NEED_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_lo = pid * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, M)
    for r0 in range(row_lo, row_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_hi
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db += tl.sum(dy, axis=0)
    if NEED_DW:
        tl.store(DW + pid * N + cols, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB + pid * N + cols, db, mask=col_ok)


# --------------------------------------------------------------------------------------
# Launchers (inputs arrive validated: 2-D (M, N) with unit column stride)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    """How many programs share the rows in the backward (the partial-sum count)."""
    if device.type != "cuda":
        return 4  # the interpreter: few programs, each looping over many rows
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _plan(n: int) -> tuple[bool, int, int, int]:
    """(fused, BLOCK_M, BLOCK_N, num_warps of the forward) for rows of n elements.

    The backward keeps more tensors live per element: it runs twice the warps.
    """
    # The block and warp counts are compile-time constants: concrete even when n is symbolic
    # (torch.compile's dynamic shapes; a SymInt num_warps fails when the traced graph runs).
    block_n = max(16, next_power_of_2(int(n)))
    if block_n <= MAX_FUSED_BLOCK:
        block_m = max(1, min(64, _TILE_ELEMENTS // block_n))
        tile = block_m * block_n
        return True, block_m, block_n, min(16, max(1, tile // 512))
    # Looped: chunks of MAX_FUSED_BLOCK / 2, 8 elements per thread per live tensor.
    block_n = MAX_FUSED_BLOCK // 2
    return False, 1, block_n, min(16, max(1, block_n // 256))


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.float32)


def norm_triton_fwd(x, residual, weight, bias, eps, is_rms):
    """The Triton forward: (y, sum or empty, mean or empty, rstd); x (M, N)."""
    M, N = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else _empty(x)
    mean = _empty(x) if is_rms else x.new_empty(M, dtype=torch.float32)
    rstd = x.new_empty(M, dtype=torch.float32)
    if M == 0:
        return y, s, mean, rstd
    fused, block_m, block_n, warps = _plan(N)
    dummy = x
    args = (x, residual if residual is not None else dummy, weight if weight is not None else dummy,
            bias if bias is not None else dummy, y, s if residual is not None else dummy,
            mean if not is_rms else rstd, rstd, M, N, x.stride(0),
            residual.stride(0) if residual is not None else 0, y.stride(0), s.stride(0) if residual is not None else 0,
            eps)
    flags = dict(IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                 BLOCK_N=block_n, num_warps=warps)
    if fused:
        launch(_fwd_fused)[(cdiv(M, block_m),)](*args, BLOCK_M=block_m, **flags)
    else:
        launch(_fwd_looped)[(M,)](*args, **flags)
    return y, s, mean, rstd


def norm_triton_bwd(dy, ds, src, weight, has_bias, mean, rstd, is_rms, need_dw):
    """The Triton backward: (dx, float32 dweight or empty, float32 dbias or empty); src is x or the sum.

    dweight is computed when need_dw (weight given and requiring grad), dbias when has_bias.
    Both come as partial sums, one row per program (per row group for long rows), summed last."""
    M, N = src.shape
    dx = torch.empty_like(src, memory_format=torch.contiguous_format)
    fused, block_m, block_n, warps = _plan(N)
    target_programs = _programs(src.device)
    rows_per_program = block_m * cdiv(cdiv(M, target_programs), block_m)
    programs = cdiv(M, rows_per_program) if M else 0
    has_w = weight is not None
    need_dw = has_w and need_dw
    if fused:
        part_rows = programs
    else:  # _dwdb_looped's row groups: about as many programs in all as for dx
        rows_per_group = cdiv(M, max(1, target_programs // cdiv(N, block_n))) if M else 0
        part_rows = cdiv(M, rows_per_group) if M else 0
    # Every partial row is written whole (no zero fill needed).
    dw_part = src.new_empty(part_rows, N, dtype=torch.float32) if need_dw else _empty(src)
    db_part = src.new_empty(part_rows, N, dtype=torch.float32) if has_bias else _empty(src)
    if M > 0:
        dummy = src
        mean_arg = mean if not is_rms else rstd
        w_arg, ds_arg = weight if has_w else dummy, ds if ds is not None else dummy
        strides = (src.stride(0), dy.stride(0), ds.stride(0) if ds is not None else 0, dx.stride(0))
        if fused:
            launch(_bwd_fused)[(programs,)](
                src, w_arg, dy, ds_arg, dx, mean_arg, rstd, dw_part if need_dw else dummy,
                db_part if has_bias else dummy, M, N, *strides, rows_per_program,
                IS_RMS=is_rms, HAS_W=has_w, HAS_B=has_bias, HAS_DS=ds is not None, NEED_DW=need_dw,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=min(16, 2 * warps))
        else:
            launch(_bwd_looped)[(programs,)](
                src, w_arg, dy, ds_arg, dx, mean_arg, rstd, M, N, *strides, rows_per_program,
                IS_RMS=is_rms, HAS_W=has_w, HAS_DS=ds is not None, BLOCK_N=block_n, num_warps=min(16, 2 * warps))
            if need_dw or has_bias:
                launch(_dwdb_looped)[(cdiv(N, block_n), part_rows)](
                    src, dy, mean_arg, rstd, dw_part if need_dw else dummy, db_part if has_bias else dummy,
                    M, N, src.stride(0), dy.stride(0), rows_per_group,
                    IS_RMS=is_rms, NEED_DW=need_dw, HAS_B=has_bias, BLOCK_N=block_n, num_warps=warps)
    # The second, deterministic reduction of the partial sums.
    return dx, dw_part.sum(0) if need_dw else _empty(src), db_part.sum(0) if has_bias else _empty(src)


# --------------------------------------------------------------------------------------
# The PyTorch path: the same semantics in plain torch, float32 inside
# --------------------------------------------------------------------------------------


def _torch_fused_applies(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether torch's fused norm computes exactly this op: float32 throughout.

    torch's fused LayerNorm keeps its statistics in the input's dtype for half inputs,
    where this op keeps them in float32, so only float32 takes it.
    """
    return x.dtype == torch.float32 and all(p is None or p.dtype == torch.float32 for p in params)


def _torch_fused_fwd(src, weight, bias, eps, is_rms):
    """(y, mean or empty, rstd) from torch's fused forward; float32 inputs."""
    if is_rms:
        y, rstd = torch.ops.aten._fused_rms_norm(src, [src.shape[-1]], weight, eps)
        return (y + bias if bias is not None else y), _empty(src), rstd.view(-1)
    y, mean, rstd = torch.ops.aten.native_layer_norm(src, [src.shape[-1]], weight, bias, eps)
    return y, mean.view(-1), rstd.view(-1)


def _torch_fused_layer_norm_bwd(dy, src, weight, mean, rstd, need_dw=True):
    """(dx, dweight or empty) from torch's fused LayerNorm backward; float32 inputs."""
    need_dw = weight is not None and need_dw
    dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
        dy, src, [src.shape[-1]], mean[:, None], rstd[:, None], weight, None, [True, need_dw, False])
    return dx, dw if need_dw else _empty(src)


def norm_reference_fwd(x, residual, weight, bias, eps, is_rms):
    """The PyTorch forward, same outputs as norm_triton_fwd."""
    s = (x.float() + residual.float()).to(x.dtype) if residual is not None else _empty(x)
    src = s if residual is not None else x
    if _torch_fused_applies(src, weight, bias):
        y, mean, rstd = _torch_fused_fwd(src, weight, bias, eps, is_rms)
        return y, s, mean, rstd
    xf = src.float()
    if is_rms:
        mean, xc = _empty(x), xf
    else:
        mean = xf.mean(-1)
        xc = xf - mean[:, None]
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), s, mean, rstd


def norm_reference_bwd(dy, ds, src, weight, has_bias, mean, rstd, is_rms, need_dw):
    """The PyTorch backward, same outputs as norm_triton_bwd."""
    dyf = dy.float()
    db = dyf.sum(0) if has_bias else _empty(src)
    # (RMSNorm's fused backward has no CPU kernel; at hidden size 1 LayerNorm's gives about 1e-4
    # where the gradient is exactly 0, which the formula below gives: wdy - mean(wdy) = 0.)
    if not is_rms and _torch_fused_applies(src, dy, weight) and src.shape[-1] > 1:
        dx, dw = _torch_fused_layer_norm_bwd(dy, src, weight, mean, rstd, need_dw)
        return (dx + ds if ds is not None else dx), dw, db
    xf = src.float()
    xhat = (xf if is_rms else xf - mean[:, None]) * rstd[:, None]
    wdy = dyf * weight.float() if weight is not None else dyf
    dx = wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)
    if not is_rms:
        dx = dx - wdy.mean(-1, keepdim=True)
    dx = dx * rstd[:, None]
    if ds is not None:
        dx = dx + ds.float()
    dw = (dyf * xhat).sum(0) if weight is not None and need_dw else _empty(src)
    return dx.to(src.dtype), dw, db


# --------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------


@on_device
def _norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, residual sum or empty, mean or empty, rstd) of x (M, N); see the module docstring."""
    impl = norm_triton_fwd if use_triton(x) else norm_reference_fwd
    return impl(x, residual, weight, bias, eps, is_rms)


@on_device
def _norm_bwd(dy: Tensor, ds: Optional[Tensor], src: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Tensor,
              rstd: Tensor, is_rms: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight or empty, dbias or empty), the last two float32; ds: the gradient into the sum output.

    has_bias / need_dw: whether to compute dbias / dweight (a frozen parameter needs neither)."""
    impl = norm_triton_bwd if use_triton(src) else norm_reference_bwd
    return impl(dy, ds, src, weight, has_bias, mean, rstd, is_rms, need_dw)


norm_fwd = torch.library.triton_op("tritonzoo::norm_fwd", _norm_fwd, mutates_args=())
norm_bwd = torch.library.triton_op("tritonzoo::norm_bwd", _norm_bwd, mutates_args=())


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.flags = (residual is not None, bias is not None, is_rms)
    ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
    ctx.reference = not use_triton(x)


def _backward(ctx, dy, ds, _dmean, _drstd):
    src, weight, mean, rstd = ctx.saved_tensors
    has_res, has_bias, is_rms = ctx.flags
    if dy is None:
        dy = torch.zeros_like(src)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if ds is not None and ds.stride(-1) != 1:
        ds = ds.contiguous()
    # A frozen weight or bias (fine-tuning, gradients for the input only) gets no reduction.
    need_dw, need_db = weight is not None and ctx.needs_input_grad[2], has_bias and ctx.needs_input_grad[3]
    dx, dw, db = run_backward(ctx, norm_bwd, _norm_bwd, dy, ds if has_res else None, src, weight, need_db, mean,
                              rstd, is_rms, need_dw)
    w_dtype, b_dtype = ctx.dtypes
    # x and residual get equal gradients but not one tensor: as leaves, their .grad would
    # share storage, and accumulating into one (gradient accumulation) would change both.
    return (dx, dx.clone() if has_res else None, dw.to(w_dtype) if need_dw else None,
            db.to(b_dtype) if need_db else None, None, None)


_call_norm_fwd = eager_op(norm_fwd, _norm_fwd, _setup_context, _backward)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _check_param(t, name: str, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if t.shape != x.shape[-1:]:
        raise ValueError(f"{name} must have shape (hidden,) = ({x.shape[-1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_residual(residual) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor (for no residual, call layer_norm / rms_norm), "
                        f"got {type(residual).__name__}")


def _native_norm(x, weight, bias, eps, is_rms):
    """layer_norm / rms_norm as torch's own differentiable norm (runtime.torch_native): float32,
    hidden > 1 (at hidden 1 torch's LayerNorm backward gives about 1e-4 where the gradient is
    exactly 0). Not the add variants: their sum output requires grad even where neither
    input does (a gradient may be asked of it), which torch's x + residual would not."""
    if is_rms:
        y = F.rms_norm(x, x.shape[-1:], weight, eps)
        return y + bias if bias is not None else y
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _run(x, residual, weight, bias, eps, is_rms):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.dim() < 1 or not 1 <= x.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"x must have a last (hidden) dim of size 1 to {MAX_HIDDEN}, got shape {tuple(x.shape)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    _check_param(weight, "weight", x)
    _check_param(bias, "bias", x)
    # numpy scalars and 0-dim tensors too, as torch's F.layer_norm takes them; bools, NaN and inf refused.
    eps = as_float(eps, "eps", "a finite number > 0")
    if not eps > 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if residual is None and torch_native(x) and x.shape[-1] > 1 and _torch_fused_applies(x, weight, bias):
        return _native_norm(x, weight, bias, eps, is_rms)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x2 = unit_stride(x2)
    r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, shape[-1])
        r2 = unit_stride(r2)
    weight = weight if weight is None or weight.is_contiguous() else weight.contiguous()
    bias = bias if bias is None or bias.is_contiguous() else bias.contiguous()
    y, s, _, _ = _call_norm_fwd(x2, r2, weight, bias, eps, is_rms)
    if residual is None:
        return y.view(*shape)
    return y.view(*shape), s.view(*shape)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias.

    x (..., hidden), fp16/bf16/fp32, hidden 1 to MAX_HIDDEN; weight, bias None or
    (hidden,) of any of those dtypes; eps a finite number > 0 (Python, numpy or a 0-dim
    tensor). Statistics in float32; returns x's shape and dtype
    (torch.nn.functional.layer_norm(x, (hidden,), weight, bias, eps) semantics).
    Raises TypeError/ValueError naming the bad argument.
    """
    return _run(x, None, weight, bias, eps, False)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
             eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight + bias.

    Shapes, dtypes and errors as layer_norm.
    """
    return _run(x, None, weight, bias, eps, True)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Fused ``s = x + residual; y = layer_norm(s)``; returns (y, s).

    residual has x's shape and dtype; s is rounded to that dtype before it is
    normalized (as the unfused code computes it). Gradients flow into x and residual
    through both outputs. Other arguments and errors as layer_norm.
    """
    _check_residual(residual)
    return _run(x, residual, weight, bias, eps, False)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Fused ``s = x + residual; y = rms_norm(s)``; returns (y, s). As add_layer_norm."""
    _check_residual(residual)
    return _run(x, residual, weight, bias, eps, True)
