"""Figures of attention maps, one kind per domain (matplotlib, no display needed).

    token_heatmaps(probs, tokens)              text: token x token, per head and averaged
    vision_attention(image, maps, grid, ...)   vision: rollout over the image, class-token attention per head
    alignment(probs, source, target)           encoder-decoder: cross-attention between target and source
    speech_attention(log_mel, probs)           speech: self-attention over frames under the log-mel spectrogram

Each takes the maps of one sample (zoo.attention_maps(...)[name][i]: (H, Sq, Sk)) and
returns a matplotlib Figure; the caller saves it (`zoo attention-map`) or logs it
(tasks.callbacks.AttentionMapLogger).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

import zoo  # noqa: E402

MAX_LABELS = 64  # beyond this many tokens, tick labels are unreadable: axes show positions instead


def _check(probs: Tensor, what: str) -> Tensor:
    if probs.dim() != 3:
        raise ValueError(f"{what} must be one sample's maps (heads, Sq, Sk), got shape {tuple(probs.shape)}")
    return probs.detach().float().cpu()


def _label_axes(ax, rows: Optional[Sequence[str]], cols: Optional[Sequence[str]]) -> None:
    if cols is not None and len(cols) <= MAX_LABELS:
        ax.set_xticks(range(len(cols)), [repr(c)[1:-1] for c in cols], rotation=90, fontsize=7)
    if rows is not None and len(rows) <= MAX_LABELS:
        ax.set_yticks(range(len(rows)), [repr(r)[1:-1] for r in rows], fontsize=7)


def _grid(panels: int, size: float) -> tuple[Figure, list]:
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.axis("off")
    return fig, axes[:panels]


def token_heatmaps(probs: Tensor, query_tokens: Optional[Sequence[str]] = None,
                   key_tokens: Optional[Sequence[str]] = None, title: str = "",
                   max_heads: Optional[int] = None) -> Figure:
    """Heatmaps (query rows x key columns) of the head average, then of each head (the first
    max_heads of them; None: all)."""
    probs = _check(probs, "probs")
    key_tokens = query_tokens if key_tokens is None else key_tokens
    heads = probs.shape[0]
    shown = heads if max_heads is None else min(heads, max_heads)
    panels = [("mean over heads", probs.mean(0))] + [(f"head {h}", probs[h]) for h in range(shown)]
    side = 3.0 + 0.08 * min(probs.shape[-1], MAX_LABELS)
    fig, axes = _grid(len(panels), side)
    for ax, (name, values) in zip(axes, panels):
        ax.imshow(values.numpy(), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        _label_axes(ax, query_tokens, key_tokens)
    fig.suptitle(title or "attention (rows: queries, columns: keys)")
    fig.tight_layout()
    return fig


def _show_image(ax, image: Tensor) -> None:
    image = image.detach().float().cpu()
    lo, hi = image.amin(dim=(1, 2), keepdim=True), image.amax(dim=(1, 2), keepdim=True)
    image = ((image - lo) / (hi - lo).clamp_min(1e-8)).permute(1, 2, 0)  # per-channel min-max for display
    ax.imshow(image.squeeze(-1).numpy() if image.shape[-1] == 1 else image.numpy(),
              cmap="gray" if image.shape[-1] == 1 else None, extent=(0, 1, 1, 0))
    ax.axis("off")


def _overlay(ax, image: Tensor, heat: Tensor, title: str) -> None:
    _show_image(ax, image)
    ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, extent=(0, 1, 1, 0), interpolation="nearest")
    ax.set_title(title, fontsize=9)


def vision_attention(image: Tensor, maps: Sequence[Tensor], grid: tuple[int, int], num_prefix_tokens: int,
                     class_token: bool = True, title: str = "", max_heads: Optional[int] = None) -> Figure:
    """The image, the class token's attention rollout over its patches (through the layers
    given), and the class token's attention to the patches in the last layer given, per head.

    image (C, H, W); maps: every self-attention layer of one sample in order, each
    (heads, T, T) with T = num_prefix_tokens + grid[0] * grid[1] (class and register
    tokens first); class_token: whether token 0 is a class token (without one, the
    rollout is averaged over the patches, and the per-head panels show the attention each
    patch receives, averaged over the patch queries).
    """
    maps = [_check(m, "maps[i]") for m in maps]
    gh, gw = grid
    if maps[0].shape[-1] != num_prefix_tokens + gh * gw:
        raise ValueError(f"maps cover {maps[0].shape[-1]} tokens, expected {num_prefix_tokens} + {gh}x{gw}")
    rollout = zoo.attention_rollout([m[None] for m in maps])[0]
    source = rollout[0] if class_token else rollout[num_prefix_tokens:].mean(0)
    last = maps[-1]
    heads = last.shape[0] if max_heads is None else min(last.shape[0], max_heads)
    fig, axes = _grid(2 + heads, 3.0)
    _show_image(axes[0], image)
    axes[0].set_title("input", fontsize=9)
    _overlay(axes[1], image, source[num_prefix_tokens:].view(gh, gw), f"rollout, blocks 0-{len(maps) - 1}")
    for h in range(heads):
        if class_token:
            heat, what = last[h, 0, num_prefix_tokens:], "[CLS] attention"
        else:  # no class token: the attention each patch receives, averaged over the patch queries
            heat, what = last[h, num_prefix_tokens:, num_prefix_tokens:].mean(0), "received"
        _overlay(axes[2 + h], image, heat.view(gh, gw), f"block {len(maps) - 1}, head {h}: {what}")
    fig.suptitle(title or "where the class token looks")
    fig.tight_layout()
    return fig


def alignment(probs: Tensor, source_tokens: Sequence[str], target_tokens: Sequence[str], title: str = "") -> Figure:
    """Cross-attention of target tokens (rows) over source tokens (columns), averaged over heads."""
    probs = _check(probs, "probs")
    mean = probs.mean(0)
    fig, ax = plt.subplots(figsize=(2.5 + 0.22 * min(mean.shape[1], MAX_LABELS),
                                    2.0 + 0.22 * min(mean.shape[0], MAX_LABELS)))
    image = ax.imshow(mean.numpy(), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
    _label_axes(ax, target_tokens, source_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_title(title or "cross-attention alignment (mean over heads)", fontsize=10)
    fig.tight_layout()
    return fig


def speech_attention(log_mel: Tensor, probs: Tensor, title: str = "", frames_per_token: int = 2) -> Figure:
    """The log-mel spectrogram (n_mels, T) above the self-attention over frames (head average),
    on a shared time axis; frames_per_token is the front end's subsampling (2 for Whisper's).

    Token t covers frames [t * frames_per_token, (t + 1) * frames_per_token); for a frame count
    that is not a multiple, the last token's cell is cut at the spectrogram's end.
    """
    probs = _check(probs, "probs").mean(0)
    log_mel = log_mel.detach().float().cpu()
    frames = log_mel.shape[-1]
    tokens = -(-frames // frames_per_token)
    if probs.shape[-1] != tokens:
        raise ValueError(f"probs cover {probs.shape[-1]} tokens, but {frames} frames at {frames_per_token} frames "
                         f"per token make {tokens}")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 8), gridspec_kw={"height_ratios": [1, 3]}, sharex=True)
    top.imshow(log_mel.numpy(), origin="lower", aspect="auto", cmap="magma", extent=(0, frames, 0, log_mel.shape[0]))
    top.set_ylabel("mel bin")
    span = probs.shape[-1] * frames_per_token
    bottom.imshow(probs.numpy(), aspect="auto", cmap="viridis", vmin=0.0, extent=(0, span, span, 0),
                  interpolation="nearest")
    bottom.set_xlim(0, frames)  # the x axis is shared with the spectrogram
    bottom.set_ylim(frames, 0)
    bottom.set_xlabel("frame (key)")
    bottom.set_ylabel("frame (query)")
    fig.suptitle(title or "self-attention over frames (mean over heads)")
    fig.tight_layout()
    return fig


def save(figures: dict[str, Figure], out_dir: str) -> list[str]:
    """Writes each figure as out_dir/<name>.png (closing it); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = os.path.join(out_dir, f"{name.replace('/', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def layer_maps(maps: dict[str, Tensor], suffix: str = ".attn") -> list[Tensor]:
    """The self-attention maps of dict `maps` (module name -> (B, H, S, S)) in block order."""
    return [m for name, m in maps.items() if name.endswith(suffix)]
