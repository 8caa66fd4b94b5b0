"""Flash attention in Triton (the FlashAttention-2 algorithm): forward and backward.

Layout and semantics follow FlashAttention-2. One kernel family serves padded batches
(q: (B, Sq, H, D)) and packed variable-length batches (q: (total, H, D) with
cu_seqlens), any head dim up to 256, GQA/MQA, causal and sliding-window masks (the
diagonal aligned bottom-right as in FlashAttention-2 >= 2.1, or top-left as in torch's
SDPA), ALiBi, softcap, an additive or boolean bias (SDPA's attn_mask), and dropout from
a counter-based RNG (Philox keyed by the seed, counted by (key, query, batch*head)).

Scores live in log2 units inside the kernels (exp2 is the cheap exponential); the
log-sum-exp is stored in natural units, +inf for a row with no key to attend to (as
FlashAttention-2 does), so the backward's exp(s - lse) is exactly 0 there.

The backward is two kernels: dK/dV (one program per key block, looping over the query
blocks and over the query heads that share the key head) and dQ (one program per query
block). Neither uses atomics, so gradients are deterministic.

The launchers at the bottom allocate outputs, pick the grid and call the kernels; the
torch.library registration lives in attention_op.py, the PyTorch reference of the same
semantics in attention_reference.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from . import autotune
from .runtime import cdiv, launch, INTERPRET, next_power_of_2, unit_stride

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: The Triton interpreter (fixed for the process, like INTERPRET): see _dot.
_INTERPRETED = tl.constexpr(INTERPRET)

#: Dropout compares the top 24 bits of a Philox draw with this many steps.
DROPOUT_RESOLUTION = 1 << 24


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, FP32: tl.constexpr):
    # fp32 inputs are computed in fp32 (ieee), not tf32: that is what a caller passing
    # fp32 asked for.
    if _INTERPRETED:
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            # Triton 3.6's interpreter gets tl.dot of bf16 tiles wrong (errors ~1e10). The products
            # of bf16 numbers are exact in fp32, so an fp32 dot of the upcast tiles is what a GPU's
            # bf16 MMA with fp32 accumulation computes.
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at +-inf, no libdevice needed (the interpreter
    # runs it too). Near 0 that formula cancels: its error is ~1e-7 absolute, not relative,
    # and softcap multiplies it (1e-4 at softcap 1e4). There (|x| < 1/4) the odd Taylor
    # series to x^9 instead, whose first dropped term is below 1e-8 relative.
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, series, 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0))


@triton.jit
def _seq_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """Start offset (int64 when packed, else 0) and length of batch row b's queries and keys."""
    if IS_VARLEN:
        q_lo = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_lo
        k_lo = tl.load(CuK + b)
        k_len = tl.load(CuK + b + 1) - k_lo
        # int64: offsets into a large packed batch overflow int32.
        q_start = q_lo.to(tl.int64)
        k_start = k_lo.to(tl.int64)
    else:
        q_start = 0
        k_start = 0
        q_len = seqlen_q
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _load_tile(ptrs, offs_r, n_r, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Loads a (rows, BLOCK_D) tile, masking only what can be out of bounds."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _dropout_keep(seed, rng_row, qi, kj, dropout_thresh):
    """Keep-mask of a tile: Philox(seed; key j, query i, row, 0). qi and kj are the query and
    key indices as 2-D tensors that broadcast to the tile (queries x keys, or keys x queries)."""
    c0 = kj + qi * 0
    c1 = qi + kj * 0
    r, _, _, _ = tl.philox(seed, c0, c1, c0 * 0 + rng_row, c0 * 0)
    return (r >> 8).to(tl.int32) >= dropout_thresh


@triton.jit
def _scores(qk, qi, kj, q_len, k_len, diag, sm_scale, qk_scale, softcap, slope,
            bias_ptrs, window_left, window_right,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
            BIAS_IS_BOOL: tl.constexpr, MASK: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Scores of a tile of raw q.k products, in log2 units, and tanh of the softcap.

    qi and kj are the query and key indices as 2-D tensors that broadcast to the tile:
    (offs_m[:, None], offs_n[None, :]) for queries x keys, the other way round for the
    backward's keys x queries tiles. Order as FlashAttention-2: scale, softcap, + ALiBi,
    + bias, then the masks. MASK applies the key bound and the causal/window masks (edge
    blocks only).
    """
    if HAS_SOFTCAP or HAS_ALIBI or HAS_BIAS:
        if HAS_SOFTCAP:
            t = _tanh(qk * (sm_scale / softcap))
            s = t * softcap
        else:
            t = qk
            s = qk * sm_scale
        if HAS_ALIBI:
            rel = qi + diag - kj
            s = s - slope * tl.abs(rel).to(tl.float32)
        if HAS_BIAS:
            in_bounds = (qi < q_len) & (kj < k_len)
            if BIAS_IS_BOOL:
                keep = tl.load(bias_ptrs, mask=in_bounds, other=1)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                s = s + tl.load(bias_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
                # Finite scores are clamped to [-2^31, 2^31]; -inf and +inf stay. A mask of
                # finfo.min must stay finite in log2 units (x LOG2E would overflow to -inf, and a
                # row of it would read as having no key, where torch gives the uniform average);
                # and a row's float64 log-sum-exp (_attn_fwd) keeps log2(l) to 1e-6 only up to
                # |m| ~ 3e9: beyond, the backward's lse round trip (x LN2, x LOG2E) is off by
                # more than 1 (a +1e30 mask entry gave inf and NaN gradients). Unlike torch, a
                # row whose scores all lie below -2^31, or whose top scores all lie above 2^31,
                # averages those uniformly.
                s = tl.where(tl.abs(s) == float("inf"), s, tl.minimum(tl.maximum(s, -2147483648.0), 2147483648.0))
        s = s * LOG2E
    else:
        t = qk
        s = qk * qk_scale
    if MASK:
        valid = kj < k_len
        if HAS_RIGHT:
            valid = valid & (kj <= qi + diag + window_right)
        if HAS_LEFT:
            valid = valid & (kj >= qi + diag - window_left)
        s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _key_range(m0, q_len, k_len, diag, window_left, window_right,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks that query block [m0, m0 + BLOCK_M) attends to.

    Returns lo, hi (all keys any of its rows may see) and f_lo, f_hi (the blocks every
    one of its rows sees whole, which need no mask). All values are multiples of
    BLOCK_N except hi. Operands of // are kept >= 0: Triton and its interpreter round
    negative quotients differently.
    """
    m_last = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo = 0
    hi = k_len
    f_lo = 0
    f_hi = (k_len // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(m0 + diag - window_left, 0) // BLOCK_N) * BLOCK_N
        f_lo = tl.maximum(m_last + diag - window_left, 0)
        f_lo = ((f_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_last + diag + window_right + 1)
        f_hi = tl.minimum(f_hi, (tl.maximum(m0 + diag + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    hi = tl.where(m0 < q_len, hi, lo)
    empty = f_hi <= f_lo
    f_lo = tl.where(empty, lo, f_lo)
    f_hi = tl.where(empty, lo, f_hi)
    return lo, hi, f_lo, f_hi


@triton.jit
def _query_range(n0, q_len, k_len, diag, window_left, window_right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that attend to key block [n0, n0 + BLOCK_N); as _key_range.

    Key j is seen by query i iff i >= j - diag - right and i <= j - diag + left.
    Unmasked blocks must hold only real queries (rows past q_len would add to dK/dV);
    columns past k_len need no mask here, their dK/dV rows are never stored.
    """
    n_last = tl.minimum(n0 + BLOCK_N, k_len) - 1
    lo = 0
    hi = q_len
    f_lo = 0
    f_hi = (q_len // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (tl.maximum(n0 - diag - window_right, 0) // BLOCK_M) * BLOCK_M
        f_lo = tl.maximum(n_last - diag - window_right, 0)
        f_lo = ((f_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, n_last - diag + window_left + 1)
        f_hi = tl.minimum(f_hi, (tl.maximum(n0 - diag + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.where(n0 < k_len, hi, lo)
    empty = f_hi <= f_lo
    f_lo = tl.where(empty, lo, f_lo)
    f_hi = tl.where(empty, lo, f_hi)
    return lo, hi, f_lo, f_hi


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
               offs_m, q_len, k_len, diag, lo, hi,
               sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh,
               window_left, window_right,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, FP32: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
               BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, k_len, offs_d,
                       MASK, HEAD_DIM, BLOCK_D)
        qk = _dot(q, tl.trans(k), None, FP32)
        s, t = _scores(qk, offs_m[:, None], offs_n[None, :], q_len, k_len, diag, sm_scale, qk_scale, softcap,
                       slope, bias_rows + offs_n[None, :] * stride_bn, window_left, window_right,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, MASK, HAS_LEFT, HAS_RIGHT)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK or HAS_BIAS:
            # A row with every score -inf so far: keep its exponent finite (no inf - inf).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_row, offs_m[:, None], offs_n[None, :], dropout_thresh), p, 0.0)
        v = _load_tile(V_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, k_len, offs_d,
                       MASK, HEAD_DIM, BLOCK_D)
        acc = _dot(p.to(v.dtype), v, acc, FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, Bias, Alibi, Seed, CuQ, CuK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab,
    nheads, group, seqlen_q, seqlen_k,
    sm_scale, qk_scale, softcap, dropout_thresh, dropout_scale, window_left, window_right,
    q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    dropout_scale = tl.cast(dropout_scale, tl.float32)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, IS_VARLEN)
    if BOTTOM_RIGHT:
        diag = k_len - q_len
    else:
        diag = 0
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = offs_m[:, None] < q_len
    d_mask = offs_d[None, :] < HEAD_DIM
    q_ptrs = (Q + b64 * stride_qb + q_start * stride_qm + h64 * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_mask & d_mask, other=0.0)
    K_base = K + b64 * stride_kb + k_start * stride_kn + hk64 * stride_kh
    V_base = V + b64 * stride_vb + k_start * stride_vn + hk64 * stride_vh
    bias_rows = Bias + b64 * stride_bb + h64 * stride_bh + offs_m[:, None] * stride_bm
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    rng_row = b * nheads + h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, f_lo, f_hi = _key_range(m0, q_len, k_len, diag, window_left, window_right,
                                    BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # Edge blocks on the left (window), unmasked middle, edge blocks on the right.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                               offs_m, q_len, k_len, diag, lo, f_lo,
                               sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh,
                               window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, FP32,
                               HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                               offs_m, q_len, k_len, diag, f_lo, f_hi,
                               sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh,
                               window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, False, FP32,
                               HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                               offs_m, q_len, k_len, diag, f_hi, hi,
                               sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh,
                               window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, FP32,
                               HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, dropout_scale / l_safe, 0.0)[:, None]
    if HAS_BIAS and not BIAS_IS_BOOL:
        # A mask row of one huge value (-1e9, the dtype's minimum) puts m near -1.44e9, where
        # float32's spacing (128) swallows log2(l), and the backward's p = exp2(s - lse) came
        # out ~1 instead of 1/Sk. With a float mask, Lse is float64 (see _log2_split).
        log2_sum = m_i.to(tl.float64) + tl.math.log2(l_safe).to(tl.float64)
        lse = tl.where(has_keys, log2_sum * tl.full([BLOCK_M], LN2, tl.float64), float("inf"))
    else:
        lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    o_ptrs = (Out + b64 * stride_ob + q_start * stride_om + h64 * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask & d_mask)
    l_ptrs = Lse + b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    tl.store(l_ptrs, lse, mask=offs_m < q_len)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut, DLse, Delta, CuQ,
    stride_ob, stride_om, stride_oh,
    stride_db, stride_dm, stride_dh,
    stride_lb, stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE: the per-row term of the softmax gradient."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, _, _ = _seq_bounds(b, CuQ, CuQ, seqlen_q, seqlen_q, IS_VARLEN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    rows = q_start + offs_m[:, None]
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b64 * stride_db + h64 * stride_dh + rows * stride_dm + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + l_off, mask=offs_m < q_len, other=0.0)
    tl.store(Delta + l_off, delta, mask=offs_m < q_len)


@triton.jit
def _log2_split(lse):
    """A float64 lse (natural log; +inf for rows without keys) in log2 units as hi + lo, two
    float32s: with a float mask the backward takes p = exp2((s - hi) - lo), where s - hi is
    exact (s and hi agree in their leading bits) and lo carries what float32 hi cannot."""
    x = lse * tl.full(lse.shape, LOG2E, tl.float64)
    hi = x.to(tl.float32)
    lo = tl.where(x == float("inf"), 0.0, x - hi.to(tl.float64)).to(tl.float32)
    return hi, lo


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, stride_qm, stride_dom, Lse_base, Delta_base,
                    bias_cols, stride_bm, offs_n, q_len, k_len, diag, lo, hi,
                    sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                    window_left, window_right,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK: tl.constexpr, FP32: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Adds query blocks [lo, hi) to this key block's dK and dV.

    The tiles are keys x queries (S^T = K Q^T, P^T, dP^T, dS^T), so that every dot has the
    key block as its M dimension and takes loaded tiles, or a dot's result as it stands, as
    operands: no dot result is transposed in registers. The queries x keys form, with
    dK += tl.trans(dS) @ Q, came out wrong on an H100 (Triton 3.6, wgmma) for several block
    shapes (docs/kernel-notes.md, "The dK bug").
    """
    offs_d = tl.arange(0, BLOCK_D)
    kj = offs_n[:, None]
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qi = offs_m[None, :]
        q = _load_tile(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, q_len, offs_d,
                       MASK, HEAD_DIM, BLOCK_D)
        do = _load_tile(DO_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, q_len, offs_d,
                        MASK, HEAD_DIM, BLOCK_D)
        if MASK:
            # Queries past q_len: lse = +inf makes p exactly 0, so they add nothing.
            lse = tl.load(Lse_base + offs_m, mask=offs_m < q_len, other=float("inf"))
            delta = tl.load(Delta_base + offs_m, mask=offs_m < q_len, other=0.0)
        else:
            lse = tl.load(Lse_base + offs_m)
            delta = tl.load(Delta_base + offs_m)
        qk = _dot(k, tl.trans(q), None, FP32)
        s, t = _scores(qk, qi, kj, q_len, k_len, diag, sm_scale, qk_scale, softcap, slope,
                       bias_cols + qi * stride_bm, window_left, window_right,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, MASK, HAS_LEFT, HAS_RIGHT)
        if HAS_BIAS and not BIAS_IS_BOOL:
            lse_hi, lse_lo = _log2_split(lse)
            p = tl.math.exp2((s - lse_hi[None, :]) - lse_lo[None, :])
        else:
            p = tl.math.exp2(s - lse[None, :] * LOG2E)
        dp = _dot(v, tl.trans(do), None, FP32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_row, qi, kj, dropout_thresh)
            p_dropped = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        else:
            p_dropped = p
        dv = _dot(p_dropped.to(do.dtype), do, dv, FP32)
        ds = p * (dp - delta[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk = _dot(ds.to(q.dtype), q, dk, FP32)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, Bias, Alibi, Seed, CuQ, CuK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab,
    nheads, group, seqlen_q, seqlen_k,
    sm_scale, qk_scale, softcap, dropout_thresh, dropout_scale, window_left, window_right,
    q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    dropout_scale = tl.cast(dropout_scale, tl.float32)
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, IS_VARLEN)
    if BOTTOM_RIGHT:
        diag = k_len - q_len
    else:
        diag = 0
    n0 = pid_n * BLOCK_N
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    k_rows = k_start + offs_n[:, None]
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + k_rows * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + k_rows * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    lo, hi, f_lo, f_hi = _query_range(n0, q_len, k_len, diag, window_left, window_right,
                                      BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    # The query heads that share this key head, one after another: no atomics.
    for g in range(0, group):
        h = hk * group + g
        h64 = h.to(tl.int64)
        Q_base = Q + b64 * stride_qb + q_start * stride_qm + h64 * stride_qh
        DO_base = DO + b64 * stride_dob + q_start * stride_dom + h64 * stride_doh
        l_off = b64 * stride_lb + h64 * stride_lh + q_start
        bias_cols = Bias + b64 * stride_bb + h64 * stride_bh + offs_n[:, None] * stride_bn
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b64 * stride_ab + h).to(tl.float32)
        rng_row = b * nheads + h
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, stride_qm, stride_dom, Lse + l_off, Delta + l_off,
                                 bias_cols, stride_bm, offs_n, q_len, k_len, diag, lo, f_lo,
                                 sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                                 window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, True, FP32,
                                 HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, stride_qm, stride_dom, Lse + l_off, Delta + l_off,
                                 bias_cols, stride_bm, offs_n, q_len, k_len, diag, f_lo, f_hi,
                                 sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                                 window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, False, FP32,
                                 HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, stride_qm, stride_dom, Lse + l_off, Delta + l_off,
                                 bias_cols, stride_bm, offs_n, q_len, k_len, diag, f_hi, hi,
                                 sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                                 window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_M, True, FP32,
                                 HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + k_rows * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + k_rows * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, lse_lo, delta, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                  offs_m, q_len, k_len, diag, lo, hi,
                  sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                  window_left, window_right,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, FP32: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BIAS_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, k_len, offs_d,
                       MASK, HEAD_DIM, BLOCK_D)
        v = _load_tile(V_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, k_len, offs_d,
                       MASK, HEAD_DIM, BLOCK_D)
        qk = _dot(q, tl.trans(k), None, FP32)
        s, t = _scores(qk, offs_m[:, None], offs_n[None, :], q_len, k_len, diag, sm_scale, qk_scale, softcap,
                       slope, bias_rows + offs_n[None, :] * stride_bn, window_left, window_right,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, MASK, HAS_LEFT, HAS_RIGHT)
        if HAS_BIAS and not BIAS_IS_BOOL:
            p = tl.math.exp2((s - lse[:, None]) - lse_lo[:, None])  # lse, lse_lo: _log2_split's hi, lo
        else:
            p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), None, FP32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_row, offs_m[:, None], offs_n[None, :], dropout_thresh)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, FP32)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, Bias, Alibi, Seed, CuQ, CuK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ab,
    nheads, group, seqlen_q, seqlen_k,
    sm_scale, qk_scale, softcap, dropout_thresh, dropout_scale, window_left, window_right,
    q_bucket, k_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # torch.compile (inductor) types Python float arguments fp64: the arithmetic stays fp32.
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = tl.cast(qk_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    dropout_scale = tl.cast(dropout_scale, tl.float32)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, IS_VARLEN)
    if BOTTOM_RIGHT:
        diag = k_len - q_len
    else:
        diag = 0
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    rows = q_start + offs_m[:, None]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0)
    l_off = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    lse = tl.load(Lse + l_off, mask=offs_m < q_len, other=float("inf"))
    if HAS_BIAS and not BIAS_IS_BOOL:
        lse, lse_lo = _log2_split(lse)
    else:
        lse = lse * LOG2E
        lse_lo = lse  # unused
    delta = tl.load(Delta + l_off, mask=offs_m < q_len, other=0.0)
    K_base = K + b64 * stride_kb + k_start * stride_kn + hk64 * stride_kh
    V_base = V + b64 * stride_vb + k_start * stride_vn + hk64 * stride_vh
    bias_rows = Bias + b64 * stride_bb + h64 * stride_bh + offs_m[:, None] * stride_bm
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h).to(tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    rng_row = b * nheads + h

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi, f_lo, f_hi = _key_range(m0, q_len, k_len, diag, window_left, window_right,
                                    BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq = _bwd_dq_inner(dq, q, do, lse, lse_lo, delta, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                       offs_m, q_len, k_len, diag, lo, f_lo,
                       sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                       window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, FP32,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
    dq = _bwd_dq_inner(dq, q, do, lse, lse_lo, delta, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                       offs_m, q_len, k_len, diag, f_lo, f_hi,
                       sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                       window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, False, FP32,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
    dq = _bwd_dq_inner(dq, q, do, lse, lse_lo, delta, K_base, V_base, stride_kn, stride_vn, bias_rows, stride_bn,
                       offs_m, q_len, k_len, diag, f_hi, hi,
                       sm_scale, qk_scale, softcap, slope, seed, rng_row, dropout_thresh, dropout_scale,
                       window_left, window_right, HEAD_DIM, BLOCK_D, BLOCK_N, True, FP32,
                       HAS_SOFTCAP, HAS_ALIBI, HAS_BIAS, BIAS_IS_BOOL, HAS_DROPOUT, HAS_LEFT, HAS_RIGHT)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(Mask, Seed, nheads, seqlen_q, seqlen_k, dropout_thresh,
                         stride_mb, stride_mh, stride_mm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the dropout keep-mask the attention kernels use, (B, H, Sq, Sk) bool."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seed = tl.load(Seed)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, b * nheads + h, offs_m[:, None], offs_n[None, :], dropout_thresh)
        tl.store(base + offs_m[:, None] * stride_mm + offs_n[None, :], keep,
                 mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------

# The interpreter runs one fixed, small configuration. M and N blocks differ on purpose,
# so the tests exercise the edge logic of both.
_INTERPRET_FWD = dict(BLOCK_M=32, BLOCK_N=16)
_INTERPRET_DKDV = dict(BLOCK_M=16, BLOCK_N=32)
_INTERPRET_DQ = dict(BLOCK_M=32, BLOCK_N=16)
# The dropout-mask kernel's tile (the mask does not depend on it: each element's draw is
# keyed by its own coordinates).
GPU_DROPOUT_MASK_BLOCK = (64, 64)
_DROPOUT_MASK_BLOCK = (32, 16) if INTERPRET else GPU_DROPOUT_MASK_BLOCK

# GPU candidates, chosen so ptxas (sm_90a, bf16) reports no or few register spills for
# them; the autotuner picks among them per key: head-dim block, masks, dtype, GQA group
# and a length bucket (kernels/autotune.py: how, and TRITONZOO_AUTOTUNE=first, which takes
# each list's first entry). fp32 (FMA dots, no tensor cores) needs small tiles.
# (block_m, block_n, num_warps, num_stages); the sweep is in docs/kernel-notes.md.
_FWD_CANDIDATES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 3), (128, 32, 8, 4), (64, 128, 8, 3)],
    256: [(64, 64, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (128, 64, 8, 2)],
    "fp32": [(32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
}
# dK/dV tiles are keys x queries (_bwd_dkdv_inner): block_n is every dot's M dimension.
_DKDV_CANDIDATES = {
    64: [(32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3), (16, 128, 8, 2), (64, 32, 8, 3)],
    128: [(32, 64, 8, 2), (16, 64, 8, 3), (16, 128, 8, 3), (64, 32, 8, 3), (64, 64, 8, 2)],
    256: [(32, 32, 8, 2), (16, 64, 8, 2), (32, 64, 8, 2)],  # 128x32 needs 289 KiB of shared memory
    "fp32": [(16, 32, 4, 2), (16, 16, 4, 1), (32, 16, 4, 1)],
}
_DQ_CANDIDATES = {
    64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)],
    128: [(128, 32, 8, 3), (64, 64, 4, 3), (32, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
    256: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2)],
    "fp32": [(32, 16, 4, 2), (16, 16, 4, 1), (32, 32, 4, 1)],
}
_AUTOTUNE_KEY = ["q_bucket", "k_bucket", "group", "BLOCK_D", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN",
                 "HAS_DROPOUT", "HAS_BIAS", "HAS_SOFTCAP", "HAS_ALIBI"]


def _all_configs(candidates):
    seen, configs = set(), []
    for group in candidates.values():
        for c in group:
            if c not in seen:
                seen.add(c)
                bm, bn, w, s = c
                configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return configs


def _pruner(candidates):
    def prune(configs, named_args, **kwargs):
        return autotune.pick(configs, candidates[autotune.table_key(kwargs["FP32"], kwargs["BLOCK_D"])],
                             lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
    return prune


def _tuned(kernel, candidates):
    if INTERPRET:
        return kernel
    return autotune.autotune(_all_configs(candidates), _AUTOTUNE_KEY, _pruner(candidates))(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd, _FWD_CANDIDATES)
_attn_bwd_dkdv_tuned = _tuned(_attn_bwd_dkdv, _DKDV_CANDIDATES)
_attn_bwd_dq_tuned = _tuned(_attn_bwd_dq, _DQ_CANDIDATES)

#: The kernels a launch configuration can be forced for (forced_config).
FORCEABLE = ("fwd", "dkdv", "dq")
_forced: dict = {}


@contextlib.contextmanager
def forced_config(kernel: str, config: dict):
    """Inside the block, ``kernel`` ("fwd", "dkdv" or "dq") launches with ``config`` (BLOCK_M,
    BLOCK_N and Triton's launch options: num_warps, num_stages, maxnreg) instead of the
    autotuner's pick (or, in the interpreter, its fixed tiles): for trying configurations
    outside the candidate tables (tasks.tune_attention). Process-wide, not thread-safe."""
    if kernel not in FORCEABLE:
        raise ValueError(f"kernel must be one of {FORCEABLE}, got {kernel!r}")
    missing = {"BLOCK_M", "BLOCK_N"} - set(config)
    if missing:
        raise ValueError(f"config needs {sorted(missing)}, got {config!r}")
    previous = _forced.get(kernel)
    _forced[kernel] = dict(config)
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(kernel)
        else:
            _forced[kernel] = previous


def _launch(kernel: str, raw, tuned, interpret_config: dict, grid, args: tuple, flags: dict) -> None:
    """Launches ``raw`` with a forced configuration, its interpreter tiles, or ``tuned``."""
    config = _forced.get(kernel) if _forced else None
    if config is not None:
        launch(raw)[grid](*args, **flags, **config)
    elif INTERPRET:
        raw[grid](*args, **flags, **interpret_config)
    else:
        launch(tuned)[grid](*args, **flags)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    return next_power_of_2(max(int(n), 16))


def dropout_threshold(dropout_p: float) -> int:
    """The integer a draw's top 24 bits must reach for the element to be kept."""
    return int(round(dropout_p * DROPOUT_RESOLUTION))


class _Geometry:
    """Strides and sizes shared by the forward and backward launches."""

    def __init__(self, q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, bias, alibi_slopes):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.batch = cu_seqlens_q.numel() - 1
            _, self.nheads, self.head_dim = q.shape
            self.nheads_k = k.shape[1]
        else:
            self.batch, _, self.nheads, self.head_dim = q.shape
            self.nheads_k = k.shape[2]
        self.seqlen_q, self.seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        # A compile-time constant: concrete under torch.compile's dynamic shapes (a guard on the
        # head dim), not a SymInt carried into the launch (tests/test_dynamic_shapes.py).
        self.head_dim = int(self.head_dim)
        self.group = self.nheads // self.nheads_k
        self.block_d = max(16, next_power_of_2(self.head_dim))
        self.bias_strides = tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)
        self.alibi_stride = alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0

    @staticmethod
    def bsh(t, varlen):
        """(batch, seq, head) strides of a (B, S, H, D) or packed (total, H, D) tensor."""
        strides = t.stride()  # one call, not one per dimension: ~1 µs each on the host
        return (0, strides[0], strides[1]) if varlen else strides[:3]

    def lse_strides(self, lse):
        # padded: (B, H, Sq); packed: (H, total_q)
        if self.varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)


def _flags(geo, q, bias, alibi_slopes, dropout_p, softcap, window_left, window_right, bottom_right):
    return dict(
        HEAD_DIM=geo.head_dim, BLOCK_D=geo.block_d, FP32=q.dtype == torch.float32,
        IS_VARLEN=geo.varlen, BOTTOM_RIGHT=bottom_right,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None, HAS_BIAS=bias is not None,
        BIAS_IS_BOOL=bias is not None and bias.dtype == torch.bool, HAS_DROPOUT=dropout_p > 0,
    )


def _scalars(geo, softmax_scale, softcap, dropout_p, window_left, window_right):
    return (geo.nheads, geo.group, geo.seqlen_q, geo.seqlen_k,
            softmax_scale, softmax_scale * 1.4426950408889634, softcap,
            dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), window_left, window_right,
            _bucket(geo.seqlen_q), _bucket(geo.seqlen_k))


def _index_placeholder(q):
    """The kernels' CuQ / CuK argument when the batch is not packed (never read).

    Not q: under torch.compile, torch's analysis of a wrapped kernel counts these pointers
    as written (they reach a helper whose results feed store addresses) and copies them on
    every launch; a one-element index tensor keeps that copy negligible.
    """
    return torch.empty(1, dtype=torch.int32, device=q.device)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, seed,
            dropout_p, softmax_scale, softcap, window_left, window_right, bottom_right):
    """Runs the forward kernel. Inputs are validated by the caller; returns (out, lse).

    out has q's shape (contiguous); lse is (B, H, Sq) float32, or (H, total_q) when packed;
    float64 with a float bias (a row of one huge mask value needs its precision).
    """
    cu_seqlens_q, cu_seqlens_k, alibi_slopes = map(unit_stride, (cu_seqlens_q, cu_seqlens_k, alibi_slopes))
    geo = _Geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, bias, alibi_slopes)
    if geo.varlen:
        # Rows that belong to no sequence (cu_seqlens_q[-1] < total) are left as zeros.
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((geo.nheads, q.shape[0]), math.inf, device=q.device, dtype=torch.float32)
    else:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse_dtype = torch.float64 if bias is not None and bias.dtype != torch.bool else torch.float32
        lse = torch.empty((geo.batch, geo.nheads, q.shape[1]), device=q.device, dtype=lse_dtype)
    if out.numel() == 0:
        return out, lse
    dummy = q
    cu_dummy = _index_placeholder(q)
    args = (q, k, v, out, lse,
            bias if bias is not None else dummy, alibi_slopes if alibi_slopes is not None else dummy,
            seed if seed is not None else dummy,
            cu_seqlens_q if cu_seqlens_q is not None else cu_dummy,
            cu_seqlens_k if cu_seqlens_k is not None else cu_dummy,
            *geo.bsh(q, geo.varlen), *geo.bsh(k, geo.varlen), *geo.bsh(v, geo.varlen), *geo.bsh(out, geo.varlen),
            *geo.lse_strides(lse), *geo.bias_strides, geo.alibi_stride,
            *_scalars(geo, softmax_scale, softcap, dropout_p, window_left, window_right))
    flags = _flags(geo, q, bias, alibi_slopes, dropout_p, softcap, window_left, window_right, bottom_right)

    def grid(meta):
        return (cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.nheads, geo.batch)

    _launch("fwd", _attn_fwd, _attn_fwd_tuned, _INTERPRET_FWD, grid, args, flags)
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias,
             alibi_slopes, seed, dropout_p, softmax_scale, softcap, window_left, window_right, bottom_right):
    """Runs the backward kernels; returns (dq, dk, dv) shaped like (q, k, v)."""
    cu_seqlens_q, cu_seqlens_k, alibi_slopes = map(unit_stride, (cu_seqlens_q, cu_seqlens_k, alibi_slopes))
    # The preprocess kernel reads dlse with lse's (contiguous) strides; autograd may hand
    # over any layout (lse.sum() gives an expanded tensor of stride 0).
    dlse = dlse.contiguous() if dlse is not None else None
    geo = _Geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, bias, alibi_slopes)
    # Padded batches: the kernels write every element. Packed: rows outside every
    # sequence are never visited and must read as zero.
    alloc = torch.zeros_like if geo.varlen else torch.empty_like
    dq, dk, dv = (alloc(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    delta = torch.empty(lse.shape, device=lse.device, dtype=torch.float32)
    dummy = q
    cu_q = cu_seqlens_q if cu_seqlens_q is not None else _index_placeholder(q)
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_q
    pre_block = 64 if geo.block_d <= 128 else 32
    pre = launch(_attn_bwd_preprocess)
    pre[(cdiv(geo.seqlen_q, pre_block), geo.nheads, geo.batch)](
        out, dout, dlse if dlse is not None else lse, delta, cu_q,
        *geo.bsh(out, geo.varlen), *geo.bsh(dout, geo.varlen), *geo.lse_strides(lse), geo.seqlen_q,
        HEAD_DIM=geo.head_dim, BLOCK_D=geo.block_d, IS_VARLEN=geo.varlen, HAS_DLSE=dlse is not None,
        BLOCK_M=pre_block)

    common_ptrs = (bias if bias is not None else dummy, alibi_slopes if alibi_slopes is not None else dummy,
                   seed if seed is not None else dummy, cu_q, cu_k)
    common_tail = (*geo.lse_strides(lse), *geo.bias_strides, geo.alibi_stride,
                   *_scalars(geo, softmax_scale, softcap, dropout_p, window_left, window_right))
    flags = _flags(geo, q, bias, alibi_slopes, dropout_p, softcap, window_left, window_right, bottom_right)
    qkv_strides = (*geo.bsh(q, geo.varlen), *geo.bsh(k, geo.varlen), *geo.bsh(v, geo.varlen),
                   *geo.bsh(dout, geo.varlen))

    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *common_ptrs, *qkv_strides,
                 *geo.bsh(dk, geo.varlen), *geo.bsh(dv, geo.varlen), *common_tail)

    def dkdv_grid(meta):
        return (cdiv(geo.seqlen_k, meta["BLOCK_N"]), geo.nheads_k, geo.batch)

    dq_args = (q, k, v, dout, lse, delta, dq, *common_ptrs, *qkv_strides, *geo.bsh(dq, geo.varlen), *common_tail)

    def dq_grid(meta):
        return (cdiv(geo.seqlen_q, meta["BLOCK_M"]), geo.nheads, geo.batch)

    _launch("dkdv", _attn_bwd_dkdv, _attn_bwd_dkdv_tuned, _INTERPRET_DKDV, dkdv_grid, dkdv_args, flags)
    _launch("dq", _attn_bwd_dq, _attn_bwd_dq_tuned, _INTERPRET_DQ, dq_grid, dq_args, flags)
    return dq, dk, dv


def dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, dropout_p, device):
    """The keep-mask the kernels draw for this seed: (batch, nheads, seqlen_q, seqlen_k) bool."""
    mask = torch.empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.bool, device=device)
    if mask.numel() == 0:
        return mask
    block_m, block_n = _DROPOUT_MASK_BLOCK
    launch(_dropout_mask_kernel)[(cdiv(seqlen_q, block_m), nheads, batch)](
        mask, seed, nheads, seqlen_q, seqlen_k, dropout_threshold(dropout_p),
        mask.stride(0), mask.stride(1), mask.stride(2), BLOCK_M=block_m, BLOCK_N=block_n)
    return mask
