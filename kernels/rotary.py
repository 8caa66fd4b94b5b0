"""Rotary position embedding (RoPE) in Triton, with FlashAttention-2's argument conventions.

    apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None, position_ids=None)

x is (batch, seqlen, nheads, headdim), or packed (total, nheads, headdim) with
cu_seqlens; cos and sin are (seqlen_ro, rotary_dim / 2), as
``flash_attn.layers.rotary.apply_rotary_emb`` takes them. The first rotary_dim features
of each head are rotated, the rest pass through unchanged (partial rotary). Token s of
batch row b sits at position p = s + seqlen_offsets (an int, or a (batch,) tensor: the
KV-cache lengths when decoding), or p = position_ids[b, s] when position_ids is given.

    rotate-half (GPT-NeoX, LLaMA): x1 = x[:r/2], x2 = x[r/2:r]
    interleaved (GPT-J):           x1 = x[0:r:2], x2 = x[1:r:2]
    out1 = x1 * cos[p] - x2 * sin[p],   out2 = x1 * sin[p] + x2 * cos[p]

The arithmetic is float32. The backward is the rotation by -theta: the same kernel with
sin negated (CONJ), applied to the output gradient.

One program handles BLOCK_S positions of one batch row and loops over a group of heads,
so each cos/sin tile is read once for all of them. tritonzoo::rotary is the functional
op (with autograd); tritonzoo::rotary_ rotates x in place (no autograd formula of its
own: apply_rotary_emb wraps it in an autograd.Function that marks x dirty).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import (as_bool, as_int, cdiv, launch, eager_op, on_device, INTERPRET, next_power_of_2, run_backward,
                      shared_layout, unit_stride, use_triton)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512
#: Heads per program: cos/sin are loaded once per (positions, heads) tile.
GPU_HEADS_PER_PROGRAM = 8
_HEADS_PER_PROGRAM = 4 if INTERPRET else GPU_HEADS_PER_PROGRAM
#: Most positions per tile (fewer for wide heads: about 1024 rotated pairs per tile).
GPU_MAX_BLOCK_S = 64
_MAX_BLOCK_S = 16 if INTERPRET else GPU_MAX_BLOCK_S


@triton.jit
def _rotary_kernel(X, Out, Cos, Sin, Offsets, Pos,
                   seqlen, nheads, head_dim, half, offset,
                   stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
                   stride_c, stride_pb, stride_ps,
                   INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                   HAS_POS: tl.constexpr, COPY_TAIL: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                   HEADS: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_HALF)
    s_ok = offs_s < seqlen
    mask = s_ok[:, None] & (offs_k[None, :] < half)
    if HAS_POS:
        pos = tl.load(Pos + b * stride_pb + offs_s * stride_ps, mask=s_ok, other=0).to(tl.int64)
    else:
        pos = (offs_s + offset).to(tl.int64)
        if HAS_OFFSETS:
            pos += tl.load(Offsets + b).to(tl.int64)
    cs_ptrs = pos[:, None] * stride_c + offs_k[None, :]
    cos = tl.load(Cos + cs_ptrs, mask=mask, other=1.0).to(tl.float32)
    sin = tl.load(Sin + cs_ptrs, mask=mask, other=0.0).to(tl.float32)
    if CONJ:
        sin = -sin
    rows = offs_s.to(tl.int64)[:, None]
    if INTERLEAVED:
        # Pairs (2k, 2k + 1): read the 2 * BLOCK_HALF features contiguously, split in
        # registers, so every load and store is coalesced.
        offs_r = tl.arange(0, 2 * BLOCK_HALF)
        mask_r = s_ok[:, None] & (offs_r[None, :] < 2 * half)
    else:
        offs_r = offs_k
        mask_r = mask
    h_lo = pid_h * HEADS
    for h in range(h_lo, tl.minimum(h_lo + HEADS, nheads)):
        h64 = tl.cast(h, tl.int64)  # loop variables arrive as ints in the interpreter
        x_base = X + b * stride_xb + h64 * stride_xh + rows * stride_xs
        o_base = Out + b * stride_ob + h64 * stride_oh + rows * stride_os
        if INTERLEAVED:
            x = tl.load(x_base + offs_r[None, :], mask=mask_r, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_S, BLOCK_HALF, 2]))
            o1 = x1 * cos - x2 * sin
            o2 = x1 * sin + x2 * cos
            out = tl.reshape(tl.join(o1, o2), [BLOCK_S, 2 * BLOCK_HALF])
            tl.store(o_base + offs_r[None, :], out.to(Out.dtype.element_ty), mask=mask_r)
        else:
            x1 = tl.load(x_base + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_base + half + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(o_base + offs_k[None, :], (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
            tl.store(o_base + half + offs_k[None, :], (x1 * sin + x2 * cos).to(Out.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            # Out of place with partial rotary: the features past rotary_dim pass through.
            for t0 in range(2 * half, head_dim, BLOCK_TAIL):
                offs_t = t0 + tl.arange(0, BLOCK_TAIL)
                mask_t = s_ok[:, None] & (offs_t[None, :] < head_dim)
                tail = tl.load(x_base + offs_t[None, :], mask=mask_t, other=0.0)
                tl.store(o_base + offs_t[None, :], tail, mask=mask_t)


def rotary_triton(x, out, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate, inplace):
    """Writes the rotation of x (B, S, H, D) into out (x itself when inplace)."""
    B, S, H, D = x.shape
    # Block sizes and COPY_TAIL are compile-time constants: concrete under dynamic shapes.
    D, half = int(D), int(cos.shape[1])
    if x.numel() == 0:
        return
    seqlen_offsets = unit_stride(seqlen_offsets)  # read as Offsets + b
    block_half = max(next_power_of_2(half), 2)
    # About 1024 rotated pairs per tile: 8 per thread over 4 warps, no register spills.
    block_s = max(1, min(_MAX_BLOCK_S, 1024 // block_half))
    copy_tail = not inplace and 2 * half < D
    dummy = cos
    grid = (cdiv(S, block_s), cdiv(H, _HEADS_PER_PROGRAM), B)
    launch(_rotary_kernel)[grid](
        x, out, cos, sin, seqlen_offsets if seqlen_offsets is not None else dummy,
        position_ids if position_ids is not None else dummy,
        S, H, D, half, offset, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0), position_ids.stride(0) if position_ids is not None else 0,
        position_ids.stride(1) if position_ids is not None else 0,
        INTERLEAVED=interleaved, CONJ=conjugate, HAS_OFFSETS=seqlen_offsets is not None,
        HAS_POS=position_ids is not None, COPY_TAIL=copy_tail, BLOCK_S=block_s, BLOCK_HALF=block_half,
        BLOCK_TAIL=64, HEADS=_HEADS_PER_PROGRAM, num_warps=4)


def rotary_reference(x, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate):
    """The PyTorch path: the rotated x (B, S, H, D) as a new tensor, float32 arithmetic."""
    B, S, H, D = x.shape
    half = cos.shape[1]
    if position_ids is not None:
        pos = position_ids.long()
    else:
        pos = torch.arange(S, device=x.device).expand(B, S) + offset
        if seqlen_offsets is not None:
            pos = pos + seqlen_offsets.long()[:, None]
    c = cos.float()[pos][:, :, None, :]  # (B, S, 1, half)
    s = sin.float()[pos][:, :, None, :]
    if conjugate:
        s = -s
    rot = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


# --------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------


@on_device
def _rotary(x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Optional[Tensor], offset: int,
            position_ids: Optional[Tensor], interleaved: bool, conjugate: bool) -> Tensor:
    """The rotated x (B, S, H, D), a new tensor; conjugate rotates by -theta."""
    if not use_triton(x):
        return rotary_reference(x, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rotary_triton(x, out, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate, False)
    return out


@on_device
def _rotary_(x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Optional[Tensor], offset: int,
             position_ids: Optional[Tensor], interleaved: bool, conjugate: bool) -> None:
    """Rotates the first rotary_dim features of x (B, S, H, D) in place."""
    if not use_triton(x):
        x.copy_(rotary_reference(x, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate))
        return
    rotary_triton(x, x, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate, True)


rotary = torch.library.triton_op("tritonzoo::rotary", _rotary, mutates_args=())
rotary_ = torch.library.triton_op("tritonzoo::rotary_", _rotary_, mutates_args=("x",))
_call_rotary_ = eager_op(rotary_, _rotary_, mutated=(0,))


def _setup_context(ctx, inputs, output):
    _, cos, sin, seqlen_offsets, offset, position_ids, interleaved, conjugate = inputs
    ctx.save_for_backward(cos, sin, seqlen_offsets, position_ids)
    ctx.params = (offset, interleaved, conjugate)
    ctx.reference = not use_triton(output)


def _backward(ctx, dout):
    cos, sin, seqlen_offsets, position_ids = ctx.saved_tensors
    offset, interleaved, conjugate = ctx.params
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dx = run_backward(ctx, rotary, _rotary, dout, cos, sin, seqlen_offsets, offset, position_ids, interleaved,
                      not conjugate)
    return dx, None, None, None, None, None, None, None


_call_rotary = eager_op(rotary, _rotary, _setup_context, _backward)


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation with autograd: x is marked dirty, the backward rotates by -theta."""

    @staticmethod
    def forward(ctx, x, cos, sin, seqlen_offsets, offset, position_ids, interleaved):
        _call_rotary_(x, cos, sin, seqlen_offsets, offset, position_ids, interleaved, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, seqlen_offsets, position_ids)
        ctx.params = (offset, interleaved)
        ctx.reference = not use_triton(x)
        return x

    @staticmethod
    def backward(ctx, dout):
        cos, sin, seqlen_offsets, position_ids = ctx.saved_tensors
        offset, interleaved = ctx.params
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        # The forward's path; no reference_only() block here: dynamo traces this method and
        # cannot trace the thread-local switch.
        if ctx.reference:
            dx = rotary_reference(dout, cos, sin, seqlen_offsets, offset, position_ids, interleaved, True)
        else:
            dx = torch.ops.tritonzoo.rotary(dout, cos, sin, seqlen_offsets, offset, position_ids, interleaved, True)
        return dx, None, None, None, None, None, None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _check_index_tensor(t: Tensor, name: str, shape: tuple, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_positions(t: Tensor, name: str, lowest: int, highest: int, seqlen_ro: int) -> None:
    """Positions [lowest + min(t), highest + max(t)] must index cos/sin (skipped when compiling)."""
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    if t.device.type != "cpu":
        # No host sync in a decoding step: a device-side assert.
        torch._assert_async((t.min() + lowest >= 0) & (t.max() + highest < seqlen_ro),
                            f"{name} gives positions outside [0, {seqlen_ro}) (cos and sin have {seqlen_ro} rows)")
        return
    lo, hi = torch.stack([t.min(), t.max()]).tolist()
    if lowest + lo < 0 or highest + hi >= seqlen_ro:
        raise ValueError(f"{name} gives positions from {lowest + lo} to {highest + hi}; cos and sin have "
                         f"seqlen_ro = {seqlen_ro} rows, so positions must be in [0, {seqlen_ro - 1}]")


def _offsets(seqlen_offsets, batch: int) -> Union[int, Tensor]:
    """seqlen_offsets as a Python int (numpy and 0-dim tensor integers too) or a tensor: a 0-dim
    integer tensor, one offset for every sequence, is expanded to (batch,) (no host read)."""
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.dim() == 0 and seqlen_offsets.dtype in (torch.int32, torch.int64):
            return seqlen_offsets.expand(batch)
        return seqlen_offsets
    return as_int(seqlen_offsets, "seqlen_offsets", "an int or a (batch,) tensor", TypeError)


def _packed_positions(x: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int],
                      seqlen_offsets: Union[int, Tensor]) -> Tensor:
    """(1, total) positions of packed x (total, H, D): each token's index in its sequence + its offset."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor (batch + 1,), got "
                        f"{cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__}"
                        f"{' of shape ' + str(tuple(cu_seqlens.shape)) if isinstance(cu_seqlens, Tensor) else ''}")
    if cu_seqlens.device != x.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
    if max_seqlen is not None:
        max_seqlen = as_int(max_seqlen, "max_seqlen", "an int >= 0 or None", TypeError)
        if max_seqlen < 0:
            raise TypeError(f"max_seqlen must be an int >= 0 or None, got {max_seqlen!r}")
    total, batch = x.shape[0], cu_seqlens.numel() - 1
    seqlen_offsets = _offsets(seqlen_offsets, batch)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        # The kernel needs no max_seqlen (positions come from cu_seqlens); on CPU it is still
        # held to FA2's meaning, the longest sequence or more. No check on CUDA: no host sync.
        if int(cu_seqlens[0]) != 0 or bool((lengths < 0).any()) or int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens must start at 0, not decrease and end at total = {total} "
                             f"(x.shape[0]), got {cu_seqlens.tolist()}")
        if max_seqlen is not None and batch and int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen = {max_seqlen} but a sequence holds {int(lengths.max())} tokens")
    if isinstance(seqlen_offsets, Tensor):
        _check_index_tensor(seqlen_offsets, "seqlen_offsets", (batch,), x)
        starts = cu_seqlens[:-1].long() - seqlen_offsets.long()
    else:
        starts = cu_seqlens[:-1].long() - seqlen_offsets
    # Token i of sequence b sits at i - cu_seqlens[b] + offset[b]; output_size keeps it sync-free.
    sequence = torch.repeat_interleave(torch.arange(batch, device=x.device), lengths, output_size=total)
    return (torch.arange(total, device=x.device) - starts[sequence]).view(1, total)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None, position_ids: Optional[Tensor] = None) -> Tensor:
    """Rotary embedding of x (batch, seqlen, nheads, headdim), FlashAttention-2's conventions.

    cos, sin: (seqlen_ro, rotary_dim / 2), float32 or x's dtype, rotary_dim <= headdim;
    features past rotary_dim are left unchanged. interleaved: GPT-J pairs (0, 1), (2, 3)...
    instead of GPT-NeoX halves. inplace: rotate x itself and return it (autograd-aware;
    under autograd, as for any in-place op, x must not be one of several views of a buffer
    that are all modified in place, e.g. q and k unbound from one qkv tensor).
    seqlen_offsets: int (numpy integers too), or int32/int64 (batch,) tensor (0-dim: one offset
    for all), added to each token's index (KV-cache decoding); position_ids: int32/int64
    (batch, seqlen) explicit positions
    (then seqlen_offsets must be 0). cu_seqlens (batch + 1,) int32, as FA2's varlen form:
    x is packed (total, nheads, headdim), token i of sequence b sits at
    i - cu_seqlens[b] + seqlen_offsets (int or (batch,)); max_seqlen, FA2's grid bound, is
    not needed (checked on CPU to be at least the longest sequence when given).
    Positions must lie in [0, seqlen_ro): checked here
    (for CUDA tensors by a device-side assert, no host sync; not under torch.compile). Applied to q and k alike:
    see apply_rotary_emb_qk. Returns the rotated tensor, shape and dtype of x.
    Raises TypeError/ValueError naming the bad argument.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if cu_seqlens is not None:
        if x.dim() != 3:
            raise ValueError(f"with cu_seqlens, x must be packed (total, nheads, headdim), got shape {tuple(x.shape)}")
        if position_ids is not None:
            raise ValueError("give cu_seqlens or position_ids, not both")
        positions = _packed_positions(x, cu_seqlens, max_seqlen, seqlen_offsets)
        out = _apply(x.unsqueeze(0), cos, sin, interleaved, inplace, 0, positions, "cu_seqlens with seqlen_offsets")
        return x if inplace else out.squeeze(0)
    if max_seqlen is not None:
        raise ValueError("max_seqlen applies only with cu_seqlens (packed x)")
    return _apply(x, cos, sin, interleaved, inplace, seqlen_offsets, position_ids, "position_ids")


def _apply(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inplace: bool, seqlen_offsets: Union[int, Tensor],
           position_ids: Optional[Tensor], positions_name: str) -> Tensor:
    """apply_rotary_emb on 4-D x; positions_name: what the positions were given as (in errors)."""
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    B, S, H, D = x.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"headdim {D} is not supported; expected 1 to {MAX_HEAD_DIM}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have 2 dims (seqlen_ro, rotary_dim / 2), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32 or x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    seqlen_ro, half = cos.shape
    if not 1 <= 2 * half <= D:
        raise ValueError(f"rotary_dim = 2 * cos.shape[1] = {2 * half} must be in [2, headdim = {D}]")
    interleaved, inplace = as_bool(interleaved, "interleaved"), as_bool(inplace, "inplace")
    offsets, offset = None, 0
    seqlen_offsets = _offsets(seqlen_offsets, B)
    if position_ids is not None:
        if not (isinstance(seqlen_offsets, int) and seqlen_offsets == 0):
            raise ValueError("seqlen_offsets must be 0 when position_ids is given (positions are explicit)")
        _check_index_tensor(position_ids, "position_ids", (B, S), x)
        _check_positions(position_ids, positions_name, 0, 0, seqlen_ro)
    elif isinstance(seqlen_offsets, Tensor):
        _check_index_tensor(seqlen_offsets, "seqlen_offsets", (B,), x)
        _check_positions(seqlen_offsets, "seqlen_offsets", 0, S - 1, seqlen_ro)
        offsets = seqlen_offsets
    else:
        if seqlen_offsets < 0 or seqlen_offsets + S > seqlen_ro:
            raise ValueError(f"seqlen_offsets = {seqlen_offsets} with seqlen {S} gives positions from {seqlen_offsets} "
                             f"to {seqlen_offsets + S - 1}; cos and sin have seqlen_ro = {seqlen_ro} rows, so "
                             f"positions must be in [0, {seqlen_ro - 1}]")
        offset = seqlen_offsets
    cos, sin = shared_layout(cos, sin)  # the kernel walks both by cos's row stride
    if inplace:
        if x.stride(-1) != 1:
            raise ValueError("inplace=True needs x with unit stride in its last dim (headdim)")
        if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
            raise ValueError(f"inplace=True needs x whose elements do not overlap; it is an expanded view "
                             f"(strides {tuple(x.stride())}): pass x.contiguous() or inplace=False")
        return _RotaryInplace.apply(x, cos, sin, offsets, offset, position_ids, interleaved)
    x = unit_stride(x)
    return _call_rotary(x, cos, sin, offsets, offset, position_ids, interleaved, False)


def apply_rotary_emb_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                        inplace: bool = False, seqlen_offsets: Union[int, Tensor] = 0,
                        position_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """apply_rotary_emb on q (B, S, H, D) and k (B, S, Hk, D) with the same positions; returns (q, k).

    k may have fewer heads than q (GQA). Arguments and errors as apply_rotary_emb.
    """
    if isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.dim() == 4:
        if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seqlen and headdim")
    return (apply_rotary_emb(q, cos, sin, interleaved, inplace, seqlen_offsets, position_ids=position_ids),
            apply_rotary_emb(k, cos, sin, interleaved, inplace, seqlen_offsets, position_ids=position_ids))
