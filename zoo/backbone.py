"""The shared transformer backbone: one Block, one stack, every domain."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .cache import KVCache, LayerCache
from .config import TransformerConfig
from .layers import MLP, DropPath, LayerScale, Rotary, alibi_slopes, make_norm, sinusoidal_table


class Block(nn.Module):
    """Self-attention, optional cross-attention, MLP; each a residual branch, pre- or post-norm.

    The unit that activation checkpointing and FSDP wrap.
    """

    def __init__(self, cfg: TransformerConfig, drop_path: float = 0.0):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.cross_attn = None
        if cfg.cross_attention:
            self.norm_cross, self.cross_attn = make_norm(cfg), Attention(cfg, cross=True)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

        def scale():
            return LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale is not None else nn.Identity()

        self.ls1, self.ls2 = scale(), scale()
        self.ls_cross = scale() if cfg.cross_attention else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _residual(self, x: Tensor, norm: nn.Module, branch, scale: nn.Module) -> Tensor:
        if self.prenorm:
            return x + self.drop_path(scale(branch(norm(x))))
        return norm(x + self.drop_path(scale(branch(x))))

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                memory_padding_mask: Optional[Tensor] = None, rope: Optional[tuple] = None,
                alibi_slopes: Optional[Tensor] = None, cache: Optional[LayerCache] = None) -> Tensor:
        x = self._residual(x, self.norm1, lambda h: self.attn(
            h, key_padding_mask=key_padding_mask, rope=rope, alibi_slopes=alibi_slopes, cache=cache), self.ls1)
        if self.cross_attn is not None:
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(
                h, memory=memory, key_padding_mask=memory_padding_mask, cache=cache), self.ls_cross)
        return self._residual(x, self.norm2, self.mlp, self.ls2)


class Transformer(nn.Module):
    """A stack of Blocks with positions and norms: (B, S, dim) embeddings -> (B, S, dim) states.

    Learned and sinusoidal positions are added to the input; rotary and ALiBi act inside
    attention. key_padding_mask (B, S) marks real tokens (True) of the input, or of all
    keys so far when decoding with a cache.
    """

    block_class = Block

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.pos_embed = self.rotary = None
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.dim))
        elif cfg.positions == "rotary":
            self.rotary = Rotary(cfg.rotary_dim or cfg.head_size, cfg.rotary_base, kernel_ops=cfg.kernel_ops)
        if cfg.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.heads), persistent=False)
        else:
            self.alibi_slopes = None
        self.input_norm = make_norm(cfg) if cfg.input_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = make_norm(cfg) if cfg.final_norm else nn.Identity()
        self.init_weights()

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) casts buffers too; the ALiBi slopes stay float32 (recomputed,
        # not cast back: bf16 would round the slopes of non-power-of-two head counts).
        super()._apply(fn, recurse)
        if self.alibi_slopes is not None and self.alibi_slopes.dtype != torch.float32:
            self.alibi_slopes = alibi_slopes(self.cfg.heads).to(self.alibi_slopes.device)
        return self

    def init_weights(self) -> None:
        """GPT-2 / BERT / timm-style init: N(0, 0.02) weights, zero biases, residual
        output projections scaled by 1/sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.depth)
        for block in self.blocks:
            for attn in (block.attn, block.cross_attn):
                if attn is not None:
                    nn.init.normal_(attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.fc2.weight, std=residual_std)

    def set_attn_backend(self, backend: str) -> None:
        """Switches every attention layer to "triton", "sdpa" or "eager" (ablations, parity)."""
        self.cfg = self.cfg.replace(attn_backend=backend)  # validates the name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def new_cache(self, capacity: int = 0, leftpad: Optional[Tensor] = None) -> KVCache:
        """An empty cache for incremental decoding with forward(..., cache=cache).

        capacity: key slots to allocate on the first step (prompt + new tokens avoids any
        regrowth); leftpad (B,): where each left-padded row's real tokens start (see KVCache).
        """
        return KVCache(self.cfg.depth, capacity, leftpad)

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, memory: Optional[Tensor] = None,
                memory_padding_mask: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> Tensor:
        """x (B, S, dim) -> (B, S, dim).

        position_ids (B, S): positions of the input tokens (default: 0.., continuing from
        the cache's offset, counted from each row's leftpad when the cache has one).
        memory (B, Sm, dim) and memory_padding_mask (B, Sm): what cross-attention attends to.
        Raises ValueError for positions past max_seq_len or below 0 (checked where reading
        them costs no sync: CPU tensors), for x, memory or position_ids of the wrong shape, or a
        cache made for another batch size; TypeError for position_ids that are not integers.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"x must have shape (batch, seq, dim) = (B, S, {self.cfg.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, S, _ = x.shape
        if position_ids is not None:
            if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
                raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
            if tuple(position_ids.shape) != (B, S):
                raise ValueError(f"position_ids must have shape (batch, seq) = ({B}, {S}), got "
                                 f"{tuple(position_ids.shape)}")
            if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling() \
                    and int(position_ids.min()) < 0:
                raise ValueError(f"position_ids must be >= 0, got {int(position_ids.min())}")
        if memory is not None and (memory.dim() != 3 or memory.shape[-1] != self.cfg.dim):
            raise ValueError(f"memory must have shape (batch, memory_len, dim) = (B, Sm, {self.cfg.dim}), got "
                             f"{tuple(memory.shape)}")
        if not self.cfg.cross_attention and (memory is not None or memory_padding_mask is not None):
            raise ValueError("memory / memory_padding_mask given to a Transformer without cross-attention "
                             "(set cross_attention=True in its config to attend to a memory sequence)")
        if memory is None and memory_padding_mask is not None:
            raise ValueError("memory_padding_mask given without memory")
        if cache is not None:
            # Positions the cache makes itself are the ones the decoding kernel can rotate by.
            cache.fused_rotary = (cache.rotary_tables(self.rotary, S, x.device)
                                  if self.rotary is not None and position_ids is None else None)
        if cache is not None and cache.leftpad is not None and cache.leftpad.shape[0] != B:
            raise ValueError(f"the cache's leftpad covers {cache.leftpad.shape[0]} rows but the input has {B}")
        last = None  # the largest position, when known without reading device memory
        shared = None  # positions every batch row has (S,), when made here
        if position_ids is None and cache is not None and cache.leftpad is not None:
            position_ids = cache.positions(S, x.device)
            last = cache.offset + S - 1 - cache.min_leftpad
        elif position_ids is None:
            start = cache.offset if cache is not None else 0
            shared = torch.arange(start, start + S, device=x.device)
            position_ids = shared.unsqueeze(0).expand(B, S)
            last = start + S - 1
        elif position_ids.device.type == "cpu" and S and not torch.compiler.is_compiling():
            last = int(position_ids.max())  # explicit positions: checked on CPU, where it costs no sync
        if self.pos_embed is not None or self.cfg.positions == "sinusoidal":
            if last is not None and last >= self.cfg.max_seq_len:
                raise ValueError(f"position {last} is past max_seq_len = {self.cfg.max_seq_len} "
                                 f"of the {self.cfg.positions} position table")
            # No cast to x's dtype: under autocast a convolution front end hands over bf16, and the
            # float32 table makes the residual stream float32, as the references' is (HF Whisper).
            x = x + (self.pos_embed(position_ids) if self.pos_embed is not None
                     else self.pos_table[position_ids])
        if self.input_norm is not None:
            x = self.input_norm(x)
        x = self.drop(x)
        rope = None
        if self.rotary is not None:
            rope = self.rotary.rope(shared if shared is not None else position_ids)
        for i, block in enumerate(self.blocks):
            args = (x, key_padding_mask, memory, memory_padding_mask, rope, self.alibi_slopes,
                    cache.layers[i] if cache is not None else None)
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        if cache is not None:
            cache.offset += S
        return self.norm(x)
