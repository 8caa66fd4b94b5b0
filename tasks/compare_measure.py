"""What `zoo compare` measures on one model: its input, FLOPs, step times, memory, MFU.

A Workload is one batch of inputs built from the model's config; the same tensors go to
our model and to its reference (tasks.compare_reference). FLOPs per sample come twice:
from an analytic formula over the config (matmul FLOPs, 2 per multiply-add) and from
torch.utils.flop_counter on one sample; the two are independent and should agree.
Times are medians over training or inference steps after warm-up steps.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from triton.errors import TritonError

import kernels
from zoo.config import TransformerConfig
from zoo.seq2seq import Seq2SeqTransformer
from zoo.speech import SpeechClassifier, SpeechCTC, SpeechEncoder
from zoo.text import GPT, BertModel
from zoo.vision import VisionTransformer, to_pair

# Dense bf16 peak (no sparsity) by whole words of torch.cuda.get_device_name(), most
# specific first; from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("L4", 121.0),
)
MASK_FRACTION = 0.15  # BERT's masked-LM rate: positions that carry a label


@dataclass
class Workload:
    """One batch of inputs for a model, and what a sample of it counts as."""

    kind: str  # vision | bert | gpt | seq2seq | speech
    batch: int
    inputs: dict[str, Tensor]  # on the run's device; the same tensors go to the reference
    tokens: int  # positions per sample the transformer sees (both stacks for seq2seq)
    description: str  # e.g. "16 x 1024 tokens"
    audio_seconds: Optional[float] = None  # seconds of audio per sample (speech)
    extra: dict[str, Any] = field(default_factory=dict)  # sizes the FLOP formula needs

    def sample(self, device: str = "cpu") -> dict[str, Tensor]:
        """The first sample of every input, on `device`."""
        return {k: v[:1].to(device) for k, v in self.inputs.items()}


def model_kind(model: nn.Module) -> str:
    """The domain of a zoo model; TypeError for a model compare does not know."""
    for cls, kind in ((VisionTransformer, "vision"), (BertModel, "bert"), (GPT, "gpt"),
                      (Seq2SeqTransformer, "seq2seq"), (SpeechEncoder, "speech")):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"zoo compare does not know how to feed a {type(model).__name__}")


def _need_length(what: str, length: int, limit: int) -> None:
    if length < 1 or length > limit:
        raise ValueError(f"{what} must be in [1, {limit}], got {length}")


def make_workload(model: nn.Module, batch: int, seq_len: Optional[int], device: str, seed: int = 0) -> Workload:
    """Random inputs for `batch` samples of `model`, built on `device` from a fixed seed.

    seq_len: tokens per sample for text (each side for seq2seq), mel frames for speech
    (100 per second at the usual 10 ms hop); None takes the preset's full length (text:
    max_seq_len, at most 128 per side for seq2seq; speech: its position table, i.e. 30 s
    for Whisper sizes). Vision models take their img_size and ignore seq_len.
    Raises ValueError for a length the model cannot take.
    """
    if batch < 1:
        raise ValueError(f"batch size must be positive, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    kind, cfg = model_kind(model), model.cfg

    def ids(high: int, length: int, low: int = 0) -> Tensor:
        return torch.randint(low, high, (batch, length), generator=gen).to(device)

    if kind == "vision":
        h, w = to_pair(cfg.img_size, "img_size")
        images = torch.randn(batch, cfg.in_chans, h, w, generator=gen).to(device)
        labels = torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=gen).to(device)
        grid = cfg.grid_size
        return Workload(kind, batch, {"images": images, "labels": labels}, cfg.num_prefix_tokens + grid[0] * grid[1],
                        f"{batch} x {cfg.in_chans}x{h}x{w} images", extra={"patches": grid[0] * grid[1]})
    if kind in ("bert", "gpt"):
        bb = cfg.backbone
        S = seq_len or bb.max_seq_len
        if bb.positions in ("learned", "sinusoidal"):
            _need_length("seq_len", S, bb.max_seq_len)
        inputs = {"input_ids": ids(cfg.vocab_size, S, low=1)}
        if kind == "bert":
            masked = torch.rand(batch, S, generator=gen) < MASK_FRACTION
            masked[:, 0] = True  # at least one label per row: a loss over no token would be NaN
            targets = torch.randint(1, cfg.vocab_size, (batch, S), generator=gen)
            inputs["labels"] = torch.where(masked, targets, torch.full_like(targets, -100)).to(device)
        return Workload(kind, batch, inputs, S, f"{batch} x {S} tokens")
    if kind == "seq2seq":
        S = seq_len or min(128, cfg.encoder.max_seq_len, cfg.decoder.max_seq_len)
        _need_length("seq_len", S, min(cfg.encoder.max_seq_len, cfg.decoder.max_seq_len))
        # Ids from 3 up: no pad / bos / eos, so every position is a real token.
        inputs = {"src_ids": ids(cfg.src_vocab_size, S, low=3), "tgt_ids": ids(cfg.tgt_vocab_size, S, low=3),
                  "labels": ids(cfg.tgt_vocab_size, S, low=3)}
        return Workload(kind, batch, inputs, 2 * S, f"{batch} x ({S} + {S}) tokens")
    # speech
    bb = cfg.backbone
    frames = seq_len or 2 * bb.max_seq_len
    _need_length("seq_len (mel frames)", frames, 2 * bb.max_seq_len)
    seconds = frames * cfg.hop_length / cfg.sample_rate
    states = (frames - 1) // 2 + 1  # after the stride-2 convolution
    if type(model) is SpeechEncoder:
        # A bare encoder takes log-mels, as Whisper's encoder does: the reference gets the same tensor.
        inputs = {"log_mels": torch.randn(batch, cfg.n_mels, frames, generator=gen).to(device)}
        what = f"{batch} x {seconds:g} s ({cfg.n_mels} x {frames} log-mels)"
    else:
        # Models with a head are fed waveforms, as their tasks do: the log-mel front end is part of the step.
        inputs = {"waveforms": (0.1 * torch.randn(batch, frames * cfg.hop_length, generator=gen)).to(device)}
        if isinstance(model, SpeechClassifier):
            inputs["labels"] = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
        what = f"{batch} x {seconds:g} s waveforms"
    return Workload(kind, batch, inputs, states, what, audio_seconds=seconds, extra={"frames": frames})


# --------------------------------------------------------------------------------------
# Our model's loss and forward on a workload
# --------------------------------------------------------------------------------------


def output_loss(out: Tensor) -> Tensor:
    """Mean of squares of an output: the loss of models without labels (an elementwise
    loss whose backward costs the same as any other's)."""
    return out.float().square().mean()


def ours_forward(model: nn.Module, w: Workload):
    """Our model's forward on the workload's inputs (no loss)."""
    x = w.inputs
    if w.kind == "vision":
        return model(x["images"])
    if w.kind in ("bert", "gpt"):
        return model(x["input_ids"])
    if w.kind == "seq2seq":
        return model(x["src_ids"], x["tgt_ids"])
    return model(x["log_mels"] if "log_mels" in x else x["waveforms"])


def ours_loss(model: nn.Module, w: Workload) -> Tensor:
    """Our model's training loss: its task's cross-entropy where it has labels, else output_loss."""
    x = w.inputs
    if w.kind == "vision":
        out = model(x["images"])
        return F.cross_entropy(out, x["labels"]) if model.cfg.num_classes else output_loss(out)
    if w.kind == "bert" and model.cfg.mlm_head:
        return model(x["input_ids"], labels=x["labels"])[1]
    if w.kind == "gpt":
        return model(x["input_ids"], labels=x["input_ids"])[1]
    if w.kind == "seq2seq":
        return model(x["src_ids"], x["tgt_ids"], labels=x["labels"])[1]
    if "labels" in x and w.kind == "speech":
        return F.cross_entropy(model(x["waveforms"]), x["labels"])
    return output_loss(ours_forward(model, w))


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def block_flops(cfg: TransformerConfig, S: int, memory: int = 0) -> int:
    """Matmul FLOPs of one backbone block over S positions (cross-attending to `memory` positions).

    Projections 2 * S * in * out each; attention 4 * S * Sk * heads * head_dim (scores and
    the weighted sum, in full even when causal, as computed by the eager path); the MLP's
    fc1 is twice as wide for gated units.
    """
    D, H, Hk, hd, W = cfg.dim, cfg.heads, cfg.num_kv_heads, cfg.head_size, cfg.mlp_width
    flops = 2 * S * D * (H + 2 * Hk) * hd + 4 * S * S * H * hd + 2 * S * H * hd * D
    if cfg.cross_attention:
        flops += 2 * S * D * H * hd + 2 * memory * D * 2 * Hk * hd + 4 * S * memory * H * hd + 2 * S * H * hd * D
    gated = cfg.mlp in ("swiglu", "geglu")
    return flops + 2 * S * D * W * (2 if gated else 1) + 2 * S * W * D


def stack_flops(cfg: TransformerConfig, S: int, memory: int = 0) -> int:
    """Matmul FLOPs of a backbone stack (depth blocks)."""
    return cfg.depth * block_flops(cfg, S, memory)


def analytic_forward_flops(model: nn.Module, w: Workload) -> int:
    """Forward FLOPs of one sample from the config: every matmul and convolution, 2 per
    multiply-add, biases, norms, softmax and activations not counted (as flop_counter)."""
    cfg = model.cfg
    if w.kind == "vision":
        bb, (ph, pw) = cfg.backbone, to_pair(cfg.patch_size, "patch_size")
        patch = 2 * w.extra["patches"] * bb.dim * cfg.in_chans * ph * pw
        return patch + stack_flops(bb, w.tokens) + 2 * bb.dim * cfg.num_classes
    if w.kind in ("bert", "gpt"):
        bb, S = cfg.backbone, w.tokens
        flops = stack_flops(bb, S)
        if w.kind == "gpt":
            return flops + 2 * S * bb.dim * cfg.vocab_size
        if cfg.mlm_head:
            flops += 2 * S * bb.dim * bb.dim + 2 * S * bb.dim * cfg.vocab_size
        if cfg.pooler or cfg.num_classes:
            flops += 2 * bb.dim * bb.dim
        return flops + 2 * bb.dim * cfg.num_classes
    if w.kind == "seq2seq":
        S = w.tokens // 2
        return (stack_flops(cfg.encoder, S) + stack_flops(cfg.decoder, S, memory=S)
                + 2 * S * cfg.decoder.dim * cfg.tgt_vocab_size)
    bb, frames, S = cfg.backbone, w.extra["frames"], w.tokens
    flops = 0
    if "waveforms" in w.inputs:  # mel filter bank over every STFT frame (one more than kept)
        flops += 2 * (frames + 1) * (cfg.n_fft // 2 + 1) * cfg.n_mels
    flops += 2 * frames * bb.dim * cfg.n_mels * 3 + 2 * S * bb.dim * bb.dim * 3  # the two k=3 convolutions
    flops += stack_flops(bb, S)
    if isinstance(model, SpeechClassifier):
        flops += 2 * bb.dim * cfg.num_classes
    elif isinstance(model, SpeechCTC):
        flops += 2 * S * bb.dim * cfg.vocab_size
    return flops


def counted_forward_flops(factory: Callable[..., nn.Module], w: Workload) -> int:
    """torch.utils.flop_counter's count of one sample's forward.

    The model is built by factory(attn_backend="eager") so that the attention matmuls are
    aten ops the counter sees, on the meta device (no memory, no time). Models fed
    waveforms run on the CPU for real: their log-mel front end (torchaudio's filter bank,
    a float32 autocast region) cannot run on meta.
    """
    device = "cpu" if "waveforms" in w.inputs else "meta"
    if w.kind == "speech":
        model = factory(attn_backend="eager").to(device)  # the filter bank is built on the CPU first
    else:
        with torch.device(device):
            model = factory(attn_backend="eager")
    model.eval()
    counting = Workload(w.kind, 1, w.sample(device), w.tokens, w.description, w.audio_seconds, w.extra)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), kernels.reference_only():
        ours_forward(model, counting)
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_step_ms(step: Callable[[], Any], device: str, steps: int, warmup: int) -> float:
    """Median wall-clock milliseconds of step() over `steps` calls, after `warmup` calls.

    Each call is timed alone between two device synchronizations. Unlike triton's
    do_bench (bench_attention's timer), nothing runs between steps (no L2 flush): a
    training loop does not flush either, and steps are counted, not a time budget.
    On CUDA the peak-memory counter restarts after the warm-up: the first calls autotune,
    and the autotuner's scratch buffers (256 MiB for triton's do_bench) are not the step's.
    """
    for _ in range(warmup):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _autocast(device: str):
    # bf16 autocast on a GPU, as the anchors' peers; fp32 on the CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def free_memory(device: str) -> None:
    """Collects garbage and, on a GPU, returns cached blocks, so the next model starts clean."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _peak_mib(device: str) -> Optional[float]:
    # On the CPU there is no allocator high-water mark to read; RSS would mix in every
    # other allocation of the process, so no number is reported rather than a wrong one.
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _guarded(measure: Callable[[], dict], device: str) -> dict:
    """measure(), or {"error": why} when it runs out of memory or fails: one failure
    (e.g. the eager backend at a long sequence, a kernel out of shared memory) does not end
    the comparison."""
    try:
        return measure()
    except (torch.OutOfMemoryError, RuntimeError, ValueError, TritonError) as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    # Freed only here: inside the except clause the traceback still holds the step's tensors.
    free_memory(device)
    return {"error": error}


def measure_training(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], device: str, steps: int,
                     warmup: int) -> dict:
    """Median ms of one training step (forward, loss, backward, AdamW step) and its peak memory.

    AdamW is torch's fused one on CUDA, its default (foreach) on CPU; every parameter that
    requires grad is trained. Returns {"step_ms", "peak_mib"} or {"error"}.
    """
    def measure():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")

        def step():
            with _autocast(device):
                loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        free_memory(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            ms = median_step_ms(step, device, steps, warmup)
            return {"step_ms": ms, "peak_mib": _peak_mib(device)}
        finally:
            optimizer.zero_grad(set_to_none=True)  # a failed step may leave gradients behind

    return _guarded(measure, device)


def measure_inference(model: nn.Module, forward_fn: Callable[[nn.Module], Any], device: str, steps: int,
                      warmup: int) -> dict:
    """Median ms of one no-grad forward in eval mode, and its peak memory; {"error"} on failure."""
    def measure():
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device):
                forward_fn(model)

        free_memory(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return {"step_ms": median_step_ms(step, device, steps, warmup), "peak_mib": _peak_mib(device)}

    return _guarded(measure, device)


def rates(entry: dict, w: Workload) -> dict:
    """Samples/s, tokens/s and (speech) audio-seconds/s of a timed entry, added to a copy of it."""
    if "step_ms" not in entry:
        return dict(entry)
    per_s = w.batch / (entry["step_ms"] / 1e3)
    out = {**entry, "samples_per_s": per_s, "tokens_per_s": per_s * w.tokens}
    if w.audio_seconds is not None:
        out["audio_s_per_s"] = per_s * w.audio_seconds
    return out


def trainable_parameters(model: nn.Module) -> int:
    """Parameters that require grad, each shared tensor once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------


def peak_tflops(device_name: str) -> tuple[Optional[float], str]:
    """(dense bf16 peak TFLOP/s, where it came from) for a CUDA device name, (None, why) if unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        # A whole word of the name: "L4" is not in "NVIDIA L40", nor "A100" in "NVIDIA RTX A1000".
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return value, f"{value:g} TFLOP/s dense bf16 ({key} data sheet, matched in {device_name!r})"
    return None, f"no dense bf16 peak known for {device_name!r}: MFU not reported (pass --peak-tflops)"


def device_description(device: str) -> str:
    """The GPU's name, or the CPU's model, cores, torch threads and load average."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ""
    with contextlib.suppress(OSError):
        load = f", load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at start"
    return f"CPU ({model}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}{load})"
