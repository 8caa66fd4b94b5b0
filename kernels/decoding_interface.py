"""`flash_attn_with_kvcache`: FlashAttention-2's decoding function, with input validation.

The op itself (Triton flash-decoding kernels, torch.library registration, the split
heuristic) is kernels/decoding.py; its PyTorch path is kernels/decoding_reference.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import decoding, decoding_reference
from .decoding import _capacity
from .flash_attn_interface import MAX_HEAD_DIM, SUPPORTED_DTYPES, _check_tensor, _window, check_options
from .runtime import as_bool, as_int, torch_native, unit_stride


# --------------------------------------------------------------------------------------
# FlashAttention-2's function, with validation
# --------------------------------------------------------------------------------------


def _check_index(x, name: str, shape: tuple, device) -> None:
    _check_tensor(x, name)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")


def _check_values(q, k_cache, seqlens, snew, cache_batch_idx, cache_leftpad, block_table, rotary_cos, capacity,
                  per_token, rotary_from_leftpad) -> None:
    """Range checks that read index values: only where that costs no device sync."""
    if torch.compiler.is_compiling() or seqlens.device.type != "cpu":
        return  # on CUDA the values are trusted, as FlashAttention-2 does: a check would sync every step
    # As Python ints: one read per tensor, then no small tensor ops (they cost more than a decoding step).
    ends = seqlens.tolist()
    if ends and (min(ends) < 0 or max(ends) + snew > capacity):
        raise ValueError(f"cache_seqlens must be in [0, {capacity - snew}] (the cache holds {capacity} keys and "
                         f"{snew} are appended), got {ends}")
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * len(ends)
    if any(start < 0 or start > end for start, end in zip(starts, ends)):
        raise ValueError(f"cache_leftpad must be in [0, cache_seqlens], got {starts} with cache_seqlens {ends}")
    if cache_batch_idx is not None:
        idx = cache_batch_idx.tolist()
        if idx and (min(idx) < 0 or max(idx) >= k_cache.shape[0]):
            raise ValueError(f"cache_batch_idx must index the {k_cache.shape[0]} cache rows, got {idx}")
    if block_table is not None:
        page = k_cache.shape[1]
        used = torch.arange(block_table.shape[1]).view(1, -1) * page < (seqlens.long() + snew).view(-1, 1)
        blocks = block_table.long()[used]
        if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_table entries in use must index the {k_cache.shape[0]} cache blocks, "
                             f"got values in [{int(blocks.min())}, {int(blocks.max())}]")
    if rotary_cos is not None and ends:
        first = max(end - start if rotary_from_leftpad else end for start, end in zip(starts, ends))
        last = first + max(snew, q.shape[1] if per_token else 1) - 1
        if last >= rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions but position "
                             f"{last} is needed")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            rotary_from_leftpad=False):
    """Attention of new queries over a KV cache, appending new keys/values to it in place (FA2's API).

    q: (batch, seqlen_q, nheads, headdim). k_cache, v_cache: (batch_cache, seqlen_cache,
    nheads_k, headdim), or paged (num_blocks, page_block_size, nheads_k, headdim) with
    block_table (batch, max_blocks_per_seq) int32 (any page size). nheads_k divides nheads.
    k, v (batch, seqlen_new, nheads_k, headdim), optional: written into the cache at
    positions cache_seqlens[b] .. + seqlen_new (in place), then attended with the rest.
    cache_seqlens: int or (batch,) int32, each row's keys before the append (None: the
    whole cache); cache_batch_idx (batch,) int32: the cache row of each batch row;
    cache_leftpad (batch,) int32: the row's keys start there (left padding; the causal,
    window and ALiBi positions count from it). rotary_cos/sin (seqlen_ro, rotary_dim / 2),
    with k/v only: as FA2, the new keys turn by the angles of their slots cache_seqlens + t,
    q by those of cache_seqlens (+ i when causal or local), left padding included;
    rotary_interleaved pairs dims (2i, 2i+1), else (i, i + rotary_dim/2).
    rotary_from_leftpad (keyword only, not in FA2): rotary positions count from
    cache_leftpad instead (cache_seqlens - cache_leftpad + t), so a left-padded row turns
    as if it were not padded, as zoo's generate needs.
    causal / window_size / softcap / alibi_slopes / softmax_scale: as flash_attn_func,
    aligned bottom-right against the keys after the append. num_splits: key splits per
    (row, kv-head), 0 picks by the shape (choose_num_splits); at most 128, as FlashAttention-2
    (the result is the same for any count).

    Returns out (batch, seqlen_q, nheads, headdim), and with return_softmax_lse also
    softmax_lse (batch, nheads, seqlen_q) float32 (+inf for a row with no key). No
    backward: as FA2's, the outputs do not require grad. Raises TypeError/ValueError naming
    the argument for bad input; index values are range-checked for CPU tensors only (on CUDA
    that would sync each step).
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(x.shape)}")
    B, Sq, H, D = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected one of float16, bfloat16, float32")
    if Sq < 1:
        raise ValueError("q must hold at least one query per row (seqlen_q >= 1)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported; expected 1 to {MAX_HEAD_DIM}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}; they must match")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (it is updated in place)")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != D:
        raise ValueError(f"k_cache and v_cache must have the same shape (..., nheads_k, {D}), {D} being q's "
                         f"head dim; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hk = k_cache.shape[2]
    if H == 0 or Hk == 0:
        raise ValueError(f"q and k_cache must have at least one head each, got nheads = {H} and nheads_k = {Hk}")
    if H % Hk != 0:
        raise ValueError(f"nheads ({H}) must be a multiple of nheads_k ({Hk}) for grouped-query attention")
    if block_table is not None:
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ValueError("cache_batch_idx and cache_leftpad are not supported with a paged cache (block_table)")
        _check_tensor(block_table, "block_table")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape (batch, max_blocks_per_seq) = ({B}, n), "
                             f"got {tuple(block_table.shape)}")
        _check_index(block_table, "block_table", tuple(block_table.shape), q.device)
    elif cache_batch_idx is not None:
        _check_index(cache_batch_idx, "cache_batch_idx", (B,), q.device)
    elif k_cache.shape[0] != B:
        raise ValueError(f"k_cache has {k_cache.shape[0]} rows but q has batch {B}; "
                         f"pass cache_batch_idx to map batch rows to cache rows")
    if cache_leftpad is not None:
        _check_index(cache_leftpad, "cache_leftpad", (B,), q.device)
    capacity = _capacity(k_cache, block_table)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    snew = 0
    if k is not None:
        for name, x in (("k", k), ("v", v)):
            _check_tensor(x, name)
            if x.dtype != q.dtype or x.device != q.device:
                raise TypeError(f"{name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}")
            if x.dim() != 4 or x.shape[0] != B or x.shape[2:] != (Hk, D) or x.shape != k.shape:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, nheads_k, headdim) = "
                                 f"({B}, n, {Hk}, {D}), the same for k and v, got {tuple(x.shape)}")
        k, v = map(unit_stride, (k, v))
        snew = k.shape[1]
        if snew > capacity:
            raise ValueError(f"k and v hold {snew} new keys per row but the cache holds only {capacity}")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("appending k/v needs cache_seqlens (None means the cache is full)")
        cache_seqlens = capacity
    if not isinstance(cache_seqlens, Tensor):
        cache_seqlens = as_int(cache_seqlens, "cache_seqlens", "an int or a (batch,) int32 tensor")
        if not 0 <= cache_seqlens <= capacity - snew:
            raise ValueError(f"cache_seqlens must be in [0, {capacity - snew}] (the cache holds {capacity} keys "
                             f"and {snew} are appended), got {cache_seqlens}")
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        _check_index(cache_seqlens, "cache_seqlens", (B,), q.device)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin apply only when new k and v are passed")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_tensor(x, name)
            if x.dim() != 2 or x.shape != rotary_cos.shape or not 1 <= 2 * x.shape[1] <= D:
                raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2) with rotary_dim <= headdim "
                                 f"({D}), the same for cos and sin, got {tuple(x.shape)}")
            if not x.is_floating_point() or x.device != q.device:
                raise TypeError(f"{name} must be a floating tensor on {q.device}, got {x.dtype} on {x.device}")
    _, softmax_scale, window_size, softcap = check_options(0.0, softmax_scale, window_size, softcap, alibi_slopes,
                                                          B, H, q.device)
    num_splits = as_int(num_splits, "num_splits", "an int >= 0 (0: chosen from the shape)")
    if num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen from the shape), got {num_splits!r}")
    causal, rotary_interleaved = as_bool(causal, "causal"), as_bool(rotary_interleaved, "rotary_interleaved")
    return_softmax_lse = as_bool(return_softmax_lse, "return_softmax_lse")
    left, right = _window(causal, window_size, capacity)
    per_token = left >= 0 or right >= 0
    rotary_from_leftpad = as_bool(rotary_from_leftpad, "rotary_from_leftpad")
    _check_values(q, k_cache, cache_seqlens, snew, cache_batch_idx, cache_leftpad, block_table, rotary_cos,
                  capacity, per_token, rotary_from_leftpad)
    q = unit_stride(q)
    softmax_scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if (not return_softmax_lse and q.dtype == torch.float32 and B > 0 and torch_native(q) and block_table is None
            and cache_batch_idx is None and alibi_slopes is None and softcap == 0 and left < 0 and right <= 0
            and decoding_reference.native_serves(q, cache_seqlens, cache_leftpad, snew, right == 0)):
        with torch.no_grad():
            return decoding_reference.native_forward(
                q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_leftpad, softmax_scale,
                right == 0, bool(rotary_interleaved), per_token, rotary_from_leftpad)
    with torch.no_grad():  # as FA2's: the output carries no gradient (the op has no backward)
        out, lse = decoding.call_kvcache_attention(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, alibi_slopes, softmax_scale, float(softcap), left, right, bool(rotary_interleaved),
            per_token, rotary_from_leftpad, num_splits)
    return (out, lse) if return_softmax_lse else out
