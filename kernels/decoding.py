"""KV-cache decoding (flash-decoding): FlashAttention-2's ``flash_attn_with_kvcache`` in Triton.

One call appends the new keys/values to the cache in place, rotates q and the new keys
(rotary embedding) on the fly, and attends over the valid part of each batch row's cache
(lengths differ per row; GQA; paged caches through ``block_table``).

Flash-decoding: with one query per sequence, batch x kv-heads programs are far fewer
than an H100's 132 SMs, so the keys of each (row, kv-head) are split across
``num_splits`` programs; each writes a partial output with its log-sum-exp and a second
kernel combines them. The G = H / Hk query heads sharing a kv-head (times the Sq
queries) are the rows of one program's tile: a cache tile is read once for all G heads,
where SDPA with ``enable_gqa`` reads it once per query head.

The append is fused into the attention kernel: keys at positions >= cache_seqlens are
read from k/v (and rotated) rather than from the cache, and the split-0 programs write
them to the cache; no program reads a slot that another one writes, so one launch does
both without a barrier. The launcher takes only shapes from the host (no device sync),
so a decode step can be captured in a CUDA graph or traced by torch.compile.

Scores are in log2 units inside the kernels (exp2 is the cheap exponential).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import autotune, decoding_reference
from .flash_attention import LN2, LOG2E, _dot, _tanh
from .runtime import (cdiv, launch, eager_op, on_device, INTERPRET, next_power_of_2, shared_layout, unit_stride,
                      use_triton)

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------

#: Tile of the keys appended by a call (tl.dot's smallest N): one per step when decoding.
NEW_N = tl.constexpr(16)


@triton.jit
def _tile_mask(rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # No head-dim term when the block is the head dim: a mask constant along d keeps the
    # loads 16 bytes wide.
    if HEAD_DIM == BLOCK_D:
        return rows_ok[:, None]
    else:
        return rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def _load_rotated(row_ptrs, rows_ok, offs_d, pos, Cos, Sin, stride_cs, rot_dim,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROTARY: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """A (rows, BLOCK_D) tile at row_ptrs + d; with HAS_ROTARY its first rot_dim dims are
    rotated by the angles of positions pos (fp32 math, rounded back to the input dtype)."""
    x = tl.load(row_ptrs + offs_d[None, :], mask=_tile_mask(rows_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    if HAS_ROTARY:
        R: tl.constexpr = x.shape[0]
        if INTERLEAVED:
            # Pairs (2i, 2i + 1) turn by angle i: swap each pair in registers, and widen
            # contiguous cos/sin rows to [c0, c0, c1, c1, ...] (no gathers).
            even, odd = tl.split(tl.reshape(x, (R, BLOCK_D // 2, 2)))
            y = tl.reshape(tl.join(odd, even), (R, BLOCK_D)).to(tl.float32)
            freq = tl.arange(0, BLOCK_D // 2)
            rot_half = rows_ok[:, None] & (freq[None, :] < rot_dim // 2)
            cs = pos[:, None] * stride_cs + freq[None, :]
            c = tl.load(Cos + cs, mask=rot_half, other=1.0).to(tl.float32)
            s = tl.load(Sin + cs, mask=rot_half, other=0.0).to(tl.float32)
            cos = tl.reshape(tl.join(c, c), (R, BLOCK_D))
            sin = tl.reshape(tl.join(-s, s), (R, BLOCK_D))
        else:
            # GPT-NeoX pairs (i, i + rot_dim / 2), rot_dim known at run time: a second load.
            half = rot_dim // 2
            first = offs_d < half
            rot = rows_ok[:, None] & (offs_d[None, :] < rot_dim)
            y = tl.load(row_ptrs + tl.where(first, offs_d + half, offs_d - half)[None, :], mask=rot,
                        other=0.0).to(tl.float32)
            cs = pos[:, None] * stride_cs + tl.where(first, offs_d, offs_d - half)[None, :]
            cos = tl.load(Cos + cs, mask=rot, other=1.0).to(tl.float32)
            sin = tl.load(Sin + cs, mask=rot, other=0.0).to(tl.float32)
            sin = tl.where(first[None, :], -sin, sin)
        x = (x.to(tl.float32) * cos + y * sin).to(x.dtype)
    return x


@triton.jit
def _cache_slots(BlockTable, bt_row, row, pos, ok, page_size, PAGED: tl.constexpr):
    """(block or cache row, slot) of absolute cache positions pos, int64."""
    if PAGED:
        blk = tl.load(BlockTable + bt_row + pos // page_size, mask=ok, other=0).to(tl.int64)
        return blk, (pos % page_size).to(tl.int64)
    else:
        return row, pos.to(tl.int64)


@triton.jit
def _attend(acc, l_i, m_i, q, k, v, rows_i, offs_n, n_ok, diag, sm_scale, qk_scale, softcap, slopes,
            window_left, window_right, FP32: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """One key tile of the online softmax. Order as FlashAttention-2: scale, softcap, ALiBi, masks."""
    qk = _dot(q, tl.trans(k), None, FP32)
    rel = rows_i[:, None] + diag - offs_n[None, :]  # key j sits rel places left of query i's diagonal
    if HAS_SOFTCAP or HAS_ALIBI:
        if HAS_SOFTCAP:
            s = _tanh(qk * (sm_scale / softcap)) * softcap
        else:
            s = qk * sm_scale
        if HAS_ALIBI:
            s = s - slopes[:, None] * tl.abs(rel).to(tl.float32)
        s = s * LOG2E
    else:
        s = qk * qk_scale
    valid = n_ok[None, :]
    if HAS_RIGHT:
        valid = valid & (rel >= -window_right)
    if HAS_LEFT:
        valid = valid & (rel <= window_left)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf on rows with no key yet
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], FP32)
    return acc, l_i, m_new


@triton.jit
def _kvcache_attn_kernel(
    Q, KCache, VCache, KNew, VNew, Cos, Sin, SeqLens, BatchIdx, LeftPad, BlockTable, Alibi,
    Out, Lse, OutPart, LsePart,
    stride_qb, stride_qm, stride_qh, stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
    stride_knb, stride_knn, stride_knh, stride_vnb, stride_vnn, stride_vnh,
    stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_cs, stride_bt, stride_ab,
    seqlen_q, seqlen_new, group, nheads_k, page_size, rot_dim, num_splits,
    sm_scale, qk_scale, softcap, window_left, window_right, split_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, FP32: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_NEW: tl.constexpr,
    HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, ROTARY_Q_PER_TOKEN: tl.constexpr,
    ROTARY_FROM_LEFTPAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // nheads_k
    hk = bh % nheads_k
    b64 = b.to(tl.int64)
    end_abs = tl.load(SeqLens + b)  # where the new keys go
    start_abs = 0
    if HAS_LEFTPAD:
        start_abs = tl.load(LeftPad + b)
    cache_len = end_abs - start_abs  # keys in the cache before this call; positions count from start_abs
    total = cache_len + seqlen_new
    diag = total - seqlen_q  # FA2: causal aligned bottom-right
    row = b64
    if HAS_BATCH_IDX:
        row = tl.load(BatchIdx + b).to(tl.int64)
    bt_row = b64 * stride_bt
    kc_head = KCache + hk.to(tl.int64) * stride_kch
    vc_head = VCache + hk.to(tl.int64) * stride_vch
    kn_head = KNew + b64 * stride_knb + hk * stride_knh
    vn_head = VNew + b64 * stride_vnb + hk * stride_vnh
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_N)

    # Rows of the tile: query i of head hk * group + g is row i * group + g.
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = seqlen_q * group
    rows_ok = rows < n_rows
    rows_i = rows // group
    heads = hk * group + rows % group
    q_ptrs = Q + b64 * stride_qb + rows_i[:, None] * stride_qm + heads[:, None] * stride_qh
    # FA2: the new keys and the queries turn by their slots' angles (from end_abs), left
    # padding included; ROTARY_FROM_LEFTPAD counts positions from each row's first real key.
    rot_first = end_abs
    if ROTARY_FROM_LEFTPAD:
        rot_first = cache_len
    if ROTARY_Q_PER_TOKEN:
        q_pos = rot_first + rows_i
    else:  # FA2: without causal/local masks every query sits at position cache_seqlens
        q_pos = rot_first + rows_i * 0
    q = _load_rotated(q_ptrs, rows_ok, offs_d, q_pos, Cos, Sin, stride_cs, rot_dim, HEAD_DIM, BLOCK_D,
                      HAS_ROTARY, INTERLEAVED)
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(Alibi + b64 * stride_ab + heads, mask=rows_ok, other=0.0).to(tl.float32)

    # Keys any row of this tile may see, then this program's share of them.
    i_first = (mb * BLOCK_M) // group
    i_last = (tl.minimum(mb * BLOCK_M + BLOCK_M, n_rows) - 1) // group
    lo = 0
    hi = total
    if HAS_LEFT:
        lo = tl.maximum(i_first + diag - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, i_last + diag + window_right + 1)
    tiles = (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
    per_split = (tiles + num_splits - 1) // num_splits
    c_lo = lo + split * per_split * BLOCK_N
    c_hi = tl.minimum(hi, c_lo + per_split * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys already in the cache.
    c_end = tl.minimum(c_hi, cache_len)
    for start in range(c_lo, c_end, BLOCK_N):
        offs_n = start + offs_k
        n_ok = offs_n < c_end
        blk, slot = _cache_slots(BlockTable, bt_row, row, start_abs + offs_n, n_ok, page_size, PAGED)
        mask = _tile_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(kc_head + (blk * stride_kcb + slot * stride_kcn)[:, None] + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(vc_head + (blk * stride_vcb + slot * stride_vcn)[:, None] + offs_d[None, :], mask=mask, other=0.0)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, rows_i, offs_n, n_ok, diag, sm_scale, qk_scale, softcap,
                                slopes, window_left, window_right, FP32, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT,
                                HAS_RIGHT)
    if HAS_NEW:
        # Keys of this call: read from k/v, rotated at their positions, not from the cache.
        # A few keys (one per step in decoding): small tiles, not software-pipelined, so
        # these loops cost the main one neither registers nor shared memory.
        offs_new = tl.arange(0, NEW_N)
        for start in tl.range(tl.maximum(c_lo, cache_len), c_hi, NEW_N, num_stages=1):
            offs_n = start + offs_new
            n_ok = offs_n < c_hi
            t = offs_n - cache_len
            k = _load_rotated(kn_head + t[:, None] * stride_knn, n_ok, offs_d, rot_first + t, Cos, Sin, stride_cs,
                              rot_dim, HEAD_DIM, BLOCK_D, HAS_ROTARY, INTERLEAVED)
            v = tl.load(vn_head + t[:, None] * stride_vnn + offs_d[None, :],
                        mask=_tile_mask(n_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, k, v, rows_i, offs_n, n_ok, diag, sm_scale, qk_scale,
                                    softcap, slopes, window_left, window_right, FP32, HAS_SOFTCAP, HAS_ALIBI,
                                    HAS_LEFT, HAS_RIGHT)
        if (split == 0) & (mb == 0):
            # The append, by one program per (row, kv-head): every new key, seen or not.
            for t0 in tl.range(0, seqlen_new, NEW_N, num_stages=1):
                t = t0 + offs_new
                t_ok = t < seqlen_new
                k = _load_rotated(kn_head + t[:, None] * stride_knn, t_ok, offs_d, rot_first + t, Cos, Sin,
                                  stride_cs, rot_dim, HEAD_DIM, BLOCK_D, HAS_ROTARY, INTERLEAVED)
                mask = _tile_mask(t_ok, offs_d, HEAD_DIM, BLOCK_D)
                v = tl.load(vn_head + t[:, None] * stride_vnn + offs_d[None, :], mask=mask)
                blk, slot = _cache_slots(BlockTable, bt_row, row, end_abs + t, t_ok, page_size, PAGED)
                tl.store(kc_head + (blk * stride_kcb + slot * stride_kcn)[:, None] + offs_d[None, :], k, mask=mask)
                tl.store(vc_head + (blk * stride_vcb + slot * stride_vcn)[:, None] + offs_d[None, :], v, mask=mask)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, 1.0 / l_safe, 0.0)[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * LN2
    mask = _tile_mask(rows_ok, offs_d, HEAD_DIM, BLOCK_D)
    if SPLIT:
        # Partials (B * Hk, splits, Sq * G, HEAD_DIM) fp32; an empty split has lse -inf and weighs 0.
        part = (bh * num_splits + split).to(tl.int64) * n_rows + rows
        tl.store(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        tl.store(LsePart + part, tl.where(has_keys, lse, float("-inf")), mask=rows_ok)
    else:
        o_ptrs = Out + b64 * stride_ob + rows_i[:, None] * stride_om + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
        tl.store(Lse + b64 * stride_lb + heads * stride_lh + rows_i, tl.where(has_keys, lse, float("inf")),
                 mask=rows_ok)


@triton.jit
def _combine_kernel(OutPart, LsePart, Out, Lse, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                    n_rows, group, nheads_k, num_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = sum_s exp(lse_s - lse) out_s, lse = log sum_s exp(lse_s), over the splits of one (row, kv-head)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        part = (bh * num_splits + s).to(tl.int64) * n_rows + rows
        lse_s = tl.load(LsePart + part, mask=rows_ok, other=float("-inf"))
        o_s = tl.load(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m - m_use) * LOG2E)
        w = tl.math.exp2((lse_s - m_use) * LOG2E)
        l_sum = l_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m = m_new
    has_keys = l_sum > 0.0
    l_safe = tl.where(has_keys, l_sum, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, m + tl.math.log2(l_safe) * LN2, float("inf"))
    b = (bh // nheads_k).to(tl.int64)
    rows_i = rows // group
    heads = (bh % nheads_k) * group + rows % group
    tl.store(Out + b * stride_ob + rows_i[:, None] * stride_om + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + b * stride_lb + heads * stride_lh + rows_i, lse, mask=rows_ok)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

#: The interpreter runs one small key block, so tiny tests still cross several tiles.
_INTERPRET_BLOCK_N = 16

# GPU candidates (BLOCK_N, num_warps, num_stages) by head-dim block: a K or V tile of
# 8-16 KiB, 2-4 tiles in flight (the kernel is bound by HBM bandwidth: it must keep
# enough bytes in flight per SM). Not yet tuned on an H100; the autotuner picks per key.
_CANDIDATES = {
    64: [(128, 4, 3), (64, 4, 4), (128, 4, 4), (64, 2, 3)],
    128: [(64, 4, 3), (64, 4, 4), (128, 4, 3), (32, 4, 4), (128, 8, 3)],
    256: [(32, 4, 3), (64, 8, 2), (32, 8, 4), (16, 4, 4)],
    "fp32": [(32, 4, 2), (16, 4, 2), (32, 4, 3)],
}
_AUTOTUNE_KEY = ["BLOCK_M", "BLOCK_D", "FP32", "PAGED", "HAS_NEW", "HAS_ROTARY", "SPLIT", "split_bucket"]

#: Number of SMs assumed without a GPU (the interpreter): an H100 SXM's.
H100_SMS = 132
#: At most this many splits (FlashAttention-2's cap), each of at least this many keys,
#: so a split's fixed costs (q load, partial write, its share of the combine) stay small.
MAX_SPLITS = 128
MIN_KEYS_PER_SPLIT = 256
#: Programs per SM the split count aims for. One 4-warp program keeps only 2-3 key tiles
#: in flight, too few bytes to keep HBM busy from one SM; two do better, and fit (sm_90a
#: compile: ~108 registers a thread and ~70 KiB of shared memory at 64-key bf16 tiles,
#: 3 stages). A starting point to tune on an H100, not a measured optimum.
PROGRAMS_PER_SM = 2


def _configs():
    seen = sorted({c for group in _CANDIDATES.values() for c in group})
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in seen]


def _prune(configs, named_args, **kwargs):
    return autotune.pick(configs, _CANDIDATES[autotune.table_key(kwargs["FP32"], kwargs["BLOCK_D"])],
                         lambda c: (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))


_kvcache_attn_tuned = _kvcache_attn_kernel if INTERPRET else autotune.autotune(
    _configs(), _AUTOTUNE_KEY, _prune)(_kvcache_attn_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; H100_SMS for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return H100_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(programs: int, max_keys: int, sms: int) -> int:
    """How many splits of the keys flash-decoding uses when num_splits=0.

    programs: batch * nheads_k * query blocks (the programs without splitting); max_keys:
    the most keys a row can attend to (the cache capacity, or less under a window). One
    split when the programs already fill the SMs; otherwise enough splits for
    PROGRAMS_PER_SM programs per SM, at most MAX_SPLITS and at least MIN_KEYS_PER_SPLIT
    keys per split. E.g. on an H100 (132 SMs), batch 1, 8 kv-heads, a 64k cache: 33
    splits (264 programs of ~2k keys); batch 16: 3 splits; 4k keys at batch 1: 16.
    """
    if programs <= 0 or programs >= sms:
        return 1
    wanted = -(-PROGRAMS_PER_SM * sms // programs)
    return max(1, min(wanted, MAX_SPLITS, max_keys // MIN_KEYS_PER_SPLIT))


def _capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    if block_table is not None:
        return block_table.shape[1] * k_cache.shape[1]
    return k_cache.shape[1]


def forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, alibi_slopes, softmax_scale, softcap, window_left, window_right, rotary_interleaved,
            rotary_per_token, rotary_from_leftpad, num_splits):
    """Runs the kernels on validated inputs (see kvcache_attention); returns (out, lse)."""
    # The kernel indexes these along their last dimension without a stride.
    cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi_slopes = map(
        unit_stride, (cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi_slopes))
    if rotary_cos is not None:
        rotary_cos, rotary_sin = shared_layout(rotary_cos, rotary_sin)  # the kernel walks both by cos's strides
    B, Sq, H, D = q.shape
    D = int(D)  # compile-time constants follow from it: concrete under dynamic shapes
    Hk = k_cache.shape[2]
    G = H // Hk
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    n_rows = Sq * G
    block_d = max(16, next_power_of_2(D))
    # tl.dot needs 16 rows; a query block of 64 rows (32 at head dim 256) bounds registers.
    block_m = min(max(16, next_power_of_2(n_rows)), 64 if block_d <= 128 else 32)
    m_blocks = cdiv(n_rows, block_m)
    max_keys = _capacity(k_cache, block_table)
    if window_left >= 0:
        max_keys = min(max_keys, window_left + Sq + max(window_right, 0) + 1)
    if Sq == 1:
        window_right = -1  # one query sits on the diagonal: no key lies right of it, so skip the mask
    if num_splits:  # as FlashAttention-2, at most MAX_SPLITS; and no split without a key to hold
        splits = max(1, min(num_splits, MAX_SPLITS, max_keys))
    else:
        splits = choose_num_splits(B * Hk * m_blocks, max_keys, sm_count(q.device))
    dummy = q
    if splits > 1:
        out_part = torch.empty((B * Hk, splits, n_rows, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * Hk, splits, n_rows), dtype=torch.float32, device=q.device)
    else:
        out_part = lse_part = dummy
    kn, vn = (k, v) if k is not None else (dummy, dummy)
    args = (q, k_cache, v_cache, kn, vn,
            rotary_cos if rotary_cos is not None else dummy, rotary_sin if rotary_sin is not None else dummy,
            cache_seqlens, cache_batch_idx if cache_batch_idx is not None else cache_seqlens,
            cache_leftpad if cache_leftpad is not None else cache_seqlens,
            block_table if block_table is not None else cache_seqlens,
            alibi_slopes if alibi_slopes is not None else dummy,
            out, lse, out_part, lse_part,
            q.stride(0), q.stride(1), q.stride(2), *k_cache.stride()[:3], *v_cache.stride()[:3],
            *(kn.stride()[:3] if k is not None else (0, 0, 0)), *(vn.stride()[:3] if k is not None else (0, 0, 0)),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            rotary_cos.stride(0) if rotary_cos is not None else 0,
            block_table.stride(0) if block_table is not None else 0,
            alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
            Sq, k.shape[1] if k is not None else 0, G, Hk, k_cache.shape[1] if block_table is not None else 1,
            2 * rotary_cos.shape[1] if rotary_cos is not None else 0, splits,
            softmax_scale, softmax_scale * 1.4426950408889634, softcap, window_left, window_right,
            next_power_of_2(max(1, max_keys // splits)))
    flags = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, FP32=q.dtype == torch.float32,
                 PAGED=block_table is not None, HAS_BATCH_IDX=cache_batch_idx is not None,
                 HAS_LEFTPAD=cache_leftpad is not None, HAS_NEW=k is not None, HAS_ROTARY=rotary_cos is not None,
                 INTERLEAVED=rotary_interleaved, ROTARY_Q_PER_TOKEN=rotary_per_token,
                 ROTARY_FROM_LEFTPAD=rotary_from_leftpad and cache_leftpad is not None, HAS_SOFTCAP=softcap > 0,
                 HAS_ALIBI=alibi_slopes is not None, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                 SPLIT=splits > 1)
    grid = (B * Hk, m_blocks, splits)
    if INTERPRET:
        _kvcache_attn_kernel[grid](*args, **flags, BLOCK_N=_INTERPRET_BLOCK_N)
    else:
        launch(_kvcache_attn_tuned)[grid](*args, **flags)
    if splits > 1:
        combine_m = min(next_power_of_2(n_rows), 16)
        launch(_combine_kernel)[(B * Hk, cdiv(n_rows, combine_m))](
            out_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
            lse.stride(1), n_rows, G, Hk, splits, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=combine_m)
    return out, lse


# --------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------


@on_device
def _kvcache_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
    rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], cache_seqlens: Tensor,
    cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor], block_table: Optional[Tensor],
    alibi_slopes: Optional[Tensor], softmax_scale: float, softcap: float, window_left: int, window_right: int,
    rotary_interleaved: bool, rotary_per_token: bool, rotary_from_leftpad: bool, num_splits: int,
) -> tuple[Tensor, Tensor]:
    """Appends k/v to the caches in place and attends; returns (out like q, lse (B, H, Sq) float32).

    Inputs arrive validated by flash_attn_with_kvcache: cache_seqlens (B,) int32 (the
    cache's end before the append), window sides -1 for unbounded (causal is right = 0),
    rotary_per_token whether query i turns by position cache_seqlens + i (else all by
    cache_seqlens), rotary_from_leftpad whether those positions count from cache_leftpad
    (cache_seqlens - cache_leftpad + i) instead of slot 0 (FA2), num_splits 0 for the heuristic.
    """
    impl = forward if use_triton(q) else decoding_reference.forward
    return impl(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                block_table, alibi_slopes, softmax_scale, softcap, window_left, window_right, rotary_interleaved,
                rotary_per_token, rotary_from_leftpad, num_splits)


kvcache_attention = torch.library.triton_op("tritonzoo::kvcache_attention", _kvcache_attention,
                                            mutates_args=("k_cache", "v_cache"))
#: How callers run the op: the op, or its body directly (kernels.runtime.eager_op).
call_kvcache_attention = eager_op(kvcache_attention, _kvcache_attention, mutated=(1, 2))
