"""Multi-head attention of the backbone, with three interchangeable backends.

"triton": this project's kernels (kernels.attention; on CPU their PyTorch path); tensors
of a dtype the kernels do not take (float64) go to torch's SDPA, as the other layers' go
to torch's ops.
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
from kernels.flash_attn_interface import SUPPORTED_DTYPES as KERNEL_DTYPES
from kernels.runtime import without_autocast
from kernels.sdpa import torch_sdpa

from .cache import LayerCache
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

    key_padding_mask: bool (B, Sk), True for the keys to attend (checked on every backend: a
    float mask would be a bias to torch's SDPA). With return_probs (eager backend only)
    returns (out, probs (B, H, Sq, Sk)).
    """
    if key_padding_mask is not None:
        shape = (q.shape[0], k.shape[1])
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != shape:
            raise ValueError(f"key_padding_mask must have shape (batch, seqlen_k) = {shape}, "
                             f"got {tuple(key_padding_mask.shape)}")
    if backend == "triton" and q.dtype not in KERNEL_DTYPES:
        backend = "sdpa"  # float64: torch's SDPA keeps it (gradcheck of a float64 model)
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
    return _eager(q, k, v, allowed, bias, dropout_p, return_probs)


@without_autocast  # float32 scores also under torch.autocast, whose matmuls would run in its dtype
def _eager(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], bias: Optional[Tensor], dropout_p: float,
           return_probs: bool):
    """softmax(q k^T / sqrt(D) + bias, masked to `allowed`) v with float32 scores; (out, probs) or out."""
    D, H, Hk = q.shape[-1], q.shape[2], k.shape[2]
    qh = q.transpose(1, 2).float()
    kh = k.transpose(1, 2).float().repeat_interleave(H // Hk, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(H // Hk, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * D ** -0.5
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key: 0, not NaN
    dropped = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    out = (dropped.to(v.dtype) @ vh).transpose(1, 2)
    return (out, probs) if return_probs else out


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
        rope: the rotary angles of the input tokens (Rotary.rope), applied to q and k.
        With a cache, self-attention appends k, v to it and attends over every key so far
        (never the slots before the cache's leftpad); decoding steps on the "triton"
        backend do both in one kernels.flash_attn_with_kvcache call (_decodes_in_kernel)."""
        B, S, _ = x.shape
        q, k, v = self._project(x, memory, cache)
        if self.q_norm is not None:
            # Cached cross-attention keys are stored raw, so this normalizes them every step.
            q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.cfg.attn_dropout if self.training else 0.0
        causal = self.cfg.causal and not self.cross
        slopes = None if self.cross else alibi_slopes
        # flash_attn_with_kvcache has no backward: a step that needs gradients appends and attends apart.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        in_kernel = (cache is not None and not self.cross and not needs_grad and q.dtype in KERNEL_DTYPES
                     and self._decodes_in_kernel(cache, key_padding_mask, dropout_p))
        # The kernel turns query i by position cache_len + i only when causal (FA2: otherwise
        # every query by cache_len), so a non-causal step of several tokens is turned here.
        fused = in_kernel and cache.owner.fused_rotary is not None and (causal or S == 1)
        if rope is not None and not self.cross and not fused:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if in_kernel:
            out = self._decode(q, k, v, cache, causal, slopes, fused)
            return self.drop(self.proj(out.reshape(B, S, self.heads * self.head_dim)))
        if cache is not None and not self.cross:
            k, v = cache.append(k, v)
            padding = cache.owner.key_mask(k.shape[1], q.device)
            if padding is not None:
                key_padding_mask = padding if key_padding_mask is None else key_padding_mask & padding
        backend = "eager" if self.keep_probs else self.backend
        out = attend(q, k, v, backend=backend, causal=causal, key_padding_mask=key_padding_mask,
                     dropout_p=dropout_p, alibi_slopes=slopes, return_probs=self.keep_probs)
        if self.keep_probs:
            out, self.last_probs = out
        return self.drop(self.proj(out.reshape(B, S, self.heads * self.head_dim)))

    def _decodes_in_kernel(self, cache: LayerCache, key_padding_mask: Optional[Tensor], dropout_p: float) -> bool:
        """Whether this cached self-attention step runs kernels.flash_attn_with_kvcache.

        Decoding steps on the "triton" backend do, when the cache alone says which keys
        count (left padding, no other mask) and nothing asks for dropout or probabilities.
        The prefill (an empty cache) runs the flash-attention forward instead, which is
        built for long query blocks, as does a step while some row's left padding goes on
        past the cache (a prompt fed in pieces: the kernel takes real new keys only).
        """
        owner = cache.owner
        return (self.backend == "triton" and not self.keep_probs and key_padding_mask is None and dropout_p == 0.0
                and owner.offset > 0 and owner.max_leftpad <= owner.offset)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, causal: bool,
                alibi_slopes: Optional[Tensor], fused_rotary: bool) -> Tensor:
        """Appends k, v to the cache buffers in place and attends over them, in one kernel call;
        with fused_rotary the kernel also turns q and k by the cache's fused_rotary tables
        (rotate-half layout)."""
        owner = cache.owner
        cache.reserve(k, v)
        leftpad = owner.leftpad.to(q.device) if owner.leftpad is not None else None
        cos, sin = owner.fused_rotary if fused_rotary else (None, None)
        return kernels.flash_attn_with_kvcache(
            q, cache.k, cache.v, k, v, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False,
            rotary_from_leftpad=True,  # each row's positions start at its first real token
            cache_seqlens=owner.seqlens(q.shape[0], q.device), cache_leftpad=leftpad, causal=causal,
            alibi_slopes=alibi_slopes.float() if alibi_slopes is not None else None)
