"""Building blocks of the backbone: norms, MLPs, residual helpers, positions and the token loss.

With kernel_ops (TransformerConfig.kernel_ops, the default) the norms, the MLP's
activations, rotary positions and the token loss run tritonzoo's kernels (kernels/:
Triton on CUDA, their PyTorch path on CPU); without, torch's own ops. Both compute the
same function with the same parameters, so a checkpoint loads into either. On CUDA, a norm
or a GELU over fewer than KERNEL_MIN_ELEMENTS elements takes torch's fused op even with
kernel_ops (kernel_pays): there a launch of ours costs more host time than torch's whole
op. On the kernels' PyTorch path, float32 norms and GELUs call torch's op themselves where the
kernels' function would call that same op (torch_op_serves), skipping its argument checks.
Tensors of a dtype the kernels do not take (float64) use torch's ops either way, but a
float64 model is not float64 throughout: RMSNorm's statistics, rotary's angles, the
sinusoidal table and the "eager" attention scores are float32, as on the other dtypes (the
"triton" and "sdpa" backends keep float64: the former hands it to torch's SDPA).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.runtime import autocast_dtype, torch_native

from .config import TransformerConfig

#: The dtypes tritonzoo's kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel_min_elements() -> int:
    text = os.environ.get("TRITONZOO_KERNEL_MIN_ELEMENTS")
    if text is None:
        return 1 << 27
    value = int(text) if text.strip().isdecimal() else -1
    if value < 0:
        raise ValueError(f"TRITONZOO_KERNEL_MIN_ELEMENTS must be an integer >= 0 (0: the kernels at every size), "
                         f"got {text!r}")
    return value


#: On CUDA, the norms and the GELU run tritonzoo's kernels from this many elements up, torch's
#: fused ops below (TRITONZOO_KERNEL_MIN_ELEMENTS in the environment when zoo is imported, 0 for
#: the kernels at every size). Measured on an H100 (docs/benchmarks.md, "Second H100 run"):
#: layer_norm forward + backward over 16384 x 1024 took 0.94 ms with ours, 0.17 with torch's,
#: and over 16384 x 4096 0.97 against 0.45, our call's host time being longer than its
#: kernels; over 16384 x 16384 (2^28) ours took 1.64 against 1.97. 2^27 lies between the last two.
KERNEL_MIN_ELEMENTS = _kernel_min_elements()


def kernel_pays(x: Tensor, numel: Optional[int] = None) -> bool:
    """Whether a norm or GELU over ``numel`` elements (default: x's) takes tritonzoo's kernel
    rather than torch's fused op: always off CUDA (the kernels' PyTorch path, or the Triton
    interpreter), on CUDA from KERNEL_MIN_ELEMENTS elements up."""
    return x.device.type != "cuda" or (x.numel() if numel is None else numel) >= KERNEL_MIN_ELEMENTS


def torch_op_serves(x: Tensor) -> bool:
    """Whether kernels.layer_norm, rms_norm and gelu would, on x, call torch's own op
    (kernels.runtime.torch_native: float32, on the kernels' PyTorch path, eager), with autocast
    off (under it the GELU's input is not float32). The layers then call that op themselves: the
    same computation without the public functions' argument checks, which cost 3-11 us a call
    on the CPU machine, a tenth of a small layer's whole op (vit_digits: 64 wide, 16 tokens)."""
    return x.dtype == torch.float32 and torch_native(x) and autocast_dtype(x.device.type) is None


def _norm_kernel(x: Tensor) -> bool:
    """Whether a norm over x calls the kernels (kernel_pays) rather than torch's op, which the
    kernel's path would call itself (torch_op_serves) except over a hidden size of 1, where
    torch's LayerNorm backward is not exactly 0 and the kernels' is."""
    return kernel_pays(x) and not (x.shape[-1] > 1 and torch_op_serves(x))


def _in_dtype(y: Tensor, x: Tensor) -> Tensor:
    """y in x's dtype: torch's norms under CUDA autocast return float32, the kernels x's dtype."""
    return y if y.dtype == x.dtype else y.to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, kernel_ops: bool = True):
        super().__init__()
        self.eps = eps
        self.kernel_ops = kernel_ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_ops and x.dtype in KERNEL_DTYPES:
            if self.weight.dtype != x.dtype or _norm_kernel(x):
                return kernels.rms_norm(x, self.weight, eps=self.eps)
            return _in_dtype(F.rms_norm(x, self.weight.shape, self.weight, self.eps), x)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernel_ops={self.kernel_ops}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same state_dict) whose forward is kernels.layer_norm
    when kernel_ops: statistics in float32, output in the input's dtype."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, kernel_ops: bool = True):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        self.kernel_ops = kernel_ops

    def forward(self, x: Tensor) -> Tensor:
        # The kernel normalizes over the last dim only; a multi-dim normalized_shape takes torch's op.
        if self.kernel_ops and len(self.normalized_shape) == 1 and x.dtype in KERNEL_DTYPES:
            # torch's op where it is faster, when x and the parameters share a dtype (a mixed
            # pair would leave torch's fused implementation, or fail).
            if _norm_kernel(x) or any(p is not None and p.dtype != x.dtype for p in (self.weight, self.bias)):
                return kernels.layer_norm(x, self.weight, self.bias, self.eps)
            return _in_dtype(super().forward(x), x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_ops={self.kernel_ops}"


def make_norm(cfg: TransformerConfig, dim: int | None = None) -> nn.Module:
    """The config's norm (LayerNorm or RMSNorm) over `dim` (default cfg.dim)."""
    dim = cfg.dim if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, kernel_ops=cfg.kernel_ops)
    return LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias, kernel_ops=cfg.kernel_ops)


class MLP(nn.Module):
    """Position-wise feed-forward: fc1 -> activation (or gated unit) -> fc2."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.kernel_ops = cfg.kernel_ops
        hidden = cfg.mlp_width
        gated = cfg.mlp in ("swiglu", "geglu")
        # A gated unit's fc1 produces both halves (value, gate) in one matmul.
        self.fc1 = nn.Linear(cfg.dim, 2 * hidden if gated else hidden, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(hidden, cfg.dim, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_ops and self.kind != "relu" and x.dtype in KERNEL_DTYPES:
            return self.drop(self.fc2(self._kernel_activation(x)))
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

    def _kernel_activation(self, x: Tensor) -> Tensor:
        if self.kind in ("gelu", "gelu_tanh"):
            # fc1's bias is added inside the GELU kernel (one pass over the hidden activations).
            return fused_linear_gelu(x, self.fc1, "tanh" if self.kind == "gelu_tanh" else "none")
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return kernels.swiglu(gate, value) if self.kind == "swiglu" else kernels.geglu(gate, value)


def fused_linear_gelu(x: Tensor, linear: nn.Linear, approximate: str = "none") -> Tensor:
    """gelu(linear(x)) with the bias added in kernels.gelu rather than in the matmul; torch's
    gelu of linear(x) where the activations are too few for the kernel to pay (kernel_pays) or
    the kernel's path would be torch's gelu (torch_op_serves: the bias then goes in the matmul)."""
    if not kernel_pays(x, x.numel() // max(1, x.shape[-1]) * linear.out_features) or torch_op_serves(x):
        return F.gelu(linear(x), approximate=approximate)
    h = F.linear(x, linear.weight)
    bias = linear.bias
    # Under autocast the matmul runs in the autocast dtype; the bias follows it, as in nn.Linear.
    return kernels.gelu(h, bias.to(h.dtype) if bias is not None else None, approximate=approximate)


#: A vocabulary projection whose rows would start at addresses that are not 16-byte multiples
#: computes its logits with the weight padded to a multiple of this many rows (vocab_logits)...
VOCAB_ALIGN = 64
#: ...when it has at least this many rows (tokens): below, the GEMM is bound by reading the
#: weight, and the padded copy would cost as much as the GEMM (a decoding step's few rows).
VOCAB_PAD_MIN_ROWS = 256


def vocab_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 pad: Optional[bool] = None) -> Tensor:
    """F.linear(hidden, weight, bias): (..., dim) -> (..., vocab) logits, with aligned rows on CUDA.

    At an odd vocabulary (GPT-2's 50257, BERT's 30522) a (tokens, vocab) logits tensor has rows
    at odd addresses, and its GEMM and both backward GEMMs leave cuBLAS's 16-byte-aligned
    tensor-core kernels (on an H100, eager torch ran the 16384 x 4096 x 50257 logits forward
    at about 100 TFLOP/s, torch.compile, which pads strides, at about 600: docs/benchmarks.md).
    With pad (default: CUDA tensors with at least VOCAB_PAD_MIN_ROWS rows), the weight and
    bias get zero rows up to a multiple of VOCAB_ALIGN, the GEMM writes aligned rows, and
    the logits are the view of the first vocab columns: the same values, and the parameters
    keep their shapes. The price is a copy of the weight per call and, in the backward, one
    (tokens, vocab) copy of the logits' gradient into the padded layout.
    """
    V = weight.shape[0]
    if pad is None:
        pad = hidden.is_cuda and hidden.numel() >= VOCAB_PAD_MIN_ROWS * hidden.shape[-1]
    if not pad or V % 8 == 0:  # 8: 16 bytes of bf16 / fp16
        return F.linear(hidden, weight, bias)
    extra = -V % VOCAB_ALIGN
    weight = F.pad(weight, (0, 0, 0, extra))
    bias = F.pad(bias, (0, extra)) if bias is not None else None
    return F.linear(hidden, weight, bias)[..., :V]


def token_cross_entropy(logits: Tensor, labels: Tensor, kernel_ops: bool = True, ignore_index: int = -100,
                        label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Float32 cross-entropy of logits (N, V) against class ids (N,); labels == ignore_index add nothing.

    kernel_ops: kernels.cross_entropy (float32 arithmetic on the logits as they are, no
    float32 copy of them); else torch's F.cross_entropy on float32 logits. reduction
    "mean" (over the rows not ignored; NaN when all are, as torch), "sum" or "none".
    """
    if kernel_ops and logits.dtype in KERNEL_DTYPES:
        return kernels.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                     reduction=reduction)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)


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

    def __init__(self, rotary_dim: int, base: float = 10000.0, kernel_ops: bool = True):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self.kernel_ops = kernel_ops
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim))

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) casts buffers too; inv_freq stays float32 (recomputed, not cast
        # back): bf16 frequencies would turn position 4000 by up to 1.5 radians off.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, S, 1, rotary_dim) for integer positions (B, S)."""
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()

    def tables(self, n: int, device) -> tuple[Tensor, Tensor]:
        """cos, sin (n, rotary_dim / 2) float32 of positions 0..n-1: FlashAttention-2's rotary_cos /
        rotary_sin, the form kernels.flash_attn_with_kvcache rotates with (as rope's angles)."""
        angles = torch.arange(n, device=device).float()[:, None] * self.inv_freq.to(device)
        return angles.cos(), angles.sin()

    def rope(self, positions: Tensor) -> tuple:
        """The angles of integer positions, in the form apply_rotary(x, *rope) takes.

        positions (B, S), or (S,) shared by every batch row (made by arange: training,
        cached decoding without padding). Without kernel_ops: cos_sin(positions), (1, S, 1,
        rotary_dim) for shared positions. With kernel_ops: tables for kernels.apply_rotary_emb,
        (cos, sin, rows): cos and sin (N, rotary_dim / 2) hold the angles of the tokens and
        rows (B, S) which table row is which token's, or None for shared positions (then
        the tables have S rows, row s for token s). The angles are computed as cos_sin's,
        so both forms rotate by the same float32 cos and sin.
        """
        if not self.kernel_ops:
            return self.cos_sin(positions[None] if positions.dim() == 1 else positions)
        angles = positions.reshape(-1).float()[:, None] * self.inv_freq
        rows = None
        if positions.dim() == 2:
            rows = torch.arange(positions.numel(), device=positions.device).view(positions.shape)
        return angles.cos(), angles.sin(), rows


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rows: Optional[Tensor] = None) -> Tensor:
    """Rotates the first rotary_dim dims of x (B, S, H, D) by the given angles (rotate-half).

    cos, sin either (B|1, S, 1, rotary_dim) (Rotary.cos_sin): torch's ops; or
    (N, rotary_dim / 2) tables with rows (B, S) or None (Rotary.rope with kernel_ops):
    kernels.apply_rotary_emb, whose position_ids are those rows.
    """
    if cos.dim() == 2:
        if x.dtype in KERNEL_DTYPES:
            return kernels.apply_rotary_emb(x, cos, sin, position_ids=rows)
        # A dtype the kernel does not take: the tables as cos_sin's layout, torch's ops.
        cos, sin = (t[rows] if rows is not None else t[None, : x.shape[1]] for t in (cos, sin))
        cos, sin = (torch.cat([t, t], dim=-1)[:, :, None, :] for t in (cos, sin))
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (x_rot.float() * cos + rotated * sin).to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out
