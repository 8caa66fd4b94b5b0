"""torch.library registration of the attention op: ``tritonzoo::attention_fwd`` / ``_bwd``.

Both are ``triton_op``s: torch.compile traces into them (the Triton kernels through
wrap_triton) without graph breaks, and the forward carries its backward through
``register_autograd``. Each op body picks the Triton kernels or the PyTorch reference
(kernels.runtime.use_triton); the two compute the same function.

These are the internal, fully general entry points. Inputs arrive validated and
normalised by flash_attn_interface.py / sdpa.py:
  - q (B, Sq, H, D), k/v (B, Sk, Hk, D) with stride(-1) == 1; or packed (total, H, D)
    with int32 cu_seqlens_q/k (B + 1,) and max_seqlen_q/k;
  - bias: None, or a bool keep-mask / float additive bias broadcast to (B, H, Sq, Sk)
    (padded layout only; no gradient flows to it);
  - alibi_slopes: None, (H,) or (B, H) float32; seed: None or int64 (1,), the dropout key;
  - window_left/right: -1 for unbounded; causal is window_right = 0;
  - bottom_right: align the causal/window diagonal to the end of the keys
    (FlashAttention-2) or to their start (torch SDPA's is_causal).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import attention_reference, flash_attention
from .runtime import eager_op, on_device, run_backward, use_triton


@on_device
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int,
    bias: Optional[Tensor], alibi_slopes: Optional[Tensor], seed: Optional[Tensor],
    dropout_p: float, softmax_scale: float, softcap: float,
    window_left: int, window_right: int, bottom_right: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out like q, lse float32: (B, H, Sq), or (H, total_q) when packed; float64 with
    a float bias, whose rows of one huge value need it)."""
    impl = flash_attention if use_triton(q) else attention_reference
    return impl.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes,
                        seed, dropout_p, softmax_scale, softcap, window_left, window_right, bottom_right)


@on_device
def _attention_bwd(
    dout: Tensor, dlse: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int,
    bias: Optional[Tensor], alibi_slopes: Optional[Tensor], seed: Optional[Tensor],
    dropout_p: float, softmax_scale: float, softcap: float,
    window_left: int, window_right: int, bottom_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv). dlse, when given, is the gradient flowing into lse."""
    impl = flash_attention if use_triton(q) else attention_reference
    return impl.backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         bias, alibi_slopes, seed, dropout_p, softmax_scale, softcap, window_left, window_right,
                         bottom_right)


attention_fwd = torch.library.triton_op("tritonzoo::attention_fwd", _attention_fwd, mutates_args=())
attention_bwd = torch.library.triton_op("tritonzoo::attention_bwd", _attention_bwd, mutates_args=())


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, bias, alibi, seed, dropout_p, scale, softcap, wl, wr, br) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, bias, alibi, seed)
    ctx.params = (max_q, max_k, dropout_p, scale, softcap, wl, wr, br)
    # The backward takes the forward's path, wherever and on whichever thread it runs.
    ctx.reference = not use_triton(q)
    # An output that received no gradient (lse, usually) arrives as None, not zeros: the
    # PyTorch path then skips the log-sum-exp's term (and can use torch's fused backward).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, bias, alibi, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, softcap, wl, wr, br = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = run_backward(ctx, attention_bwd, _attention_bwd, dout, dlse, q, k, v, out, lse, cu_q, cu_k,
                              max_q, max_k, bias, alibi, seed, dropout_p, scale, softcap, wl, wr, br)
    return (dq, dk, dv) + (None,) * 13


#: How callers run the forward: the op, or its body directly (kernels.runtime.eager_op).
call_attention_fwd = eager_op(attention_fwd, _attention_fwd, _setup_context, _backward)
