"""timm VisionTransformer -> zoo VisionTransformer, one tensor to one tensor.

The zoo ViT keeps timm's parameter names, so the mapping is a renaming of prefixes:
the blocks, norm_pre and the final norm live under `backbone.` and the patch
convolution drops its `.proj`. Everything timm's class can be configured to do that the
zoo model cannot (attention pooling, qk-norm, extra norms, other block or MLP types, ...)
raises ValueError naming the attribute, rather than converting into a different model.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor, nn

from ..config import TransformerConfig
from ..registry import build_config
from ..vision import ViTConfig, VisionTransformer
from ._common import like_source, load_exactly, unwrap_compiled, warn_not_reproduced

_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "ls1.gamma", "norm2", "mlp.fc1", "mlp.fc2", "ls2.gamma")
_RENAMES = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"(cls_token|reg_token|pos_embed)", r"\1"),
    (r"norm_pre\.(weight|bias)", r"backbone.input_norm.\1"),
    (r"blocks\.(\d+)\.(" + "|".join(re.escape(p) for p in _BLOCK_PARTS) + r")((?:\.weight|\.bias)?)",
     r"backbone.blocks.\1.\2\3"),
    (r"norm\.(weight|bias)", r"backbone.norm.\1"),
    (r"(fc_norm|head)\.(weight|bias)", r"\1.\2"),
]


def rename_key(key: str) -> str:
    """The zoo name of a timm ViT state-dict key; ValueError for a key the zoo ViT has no place for."""
    for pattern, replacement in _RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise ValueError(f"timm ViT weight {key!r} has no counterpart in the zoo VisionTransformer "
                     f"(an unsupported timm variant)")


def _gelu_approximation(act: nn.Module) -> str | None:
    """"none" or "tanh" for the GELU modules timm builds (nn.GELU, timm's GELU and GELUTanh); None otherwise."""
    from timm.layers.activations import GELU, GELUTanh

    if type(act) is nn.GELU:
        return act.approximate
    return {GELU: "none", GELUTanh: "tanh"}.get(type(act))


def _unsupported(what: str) -> ValueError:
    return ValueError(f"timm VisionTransformer with {what} is not supported by the zoo ViT")


def _check_module(vit: nn.Module) -> None:
    """Raises ValueError for any timm option whose computation the zoo ViT does not reproduce."""
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock

    if getattr(vit, "attn_pool", None) is not None:
        raise _unsupported(f"global_pool={vit.global_pool!r} (attention pooling, attn_pool)")
    if vit.global_pool not in ("token", "avg"):
        raise _unsupported(f"global_pool={vit.global_pool!r} (supported: 'token', 'avg')")
    if getattr(vit, "pool_include_prefix", False):
        raise _unsupported("pool_include_prefix=True")
    if vit.pos_embed is None:
        raise _unsupported("pos_embed='none' (no position table)")
    pe = vit.patch_embed
    if type(pe) is not PatchEmbed:
        raise _unsupported(f"patch_embed of type {type(pe).__name__}")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported("a norm in the patch embedding (patch_embed.norm, embed_norm_layer)")
    if getattr(pe, "dynamic_img_pad", False):
        raise _unsupported("dynamic_img_pad=True (the zoo ViT raises for sizes not divisible by the patch)")
    if not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity):
        raise _unsupported("patch_drop_rate > 0 (patch_drop)")
    norms = [vit.norm_pre, vit.norm, vit.fc_norm]
    for i, block in enumerate(vit.blocks):
        if type(block) is not TimmBlock:
            raise _unsupported(f"block_fn {type(block).__name__} (blocks.{i})")
        attn, mlp = block.attn, block.mlp
        if type(attn) is not TimmAttention:
            raise _unsupported(f"attn_layer {type(attn).__name__} (blocks.{i}.attn)")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise _unsupported(f"qk_norm=True (blocks.{i}.attn.q_norm / k_norm: a LayerNorm, the zoo's is RMSNorm)")
        if not isinstance(attn.norm, nn.Identity):
            raise _unsupported(f"scale_attn_norm=True (blocks.{i}.attn.norm)")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported(f"gated attention (blocks.{i}.attn.gate)")
        if type(mlp) is not Mlp:
            raise _unsupported(f"mlp_layer {type(mlp).__name__} (blocks.{i}.mlp)")
        if not isinstance(mlp.norm, nn.Identity):
            raise _unsupported(f"scale_mlp_norm=True (blocks.{i}.mlp.norm)")
        if _gelu_approximation(mlp.act) is None:
            raise _unsupported(f"act_layer {type(mlp.act).__name__} (blocks.{i}.mlp.act; supported: GELU, "
                               f"exact or tanh)")
        if _gelu_approximation(mlp.act) != _gelu_approximation(vit.blocks[0].mlp.act):
            raise _unsupported(f"a different GELU in blocks.{i}.mlp.act than in blocks.0")
        for name in ("ls1", "ls2"):
            scale = getattr(block, name)
            if not isinstance(scale, nn.Identity) and not hasattr(scale, "gamma"):
                raise _unsupported(f"layer scale of type {type(scale).__name__} (blocks.{i}.{name})")
        norms += [block.norm1, block.norm2]
    norms = [n for n in norms if not isinstance(n, nn.Identity)]
    for n in norms:
        if not isinstance(n, nn.LayerNorm) or not n.elementwise_affine:
            raise _unsupported(f"norm_layer {type(n).__name__} (supported: an affine LayerNorm)")
    if len({n.eps for n in norms}) > 1:
        raise _unsupported(f"norms of different eps {sorted({n.eps for n in norms})}")
    if len({n.bias is None for n in norms}) > 1:
        raise _unsupported("norms with and without bias")


def _config_from_module(vit: nn.Module) -> tuple[TransformerConfig, dict]:
    """The zoo backbone config and ViT fields that reproduce timm model `vit` (checked first)."""
    _check_module(vit)
    block = vit.blocks[0]
    attn, mlp = block.attn, block.mlp
    norm = vit.blocks[0].norm1
    dim = vit.embed_dim
    drop_paths = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    # Dropout rates only matter in training; mapped onto the zoo's nearest options, with a
    # warning where those differ (the zoo drops embeddings and residual branches at one rate).
    inner = getattr(getattr(mlp, "drop1", None), "p", 0.0)
    if inner:
        warn_not_reproduced("timm ViT", f"the MLP's dropout after its activation (p={inner})")
    pos_drop = getattr(getattr(vit, "pos_drop", None), "p", 0.0)
    if pos_drop != attn.proj_drop.p:
        warn_not_reproduced("timm ViT", f"pos_drop_rate={pos_drop} (the zoo model drops the embeddings at "
                                        f"proj_drop_rate={attn.proj_drop.p})")
    backbone = TransformerConfig(
        dim=dim, depth=len(vit.blocks), heads=attn.num_heads,
        head_dim=None if attn.head_dim * attn.num_heads == dim else attn.head_dim,
        mlp="gelu" if _gelu_approximation(mlp.act) == "none" else "gelu_tanh", mlp_hidden=mlp.fc1.out_features,
        norm="layernorm", norm_eps=norm.eps, norm_bias=norm.bias is not None, prenorm=True,
        final_norm=not (isinstance(vit.norm, nn.Identity) and isinstance(vit.fc_norm, nn.Identity)),
        input_norm=not isinstance(vit.norm_pre, nn.Identity), positions="none",
        qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None, mlp_bias=mlp.fc1.bias is not None,
        dropout=attn.proj_drop.p, attn_dropout=attn.attn_drop.p, drop_path=max(drop_paths),
        layer_scale=float(block.ls1.gamma.detach().flatten()[0]) if hasattr(block.ls1, "gamma") else None,
    )
    fields = dict(
        img_size=tuple(vit.patch_embed.img_size), patch_size=tuple(vit.patch_embed.patch_size),
        in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes if isinstance(vit.head, nn.Linear) else 0,
        global_pool=vit.global_pool, class_token=vit.cls_token is not None, reg_tokens=vit.num_reg_tokens,
        no_embed_class=vit.no_embed_class, fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        patch_bias=vit.patch_embed.proj.bias is not None, head_dropout=vit.head_drop.p,
    )
    return backbone, fields


def _config_from_state_dict(state: dict[str, Tensor], overrides: dict) -> tuple[TransformerConfig, dict]:
    """Backbone config and ViT fields from tensor shapes; what shapes cannot tell comes from overrides.

    heads (or num_heads) is required. norm_eps defaults to timm's 1e-6 and mlp to exact GELU
    (mlp="gelu_tanh" for timm's act_layer="gelu_tanh"); the grid is taken as square unless
    img_size is given (a ValueError when the table reads as a square grid both with and
    without the prefix tokens: pass img_size= or no_embed_class=); global_pool is "avg"
    when there is an fc_norm, else "token" with a class token (as timm pairs them; pass
    global_pool= for the other pairings).
    """
    heads = overrides.pop("num_heads", None) or overrides.pop("heads", None)
    if heads is None:
        raise ValueError("convert(state_dict) needs heads= (the head count cannot be read from tensor shapes)")
    if "patch_embed.proj.weight" not in state:
        raise ValueError("state dict has no 'patch_embed.proj.weight': not a timm VisionTransformer")
    dim, in_chans, ph, pw = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "pos_embed" not in state:
        raise ValueError("state dict has no 'pos_embed': a timm ViT without an absolute position table (rotary, "
                         "relative-position or BEiT-style) is not supported by the zoo ViT")
    class_token = "cls_token" in state
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int(class_token) + reg_tokens
    table = state["pos_embed"].shape[1]
    img_size = overrides.pop("img_size", None)
    no_embed_class = overrides.pop("no_embed_class", None)
    if img_size is None:
        # The table holds the patches (+ prefix tokens unless no_embed_class); take the grid as square.
        candidates = [(table - prefix, False), (table, True)] if no_embed_class is None else \
            [(table - (0 if no_embed_class else prefix), no_embed_class)]
        square = [(n, flag) for n, flag in candidates[:1 if prefix == 0 else None]
                  if n > 0 and math.isqrt(n) ** 2 == n]
        if not square:
            raise ValueError(f"pos_embed of {table} rows is not a square grid (+ {prefix} prefix tokens); "
                             f"pass img_size=")
        if len(square) > 1:
            raise ValueError(f"pos_embed of {table} rows reads as a square grid both with its {prefix} prefix "
                             f"tokens ({square[0][0]} patches) and without them ({square[1][0]} patches): pass "
                             f"img_size= or no_embed_class=")
        side = math.isqrt(square[0][0])
        img_size, no_embed_class = (side * ph, side * pw), square[0][1]
    else:
        grid = ViTConfig(img_size=img_size, patch_size=(ph, pw), class_token=class_token,
                         global_pool="token" if class_token else "avg").grid_size
        patches = grid[0] * grid[1]
        if table not in (patches, patches + prefix):
            raise ValueError(f"pos_embed holds {table} rows, not the {patches} patches (+ {prefix} prefix tokens) of "
                             f"img_size={img_size}: import at the table's own size (leave img_size out) and call "
                             f"model.set_image_size(...), which resamples the table as timm does on load")
        if no_embed_class is None:
            no_embed_class = table == patches and prefix > 0
    has_fc_norm = "fc_norm.weight" in state
    global_pool = overrides.pop("global_pool", "avg" if has_fc_norm or not class_token else "token")
    backbone = TransformerConfig(
        dim=dim, depth=depth, heads=heads, mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0], norm="layernorm",
        norm_eps=1e-6, norm_bias="blocks.0.norm1.bias" in state, prenorm=True, positions="none",
        final_norm="norm.weight" in state or has_fc_norm, input_norm="norm_pre.weight" in state,
        qkv_bias="blocks.0.attn.qkv.bias" in state, proj_bias="blocks.0.attn.proj.bias" in state,
        mlp_bias="blocks.0.mlp.fc1.bias" in state,
        layer_scale=float(state["blocks.0.ls1.gamma"].flatten()[0]) if "blocks.0.ls1.gamma" in state else None,
    )
    fields = dict(
        img_size=img_size, patch_size=(ph, pw), in_chans=in_chans,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0, global_pool=global_pool,
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class, fc_norm=has_fc_norm,
        patch_bias="patch_embed.proj.bias" in state,
    )
    return backbone, fields


def convert(source: Any, **overrides) -> VisionTransformer:
    """A zoo VisionTransformer computing what timm VisionTransformer `source` computes.

    source: a timm VisionTransformer (its architecture is read from the module), or its
    state dict (architecture from the tensor shapes; pass heads= and, where timm's
    defaults were changed, norm_eps=, mlp=, img_size=, global_pool=). overrides are applied to
    the zoo config afterwards (e.g. attn_backend="sdpa"). The result is in eval mode if
    the source module was. Raises ValueError for a timm variant the zoo ViT does not
    support (naming the attribute) and when a tensor would be dropped or left unset.
    """
    overrides = dict(overrides)
    source = unwrap_compiled(source)
    if isinstance(source, nn.Module):
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        if not isinstance(source, TimmViT):
            raise ValueError(f"{type(source).__name__} is not a timm VisionTransformer "
                             f"(timm.models.vision_transformer.VisionTransformer), the one class the zoo ViT imports")
        backbone, fields = _config_from_module(source)
        state, training = source.state_dict(), source.training
    elif isinstance(source, dict):
        backbone, fields = _config_from_state_dict(source, overrides)
        state, training = source, False
    else:
        raise TypeError(f"convert takes a timm VisionTransformer or its state dict, got {type(source).__name__}")
    model = VisionTransformer(build_config(ViTConfig, backbone, overrides, **fields))
    load_exactly(model, {rename_key(k): v for k, v in state.items()}, "timm VisionTransformer")
    return like_source(model.train(training), source)
