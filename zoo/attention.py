"""Multi-head attention of the backbone, with three interchangeable backends.

"triton": this project's kernels (kernels.attention; on CPU their PyTorch path).
"sdpa": torch's scaled_dot_product_attention (its own function, even under patch_sdpa).
"eager": softmax(Q K^T * scale) V written out, float32 scores; the ablation baseline,
and the one path that can hand back the attention probabilities.

All three implement one semantics, in FlashAttention-2's (B, S, H, D) layout: causal
masks aligned bottom-right (a query block at the end of the keys, as in cached
decoding), key-padding masks (B, Sk) with True = attend, ALiBi as -slope * |i + Sk - Sq - j|,
rows with no key to attend to give 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.sdpa import torch_sdpa

from .config import TransformerConfig
from .layers import RMSNorm, apply_rotary


def _allowed(Sq: int, Sk: int, causal: bool, key_padding_mask: Optional[Tensor], device) -> Optional[Tensor]:
    """Bool (B|1, 1, Sq|1, Sk): which keys each query may attend to, or None for all."""
    allowed = None
    if causal:
        i = torch.arange(Sq, device=device).view(-1, 1)
        j = torch.arange(Sk, device=device).view(1, -1)
        allowed = (j <= i + (Sk - Sq))[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def _alibi_bias(slopes: Tensor, Sq: int, Sk: int) -> Tensor:
    i = torch.arange(Sq, device=slopes.device).view(-1, 1)
    j = torch.arange(Sk, device=slopes.device).view(1, -1)
    return -slopes.float().view(1, -1, 1, 1) * (i + (Sk - Sq) - j).abs().float()


def attend(q: Tensor, k: Tensor, v: Tensor, *, backend: str, causal: bool = False,
           key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
           alibi_slopes: Optional[Tensor] = None, return_probs: bool = False):
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, Hk, D); returns (B, Sq, H, D).

    With return_probs (eager backend only) returns (out, probs (B, H, Sq, Sk)).
    """
    if backend == "triton" and not return_probs:
        return kernels.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                 alibi_slopes=alibi_slopes)
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    allowed = _allowed(Sq, Sk, causal, key_padding_mask, q.device)
    bias = _alibi_bias(alibi_slopes, Sq, Sk) if alibi_slopes is not None else None
    if backend == "sdpa" and not return_probs:
        mask = allowed
        if bias is not None:
            mask = bias.to(q.dtype) if allowed is None else bias.masked_fill(~allowed, -math.inf).to(q.dtype)
        out = torch_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                         dropout_p=dropout_p, enable_gqa=Hk != H)
        return out.transpose(1, 2)
    # eager
    scale = D ** -0.5
    qh = q.transpose(1, 2).float()
    kh = k.transpose(1, 2).float().repeat_interleave(H // Hk, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: 0, not NaN
    dropped = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    out = (dropped.to(v.dtype) @ vh).transpose(1, 2)
    return (out, probs) if return_probs else out


class LayerCache:
    """Keys and values one attention layer has seen, for incremental decoding.

    Self-attention keys grow by appending (the buffer doubles when full, so appends are
    amortized O(1)); cross-attention keys are computed from the memory once.
    """

    def __init__(self):
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.length = 0
        self.cross_k: Optional[Tensor] = None
        self.cross_v: Optional[Tensor] = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds (B, S, Hk, D) keys and values; returns all of them so far."""
        needed = self.length + k.shape[1]
        if self.k is None or needed > self.k.shape[1]:
            capacity = max(needed, 2 * (self.k.shape[1] if self.k is not None else 0), 16)
            new_k = k.new_empty((k.shape[0], capacity, *k.shape[2:]))
            new_v = v.new_empty((v.shape[0], capacity, *v.shape[2:]))
            if self.length:
                new_k[:, : self.length] = self.k[:, : self.length]
                new_v[:, : self.length] = self.v[:, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, self.length:needed] = k
        self.v[:, self.length:needed] = v
        self.length = needed
        return self.k[:, :needed], self.v[:, :needed]

    def reorder(self, index: Tensor) -> None:
        """Keeps batch rows `index` (beam search)."""
        for name in ("k", "v", "cross_k", "cross_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


class Attention(nn.Module):
    """Multi-head (grouped-query) self- or cross-attention with an output projection."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False):
        super().__init__()
        self.cfg, self.cross = cfg, cross
        self.backend = cfg.attn_backend
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.head_size
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(cfg.dim, q_width, bias=cfg.qkv_bias)
            self.kv = nn.Linear(cfg.dim, 2 * kv_width, bias=cfg.qkv_bias)
        else:
            self.qkv = nn.Linear(cfg.dim, q_width + 2 * kv_width, bias=cfg.qkv_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, kernel_ops=cfg.kernel_ops)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, kernel_ops=cfg.kernel_ops)
        self.proj = nn.Linear(q_width, cfg.dim, bias=cfg.proj_bias)
        self.drop = nn.Dropout(cfg.dropout)
        #: When True (set by zoo.attention_maps), the next forward keeps its probabilities
        #: in .last_probs, computed by the eager path.
        self.keep_probs = False
        self.last_probs: Optional[Tensor] = None

    def _project(self, x: Tensor, memory: Optional[Tensor], cache: Optional[LayerCache]):
        B, S, _ = x.shape
        D = self.head_dim
        if not self.cross:
            q, k, v = self.qkv(x).split([self.heads * D, self.kv_heads * D, self.kv_heads * D], dim=-1)
            return q.view(B, S, self.heads, D), k.view(B, S, self.kv_heads, D), v.view(B, S, self.kv_heads, D)
        q = self.q(x).view(B, S, self.heads, D)
        if cache is not None and cache.cross_k is not None:
            return q, cache.cross_k, cache.cross_v
        if memory is None:
            raise ValueError("cross-attention needs a memory sequence (memory=...)")
        k, v = self.kv(memory).view(memory.shape[0], memory.shape[1], 2, self.kv_heads, D).unbind(2)
        if cache is not None:
            cache.cross_k, cache.cross_v = k, v
        return q, k, v

    def forward(self, x: Tensor, *, memory: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                rope: Optional[tuple] = None, alibi_slopes: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None) -> Tensor:
        """x (B, S, dim) -> (B, S, dim). key_padding_mask (B, Sk) covers the keys: for
        self-attention with a cache, all keys so far; for cross-attention, the memory.
        rope: the rotary angles of the input tokens (Rotary.rope), applied to q and k."""
        B, S, _ = x.shape
        q, k, v = self._project(x, memory, cache)
        if self.q_norm is not None:
            # Cached cross-attention keys are stored raw, so this normalizes them every step.
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None and not self.cross:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None and not self.cross:
            k, v = cache.append(k, v)
        dropout_p = self.cfg.attn_dropout if self.training else 0.0
        causal = self.cfg.causal and not self.cross
        backend = "eager" if self.keep_probs else self.backend
        out = attend(q, k, v, backend=backend, causal=causal, key_padding_mask=key_padding_mask,
                     dropout_p=dropout_p, alibi_slopes=None if self.cross else alibi_slopes,
                     return_probs=self.keep_probs)
        if self.keep_probs:
            out, self.last_probs = out
        return self.drop(self.proj(out.reshape(B, S, self.heads * self.head_dim)))
