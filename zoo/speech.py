"""Speech encoder: log-mel front end, Whisper's convolutional stem, the shared backbone, heads.

    model = zoo.create_model("speech_tiny")                 # keyword spotting, 12 classes by default
    logits = model(waveforms, lengths)                       # waveforms (B, T) at 16 kHz
    encoder = zoo.create_model("whisper_tiny_encoder")       # Whisper tiny's encoder shapes
    states = encoder(log_mels)                               # log_mels (B, 80, 3000) -> (B, 1500, 384)

Variable-length audio: `lengths` (in samples for waveforms, in frames for log-mels)
becomes a key-padding mask after subsampling, and padded frames are zeroed before each
convolution so that valid outputs do not depend on what the padding holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from .backbone import Transformer
from .config import TransformerConfig, is_finite_number, is_int
from .generation import suppress, suppress_index
from .registry import build_config, register_model

MEL_NORMS = ("whisper", "log")


@dataclass
class SpeechConfig:
    """Front end, SpecAugment and head sizes of a speech model; the backbone is a TransformerConfig."""

    sample_rate: int = 16000  # Hz of the input waveforms
    n_fft: int = 400  # STFT window and size in samples (25 ms at 16 kHz)
    hop_length: int = 160  # STFT hop in samples (10 ms at 16 kHz)
    n_mels: int = 80  # mel bins (80 for Whisper)
    mel_scale: str = "slaney"  # slaney (Whisper, librosa; slaney-normalized filters) or htk (unnormalized)
    mel_norm: str = "whisper"  # whisper: log10, floor at max - 8, (x + 4) / 4; log: natural log
    log_floor: float = 1e-10  # mel power is clamped to at least this before the log
    freq_masks: int = 0  # SpecAugment frequency masks per utterance while training (0: off)
    freq_mask_width: int = 27  # widest frequency mask, in mel bins
    time_masks: int = 0  # SpecAugment time masks per utterance while training (0: off)
    time_mask_width: int = 100  # widest time mask, in frames
    num_classes: int = 0  # utterance classes of SpeechClassifier (0: no classification head)
    vocab_size: int = 0  # CTC output symbols including the blank, for SpeechCTC (0: no CTC head)
    blank_id: int = 0  # index of the CTC blank
    backbone: TransformerConfig = field(default_factory=lambda: TransformerConfig(positions="sinusoidal"))

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"SpeechConfig: {name} must be a positive int, got {value!r}")
        for name in ("freq_masks", "freq_mask_width", "time_masks", "time_mask_width", "num_classes", "vocab_size",
                     "blank_id"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"SpeechConfig: {name} must be a non-negative int, got {value!r}")
        if self.mel_scale not in ("slaney", "htk"):
            raise ValueError(f"SpeechConfig: mel_scale must be slaney or htk, got {self.mel_scale!r}")
        if self.mel_norm not in MEL_NORMS:
            raise ValueError(f"SpeechConfig: mel_norm must be one of {', '.join(MEL_NORMS)}, got {self.mel_norm!r}")
        # NaN passes `<= 0` and would clamp every mel power to NaN: a silently NaN model.
        if not is_finite_number(self.log_floor) or not self.log_floor > 0:
            raise ValueError(f"SpeechConfig: log_floor must be a positive finite number, got {self.log_floor!r}")
        if self.freq_masks and self.freq_mask_width > self.n_mels:
            raise ValueError(f"SpeechConfig: freq_mask_width ({self.freq_mask_width}) must be at most n_mels "
                             f"({self.n_mels})")
        if self.vocab_size and not 0 <= self.blank_id < self.vocab_size:
            raise ValueError(f"SpeechConfig: blank_id must be in [0, {self.vocab_size}), got {self.blank_id}")


class LogMel(nn.Module):
    """Waveforms (B, T) -> log-mel spectrograms (B, n_mels, ceil(T / hop_length)).

    What torchaudio's MelSpectrogram computes (centered, reflect-padded Hann-window STFT,
    power 2, its mel filter bank), written with torch.stft so torch.compile traces it
    whole. A frame is kept when its center is a sample of the waveform: the STFT's last
    frame is dropped when T is a multiple of the hop, as Whisper does (30 s at 16 kHz
    gives 3000 frames), and kept otherwise, so a waveform has as many frames alone as
    `frames` counts for it in a padded batch. The window and filter bank are buffers
    computed from the config (not saved).
    """

    def __init__(self, cfg: SpeechConfig):
        super().__init__()
        self.cfg = cfg
        # Computed on the CPU, then put where the model is being built: under torch.device("meta")
        # torchaudio's filter bank would need values (nonzero) that meta tensors do not have.
        with torch.device("cpu"):
            fbank = torchaudio.functional.melscale_fbanks(
                n_freqs=cfg.n_fft // 2 + 1, f_min=0.0, f_max=cfg.sample_rate / 2, n_mels=cfg.n_mels,
                sample_rate=cfg.sample_rate, norm="slaney" if cfg.mel_scale == "slaney" else None,
                mel_scale=cfg.mel_scale)
            window = torch.hann_window(cfg.n_fft)
        device = torch.get_default_device()
        self.register_buffer("fbank", fbank.float().to(device), persistent=False)  # (n_freqs, n_mels)
        self.register_buffer("window", window.to(device), persistent=False)

    def power_mel(self, waveform: Tensor) -> Tensor:
        """Mel power spectrogram (B, n_mels, T // hop_length + 1) of float32 waveforms (B, T)."""
        spec = torch.stft(waveform, self.cfg.n_fft, self.cfg.hop_length, window=self.window.float(), center=True,
                          pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        power = spec.abs().pow(2.0)
        return (power.transpose(-1, -2) @ self.fbank.float()).transpose(-1, -2)

    def frames(self, lengths: Tensor) -> Tensor:
        """Valid frames of waveforms with `lengths` samples: those whose center is a real sample."""
        return (lengths + self.cfg.hop_length - 1) // self.cfg.hop_length

    def forward(self, waveform: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """waveform (B, T), lengths (B,) samples or None -> log-mels (B, n_mels, ceil(T / hop_length)).

        Samples past `lengths` are treated as silence, whatever they hold (NaN and inf
        included). A frame whose window reaches past a waveform's end sees that silence in
        a padded batch and the STFT's reflect padding at the end of the tensor, so the last
        frames of a clip differ slightly between the two (as in Whisper, whose extractor
        pads every clip to 30 s). Raises ValueError for a waveform shorter than half an
        STFT window or one hop.
        """
        T = waveform.shape[-1]
        if T <= self.cfg.n_fft // 2 or T < self.cfg.hop_length:
            raise ValueError(f"waveform must have more than {self.cfg.n_fft // 2} and at least "
                             f"{self.cfg.hop_length} samples, got {T}")
        if lengths is not None:
            waveform = waveform.masked_fill(torch.arange(T, device=waveform.device) >= lengths[:, None], 0.0)
        # float32 even under autocast or after model.half(): the log of tiny powers needs the range.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            mel = self.power_mel(waveform.float())[..., :-(-T // self.cfg.hop_length)]
        floor = self.cfg.log_floor
        if self.cfg.mel_norm == "log":
            return mel.clamp(min=floor).log()
        log_mel = mel.clamp(min=floor).log10()
        valid = log_mel
        if lengths is not None:
            frame_ok = torch.arange(log_mel.shape[-1], device=log_mel.device) < self.frames(lengths)[:, None]
            valid = log_mel.masked_fill(~frame_ok[:, None, :], -torch.inf)
        # Whisper's 80 dB dynamic range, measured from each utterance's own (valid) peak.
        peak = valid.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_mel, peak - 8.0) + 4.0) / 4.0


def _as_lengths(lengths: Union[Tensor, Sequence[int], None], batch: int, limit: int, unit: str,
                device) -> Optional[Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be {batch} integer {unit} counts, got {lengths.dtype} {tuple(lengths.shape)}")
    # Values are checked where they live on the CPU (the usual case: lengths come from the
    # data loader); reading them off an accelerator would cost a host sync every step.
    if (batch and lengths.device.type == "cpu" and not torch.compiler.is_compiling()
            and (int(lengths.min()) < 1 or int(lengths.max()) > limit)):
        raise ValueError(f"lengths must be in [1, {limit}] {unit}, got {lengths.tolist()}")
    return lengths.to(device=device, dtype=torch.long)


def _mask_spans(sizes: Tensor, count: int, max_width: int, total: int) -> Tensor:
    """(B, total) bool: the union of `count` random spans per row, each inside [0, sizes[b]).

    A span's width is uniform over the integers in [0, min(max_width, size)) and its start
    uniform over the positions where it fits: torchaudio's iid masking (mask_along_axis_iid),
    in whole frames, with each row's own size in place of the padded one.
    """
    rows = sizes.shape[0]
    positions = torch.arange(total, device=sizes.device)
    if count == 0:
        return torch.zeros(rows, total, dtype=torch.bool, device=sizes.device)
    sizes = sizes.to(torch.float32)[:, None]
    width = (torch.rand(rows, count, device=sizes.device) * sizes.clamp(max=max_width)).floor()
    first = (torch.rand(rows, count, device=sizes.device) * (sizes - width + 1)).floor()
    first, last = first.long()[..., None], (first + width).long()[..., None]
    return ((positions >= first) & (positions < last)).any(dim=1)


class SpeechEncoder(nn.Module):
    """Log-mels -> Conv1d(k3) + GELU -> Conv1d(k3, stride 2) + GELU -> backbone: (B, frames / 2, dim).

    Whisper's encoder layout: sinusoidal positions are added after the convolutions (the
    backbone's positions="sinusoidal"), pre-norm blocks, a final LayerNorm.
    """

    def __init__(self, cfg: SpeechConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.backbone.dim
        self.frontend = LogMel(cfg)
        self.conv1 = nn.Conv1d(cfg.n_mels, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.backbone = Transformer(cfg.backbone)

    def set_attn_backend(self, backend: str) -> None:
        """Switches every attention layer to "triton", "sdpa" or "eager"."""
        self.backbone.set_attn_backend(backend)
        self.cfg = dataclasses.replace(self.cfg, backbone=self.backbone.cfg)

    def spec_augment(self, log_mel: Tensor, frames: Optional[Tensor] = None) -> Tensor:
        """SpecAugment (B, n_mels, F): independent frequency and time masks per utterance, set to
        0 (mid-range of Whisper-normalized log-mels). Identity unless training.

        frames (B,): each utterance's valid frame count. Its time masks are drawn within its own
        frames, as if it were alone, so padding neither absorbs a mask nor changes where one falls.
        """
        if not self.training:
            return log_mel
        batch, n_mels, total = log_mel.shape
        bins = torch.full((batch,), n_mels, device=log_mel.device)
        mask = _mask_spans(bins, self.cfg.freq_masks, self.cfg.freq_mask_width, n_mels)[:, :, None]
        frames = torch.full((batch,), total, device=log_mel.device) if frames is None else frames
        mask = mask | _mask_spans(frames, self.cfg.time_masks, self.cfg.time_mask_width, total)[:, None, :]
        return log_mel.masked_fill(mask, 0.0)

    def log_mels(self, inputs: Tensor, lengths=None) -> tuple[Tensor, Optional[Tensor]]:
        """Log-mels (B, n_mels, F) and valid frame counts (B,) or None, from waveforms (B, T)
        with lengths in samples or from log-mels (B, n_mels, F) with lengths in frames.

        Raises TypeError for a non-float input and ValueError for a wrong shape or lengths.
        """
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
            raise TypeError(f"inputs must be a float tensor, got {getattr(inputs, 'dtype', type(inputs).__name__)}")
        if inputs.dim() == 2:
            samples = _as_lengths(lengths, inputs.shape[0], inputs.shape[1], "samples", inputs.device)
            log_mel = self.frontend(inputs, samples)
            return log_mel, None if samples is None else self.frontend.frames(samples)
        if inputs.dim() == 3 and inputs.shape[1] == self.cfg.n_mels:
            return inputs, _as_lengths(lengths, inputs.shape[0], inputs.shape[2], "frames", inputs.device)
        raise ValueError(f"inputs must be waveforms (B, T) or log-mels (B, {self.cfg.n_mels}, frames), "
                         f"got shape {tuple(inputs.shape)}")

    def encode(self, inputs: Tensor, lengths=None) -> tuple[Tensor, Optional[Tensor]]:
        """Hidden states (B, S, dim) and their padding mask (B, S) bool (True = real frame) or None.

        S = ceil(frames / 2). See log_mels for inputs and lengths; raises ValueError, in frames
        and seconds, when S exceeds the backbone's max_seq_len (learned or sinusoidal positions).
        """
        log_mel, frames = self.log_mels(inputs, lengths)
        backbone = self.backbone.cfg
        tokens = (log_mel.shape[-1] + 1) // 2
        if backbone.positions in ("learned", "sinusoidal") and tokens > backbone.max_seq_len:
            hop = self.cfg.hop_length / self.cfg.sample_rate
            raise ValueError(f"{log_mel.shape[-1]} mel frames make {tokens} positions after the stride-2 convolution, "
                             f"past this encoder's {backbone.max_seq_len} (max_seq_len): at most "
                             f"{2 * backbone.max_seq_len} frames, {2 * backbone.max_seq_len * hop:g} s of audio")
        log_mel = self.spec_augment(log_mel, frames)
        x, mask = log_mel.to(self.conv1.weight.dtype), None
        if frames is not None:
            # Zeroing padded frames before each convolution makes the valid outputs equal
            # to those of the unpadded utterance (the convs zero-pad) whatever the padding holds.
            # masked_fill, not a product: padding may hold -inf (the log of silence) or NaN.
            x = x.masked_fill((torch.arange(x.shape[-1], device=x.device) >= frames[:, None])[:, None, :], 0.0)
        x = F.gelu(self.conv1(x))
        if frames is not None:
            x = x.masked_fill((torch.arange(x.shape[-1], device=x.device) >= frames[:, None])[:, None, :], 0.0)
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if frames is not None:
            # Kept even when nothing is padded: testing for that would cost a host sync per
            # step and a graph break under torch.compile.
            mask = torch.arange(x.shape[1], device=x.device) < ((frames + 1) // 2)[:, None]
        return self.backbone(x, key_padding_mask=mask), mask

    def forward_features(self, inputs: Tensor, lengths=None) -> Tensor:
        """Hidden states (B, S, dim) of waveforms (B, T) or log-mels (B, n_mels, frames)."""
        return self.encode(inputs, lengths)[0]

    def forward(self, inputs: Tensor, lengths=None) -> Tensor:
        """The encoder's output: forward_features."""
        return self.forward_features(inputs, lengths)


class SpeechClassifier(SpeechEncoder):
    """Utterance classification (keyword spotting): mean of the valid frames -> Linear -> (B, num_classes)."""

    def __init__(self, cfg: SpeechConfig):
        if cfg.num_classes < 1:
            raise ValueError(f"SpeechClassifier needs num_classes >= 1, got {cfg.num_classes}")
        super().__init__(cfg)
        self.head = nn.Linear(cfg.backbone.dim, cfg.num_classes)

    def forward(self, inputs: Tensor, lengths=None) -> Tensor:
        """Class logits (B, num_classes) of waveforms (B, T) or log-mels; lengths as in encode."""
        states, mask = self.encode(inputs, lengths)
        if mask is None:
            pooled = states.mean(dim=1)
        else:
            weights = mask.to(states.dtype)[..., None]
            pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)
        return self.head(pooled)


class SpeechCTC(SpeechEncoder):
    """Per-frame logits over vocab_size symbols (blank included) for CTC training and decoding."""

    def __init__(self, cfg: SpeechConfig):
        if cfg.vocab_size < 2:
            raise ValueError(f"SpeechCTC needs vocab_size >= 2 (blank included), got {cfg.vocab_size}")
        super().__init__(cfg)
        self.head = nn.Linear(cfg.backbone.dim, cfg.vocab_size)

    def frame_logits(self, inputs: Tensor, lengths=None) -> tuple[Tensor, Tensor]:
        """Logits (B, S, vocab_size) and valid frame counts (B,)."""
        states, mask = self.encode(inputs, lengths)
        counts = mask.sum(dim=1) if mask is not None else states.new_full((states.shape[0],), states.shape[1],
                                                                          dtype=torch.long)
        return self.head(states), counts

    def forward(self, inputs: Tensor, lengths=None) -> Tensor:
        """Per-frame logits (B, S, vocab_size)."""
        return self.frame_logits(inputs, lengths)[0]

    def ctc_loss(self, inputs: Tensor, lengths, targets: Tensor, target_lengths, zero_infinity: bool = False) -> Tensor:
        """Mean CTC loss (torch.nn.functional.ctc_loss, per-target-length normalized).

        targets (B, L) padded or concatenated (sum(target_lengths),) symbol ids, none the
        blank; target_lengths (B,). An utterance too short for its target gives inf (and NaN
        gradients); with zero_infinity, 0 and zero gradients (it still counts in the mean).
        """
        logits, counts = self.frame_logits(inputs, lengths)
        log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (S, B, V), as ctc_loss wants
        target_lengths = torch.as_tensor(target_lengths, device=logits.device)
        return F.ctc_loss(log_probs, targets, counts, target_lengths, blank=self.cfg.blank_id,
                          zero_infinity=zero_infinity)

    @torch.no_grad()
    def greedy_decode(self, inputs: Tensor, lengths=None,
                      suppress_tokens: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Best-path CTC decoding: per-frame argmax (never one of suppress_tokens), repeats merged,
        blanks removed. Raises ValueError for bad suppress_tokens (or one that is the blank)."""
        logits, counts = self.frame_logits(inputs, lengths)
        banned = suppress_index(suppress_tokens, self.cfg.vocab_size, logits.device)
        if banned is not None and bool((banned == self.cfg.blank_id).any()):
            raise ValueError(f"suppress_tokens holds the CTC blank {self.cfg.blank_id}")
        best = suppress(logits, banned).argmax(dim=-1)
        out = []
        for row, n in zip(best.tolist(), counts.tolist()):
            row = row[:n]
            out.append([s for i, s in enumerate(row) if s != self.cfg.blank_id and (i == 0 or s != row[i - 1])])
        return out


def speech_model(cfg: SpeechConfig) -> SpeechEncoder:
    """The model a config asks for: SpeechClassifier with num_classes, SpeechCTC with
    vocab_size, else the bare SpeechEncoder. Raises ValueError if both are set."""
    if cfg.num_classes and cfg.vocab_size:
        raise ValueError("set num_classes (classifier) or vocab_size (CTC), not both")
    if cfg.num_classes:
        return SpeechClassifier(cfg)
    return SpeechCTC(cfg) if cfg.vocab_size else SpeechEncoder(cfg)


def _whisper_backbone(dim: int, depth: int, heads: int, frames: int = 1500) -> TransformerConfig:
    return TransformerConfig(dim=dim, depth=depth, heads=heads, mlp="gelu", mlp_ratio=4.0, norm="layernorm",
                             norm_eps=1e-5, prenorm=True, final_norm=True, positions="sinusoidal",
                             max_seq_len=frames)


@register_model
def speech_tiny(**overrides) -> SpeechEncoder:
    """A CPU-sized keyword spotter: 40 mels, 2 layers of width 64, SpecAugment on while training;
    12 classes unless overridden (the classic Speech Commands benchmark: 10 words + silence +
    unknown; SpeechCommandsDataModule has no silence class, so 10 words there give 11)."""
    backbone = _whisper_backbone(dim=64, depth=2, heads=4, frames=500)
    return speech_model(build_config(SpeechConfig, backbone, overrides, n_mels=40, num_classes=12, freq_masks=2,
                                     freq_mask_width=8, time_masks=2, time_mask_width=10))


@register_model
def whisper_tiny_encoder(**overrides) -> SpeechEncoder:
    """Whisper tiny's encoder: 80 mels, 4 layers, width 384, 6 heads, FFN 1536, 1500 positions (30 s)."""
    return speech_model(build_config(SpeechConfig, _whisper_backbone(384, 4, 6), overrides, n_mels=80))


@register_model
def whisper_base_encoder(**overrides) -> SpeechEncoder:
    """Whisper base's encoder: 80 mels, 6 layers, width 512, 8 heads, FFN 2048, 1500 positions (30 s)."""
    return speech_model(build_config(SpeechConfig, _whisper_backbone(512, 6, 8), overrides, n_mels=80))
