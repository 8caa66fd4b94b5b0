"""The PyTorch path of KV-cache decoding: the same semantics as the kernels in decoding.py.

CPU tensors run here when the Triton interpreter is off (so zoo models decode on a CPU
with the same op), and the kernels' tests compare against it beside a float64 oracle.
After the append it reads each batch row's first `span` slots, up to the longest row's
end (a view of the cache, or a gathered copy through block_table / cache_batch_idx),
and computes in float32, the G query heads of a kv-head as one block of rows (no repeat
of k or v). num_splits changes nothing here: splitting the keys is a GPU schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .runtime import concrete, torch_sdpa, without_autocast


def rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """x (B, S, heads, D) with its first rotary_dim = 2 * cos.shape[1] dims turned by the
    angles of positions (B, S) int64; fp32 math, x's dtype out (as the kernels round).

    interleaved pairs dims (2i, 2i + 1); otherwise (i, i + rotary_dim / 2) (GPT-NeoX).
    """
    rd = 2 * cos.shape[1]
    c = cos.float()[positions].unsqueeze(2)  # (B, S, 1, rd / 2)
    s = sin.float()[positions].unsqueeze(2)
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        turned = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        turned = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([turned.to(x.dtype), x[..., rd:]], dim=-1)


def _readable(t: Tensor) -> bool:
    """Whether Python may read t's values here without a device sync: a ``concrete`` CPU tensor
    (on CUDA a read would sync every step, and break a CUDA-graph capture of this path)."""
    return concrete(t) and t.device.type == "cpu"


def _span(valid_keys: Tensor, capacity: int) -> int:
    """Slots [0, span) hold every row's keys: the cache's capacity, or, where the index values
    are ``_readable``, the last row end (the slots past it are never attended)."""
    if not _readable(valid_keys) or valid_keys.numel() == 0:
        return capacity
    return int(valid_keys.max())


def _slots(k_cache: Tensor, block_table: Optional[Tensor], cache_batch_idx: Optional[Tensor], B: int,
           valid_keys: Tensor, span: int) -> Optional[tuple[Tensor, Tensor]]:
    """Index tensors (B, span) into the cache's first two dims for each row's positions, or
    None where row b's positions are k_cache[b, :span] (no table, no batch index)."""
    dev = k_cache.device
    pos = torch.arange(span, device=dev)
    if block_table is not None:
        page = k_cache.shape[1]
        blocks = block_table.long()[:, pos // page]
        # Table entries past a row's keys may hold anything: never index with them.
        blocks = torch.where(pos.view(1, -1) < valid_keys.view(-1, 1), blocks, 0)
        return blocks, (pos % page).expand(B, span)
    if cache_batch_idx is None:
        return None
    return cache_batch_idx.long().view(-1, 1).expand(B, span), pos.expand(B, span)


def _gather(cache: Tensor, index: Optional[tuple[Tensor, Tensor]], span: int) -> Tensor:
    """Each row's first span slots (B, span, Hk, D): a view of the cache where index is None."""
    return cache[:, :span] if index is None else cache[index]


def _append_slots(block_table: Optional[Tensor], cache_batch_idx: Optional[Tensor], page: int,
                  where: Tensor) -> tuple[Tensor, Tensor]:
    """Indices into the cache's first two dims of the absolute slots ``where`` (B, n)."""
    if block_table is not None:
        return block_table.long().gather(1, where // page), where % page
    rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(where.shape[0], device=where.device)
    return rows.view(-1, 1).expand_as(where), where


@without_autocast
def forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, alibi_slopes, softmax_scale, softcap, window_left, window_right, rotary_interleaved,
            rotary_per_token, rotary_from_leftpad, num_splits):
    """Same contract as decoding.forward: appends k/v to the caches in place; returns (out, lse)."""
    del num_splits
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    G = H // Hk
    dev = q.device
    ends = cache_seqlens.long()
    starts = cache_leftpad.long() if cache_leftpad is not None else torch.zeros_like(ends)
    cache_len = ends - starts  # keys before the append; causal/window/ALiBi positions count from starts
    rot_first = cache_len if rotary_from_leftpad else ends  # FA2 turns by absolute slots
    snew = k.shape[1] if k is not None else 0
    total = cache_len + snew
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if block_table is not None else page
    span = _span(ends + snew, capacity)
    if k is not None:
        t = torch.arange(snew, device=dev).view(1, -1)
        if rotary_cos is not None:
            k = rotate(k, rotary_cos, rotary_sin, rot_first.view(-1, 1) + t, rotary_interleaved)
        index = _append_slots(block_table, cache_batch_idx, page, ends.view(-1, 1) + t)
        k_cache.index_put_(index, k)
        v_cache.index_put_(index, v)
    if rotary_cos is not None:
        i = torch.arange(Sq, device=dev).view(1, -1) * int(rotary_per_token)
        q = rotate(q, rotary_cos, rotary_sin, rot_first.view(-1, 1) + i, rotary_interleaved)
    index = _slots(k_cache, block_table, cache_batch_idx, B, ends + snew, span)
    j = torch.arange(span, device=dev).view(1, 1, -1) - starts.view(-1, 1, 1)  # key index within the row
    in_row = (j >= 0) & (j < total.view(-1, 1, 1))  # (B, 1, span)
    keys = _gather(k_cache, index, span).float().permute(0, 2, 1, 3)  # (B, Hk, span, D)
    values = _gather(v_cache, index, span).float().permute(0, 2, 1, 3)
    # Slots outside a row's keys may hold anything (FlashAttention-2's contract), NaN
    # included: their scores are replaced by -inf below, but 0 * NaN is NaN, so such value
    # slots are zeroed, not just given zero weight.
    if not _readable(in_row) or not bool(in_row.all()):
        values = values.masked_fill(~in_row.unsqueeze(-1), 0.0)
    # The G query heads of a kv-head and its Sq queries as one (G * Sq)-row block: one
    # matmul per (row, kv-head), k and v never repeated.
    qg = q.float().view(B, Sq, Hk, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * Sq, D)
    s = (qg @ keys.transpose(-1, -2)).view(B, Hk, G, Sq, span) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=dev).view(1, -1, 1)
    rel = i + (total - Sq).view(-1, 1, 1) - j  # (B, Sq, span): key j sits rel places left of query i's diagonal
    if alibi_slopes is not None:
        s = s - alibi_slopes.float().reshape(-1, Hk, G, 1, 1) * rel.abs().unsqueeze(1).unsqueeze(1)
    valid = in_row
    if window_right >= 0:
        valid = valid & (rel >= -window_right)
    if window_left >= 0:
        valid = valid & (rel <= window_left)
    s = s.masked_fill(~valid.unsqueeze(1).unsqueeze(1), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # a row with no key: 0
    out = (p.reshape(B, Hk, G * Sq, span) @ values).view(B, Hk, G, Sq, D)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, Sq, H, D).contiguous()  # contiguous, as FA2's
    lse = lse.masked_fill(lse == -math.inf, math.inf).reshape(B, H, Sq)
    return out.to(q.dtype), lse


def native_serves(q: Tensor, cache_seqlens: Tensor, cache_leftpad: Optional[Tensor], snew: int, causal: bool) -> bool:
    """Whether torch's SDPA computes this call's values (for native_forward): every query has a
    key (torch's softmax gives NaN to a query without one, the op 0). Reads index values: for
    concrete CPU tensors (runtime.torch_native), where that costs no device sync."""
    ends = cache_seqlens.tolist()
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * len(ends)
    # Bottom-right causal: query i of Sq sees the row's first total - Sq + 1 + i keys.
    fewest = q.shape[1] if causal else 1
    return all(end - start + snew >= fewest for end, start in zip(ends, starts))


@without_autocast
def native_forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_leftpad, softmax_scale,
                   causal, rotary_interleaved, rotary_per_token, rotary_from_leftpad) -> Tensor:
    """Float32 decoding as torch's own SDPA over views of the cache (runtime.torch_native): what
    forward computes, to float32 rounding, in a few torch ops instead of about forty, which on
    a CPU cost more than a decoding step's arithmetic. The caller (flash_attn_with_kvcache)
    checked the call fits: no block_table, cache_batch_idx, ALiBi, softcap, window or lse, and
    native_serves. Appends k/v in place as forward does; returns out (B, Sq, H, D), contiguous."""
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    dev = q.device
    ends = cache_seqlens.tolist()  # the row lengths as Python ints: one read, then no small tensor ops
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * B
    snew = k.shape[1] if k is not None else 0
    if rotary_cos is not None:
        first = cache_seqlens.long()
        if rotary_from_leftpad and cache_leftpad is not None:
            first = first - cache_leftpad.long()
        first = first.view(-1, 1)
    if k is not None:
        if rotary_cos is not None:
            k = rotate(k, rotary_cos, rotary_sin, first + torch.arange(snew, device=dev), rotary_interleaved)
        if all(end == ends[0] for end in ends):  # every row appends at one slot: a copy into a slice
            k_cache[:, ends[0]:ends[0] + snew] = k
            v_cache[:, ends[0]:ends[0] + snew] = v
        else:
            index = _append_slots(None, None, 0, cache_seqlens.long().view(-1, 1) + torch.arange(snew, device=dev))
            k_cache.index_put_(index, k)
            v_cache.index_put_(index, v)
    if rotary_cos is not None:
        q = rotate(q, rotary_cos, rotary_sin, first + torch.arange(Sq, device=dev) * int(rotary_per_token),
                   rotary_interleaved)
    span = max(ends) + snew
    keys, values = k_cache[:, :span].transpose(1, 2), v_cache[:, :span].transpose(1, 2)  # (B, Hk, span, D)
    mask = None
    padded = any(start > 0 or end + snew < span for start, end in zip(starts, ends))
    if padded or (causal and Sq > 1):
        j = torch.arange(span, device=dev).view(1, -1) - (
            cache_leftpad.long().view(-1, 1) if cache_leftpad is not None else 0)  # key index within the row
        total = (cache_seqlens.long() - (cache_leftpad.long() if cache_leftpad is not None else 0) + snew).view(-1, 1)
    if padded:
        # Rows that do not fill slots [0, span): their other slots may hold anything, NaN
        # included, which neither a -inf score nor a zero weight cancels: they are zeroed.
        keep = ((j >= 0) & (j < total)).view(B, 1, span, 1)
        keys, values = keys.masked_fill(~keep, 0.0), values.masked_fill(~keep, 0.0)
        mask = keep.view(B, 1, 1, span)
    if causal and Sq > 1:
        # Bottom-right: query i sees the row's keys up to index total - Sq + i.
        last = total.view(-1, 1, 1) - Sq + torch.arange(Sq, device=dev).view(1, -1, 1)
        seen = (j.unsqueeze(1) <= last).unsqueeze(1)  # (B, 1, Sq, span)
        mask = seen if mask is None else mask & seen
    out = torch_sdpa(q.transpose(1, 2), keys, values, attn_mask=mask, scale=softmax_scale, enable_gqa=H != Hk)
    return out.transpose(1, 2).contiguous()
