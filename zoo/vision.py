"""Vision Transformer (Dosovitskiy et al. 2020) on the shared backbone, with timm's API.

An image (B, C, H, W) is cut into patches by a strided convolution, optional class and
register tokens are put in front, a learned position table over the patch grid is added
(the backbone itself runs with positions="none"), and the backbone's final norm, a pooling
and a linear head follow. Parameter names and layout follow timm's VisionTransformer, so
its checkpoints map one tensor to one tensor (zoo.weights.timm_vit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Transformer
from .config import TransformerConfig, check_bool_fields, is_finite_number, is_int
from .layers import make_norm
from .registry import build_config, register_model

Size = Union[int, tuple[int, int]]
POOL_TYPES = ("token", "avg")


def to_pair(value: Size, name: str) -> tuple[int, int]:
    """(height, width) from an int (square) or a pair of positive ints; ValueError otherwise."""
    try:
        pair = (value, value) if isinstance(value, int) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(is_int(v) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _vit_backbone() -> TransformerConfig:
    return TransformerConfig(dim=768, depth=12, heads=12, norm_eps=1e-6, positions="none")


@dataclass
class ViTConfig:
    """A Vision Transformer: image and patch geometry, tokens, pooling, head, and its backbone."""

    img_size: Size = 224  # input height and width (an int: square); other sizes resample the positions
    patch_size: Size = 16  # patch height and width
    in_chans: int = 3  # input image channels
    num_classes: int = 1000  # classes of the linear head (0: no head, forward returns pooled features)
    global_pool: str = "token"  # "token": the class token's state; "avg": mean of the patch tokens
    class_token: bool = True  # a learned class token in front of the patches
    reg_tokens: int = 0  # learned register tokens after the class token (Darcet et al. 2023)
    no_embed_class: bool = False  # position table covers the patches only (DeiT-3, register ViTs)
    fc_norm: Optional[bool] = None  # final norm after pooling instead of before (None: only for avg pool, as timm)
    patch_bias: bool = True  # bias in the patch projection (timm drops it when the backbone has input_norm)
    head_dropout: float = 0.0  # dropout on the pooled features before the head
    pos_init_std: float = 0.02  # std of the position table's init (timm: 0.02)
    pos_antialias: bool = True  # resample the table for other sizes as timm (antialiased bicubic); False: as HF
    backbone: TransformerConfig = field(default_factory=_vit_backbone)  # the blocks; positions must be "none"

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ValueError(f"ViTConfig: {message}")

        check_bool_fields(self)
        image, patch = to_pair(self.img_size, "img_size"), to_pair(self.patch_size, "patch_size")
        need(image[0] % patch[0] == 0 and image[1] % patch[1] == 0,
             f"img_size {self.img_size!r} must be divisible by patch_size {self.patch_size!r}")
        need(is_int(self.in_chans) and self.in_chans > 0,
             f"in_chans must be a positive int, got {self.in_chans!r}")
        need(is_int(self.num_classes) and self.num_classes >= 0,
             f"num_classes must be an int >= 0, got {self.num_classes!r}")
        need(self.global_pool in POOL_TYPES,
             f"global_pool must be one of {', '.join(POOL_TYPES)}; got {self.global_pool!r}")
        need(self.class_token or self.global_pool != "token", "global_pool='token' needs class_token=True")
        need(is_int(self.reg_tokens) and self.reg_tokens >= 0,
             f"reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        need(is_finite_number(self.head_dropout) and 0.0 <= self.head_dropout < 1.0,
             f"head_dropout must be in [0, 1), got {self.head_dropout!r}")
        need(is_finite_number(self.pos_init_std) and self.pos_init_std >= 0,
             f"pos_init_std must be a finite number >= 0, got {self.pos_init_std!r}")
        if not isinstance(self.backbone, TransformerConfig):
            raise TypeError(f"ViTConfig: backbone must be a TransformerConfig, got {type(self.backbone).__name__}")
        # The ViT's own table knows the 2-D grid; a 1-D table (or rotary over the flat index) on top would not.
        need(self.backbone.positions == "none",
             f"backbone positions must be 'none' (the ViT adds its own 2-D position table), got "
             f"{self.backbone.positions!r}")
        need(not self.backbone.cross_attention, "backbone cross_attention is not supported (a ViT has no memory)")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width at img_size."""
        (h, w), (ph, pw) = to_pair(self.img_size, "img_size"), to_pair(self.patch_size, "patch_size")
        return h // ph, w // pw

    @property
    def num_prefix_tokens(self) -> int:
        """Class plus register tokens in front of the patches."""
        return int(self.class_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        """Whether the final norm comes after pooling (timm's fc_norm) rather than on every token."""
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int = 0, antialias: bool = True) -> Tensor:
    """A (1, P + old_h * old_w, D) position table resampled to (1, P + new_h * new_w, D).

    The patch part is treated as a D-channel image and resized bicubically in float32;
    the first num_prefix_tokens rows (class and register tokens) are kept as they are.
    antialias=True is timm's resampling (torch's antialiased bicubic, whose cubic kernel
    differs from the plain one even when enlarging); False is Hugging Face ViT's
    interpolate_pos_encoding. Raises ValueError if the table's length does not match old_grid.
    """
    P, (oh, ow), (nh, nw) = num_prefix_tokens, old_grid, new_grid
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != P + oh * ow:
        raise ValueError(f"pos_embed must have shape (1, {P} + {oh} * {ow}, D) for a {oh}x{ow} grid, "
                         f"got {tuple(pos_embed.shape)}")
    if (nh, nw) == (oh, ow):
        return pos_embed
    prefix, grid = pos_embed[:, :P], pos_embed[:, P:]
    D = grid.shape[-1]
    image = grid.float().reshape(1, oh, ow, D).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    grid = image.permute(0, 2, 3, 1).reshape(1, nh * nw, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class VisionTransformer(nn.Module):
    """ViT classifier: (B, in_chans, H, W) images -> (B, num_classes) logits.

    H and W may differ from cfg.img_size (multiples of the patch size): the position table
    is then resampled bicubically on the fly, as timm's dynamic_img_size does (or as Hugging
    Face's interpolate_pos_encoding, with cfg.pos_antialias=False).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if not isinstance(cfg, ViTConfig):
            raise TypeError(f"VisionTransformer takes a ViTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        bb = cfg.backbone
        self.patch_size, self.grid_size = to_pair(cfg.patch_size, "patch_size"), cfg.grid_size
        self.num_prefix_tokens, self.num_features, self.num_classes = cfg.num_prefix_tokens, bb.dim, cfg.num_classes
        self.patch_embed = nn.Conv2d(cfg.in_chans, bb.dim, self.patch_size, stride=self.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, bb.dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, bb.dim)) if cfg.reg_tokens else None
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self._table_prefix, bb.dim))
        # timm's fc_norm layout: the backbone's final norm moves from every token to the pooled vector.
        self.backbone = Transformer(bb.replace(final_norm=False) if cfg.use_fc_norm else bb)
        self.fc_norm = make_norm(bb) if cfg.use_fc_norm and bb.final_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(bb.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self._init_weights()

    @property
    def _table_prefix(self) -> int:
        """Rows of the position table that belong to prefix tokens."""
        return 0 if self.cfg.no_embed_class else self.num_prefix_tokens

    def _init_weights(self) -> None:
        # timm's scheme: truncated-normal positions and head, tiny prefix tokens; the conv keeps torch's init.
        if self.cfg.pos_init_std > 0:
            nn.init.trunc_normal_(self.pos_embed, std=self.cfg.pos_init_std)
        else:  # std 0: positions start at zero (trunc_normal_ would divide by the std)
            nn.init.zeros_(self.pos_embed)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_attn_backend(self, backend: str) -> None:
        """Switches every attention layer to "triton", "sdpa" or "eager" (ValueError for others)."""
        self.backbone.set_attn_backend(backend)
        self.cfg = dataclasses.replace(self.cfg, backbone=self.cfg.backbone.replace(attn_backend=backend))

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head with a fresh one for num_classes classes (0: no head)."""
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)  # validates
        self.num_classes = num_classes
        device, dtype = self.pos_embed.device, self.pos_embed.dtype
        self.head = nn.Identity()
        if num_classes:
            self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _grid_of(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if height % ph or width % pw or height < ph or width < pw:
            raise ValueError(f"image size ({height}, {width}) must be divisible by the patch size ({ph}, {pw}) "
                             f"and hold at least one patch")
        return height // ph, width // pw

    def set_image_size(self, img_size: Size) -> None:
        """Resamples the position table for img_size once (then that size runs without resampling).

        Raises ValueError if img_size is not a multiple of the patch size.
        """
        grid = self._grid_of(*to_pair(img_size, "img_size"))
        table = resample_pos_embed(self.pos_embed.detach(), grid, self.grid_size, self._table_prefix,
                                   self.cfg.pos_antialias)
        self.pos_embed = nn.Parameter(table.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.grid_size = grid
        self.cfg = dataclasses.replace(self.cfg, img_size=img_size)

    def _embed(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got "
                            f"{getattr(images, 'dtype', type(images).__name__)}")
        if images.dim() != 4 or images.shape[1] != self.cfg.in_chans:
            raise ValueError(f"images must have shape (B, {self.cfg.in_chans}, H, W), got {tuple(images.shape)}")
        grid = self._grid_of(images.shape[2], images.shape[3])
        # Images of another float dtype take the model's, as Hugging Face's ViT embeddings do
        # (float32 pixels into a bfloat16 model) rather than failing inside the convolution.
        images = images.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, dim), patches in row-major order
        pos = resample_pos_embed(self.pos_embed, grid, self.grid_size, self._table_prefix, self.cfg.pos_antialias)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.cfg.no_embed_class:
            return torch.cat(prefix + [x + pos], dim=1)
        return torch.cat(prefix + [x], dim=1) + pos

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> token states (B, num_prefix_tokens + N, dim).

        The final norm is applied here unless the config moves it after pooling (fc_norm).
        Images of another float dtype are cast to the model's (as Hugging Face's ViT does).
        Raises TypeError for non-float images and ValueError for a wrong channel count or
        H, W that are not positive multiples of the patch size.
        """
        return self.backbone(self._embed(images))

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Token states (B, T, dim) -> logits (B, num_classes), or pooled (B, dim) with pre_logits.

        Raises ValueError for features of another shape or width, or without the tokens the
        pooling reads (the class token; for "avg", at least one patch token: the mean of none
        would be NaN)."""
        dim, prefix = self.cfg.backbone.dim, self.num_prefix_tokens
        if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[-1] != dim:
            raise ValueError(f"features must have shape (B, tokens, {dim}) (forward_features' output), got "
                             f"{tuple(getattr(features, 'shape', ())) or type(features).__name__}")
        needed = prefix + 1 if self.cfg.global_pool != "token" else 1
        if features.shape[1] < needed:
            raise ValueError(f"features hold {features.shape[1]} tokens; global_pool={self.cfg.global_pool!r} needs "
                             f"at least {needed} ({prefix} prefix tokens, then the patches)")
        if self.cfg.global_pool == "token":
            x = features[:, 0]
        else:
            x = features[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> logits (B, num_classes) (pooled features if num_classes == 0)."""
        return self.forward_head(self.forward_features(images))


def _vit(backbone: TransformerConfig, overrides: dict, **preset) -> VisionTransformer:
    return VisionTransformer(build_config(ViTConfig, backbone, overrides, **preset))


def _imagenet_backbone(dim: int, heads: int) -> TransformerConfig:
    # The original ViT recipe: 12 pre-norm blocks, exact GELU, qkv bias, LayerNorm eps 1e-6.
    return TransformerConfig(dim=dim, depth=12, heads=heads, mlp="gelu", mlp_ratio=4.0, norm="layernorm",
                             norm_eps=1e-6, prenorm=True, positions="none", qkv_bias=True)


@register_model
def vit_tiny_patch16_224(**overrides) -> VisionTransformer:
    """ViT-Ti/16 at 224x224 (DeiT-Tiny widths): 192 wide, 12 blocks, 3 heads, 1000 classes."""
    return _vit(_imagenet_backbone(192, 3), overrides, img_size=224, patch_size=16)


@register_model
def vit_small_patch16_224(**overrides) -> VisionTransformer:
    """ViT-S/16 at 224x224: 384 wide, 12 blocks, 6 heads, 1000 classes."""
    return _vit(_imagenet_backbone(384, 6), overrides, img_size=224, patch_size=16)


@register_model
def vit_base_patch16_224(**overrides) -> VisionTransformer:
    """ViT-B/16 at 224x224: 768 wide, 12 blocks, 12 heads, 1000 classes (86,567,656 parameters)."""
    return _vit(_imagenet_backbone(768, 12), overrides, img_size=224, patch_size=16)


@register_model
def vit_digits(**overrides) -> VisionTransformer:
    """A small ViT for scikit-learn's 8x8 grey digits: 2x2 patches (16 tokens), 64 wide, 4 blocks, 10 classes.

    Average pooling (with its norm after the pool) trains faster than a class token on so few images.
    Positions start at std 0.5, not timm's 0.02: with 0.02 an average-pooled model begins as a
    bag of patches and took ~30 epochs longer to reach the same accuracy (1,257 images).
    Stochastic depth 0.1: 50 epochs reached 98.5-99.3% validation accuracy over seeds 0-2,
    against 97.4-99.3% without it (2026-11-24); seed 0 at 7c4f916, whose masks are drawn in
    another order, 97.8% (best 98.5%): a few of the 270 images either way (docs/training.md).
    """
    backbone = TransformerConfig(dim=64, depth=4, heads=4, mlp="gelu", mlp_ratio=2.0, norm_eps=1e-6,
                                 positions="none", drop_path=0.1)
    return _vit(backbone, overrides, img_size=8, patch_size=2, in_chans=1, num_classes=10, global_pool="avg",
                class_token=False, pos_init_std=0.5)


@register_model
def vit_cifar(**overrides) -> VisionTransformer:
    """A ViT for 32x32 CIFAR-10 images: 4x4 patches (64 tokens), ViT-S width (384, 6 heads), 6 blocks, 10 classes.

    Stochastic depth 0.1, since it trains from scratch on 50k images.
    """
    backbone = TransformerConfig(dim=384, depth=6, heads=6, mlp="gelu", mlp_ratio=4.0, norm_eps=1e-6,
                                 positions="none", drop_path=0.1)
    return _vit(backbone, overrides, img_size=32, patch_size=4, num_classes=10)
