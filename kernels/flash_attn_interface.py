"""FlashAttention-2's Python API on the Triton kernels.

Same function names, argument names, layouts and semantics as
``flash_attn.flash_attn_interface``, so ``from kernels import flash_attn_func`` replaces
``from flash_attn import flash_attn_func``. Beyond FlashAttention-2: fp32 inputs are
accepted (computed in fp32), any head dim from 1 to 256 runs without padding, CPU
tensors take a PyTorch path of the same semantics, and the backward is always
deterministic (``deterministic`` is accepted and has nothing left to do).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import attention_op, attention_reference, flash_attention
from .runtime import as_bool, as_float, as_int, autocast_dtype, scalar_value, torch_native, unit_stride, use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------
# Validation: errors name the argument and what was expected.
# --------------------------------------------------------------------------------------


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, packed: bool) -> None:
    """Checks ranks, dtypes, devices and matching shapes of q, k, v (FA2 layout)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(x, name)
    rank, layout = (3, "(total_tokens, nheads, headdim)") if packed else (4, "(batch, seqlen, nheads, headdim)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(x.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected one of float16, bfloat16, float32")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; q, k and v must share a device")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {q.shape[0]}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k and v have head dim {k.shape[-1]} but q has {head_dim}; they must match")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is not supported; expected 1 to {MAX_HEAD_DIM}")
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads == 0 or nheads_k == 0:
        raise ValueError(f"q and k must have at least one head each, got nheads = {nheads} and nheads_k = {nheads_k}")
    if nheads % nheads_k != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_k ({nheads_k}) for grouped-query attention")


def check_options(dropout_p, softmax_scale, window_size, softcap, alibi_slopes, batch, nheads, device):
    """Checks the scalar options and alibi_slopes. Returns (dropout_p, softmax_scale,
    window_size, softcap) as Python floats and ints (softmax_scale None stays None)."""
    dropout_p = scalar_value(dropout_p)
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:  # False: no dropout
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None:
        softmax_scale = as_float(softmax_scale, "softmax_scale", "a finite number or None")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    window_size = tuple(as_int(w, f"window_size {side}", "an int, -1 (unbounded) or >= 0")
                        for side, w in zip(("left", "right"), window_size))
    for side, w in zip(("left", "right"), window_size):
        if w < -1:
            raise ValueError(f"window_size {side} must be -1 (unbounded) or >= 0, got {w}")
    softcap = as_float(softcap, "softcap", "a finite number >= 0 (0 disables it)")
    if softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap!r}")
    if alibi_slopes is not None:
        _check_tensor(alibi_slopes, "alibi_slopes")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
        if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
            raise ValueError(f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                             f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}")
    return float(dropout_p), softmax_scale, window_size, softcap


def check_cu_seqlens(cu: Tensor, name: str, total: int, max_seqlen: int, max_name: str, device) -> int:
    """Checks a cumulative-lengths tensor; its values are read (one host sync) outside compile.
    Returns max_seqlen as a Python int."""
    _check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    max_seqlen = as_int(max_seqlen, max_name, "an int >= 0")
    if max_seqlen < 0:
        raise ValueError(f"{max_name} must be an int >= 0, got {max_seqlen!r}")
    if torch.compiler.is_compiling() or cu.device.type == "meta":  # no values to read
        return max_seqlen
    lengths = cu[1:] - cu[:-1]
    first, last, min_len, max_len = torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
    if first < 0 or min_len < 0:
        raise ValueError(f"{name} must start at >= 0 and never decrease, got {cu.tolist()}")
    if last > total:
        raise ValueError(f"{name}[-1] = {last} exceeds the {total} packed tokens")
    if max_len > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is less than the longest sequence in {name} ({max_len})")
    return max_seqlen


def _window(causal: bool, window_size, max_seqlen_k: int) -> tuple[int, int]:
    """FlashAttention-2's rules: causal sets right = 0; a side >= seqlen_k is unbounded."""
    left, right = window_size
    if causal:
        right = 0
    if left >= max_seqlen_k:
        left = -1
    if right >= max_seqlen_k:
        right = -1
    return left, right


# --------------------------------------------------------------------------------------
# The shared entry point
# --------------------------------------------------------------------------------------


def run_attention(q, k, v, *, max_seqlen_q, max_seqlen_k, softmax_scale, cu_seqlens_q=None, cu_seqlens_k=None,
              bias=None, alibi_slopes=None, dropout_p=0.0, softcap=0.0, window_left=-1, window_right=-1,
              bottom_right=True, need_lse=True, key_padding_mask=None):
    """Runs the attention op on validated inputs; returns (out, lse, seed).

    Under autocast, floating inputs are cast to the autocast dtype first, as torch's
    SDPA is. seed is the dropout key tensor (None without dropout). need_lse=False (the
    caller drops lse) lets float32 attention on the PyTorch path run torch's own attention
    under torch's autograd where it computes the same function (runtime.torch_native, _native);
    lse and seed are then None. key_padding_mask (B, Sk) bool: the mask bias was expanded from.
    """
    dtype = autocast_dtype(q.device.type)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if bias is not None and bias.is_floating_point():
            bias = bias.to(dtype)
    # Unit stride in the head dim first: torch's CPU flash kernel, like ours, reads it without a stride.
    q, k, v = map(unit_stride, (q, k, v))
    if not need_lse and cu_seqlens_q is None and q.dtype == torch.float32 and torch_native(q):
        causal = _native(q, k, bias, key_padding_mask, alibi_slopes, softmax_scale, softcap, window_left,
                         window_right, bottom_right)
        if causal is not None:
            out = attention_reference.native_forward(q, k, v, softmax_scale, causal, key_padding_mask, dropout_p)
            return out, None, None
    seed = None
    if dropout_p > 0:
        # Drawn from torch's generator for the device: reproducible under torch.manual_seed.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)
    out, lse = attention_op.call_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, seed,
        float(dropout_p), float(softmax_scale), float(softcap), window_left, window_right, bottom_right)
    return out, lse, seed


def _native(q, k, bias, key_padding_mask, alibi_slopes, softmax_scale, softcap, window_left, window_right,
            bottom_right):
    """is_causal for attention_reference.native_forward when torch's attention computes this call, else None.

    The PyTorch path's test of plain attention (no ALiBi, softcap or window; a diagonal torch
    can draw; see attention_reference.plain_causal), plus a key-padding mask under which every
    query has a key (torch's softmax of a row without one is NaN, the op's output 0): with
    causal, every sequence's first key. Dropout is torch's then: the same distribution, not
    the kernels' Philox samples (which the op's path draws, to drop what the kernels drop).
    """
    if bias is not None and key_padding_mask is None:
        return None
    causal = attention_reference.plain_causal(q, k, None, alibi_slopes, 0.0, softmax_scale, softcap, window_left,
                                              window_right, bottom_right)
    if causal is None or key_padding_mask is None:
        return causal
    has_key = key_padding_mask[:, 0].all() if causal else key_padding_mask.any(-1).all()
    return causal if bool(has_key) else None


def attention_probs(q, k, *, max_seqlen_q, max_seqlen_k, softmax_scale, cu_seqlens_q=None, cu_seqlens_k=None,
                    bias=None, alibi_slopes=None, seed=None, dropout_p=0.0, softcap=0.0, window_left=-1,
                    window_right=-1, bottom_right=True) -> Tensor:
    """The attention probabilities (B, H, max_seqlen_q, max_seqlen_k), float32.

    Materializes the S x S matrix: for inspection and tests. With dropout, dropped
    entries are negated (FlashAttention-2's S_dmask encoding).
    """
    with torch.no_grad():
        if cu_seqlens_q is not None:
            pq = attention_reference.Packing(cu_seqlens_q, max_seqlen_q, q.shape[0])
            pk = attention_reference.Packing(cu_seqlens_k, max_seqlen_k, k.shape[0])
            q, k, lens_q, lens_k = pq.pad(q), pk.pad(k), pq.lengths, pk.lengths
        else:
            lens_q = lens_k = None
        probs = attention_reference.probabilities(q, k, lens_q, lens_k, bias, alibi_slopes, softmax_scale, softcap,
                                                  window_left, window_right, bottom_right)
        if dropout_p > 0:
            B, H = probs.shape[:2]
            impl = flash_attention if use_triton(q) else attention_reference
            keep = impl.dropout_mask(seed, B, H, probs.shape[2], probs.shape[3], dropout_p, q.device)
            probs = torch.where(keep, probs, -probs)
    return probs


# --------------------------------------------------------------------------------------
# FlashAttention-2's functions
# --------------------------------------------------------------------------------------


def _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
         window_size, softcap, alibi_slopes, return_attn_probs):
    packed = cu_seqlens_q is not None
    check_qkv(q, k, v, packed)
    causal, return_attn_probs = as_bool(causal, "causal"), as_bool(return_attn_probs, "return_attn_probs")
    if packed:
        max_seqlen_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q",
                                        q.device)
        max_seqlen_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k",
                                        q.device)
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    batch = cu_seqlens_q.numel() - 1 if packed else q.shape[0]
    dropout_p, softmax_scale, window_size, softcap = check_options(
        dropout_p, softmax_scale, window_size, softcap, alibi_slopes, batch, q.shape[-2], q.device)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    left, right = _window(causal, window_size, max_seqlen_k)
    out, lse, seed = run_attention(q, k, v, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                               softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               alibi_slopes=alibi_slopes, dropout_p=dropout_p, softcap=softcap,
                               window_left=left, window_right=right, bottom_right=True,
                               need_lse=return_attn_probs)
    if not return_attn_probs:
        return out
    probs = attention_probs(q, k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                            softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                            alibi_slopes=alibi_slopes, seed=seed, dropout_p=dropout_p, softcap=softcap,
                            window_left=left, window_right=right, bottom_right=True)
    return out, lse, probs


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Attention over padded batches, FlashAttention-2's ``flash_attn_func``.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim),
    nheads a multiple of nheads_k (GQA/MQA). causal aligns the mask bottom-right:
    query i sees keys j <= i + seqlen_k - seqlen_q. window_size (left, right) limits
    query i to keys in [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]
    (-1: unbounded). softcap > 0 applies softcap * tanh(score / softcap). alibi_slopes
    (nheads,) or (batch, nheads) fp32 adds -slope * |i + seqlen_k - seqlen_q - j|.
    A query with no key to attend to gets zeros (and zero gradients).

    Returns out (batch, seqlen_q, nheads, headdim); with return_attn_probs also
    softmax_lse (batch, nheads, seqlen_q) fp32 (natural log; +inf for rows with no key)
    and the probabilities (batch, nheads, seqlen_q, seqlen_k), dropped entries negated.
    Raises TypeError/ValueError naming the argument for bad input.
    """
    del deterministic  # the backward has no atomics: always deterministic
    _check_tensor(q, "q")
    _check_tensor(k, "k")
    return _run(q, k, v, None, None, q.shape[1] if q.dim() == 4 else 0, k.shape[1] if k.dim() == 4 else 0,
                dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def attention(q, k, v, *, causal=False, key_padding_mask=None, dropout_p=0.0, softmax_scale=None,
              window_size=(-1, -1), softcap=0.0, alibi_slopes=None, return_lse=False):
    """flash_attn_func with a key-padding mask: the entry point for models with padded batches.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim);
    key_padding_mask: None or (batch, seqlen_k) bool, True where the key may be attended
    (left or right padding alike). The mask is read per key block, never expanded to
    S x S. Other options as flash_attn_func (causal aligned bottom-right). Returns out,
    or (out, lse) with return_lse. Raises TypeError/ValueError naming the bad argument.
    """
    check_qkv(q, k, v, packed=False)
    causal, return_lse = as_bool(causal, "causal"), as_bool(return_lse, "return_lse")
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    dropout_p, softmax_scale, window_size, softcap = check_options(
        dropout_p, softmax_scale, window_size, softcap, alibi_slopes, B, H, q.device)
    bias = None
    if key_padding_mask is not None:
        _check_tensor(key_padding_mask, "key_padding_mask")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(f"key_padding_mask must have shape (batch, seqlen_k) = ({B}, {Sk}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        bias = key_padding_mask[:, None, None, :].expand(B, H, Sq, Sk)
    left, right = _window(causal, window_size, Sk)
    out, lse, _ = run_attention(q, k, v, max_seqlen_q=Sq, max_seqlen_k=Sk,
                                softmax_scale=D ** -0.5 if softmax_scale is None else softmax_scale,
                                bias=bias, alibi_slopes=alibi_slopes, dropout_p=dropout_p, softcap=softcap,
                                window_left=left, window_right=right, bottom_right=True, need_lse=return_lse,
                                key_padding_mask=key_padding_mask)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over packed variable-length batches, FlashAttention-2's ``flash_attn_varlen_func``.

    q: (total_q, nheads, headdim), k, v: (total_k, nheads_k, headdim); sequence b holds
    rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32, (batch + 1,)); max_seqlen_q/k bound
    the lengths. Options as flash_attn_func; the masks apply within each sequence.
    Returns out (total_q, nheads, headdim); with return_attn_probs also softmax_lse
    (nheads, total_q) and the probabilities (batch, nheads, max_seqlen_q, max_seqlen_k).
    """
    del deterministic
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not supported by flash_attn_varlen_func yet")
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, headdim)."""
    _check_tensor(qkv, "qkv")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func on q and kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    _check_tensor(kv, "kv")
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func on qkv (total, 3, nheads, headdim)."""
    _check_tensor(qkv, "qkv")
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total_tokens, 3, nheads, headdim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func on q and kv (total_k, 2, nheads_k, headdim)."""
    _check_tensor(kv, "kv")
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must have shape (total_tokens, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
