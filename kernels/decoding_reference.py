"""The PyTorch path of KV-cache decoding: the same semantics as the kernels in decoding.py.

CPU tensors run here when the Triton interpreter is off (so zoo models decode on a CPU
with the same op), and the kernels' tests compare against it beside a float64 oracle.
It gathers each batch row's cache into a dense (B, capacity, Hk, D) copy after the
append and computes in float32, the G query heads of a kv-head beside it (no repeat of
k or v). num_splits changes nothing here: splitting the keys is a GPU schedule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .runtime import without_autocast


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


def _slots(k_cache: Tensor, block_table: Optional[Tensor], cache_batch_idx: Optional[Tensor], B: int,
           valid_keys: Tensor) -> tuple[Tensor, Tensor, int]:
    """Index tensors (B, capacity) into the cache's first two dims for each row's positions."""
    dev = k_cache.device
    if block_table is not None:
        page = k_cache.shape[1]
        capacity = block_table.shape[1] * page
        pos = torch.arange(capacity, device=dev)
        blocks = block_table.long()[:, pos // page]
        # Table entries past a row's keys may hold anything: never index with them.
        blocks = torch.where(pos.view(1, -1) < valid_keys.view(-1, 1), blocks, 0)
        return blocks, (pos % page).expand(B, capacity), capacity
    capacity = k_cache.shape[1]
    rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(B, device=dev)
    return rows.view(-1, 1).expand(B, capacity), torch.arange(capacity, device=dev).expand(B, capacity), capacity


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
    rows, slots, capacity = _slots(k_cache, block_table, cache_batch_idx, B, ends + snew)
    if k is not None:
        t = torch.arange(snew, device=dev).view(1, -1)
        if rotary_cos is not None:
            k = rotate(k, rotary_cos, rotary_sin, rot_first.view(-1, 1) + t, rotary_interleaved)
        where = ends.view(-1, 1) + t  # absolute slots of the new keys
        index = (rows.gather(1, where), slots.gather(1, where))
        k_cache.index_put_(index, k)
        v_cache.index_put_(index, v)
    if rotary_cos is not None:
        i = torch.arange(Sq, device=dev).view(1, -1) * int(rotary_per_token)
        q = rotate(q, rotary_cos, rotary_sin, rot_first.view(-1, 1) + i, rotary_interleaved)
    j = torch.arange(capacity, device=dev).view(1, 1, -1) - starts.view(-1, 1, 1)  # key index within the row
    in_row = ((j >= 0) & (j < total.view(-1, 1, 1))).view(B, 1, 1, capacity, 1)
    # Slots outside a row's keys may hold anything (FlashAttention-2's contract), NaN
    # included, and 0 * NaN is NaN: they are zeroed, not just given zero weight.
    keys = k_cache[rows, slots].float().permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hk, 1, capacity, D)
    values = v_cache[rows, slots].float().permute(0, 2, 1, 3).unsqueeze(2)
    keys, values = (torch.where(in_row, x, 0.0) for x in (keys, values))
    qg = q.float().view(B, Sq, Hk, G, D).permute(0, 2, 3, 1, 4)  # (B, Hk, G, Sq, D)
    s = (qg @ keys.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=dev).view(1, -1, 1)
    rel = i + (total - Sq).view(-1, 1, 1) - j  # (B, Sq, capacity): key j sits rel places left of query i's diagonal
    if alibi_slopes is not None:
        s = s - alibi_slopes.float().reshape(-1, Hk, G, 1, 1) * rel.abs().unsqueeze(1).unsqueeze(1)
    valid = (j >= 0) & (j < total.view(-1, 1, 1))
    if window_right >= 0:
        valid = valid & (rel >= -window_right)
    if window_left >= 0:
        valid = valid & (rel <= window_left)
    s = s.masked_fill(~valid.unsqueeze(1).unsqueeze(1), -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)  # a row with no key: 0
    out = (p @ values).permute(0, 3, 1, 2, 4).reshape(B, Sq, H, D).contiguous()  # contiguous, as FA2's
    lse = lse.masked_fill(lse == -math.inf, math.inf).reshape(B, H, Sq)
    return out.to(q.dtype), lse
