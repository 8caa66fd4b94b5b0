"""The KV cache of incremental decoding: preallocated per-layer buffers written in place.

Every layer keeps its keys and values in (B, capacity, Hk, D) buffers in the layout
FlashAttention-2's `flash_attn_with_kvcache` takes, so a decoding step on the "triton"
backend appends and attends in one call of kernels.flash_attn_with_kvcache (split-K
flash-decoding). The layers share one offset: every row holds the same number of key
slots. Prompts of different lengths are LEFT-padded, and `leftpad` (B,) says where each
row's real keys start; the slots before it are never attended, on any backend, and
default positions count from it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class LayerCache:
    """One attention layer's keys and values.

    Self-attention keys fill k, v (B, capacity, Hk, D) up to the owner's offset; the
    buffers are allocated on the first append (owner.capacity slots, or what the append
    needs) and grow by doubling, so appends are amortized O(1). Cross-attention keys
    are computed from the memory once and kept in cross_k, cross_v.
    """

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.cross_k: Optional[Tensor] = None
        self.cross_v: Optional[Tensor] = None

    def _check_fits(self, k: Tensor) -> None:
        if self.k.shape[0] != k.shape[0] or self.k.shape[2:] != k.shape[2:] or self.k.dtype != k.dtype:
            raise ValueError(f"the cache holds keys {tuple(self.k.shape)} {self.k.dtype}; new keys "
                             f"{tuple(k.shape)} {k.dtype} do not fit them (batch, kv heads, head dim, dtype)")

    def reserve(self, k: Tensor, v: Tensor) -> None:
        """Makes room for the new keys k, v (B, S, Hk, D) after the owner's offset."""
        length, needed = self.owner.offset, self.owner.offset + k.shape[1]
        if self.k is not None:
            self._check_fits(k)
            if needed <= self.k.shape[1]:
                return
        capacity = max(needed, 2 * self.k.shape[1] if self.k is not None else self.owner.capacity or 16)
        new_k = k.new_empty((k.shape[0], capacity, *k.shape[2:]))
        new_v = v.new_empty((v.shape[0], capacity, *v.shape[2:]))
        if length:
            new_k[:, :length] = self.k[:, :length]
            new_v[:, :length] = self.v[:, :length]
        self.k, self.v = new_k, new_v

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v (B, S, Hk, D) after the owner's offset; returns all keys and values so far."""
        start, end = self.owner.offset, self.owner.offset + k.shape[1]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Autograd keeps the keys an earlier step attended over: writing into that buffer in
            # place would change them under it. With gradients the cache grows by concatenation.
            if start:
                self._check_fits(k)
                k, v = torch.cat([self.k[:, :start], k], dim=1), torch.cat([self.v[:, :start], v], dim=1)
            self.k, self.v = k, v
            return k, v
        self.reserve(k, v)
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]

    def reorder(self, index: Tensor) -> None:
        """Keeps batch rows `index` (beam search)."""
        for name in ("k", "v", "cross_k", "cross_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index))


class KVCache:
    """Per-layer caches, the number of key slots each row holds (offset) and its left padding.

    capacity: slots to allocate up front (prompt + new tokens, so no step reallocates).
    leftpad (B,) int: row b's real keys start at slot leftpad[b]; None: at 0.
    """

    def __init__(self, depth: int, capacity: int = 0, leftpad: Optional[Tensor] = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        if leftpad is not None:
            if not isinstance(leftpad, Tensor) or leftpad.dim() != 1 or leftpad.is_floating_point():
                raise TypeError(f"leftpad must be a 1-D integer tensor (batch,), got {leftpad!r}")
            leftpad = leftpad.to(torch.int32)
        self.layers = [LayerCache(self) for _ in range(depth)]
        self.offset = 0
        self.capacity = capacity
        self.leftpad = leftpad
        # The smallest and largest left padding, read once here (a host sync on CUDA), so that
        # position checks and the choice of decoding kernel need no device reads while decoding.
        self.min_leftpad = int(leftpad.min()) if leftpad is not None and leftpad.numel() else 0
        self.max_leftpad = int(leftpad.max()) if leftpad is not None and leftpad.numel() else 0
        if self.min_leftpad < 0:
            raise ValueError(f"leftpad must be >= 0 (slots of padding before each row), got {leftpad.tolist()}")
        self._seqlens: Optional[Tensor] = None
        self._seqlens_at = -1
        #: (cos, sin) rotary tables of positions 0.. when this call's positions are the cache's
        #: own (Transformer.forward sets it per call): the decoding kernel then rotates q and the
        #: new keys itself. None: attention applies the rotary before it.
        self.fused_rotary: Optional[tuple[Tensor, Tensor]] = None
        self._rotary_tables: Optional[tuple[Tensor, Tensor]] = None

    def seqlens(self, batch: int, device) -> Tensor:
        """(batch,) int32 on `device`: the slots each row holds (cache_seqlens of the kernel)."""
        t = self._seqlens
        if t is None or self._seqlens_at != self.offset or t.shape[0] != batch or t.device != torch.device(device):
            t = torch.full((batch,), self.offset, dtype=torch.int32, device=device)
            self._seqlens, self._seqlens_at = t, self.offset
        return t

    def rotary_tables(self, rotary, length: int, device) -> tuple[Tensor, Tensor]:
        """rotary.tables covering the next `length` tokens' positions (made once per capacity)."""
        needed = self.offset + length
        tables = self._rotary_tables
        if tables is None or tables[0].shape[0] < needed or tables[0].device != torch.device(device):
            tables = self._rotary_tables = rotary.tables(max(needed, self.capacity), device)
        return tables

    def key_mask(self, length: int, device) -> Optional[Tensor]:
        """(B, length) bool, True from each row's leftpad on; None without left padding."""
        if self.leftpad is None:
            return None
        return torch.arange(length, device=device).view(1, -1) >= self.leftpad.to(device).view(-1, 1)

    def positions(self, length: int, device) -> Tensor:
        """(B, length) int64: the positions of the next `length` tokens, counted from each row's leftpad."""
        slots = torch.arange(self.offset, self.offset + length, device=device).view(1, -1)
        return (slots - self.leftpad.to(device).view(-1, 1).long()).clamp_min(0)

    def reorder(self, index: Tensor) -> None:
        """Keeps batch rows `index` in every layer (beam search)."""
        for layer in self.layers:
            layer.reorder(index)
        if self.leftpad is not None:
            self.leftpad = self.leftpad.index_select(0, index.to(self.leftpad.device))
            self.min_leftpad = int(self.leftpad.min()) if self.leftpad.numel() else 0
            self.max_leftpad = int(self.leftpad.max()) if self.leftpad.numel() else 0
        self._seqlens = None
