"""The presets table of docs/models.md: parameters and forward FLOPs per sample.

    python -m tasks.model_table            # prints the Markdown table

Models are built on the meta device (no memory, no time); FLOPs are counted by
torch.utils.flop_counter on one sample of each preset's default input, with the "eager"
attention backend so the attention matmuls are visible to the counter (counted in full,
also when causal: 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import kernels
import zoo

# The input each preset is described at: (what, builder of one sample on `device`).
SECONDS = 16000  # samples per second of audio


def default_input(name: str, model) -> tuple[str, tuple]:
    """A description and the positional inputs of one sample at the preset's default size."""
    cfg = model.cfg
    if name.startswith("vit"):
        size = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
        return f"{cfg.in_chans}x{size}x{size} image", (torch.randn(1, cfg.in_chans, size, size),)
    if name.startswith("whisper"):
        return "30 s audio", (torch.randn(1, 30 * SECONDS),)
    if name.startswith("speech"):
        return "1 s audio", (torch.randn(1, SECONDS),)
    if name.startswith(("seq2seq", "transformer_base")):
        n = min(128, cfg.encoder.max_seq_len)
        return f"{n} + {n} tokens", (torch.randint(3, cfg.src_vocab_size, (1, n)),
                                     torch.randint(3, cfg.tgt_vocab_size, (1, n)))
    n = cfg.backbone.max_seq_len
    return f"{n} tokens", (torch.randint(0, cfg.vocab_size, (1, n)),)


def describe(name: str) -> dict:
    """Parameters, default input and forward FLOPs of one preset."""
    # torchaudio's mel filter bank cannot be built on the meta device: speech models are
    # small enough to count on the CPU for real.
    device = "cpu" if name.startswith(("speech", "whisper")) else "meta"
    with torch.device(device):
        model = zoo.create_model(name, attn_backend="eager").eval()
    params = sum(p.numel() for p in model.parameters())
    what, inputs = default_input(name, model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), kernels.reference_only():
        model(*(x.to(device) for x in inputs))
    return {"name": name, "params": params, "input": what, "gflops": counter.get_total_flops() / 1e9}


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | parameters | default input | forward GFLOPs / sample |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['params'] / 1e6:,.2f} M | {r['input']} | {r['gflops']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    names = (argv if argv else None) or zoo.list_models()
    print(markdown([describe(n) for n in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
