"""Activations in Triton: GELU with a fused bias, and the gated units SwiGLU and GeGLU.

    gelu(x, bias=None, approximate="none"|"tanh")   y = gelu(x + bias)
    swiglu(x, y=None)                               silu(x) * y
    geglu(x, y=None, approximate="none"|"tanh")     gelu(x) * y

With y None, the gated units take one packed tensor (..., 2N) and split it into
x = [..., :N] and y = [..., N:] (a fused gate/up projection's output), without copies
in either direction: the backward writes both halves of one gradient tensor.

Arithmetic is float32; outputs and gradients are in the input dtype. GELU's erf form
is exact; the tanh form is torch's approximate="tanh". Each kernel is an elementwise
pass over (rows, cols) tiles; the bias gradient is reduced per row tile inside the
backward kernel, then across tiles (deterministic, no atomics).

torch.library ops: tritonzoo::gelu_fwd/gelu_bwd, tritonzoo::glu_fwd/glu_bwd; the
*_reference functions are the PyTorch path of the same semantics. Eager float32 calls on
that path run torch's F.gelu / F.silu under torch's autograd (kernels.runtime.torch_native).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .runtime import cdiv, launch, eager_op, on_device, INTERPRET, run_backward, torch_native, unit_stride, use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Activation codes of the kernels (constexpr ACT).
SILU, GELU_ERF, GELU_TANH = 0, 1, 2
_APPROXIMATE = {"none": GELU_ERF, "tanh": GELU_TANH}

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
LOG2E = tl.constexpr(1.4426950408889634)

#: The GPU's tile (rows x columns, warps): 16 elements per thread per tensor, so GeGLU's
#: backward stays under 128 registers. The interpreter runs its own, wider-row tile;
#: tests/test_gpu_tiles_interpreter.py runs the GPU's through it too.
GPU_TILE = dict(BLOCK_M=16, BLOCK_N=256, num_warps=8)
_TILE = dict(BLOCK_M=8, BLOCK_N=512, num_warps=4) if INTERPRET else GPU_TILE


@triton.jit
def _tanh_sech2(z):
    """tanh(z) and 1 - tanh(z)^2 from e = exp(-2|z|) in (0, 1]: no overflow, and no
    cancellation in 1 - t^2 = 4e / (1 + e)^2 (the interpreter runs it too: no libdevice)."""
    e = tl.math.exp2(tl.abs(z) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t), 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _act(x, ACT: tl.constexpr):
    """(f(x), f'(x)) in float32 for the activation code ACT."""
    if ACT == 0:  # silu
        # The sigmoid from e = exp(-|x|) in (0, 1]: no overflow for either sign.
        e = tl.math.exp2(tl.abs(x) * (-LOG2E))
        sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return x * sig, sig * (1.0 + x * (1.0 - sig))
    elif ACT == 1:  # gelu, erf form
        cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))
        pdf = tl.math.exp2(-0.5 * x * x * LOG2E) * INV_SQRT_2PI
        return x * cdf, cdf + x * pdf
    else:  # gelu, tanh form
        inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t, sech2 = _tanh_sech2(inner)
        d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * sech2 * d_inner


@triton.jit
def _gelu_fwd_kernel(X, B, Y, M, N, stride_x, stride_y,
                     ACT: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        x += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y, _ = _act(x, ACT)
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, B, DX, DB, M, N, stride_dy, stride_x, stride_dx,
                     ACT: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        x += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _, d = _act(x, ACT)
    dx = dy * d
    tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_B:
        # This row tile's share of dbias (float32); the tiles are summed afterwards.
        tl.store(DB + pid_m.to(tl.int64) * N + cols, tl.sum(tl.where(mask, dx, 0.0), axis=0), mask=cols < N)


@triton.jit
def _glu_fwd_kernel(X, Yg, Out, M, N, stride_x, stride_y, stride_o, y_col,
                    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Yg + r64 * stride_y + y_col + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    fa, _ = _act(a, ACT)
    tl.store(Out + r64 * stride_o + cols[None, :], (fa * b).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DO, X, Yg, DX, DYg, M, N, stride_do, stride_x, stride_y, stride_dx, stride_dy, y_col,
                    ACT: tl.constexpr, PACKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # PACKED: both gradients go to DX (the gate's at column y_col) and DYg is not written.
    # One tensor passed as two written arguments would break torch.compile: functionalization
    # clones each written argument on its own, and one clone's half would be lost.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Yg + r64 * stride_y + y_col + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + r64 * stride_do + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    fa, dfa = _act(a, ACT)
    tl.store(DX + r64 * stride_dx + cols[None, :], (do * b * dfa).to(DX.dtype.element_ty), mask=mask)
    if PACKED:
        tl.store(DX + r64 * stride_dx + y_col + cols[None, :], (do * fa).to(DX.dtype.element_ty), mask=mask)
    else:
        tl.store(DYg + r64 * stride_dy + y_col + cols[None, :], (do * fa).to(DYg.dtype.element_ty), mask=mask)


def _grid(M, N):
    return (cdiv(M, _TILE["BLOCK_M"]), cdiv(N, _TILE["BLOCK_N"]))


# --------------------------------------------------------------------------------------
# Launchers (x 2-D (M, N) with unit column stride; bias (N,) contiguous)
# --------------------------------------------------------------------------------------


def gelu_triton_fwd(x, bias, act):
    """gelu(x + bias) for x (M, N)."""
    M, N = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if y.numel():
        launch(_gelu_fwd_kernel)[_grid(M, N)](x, bias if bias is not None else x, y, M, N, x.stride(0),
                                              y.stride(0), ACT=act, HAS_B=bias is not None, **_TILE)
    return y


def gelu_triton_bwd(dy, x, bias, act):
    """(dx, float32 dbias or empty) of gelu(x + bias)."""
    M, N = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    tiles = cdiv(M, _TILE["BLOCK_M"])
    db_part = x.new_zeros((tiles, N), dtype=torch.float32) if bias is not None else x.new_empty(0)
    if dx.numel():
        launch(_gelu_bwd_kernel)[_grid(M, N)](dy, x, bias if bias is not None else x, dx,
                                              db_part if bias is not None else dx, M, N, dy.stride(0), x.stride(0),
                                              dx.stride(0), ACT=act, HAS_B=bias is not None, **_TILE)
    db = db_part.sum(0) if bias is not None else x.new_empty(0, dtype=torch.float32)
    return dx, db


def glu_triton_fwd(x, y, act):
    """act(a) * b with (a, b) = (x, y), or the halves of x (M, 2N) when y is None."""
    M = x.shape[0]
    N = x.shape[1] if y is not None else x.shape[1] // 2
    out = x.new_empty((M, N))
    if out.numel():
        gate = y if y is not None else x
        launch(_glu_fwd_kernel)[_grid(M, N)](x, gate, out, M, N, x.stride(0), gate.stride(0), out.stride(0),
                                             0 if y is not None else N, ACT=act, **_TILE)
    return out


def glu_triton_bwd(dout, x, y, act):
    """(dx, dy): dy empty when y is None (then dx (M, 2N) holds both halves' gradients)."""
    M, N = dout.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dy = torch.empty_like(y, memory_format=torch.contiguous_format) if y is not None else x.new_empty(0)
    if dout.numel():
        packed = y is None
        gate, dgate = (x, dout) if packed else (y, dy)  # packed: dgate is an unwritten placeholder
        launch(_glu_bwd_kernel)[_grid(M, N)](dout, x, gate, dx, dgate, M, N, dout.stride(0), x.stride(0),
                                             gate.stride(0), dx.stride(0), dgate.stride(0),
                                             N if packed else 0, ACT=act, PACKED=packed, **_TILE)
    return dx, dy


# --------------------------------------------------------------------------------------
# The PyTorch path (float32 inside, as the kernels)
# --------------------------------------------------------------------------------------


def _act_reference(x: Tensor, act: int) -> Tensor:
    if act == SILU:
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == GELU_TANH else "none")


def _act_backward_reference(grad: Tensor, x: Tensor, act: int) -> Tensor:
    """grad * act'(x), by torch's fused backward of the activation."""
    if act == SILU:
        if torch.is_grad_enabled():  # a backward with create_graph: aten.silu_backward has no derivative
            s = torch.sigmoid(x)
            return grad * s * (1 + x * (1 - s))
        return torch.ops.aten.silu_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if act == GELU_TANH else "none")


def gelu_reference_fwd(x, bias, act):
    """The PyTorch forward of gelu(x + bias)."""
    xf = x.float() + bias.float() if bias is not None else x.float()
    return _act_reference(xf, act).to(x.dtype)


def gelu_reference_bwd(dy, x, bias, act):
    """The PyTorch backward: (dx, float32 dbias or empty)."""
    xf = x.float() + bias.float() if bias is not None else x.float()
    dx = _act_backward_reference(dy.float(), xf, act)
    db = dx.sum(0) if bias is not None else x.new_empty(0, dtype=torch.float32)
    return dx.to(x.dtype), db


def _halves(x, y):
    if y is not None:
        return x, y
    n = x.shape[1] // 2
    return x[:, :n], x[:, n:]


def glu_reference_fwd(x, y, act):
    """The PyTorch forward of act(a) * b."""
    a, b = _halves(x, y)
    return (_act_reference(a.float(), act) * b.float()).to(x.dtype)


def glu_reference_bwd(dout, x, y, act):
    """The PyTorch backward, laid out as glu_triton_bwd's."""
    a, b = _halves(x, y)
    af, do = a.float(), dout.float()
    da = _act_backward_reference(do * b.float(), af, act).to(x.dtype)
    db = (do * _act_reference(af, act)).to(b.dtype)
    if y is not None:
        return da, db
    return torch.cat((da, db), dim=1), x.new_empty(0)


# --------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------


@on_device
def _gelu_fwd(x: Tensor, bias: Optional[Tensor], act: int) -> Tensor:
    """gelu(x + bias) of x (M, N); act is GELU_ERF or GELU_TANH."""
    return (gelu_triton_fwd if use_triton(x) else gelu_reference_fwd)(x, bias, act)


@on_device
def _gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], act: int) -> tuple[Tensor, Tensor]:
    """(dx, float32 dbias or empty)."""
    return (gelu_triton_bwd if use_triton(x) else gelu_reference_bwd)(dy, x, bias, act)


@on_device
def _glu_fwd(x: Tensor, y: Optional[Tensor], act: int) -> Tensor:
    """act(x) * y of (M, N) tensors, or of the two halves of x (M, 2N) when y is None."""
    return (glu_triton_fwd if use_triton(x) else glu_reference_fwd)(x, y, act)


@on_device
def _glu_bwd(dout: Tensor, x: Tensor, y: Optional[Tensor], act: int) -> tuple[Tensor, Tensor]:
    """(dx, dy); when y is None, dx (M, 2N) holds both halves and dy is empty."""
    return (glu_triton_bwd if use_triton(x) else glu_reference_bwd)(dout, x, y, act)


gelu_fwd = torch.library.triton_op("tritonzoo::gelu_fwd", _gelu_fwd, mutates_args=())
gelu_bwd = torch.library.triton_op("tritonzoo::gelu_bwd", _gelu_bwd, mutates_args=())
glu_fwd = torch.library.triton_op("tritonzoo::glu_fwd", _glu_fwd, mutates_args=())
glu_bwd = torch.library.triton_op("tritonzoo::glu_bwd", _glu_bwd, mutates_args=())


def _gelu_setup(ctx, inputs, output):
    x, bias, act = inputs
    ctx.save_for_backward(x, bias)
    ctx.act = act
    ctx.reference = not use_triton(x)


def _gelu_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dy = unit_stride(dy)
    dx, db = run_backward(ctx, gelu_bwd, _gelu_bwd, dy, x, bias, ctx.act)
    return dx, db.to(bias.dtype) if bias is not None else None, None


def _glu_setup(ctx, inputs, output):
    x, y, act = inputs
    ctx.save_for_backward(x, y)
    ctx.act = act
    ctx.reference = not use_triton(x)


def _glu_backward(ctx, dout):
    x, y = ctx.saved_tensors
    dout = unit_stride(dout)
    dx, dy = run_backward(ctx, glu_bwd, _glu_bwd, dout, x, y, ctx.act)
    return dx, dy if y is not None else None, None


def _act_derivatives(u: Tensor, act: int) -> tuple[Tensor, Tensor, Tensor]:
    """(act(u), act'(u), act''(u)) of float32 u, in torch ops: the backward ops' own derivatives."""
    if act == SILU:
        s = torch.sigmoid(u)
        return u * s, s * (1 + u * (1 - s)), s * (1 - s) * (2 + u * (1 - 2 * s))
    if act == GELU_ERF:
        pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
        cdf = 0.5 * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
        return u * cdf, cdf + u * pdf, pdf * (2.0 - u * u)
    k, c = math.sqrt(2.0 / math.pi), 0.044715
    t = torch.tanh(k * (u + c * u * u * u))
    dz, d2z, sech2 = k * (1.0 + 3.0 * c * u * u), 6.0 * k * c * u, 1.0 - t * t
    second = sech2 * (dz + 0.5 * u * (d2z - 2.0 * t * dz * dz))
    return 0.5 * u * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * u * sech2 * dz, second


def _bwd_setup(ctx, inputs, output):
    """Of gelu_bwd (dy, x, bias, act) and glu_bwd (dout, x, y, act): the three tensors and act."""
    *tensors, act = inputs
    ctx.save_for_backward(*tensors)
    ctx.act = act


def _gelu_bwd_backward(ctx, gdx, gdb):
    """Of (dx, dbias) = (dy * g'(u), sum_rows(dy * g'(u))), u = x + bias."""
    dy, x, bias = ctx.saved_tensors
    u = x.float() + bias.float() if bias is not None else x.float()
    _, d1, d2 = _act_derivatives(u, ctx.act)
    g = gdx.float() + gdb.float() if bias is not None else gdx.float()
    gx = g * dy.float() * d2
    return (g * d1).to(dy.dtype), gx.to(x.dtype), gx.sum(0).to(bias.dtype) if bias is not None else None, None


def _glu_bwd_backward(ctx, gdx, gdy):
    """Of (da, db) = (dout * b * g'(a), dout * g(a)); packed (y None): dx = [da, db]."""
    dout, x, y = ctx.saved_tensors
    a, b = _halves(x, y)
    gda, gdb = _halves(gdx, gdy if y is not None else None)
    af, bf, do, gda, gdb = a.float(), b.float(), dout.float(), gda.float(), gdb.float()
    g0, g1, g2 = _act_derivatives(af, ctx.act)
    g_dout = gda * bf * g1 + gdb * g0
    g_a = do * (gda * bf * g2 + gdb * g1)
    g_b = do * gda * g1
    if y is not None:
        return g_dout.to(dout.dtype), g_a.to(x.dtype), g_b.to(y.dtype), None
    return g_dout.to(dout.dtype), torch.cat((g_a, g_b), dim=1).to(x.dtype), None, None


# The backward ops carry their own autograd formulas (analytic, in torch ops), so second
# derivatives are exact on every path: the op (Triton, torch.compile) and the eager body.
gelu_bwd.register_autograd(_gelu_bwd_backward, setup_context=_bwd_setup)
glu_bwd.register_autograd(_glu_bwd_backward, setup_context=_bwd_setup)
_call_gelu_fwd = eager_op(gelu_fwd, _gelu_fwd, _gelu_setup, _gelu_backward, double_backward=True)
_call_glu_fwd = eager_op(glu_fwd, _glu_fwd, _glu_setup, _glu_backward, double_backward=True)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _check_x(x, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got a scalar")


def _act_code(approximate) -> int:
    if not isinstance(approximate, str) or approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _APPROXIMATE[approximate]


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x  # -1 fails for 0 columns
    return unit_stride(x2)


def gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GELU of x + bias, fused: torch's ``F.gelu(x + bias, approximate=approximate)``.

    x (..., N), fp16/bf16/fp32; bias None or (N,) of x's dtype. approximate "none" (erf)
    or "tanh". Returns x's shape and dtype; gradients flow to x and bias.
    Raises TypeError/ValueError naming the bad argument.
    """
    _check_x(x)
    act = _act_code(approximate)
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"bias must have shape (x.shape[-1],) = ({x.shape[-1]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; they must match")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.contiguous()
    if x.dtype == torch.float32 and torch_native(x):
        return F.gelu(x + bias if bias is not None else x, approximate=approximate)
    return _call_gelu_fwd(_rows(x), bias, act).view(*x.shape)


def _glu(x, y, act, what):
    _check_x(x)
    if y is None:
        if x.shape[-1] % 2:
            raise ValueError(f"{what} with y=None splits x's last dim in two halves; it must be even, "
                             f"got shape {tuple(x.shape)}")
        if x.dtype == torch.float32 and torch_native(x):
            a, b = x.chunk(2, dim=-1)
            return _act_reference(a, act) * b
        out_shape = (*x.shape[:-1], x.shape[-1] // 2)
        return _call_glu_fwd(_rows(x), None, act).view(*out_shape)
    _check_x(y, "y")
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if y.dtype != x.dtype:
        raise TypeError(f"y has dtype {y.dtype} but x has {x.dtype}; they must match")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if x.dtype == torch.float32 and torch_native(x):
        return _act_reference(x, act) * y
    return _call_glu_fwd(_rows(x), _rows(y), act).view(*x.shape)


def swiglu(x: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """SwiGLU: silu(x) * y, fused (forward and backward in one pass each).

    x, y (..., N) of one dtype (fp16/bf16/fp32); with y None, x is (..., 2N) and its
    halves are (x, y). Returns (..., N) in x's dtype. Raises TypeError/ValueError
    naming the bad argument.
    """
    return _glu(x, y, SILU, "swiglu")


def geglu(x: Tensor, y: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """GeGLU: gelu(x, approximate) * y, fused. Shapes, dtypes and errors as swiglu."""
    return _glu(x, y, _act_code(approximate), "geglu")
