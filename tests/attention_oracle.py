"""Float64 attention written out in full: the oracle the kernels are checked against.

Independent of kernels/: the whole S x S score matrix, FlashAttention-2's documented
semantics spelled out directly.
"""

from __future__ import annotations

import math

import torch


def attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None,
              bias=None, keep=None, dropout_p=0.0, bottom_right=True, dtype=torch.float64):
    """Attention of padded q (B, Sq, H, D), k/v (B, Sk, Hk, D), computed in `dtype`.

    causal/window: query i sees key j iff i + off - left <= j <= i + off + right, with
    off = Sk - Sq (bottom_right) or 0; causal means right = 0. softcap, then ALiBi
    (-slope * |i + off - j|), then bias (bool keep-mask or additive, broadcast to
    (B, H, Sq, Sk)); keep: dropout keep-mask (B, H, Sq, Sk). Rows with no key give 0.
    Returns out (B, Sq, H, D) and lse (B, H, Sq) (+inf for rows with no key).
    """
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq, device=q.device).view(-1, 1)
    j = torch.arange(Sk, device=q.device).view(1, -1)
    off = Sk - Sq if bottom_right else 0
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).reshape(-1, H, 1, 1)
        s = s - slopes * (i + off - j).abs().to(dtype)
    if bias is not None:
        bias = bias.expand(B, H, Sq, Sk)
        s = s.masked_fill(~bias, -math.inf) if bias.dtype == torch.bool else s + bias.to(dtype)
    left, right = window
    if causal:
        right = 0
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= j >= i + off - left
    if right >= 0:
        allowed &= j <= i + off + right
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    lse = lse.masked_fill(lse == -math.inf, math.inf)
    if keep is not None:
        p = p * keep.to(dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs):
    """The oracle per sequence of packed q (total_q, H, D), k/v (total_k, Hk, D)."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]]
        vs = v[ck[b]:ck[b + 1]]
        o, lse = attention(qs[None], ks[None], vs[None], **kwargs)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def assert_fa2_close(ours, oracle, same_dtype_math, name, atol=None):
    """FlashAttention-2's test rule: our error against the float64 oracle is at most twice
    the error of plain torch math in the inputs' dtype, plus a small absolute floor."""
    if atol is None:
        atol = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}[ours.dtype]
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - oracle.double()).abs().max().item()
    err_pt = (same_dtype_math.double() - oracle.double()).abs().max().item()
    assert err <= 2 * err_pt + atol, f"{name}: error {err:.3g} > 2 x torch's {err_pt:.3g} + {atol:g}"
