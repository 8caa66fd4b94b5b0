"""Building blocks of the backbone: norms, MLPs, residual helpers and positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(cfg: TransformerConfig, dim: int | None = None) -> nn.Module:
    dim = cfg.dim if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


class MLP(nn.Module):
    """Position-wise feed-forward: fc1 -> activation (or gated unit) -> fc2."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.mlp_width
        gated = cfg.mlp in ("swiglu", "geglu")
        # A gated unit's fc1 produces both halves (value, gate) in one matmul.
        self.fc1 = nn.Linear(cfg.dim, 2 * hidden if gated else hidden, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(hidden, cfg.dim, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu":
            h = F.relu(h)
        else:
            value, gate = h.chunk(2, dim=-1)
            h = value * (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate))
        return self.drop(self.fc2(h))


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def sinusoidal_table(length: int, dim: int) -> Tensor:
    """(length, dim) fixed positions: [sin | cos] halves over geometric timescales 1..10000.

    The layout of tensor2tensor and Whisper's encoder.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    half = dim // 2
    increment = math.log(10000.0) / max(half - 1, 1)
    inv_timescales = torch.exp(-increment * torch.arange(half, dtype=torch.float64))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al.): a geometric series, interleaved for non-powers of 2."""
    def series(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        slopes = series(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = series(closest) + series(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half layout, as GPT-NeoX / LLaMA), optionally partial."""

    def __init__(self, rotary_dim: int, base: float = 10000.0):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, S, 1, rotary_dim) for integer positions (B, S)."""
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the first cos.shape[-1] dims of x (B, S, H, D) by the given angles."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (x_rot.float() * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out
