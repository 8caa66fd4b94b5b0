"""The one configuration of the shared transformer backbone."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

MLP_TYPES = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
NORM_TYPES = ("layernorm", "rmsnorm")
POSITION_TYPES = ("learned", "sinusoidal", "rotary", "alibi", "none")
ATTENTION_BACKENDS = ("triton", "sdpa", "eager")


def is_int(value) -> bool:
    """An int that is not a bool (True would pass isinstance(value, int) as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite real number (int, float, numpy scalar) that is not a bool: NaN and inf pass or fail
    range checks by accident, and a string would fail them with a TypeError naming no field."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_bool_fields(config) -> None:
    """Every field of a config dataclass annotated bool (or Optional[bool]) holds a bool (or None):
    a string from a YAML file or a command line ("false", "no") would otherwise read as True."""
    for f in dataclasses.fields(config):
        optional = f.type in (Optional[bool], "Optional[bool]")
        if f.type in (bool, "bool") or optional:
            value = getattr(config, f.name)
            if not (isinstance(value, bool) or (optional and value is None)):
                raise ValueError(f"{type(config).__name__}: {f.name} must be a bool{' or None' if optional else ''}, "
                                 f"got {value!r}")


@dataclass
class TransformerConfig:
    """Every variant of the backbone is a field here; the defaults are a GPT-style block."""

    dim: int = 512  # model width
    depth: int = 6  # number of blocks
    heads: int = 8  # attention heads
    kv_heads: Optional[int] = None  # key/value heads for GQA / MQA (None: as many as heads)
    head_dim: Optional[int] = None  # width of one head (None: dim // heads)
    mlp: str = "gelu"  # MLP type: gelu (exact), gelu_tanh, relu, swiglu or geglu
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of dim
    mlp_hidden: Optional[int] = None  # MLP hidden width; overrides mlp_ratio when set
    norm: str = "layernorm"  # layernorm or rmsnorm
    norm_eps: float = 1e-5  # epsilon of every norm
    prenorm: bool = True  # pre-norm residual blocks (GPT, ViT); False: post-norm (BERT, 2017 Transformer)
    final_norm: bool = True  # a norm after the last block (pre-norm models)
    input_norm: bool = False  # a norm over the input embeddings, after positions are added (BERT)
    positions: str = "learned"  # learned, sinusoidal (added to the input), rotary, alibi (self-attention), none
    max_seq_len: int = 1024  # table length of learned / sinusoidal positions
    rotary_dim: Optional[int] = None  # dims of each head that rotary rotates (None: all)
    rotary_base: float = 10000.0  # rotary frequency base
    causal: bool = False  # causal (decoder) self-attention
    cross_attention: bool = False  # every block also attends to a memory sequence (encoder-decoder)
    qk_norm: bool = False  # normalize queries and keys per head before attention
    qkv_bias: bool = True  # bias in the query/key/value projections
    proj_bias: bool = True  # bias in the attention output projection
    mlp_bias: bool = True  # biases in the MLP
    norm_bias: bool = True  # learned shift in LayerNorm
    dropout: float = 0.0  # dropout on the input embeddings and on each residual branch
    attn_dropout: float = 0.0  # dropout on the attention probabilities
    drop_path: float = 0.0  # stochastic depth: drop rate of the last block, linear from 0 at the first (depth 1: 0)
    layer_scale: Optional[float] = None  # LayerScale initial value on each residual branch (None: off)
    attn_backend: str = "triton"  # triton (this project's kernels), sdpa (torch) or eager (explicit softmax)
    checkpointing: bool = False  # recompute each block in the backward (activation checkpointing)
    kernel_ops: bool = True  # norms, rotary, activations, LM losses through tritonzoo's kernels (False: torch ops)

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ValueError(f"TransformerConfig: {message}")

        for name in ("dim", "depth", "heads", "max_seq_len"):
            need(is_int(getattr(self, name)) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("kv_heads", "head_dim", "mlp_hidden", "rotary_dim"):
            value = getattr(self, name, None)
            need(value is None or is_int(value),
                 f"{name} must be an int or None, got {value!r}")
        # Before the range checks below: a string or None would fail them with a bare TypeError.
        for name in ("mlp_ratio", "norm_eps", "rotary_base", "dropout", "attn_dropout", "drop_path"):
            need(is_finite_number(getattr(self, name)),
                 f"{name} must be a finite number, got {getattr(self, name)!r}")
        need(self.layer_scale is None or is_finite_number(self.layer_scale),
             f"layer_scale must be a finite number or None, got {self.layer_scale!r}")
        need(self.head_dim is not None or self.dim % self.heads == 0,
             f"heads ({self.heads}) must divide dim ({self.dim}), or set head_dim")
        need(self.head_dim is None or self.head_dim > 0, f"head_dim must be positive, got {self.head_dim}")
        kv = self.kv_heads if self.kv_heads is not None else self.heads
        need(kv > 0 and self.heads % kv == 0, f"kv_heads ({kv}) must divide heads ({self.heads})")
        for name, choices in (("mlp", MLP_TYPES), ("norm", NORM_TYPES), ("positions", POSITION_TYPES),
                              ("attn_backend", ATTENTION_BACKENDS)):
            need(getattr(self, name) in choices, f"{name} must be one of {', '.join(choices)}; "
                                                 f"got {getattr(self, name)!r}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        check_bool_fields(self)
        need(self.mlp_ratio > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        need(self.mlp_hidden is None or self.mlp_hidden > 0, f"mlp_hidden must be positive, got {self.mlp_hidden}")
        need(self.mlp_width >= 1, f"dim ({self.dim}) x mlp_ratio ({self.mlp_ratio}) rounds the MLP width to 0")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.rotary_dim is None or self.positions == "rotary",
             f"rotary_dim applies to positions='rotary' only; got positions={self.positions!r} "
             f"with rotary_dim={self.rotary_dim}")
        if self.positions == "rotary":
            need(self.rotary_base > 0, f"rotary_base must be positive, got {self.rotary_base}")
            rd = self.rotary_dim if self.rotary_dim is not None else self.head_size
            need(rd % 2 == 0 and 0 < rd <= self.head_size,
                 f"rotary_dim ({rd}) must be even and at most head_dim ({self.head_size})")
        need(self.positions != "sinusoidal" or self.dim % 2 == 0,
             f"positions='sinusoidal' needs an even dim (sine and cosine pairs), got dim={self.dim}")

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def mlp_width(self) -> int:
        """Hidden width of the MLP."""
        return self.mlp_hidden if self.mlp_hidden is not None else int(self.dim * self.mlp_ratio)

    def replace(self, **changes) -> "TransformerConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"TransformerConfig has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)
