"""torch's ``scaled_dot_product_attention`` on the Triton kernels, and a patch for it.

``scaled_dot_product_attention`` takes torch's signature and (batch, heads, seq, dim)
layout. It runs the Triton kernel where it can: no mask, ``is_causal`` (top-left
aligned, as torch's), and any boolean or additive ``attn_mask`` that broadcasts to
(B, H, Sq, Sk) (key-padding masks included), GQA with ``enable_gqa``, dropout.
Everything else goes to torch's own function unchanged, so results are those of torch:
``fallback_reason`` says which calls fall back and why.

``patch_sdpa()`` routes ``torch.nn.functional.scaled_dot_product_attention`` through
it, so unmodified timm and Hugging Face models run on the kernels.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .flash_attn_interface import MAX_HEAD_DIM, SUPPORTED_DTYPES, run_attention
from .runtime import autocast_dtype, torch_sdpa, use_triton  # noqa: F401 (torch_sdpa: imported by zoo)

SERVED = "served by the Triton kernel"

_lock = threading.Lock()
_stats: collections.Counter = collections.Counter()
_recorders: list[collections.Counter] = []  # open record_routing() scopes


def fallback_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False) -> Optional[str]:
    """None if the Triton kernel serves this call, else why torch's function does."""
    tensors = (query, key, value)
    if not all(isinstance(t, Tensor) for t in tensors):
        return "query, key and value are not all tensors"
    if any(t.is_nested for t in tensors):
        return "nested tensors"
    # vmap / grad wrap their inputs: torch's function has batching and functorch rules, the op none.
    if not torch.compiler.is_compiling() and any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return "torch.func transform (vmap, grad) of the inputs"
    if not isinstance(is_causal, bool):
        return f"is_causal {is_causal!r} is not a bool"
    if any(t.dim() != 4 for t in tensors):
        return "inputs are not 4-D (batch, heads, seq, dim)"
    if not use_triton(query):
        return f"{query.device.type} tensors (torch's own kernel serves them)"
    if key.device != query.device or value.device != query.device:
        return "inputs on different devices"
    # Under autocast torch's function (and the op) first casts floating inputs and masks to its dtype.
    cast = autocast_dtype(query.device.type)
    dtypes = [cast if cast is not None and t.is_floating_point() else t.dtype for t in tensors]
    if len(set(dtypes)) > 1:
        return f"query, key and value dtypes differ: {dtypes[0]}/{dtypes[1]}/{dtypes[2]}"
    if dtypes[0] not in SUPPORTED_DTYPES:
        return f"dtype {dtypes[0]} (needs float16, bfloat16 or float32)"
    B, H, Sq, E = query.shape
    if key.shape[0] != B or value.shape[0] != B or key.shape[:3] != value.shape[:3]:
        return "batch or key/value shapes differ"
    if value.shape[-1] != E or key.shape[-1] != E:
        return "value or key head dim differs from the query's"
    if E > MAX_HEAD_DIM:
        return f"head dim {E} > {MAX_HEAD_DIM}"
    Hk, Sk = key.shape[1], key.shape[2]
    if Hk != H and (not enable_gqa or Hk == 0 or H % Hk != 0):
        return "query and key head counts differ without a valid enable_gqa"
    if 0 in (B, H, Sq, Sk, E):
        return "empty input"
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return f"dropout_p {dropout_p!r} outside [0, 1)"
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.is_nested:
            return "attn_mask is not a dense tensor"
        if attn_mask.dim() < 2:
            return f"attn_mask of {attn_mask.dim()} dims (torch needs at least 2)"
        if is_causal:
            return "attn_mask together with is_causal"
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "attn_mask requires grad"
        mask_dtype = cast if cast is not None and attn_mask.is_floating_point() else attn_mask.dtype
        if mask_dtype != torch.bool and mask_dtype != dtypes[0]:
            return f"attn_mask dtype {attn_mask.dtype} (needs bool or the query's dtype)"
        if attn_mask.device != query.device:
            return "attn_mask on another device"
        try:
            if torch.broadcast_shapes(attn_mask.shape, (B, H, Sq, Sk)) != (B, H, Sq, Sk):
                return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, Sq, Sk)}"
        except RuntimeError:
            return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, Sq, Sk)}"
    return None


def _heads(t) -> Optional[int]:
    """The head count of a dense (batch, heads, seq, dim) tensor, else None."""
    return t.shape[1] if isinstance(t, Tensor) and not t.is_nested and t.dim() == 4 else None


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, served by the Triton kernel where it can.

    query (B, H, Sq, E), key/value (B, Hk, Sk, E); returns (B, H, Sq, E) (a transposed
    view of a (B, Sq, H, E) buffer, as torch's flash backend returns). Unsupported
    calls run torch's function; see ``fallback_reason``. Dropout draws from this
    project's RNG, not torch's: same distribution, different samples.
    """
    reason = fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not torch.compiler.is_compiling():
        outcome = SERVED if reason is None else reason
        with _lock:
            _stats[outcome] += 1
            for counter in _recorders:
                counter[outcome] += 1
    if reason is not None:
        # torch's CPU kernels divide by the head count: a process-killing SIGFPE with no heads
        # (torch 2.11). No query heads has an empty result, which torch's math path returns.
        heads_q, heads_k = _heads(query), _heads(key)
        if heads_q and heads_k == 0:
            raise ValueError(f"key has 0 heads but query has {heads_q}; expected key and value heads dividing "
                             f"the query's (with enable_gqa) or equal to them")
        if heads_q == 0:
            return torch.ops.aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa)[0]
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    B, H, Sq, E = query.shape
    Sk = key.shape[2]
    bias = attn_mask.expand(B, H, Sq, Sk) if attn_mask is not None else None
    out, _, _ = run_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          max_seqlen_q=Sq, max_seqlen_k=Sk, softmax_scale=scale if scale is not None else E ** -0.5,
                          bias=bias, dropout_p=dropout_p, window_right=0 if is_causal else -1, bottom_right=False)
    return out.transpose(1, 2)


def sdpa_stats(reset: bool = False) -> dict[str, int]:
    """How many calls the kernel served and how many fell back, by reason, since the last reset."""
    with _lock:
        counts = dict(_stats)
        if reset:
            _stats.clear()
    return counts


@contextlib.contextmanager
def record_routing():
    """Counts, by outcome, the calls of this module's scaled_dot_product_attention made inside
    the block: yields a Counter whose keys are SERVED or a fallback reason."""
    counter: collections.Counter = collections.Counter()
    with _lock:
        _recorders.append(counter)
    try:
        yield counter
    finally:
        with _lock:  # by identity: two open scopes may hold equal counts
            _recorders[:] = [c for c in _recorders if c is not counter]


def routing_report(counter: collections.Counter) -> dict:
    """{"served": n, "fell_back": m, "fallback_reasons": {reason: count}} of a record_routing counter."""
    reasons = {k: v for k, v in counter.items() if k != SERVED}
    return {"served": counter.get(SERVED, 0), "fell_back": sum(reasons.values()), "fallback_reasons": reasons}


# Who holds the patch: the explicit enable_sdpa_patch() and the open patch_sdpa() blocks.
# The function in place before the first holder is put back when the last one lets go,
# in whatever order they end (a Lightning callback's stage and a module's forward hooks
# can close out of order).
_patch_state = {"explicit": False, "blocks": 0, "previous": None}  # previous: None while not held


def _hold() -> None:
    with _lock:
        if _patch_state["previous"] is None:
            current = F.scaled_dot_product_attention
            _patch_state["previous"] = torch_sdpa if current is scaled_dot_product_attention else current
            F.scaled_dot_product_attention = scaled_dot_product_attention


def _release() -> None:
    with _lock:
        if _patch_state["explicit"] or _patch_state["blocks"] > 0 or _patch_state["previous"] is None:
            return
        previous, _patch_state["previous"] = _patch_state["previous"], None
        # A function patched in on top of ours since stays: it may wrap ours, and is its owner's to undo.
        if F.scaled_dot_product_attention is scaled_dot_product_attention:
            F.scaled_dot_product_attention = previous


def enable_sdpa_patch() -> None:
    """Route torch.nn.functional.scaled_dot_product_attention through the kernels until
    disable_sdpa_patch(). Idempotent: one disable undoes any number of enables."""
    _patch_state["explicit"] = True
    _hold()


def disable_sdpa_patch() -> None:
    """Undo enable_sdpa_patch(). The function in place before the patch (torch's, or another
    library's patch) comes back once no patch_sdpa() block is open either."""
    _patch_state["explicit"] = False
    _release()


def sdpa_patched() -> bool:
    return F.scaled_dot_product_attention is scaled_dot_product_attention


@contextlib.contextmanager
def patch_sdpa():
    """Within this block, torch.nn.functional.scaled_dot_product_attention runs on the kernels.

    Blocks nest and may end in any order: the function in place before the first of them
    (torch's, or another library's patch) comes back when the last one ends and no
    enable_sdpa_patch() holds the patch.
    """
    with _lock:
        _patch_state["blocks"] += 1
    _hold()
    try:
        yield
    finally:
        with _lock:
            _patch_state["blocks"] -= 1
        _release()
