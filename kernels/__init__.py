"""tritonzoo kernels: Triton flash attention with FlashAttention-2's and torch SDPA's APIs,
KV-cache decoding, and the block's other hot spots (norms, rotary, activations, cross-entropy).

Depends on torch and triton only; usable in any PyTorch or Lightning project
(kernels.lightning.TritonAttention is the Lightning callback; importing it needs Lightning).
"""

from .activations import geglu, gelu, swiglu
from .cross_entropy import cross_entropy, fused_linear_cross_entropy
from .decoding_interface import flash_attn_with_kvcache
from .flash_attn_interface import (
    attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .rotary import apply_rotary_emb, apply_rotary_emb_qk
from .routing import AttentionRouting, triton_attention
from .runtime import INTERPRET, reference_only
from .sdpa import (
    disable_sdpa_patch,
    enable_sdpa_patch,
    fallback_reason,
    patch_sdpa,
    record_routing,
    scaled_dot_product_attention,
    sdpa_stats,
)
from .launcher import bind_all as _bind_all

_bind_all()  # every kernel of the modules above launches through launcher.bind_once's path

__all__ = [
    "attention",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_emb",
    "apply_rotary_emb_qk",
    "gelu",
    "swiglu",
    "geglu",
    "cross_entropy",
    "fused_linear_cross_entropy",
    "patch_sdpa",
    "enable_sdpa_patch",
    "disable_sdpa_patch",
    "fallback_reason",
    "sdpa_stats",
    "record_routing",
    "triton_attention",
    "AttentionRouting",
    "reference_only",
    "INTERPRET",
]
