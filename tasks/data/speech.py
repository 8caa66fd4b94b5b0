"""Speech data: keywords synthesized offline with espeak-ng, and the audio reading and batching
that every speech data module shares (Speech Commands and LibriSpeech: speech_corpora.py).

Keyword batches are (waveforms (B, T) float32 at 16 kHz, lengths (B,) samples, labels (B,)).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import time
import wave
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Union

import torch
import torchaudio
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from zoo.config import is_finite_number

from .loaders import SplitDataModule


SAMPLE_RATE = 16000
WORD_SETS = {
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "commands": ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"),
}
ESPEAK_INSTALL = ("espeak-ng is needed to synthesize the keyword data set and is not on PATH; install it with "
                  "`apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` (macOS) or "
                  "`dnf install espeak-ng` (Fedora)")


def read_wav(data: Union[bytes, str]) -> tuple[torch.Tensor, int]:
    """Samples (T,) float32 in [-1, 1] and the sample rate of 16-bit PCM WAV bytes or a file path.

    Reads to the end of the data, so espeak-ng's streamed WAVs (whose header gives no
    length) decode whole. Raises ValueError (naming the file) for another sample format,
    data that is not a WAV file, a file with no samples or one cut off inside a frame.
    """
    name = data if isinstance(data, str) else "<wav bytes>"
    try:
        with wave.open(data if isinstance(data, str) else io.BytesIO(data)) as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{name}: expected 16-bit PCM WAV, got {8 * w.getsampwidth()}-bit samples")
            rate, channels = w.getframerate(), w.getnchannels()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{name}: not a readable WAV file ({e})") from e
    if not frames:
        raise ValueError(f"{name}: the WAV file holds no samples")
    if len(frames) % (2 * channels):
        raise ValueError(f"{name}: the WAV data is cut off inside a frame ({len(frames)} bytes of "
                         f"{channels}-channel 16-bit frames): the file is truncated")
    samples = torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768.0
    return samples.view(-1, channels).mean(dim=1), rate


def read_audio(path: str) -> tuple[torch.Tensor, int]:
    """Mono samples (T,) float32 and sample rate of an audio file: WAV with the standard library,
    anything else (FLAC) with soundfile or torchaudio.load (torchcodec), whichever is installed.

    Raises FileNotFoundError naming a missing file, RuntimeError naming the file when no
    decoder for its format is installed, ValueError naming a file its decoder cannot read
    (truncated, corrupt or not audio: libsndfile's own messages name no file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {os.path.abspath(path)!r}")
    if path.lower().endswith(".wav"):
        return read_wav(path)
    try:
        import soundfile
    except ImportError:
        soundfile = None
    try:
        if soundfile is not None:
            samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
            return torch.from_numpy(samples).mean(dim=1), rate
        waveform, rate = torchaudio.load(path)
    except ImportError as e:
        raise RuntimeError(f"cannot decode {path!r}: install soundfile or torchcodec "
                           f"(`pip install soundfile`)") from e
    except RuntimeError as e:  # soundfile.LibsndfileError and torchaudio's decoding errors
        raise ValueError(f"{os.path.abspath(path)!r} cannot be decoded (truncated, corrupt or not audio): {e}") from e
    return waveform.mean(dim=0), rate


def collate_waveforms(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(waveform (T_i,), label) items -> waveforms (B, max T_i) zero-padded, lengths (B,), labels (B,)."""
    lengths = torch.tensor([len(w) for w, _ in items], dtype=torch.long)
    waveforms = torch.zeros(len(items), int(lengths.max()))
    for i, (w, _) in enumerate(items):
        waveforms[i, :len(w)] = w
    return waveforms, lengths, torch.tensor([label for _, label in items], dtype=torch.long)


class WaveformDataModule(SplitDataModule):
    """Loaders of (waveform, label) items, batched by collate_waveforms."""

    def collate_fn(self, train: bool):
        return collate_waveforms


# ---------------------------------------------------------------------------------------------
# Keywords synthesized with espeak-ng


def require_espeak() -> str:
    """The espeak-ng executable; RuntimeError saying how to install it when it is missing."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(ESPEAK_INSTALL)
    return path


def espeak_voices() -> tuple[list[str], list[str]]:
    """(English languages, voice variants) of the installed espeak-ng.

    Languages are espeak-ng's own English voices (`espeak-ng --voices=en`), MBROLA ones
    left out (they need separately installed MBROLA voice data); variants are the
    speaker presets of `espeak-ng --voices=variant` (m1..m8, f1..f5, klatt, whisper, ...).
    """
    espeak = require_espeak()
    listing = subprocess.run([espeak, "--voices=en"], capture_output=True, text=True, check=True).stdout
    languages = sorted({line.split()[1] for line in listing.splitlines()[1:]
                        if len(line.split()) >= 5 and line.split()[4].startswith("gmw/")})
    listing = subprocess.run([espeak, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    variants = sorted({m.group(1).strip() for m in re.finditer(r"!v/(.+?)(?:\s{2,}|$)", listing, re.M)})
    return languages, variants


def synthesize(word: str, voice: str, speed: int = 175, pitch: int = 50) -> torch.Tensor:
    """One utterance of `word` by espeak-ng voice `voice` ("en-us+f3") at `speed` words per minute
    and `pitch` (0-99): float32 samples (T,) at 16 kHz, leading and trailing silence cut.

    Raises RuntimeError if espeak-ng is missing or fails (with its message).
    """
    result = subprocess.run([require_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                            capture_output=True)
    if result.returncode != 0 or len(result.stdout) <= 44:
        raise RuntimeError(f"espeak-ng -v {voice!r} failed on {word!r}: {result.stderr.decode(errors='replace')}")
    samples, rate = read_wav(result.stdout)
    samples = torchaudio.functional.resample(samples, rate, SAMPLE_RATE)
    loud = (samples.abs() > 0.02 * samples.abs().max()).nonzero()
    margin = SAMPLE_RATE // 100  # keep 10 ms around the speech: onsets and releases are quiet
    return samples[max(0, int(loud[0]) - margin):int(loud[-1]) + margin + 1]


def voice_split(variant: str, shares: Sequence[int] = (70, 15, 15)) -> str:
    """"train", "val" or "test" for a voice variant, by CRC-32 of its name (stable across runs)."""
    bucket = zlib.crc32(variant.encode()) % sum(shares)
    if bucket < shares[0]:
        return "train"
    return "val" if bucket < shares[0] + shares[1] else "test"


#: Variants whose spectral envelopes correlate at least this much count as one voice (see voice_groups).
SAME_VOICE = 0.98


def group_alike(envelopes: dict[str, torch.Tensor], threshold: float = SAME_VOICE) -> list[list[str]]:
    """Names grouped by how alike their vectors are: two names are linked when the Pearson
    correlation of their vectors is >= threshold, and the groups are the connected components
    (single linkage: a chain of near copies stays in one group). Each group sorted, groups by first name."""
    names = sorted(envelopes)
    x = torch.stack([envelopes[n].double().flatten() for n in names])
    x = x - x.mean(dim=1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    linked = (x @ x.T) >= threshold
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in linked.triu(diagonal=1).nonzero().tolist():
        parent[root(i)] = root(j)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), []).append(name)
    return sorted(groups.values())


def voice_groups(variants: Sequence[str], threshold: float = SAME_VOICE, workers: int = 1) -> list[list[str]]:
    """espeak-ng voice variants grouped by how alike they sound (`group_alike` of their envelopes).

    Some variants are one voice under several names (caleb, klatt and klatt6 render the same
    samples), others near copies (steph, steph2, steph3). Each variant says one phrase (en-us,
    fixed speed and pitch); its envelope is its mean log-mel spectrum (formants and timbre, not
    timing). With espeak-ng 1.51 the 101 variants form 57 groups at 0.98 (the largest holds
    13); distinct presets stay apart (m1 and m2 correlate at 0.95, f1 and f2 at 0.92).
    """
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=40)
    with ThreadPoolExecutor(workers) as pool:
        clips = list(pool.map(lambda v: synthesize("seven three", f"en-us+{v}", 160, 50), variants))
    return group_alike({v: (mel(c) + 1e-6).log().mean(dim=1) for v, c in zip(variants, clips)}, threshold)


def split_voices(variants: Sequence[str], shares: Sequence[int] = (70, 15, 15),
                 workers: int = 1) -> dict[str, list[str]]:
    """{"train", "val", "test": variants}: whole `voice_groups`, each placed by `voice_split` of its
    first name, so no split holds a voice that sounds like another split's."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for group in voice_groups(variants, workers=workers):
        out[voice_split(group[0], shares)] += group
    return out


class KeywordClips(Dataset):
    """Clean clips (int16, concatenated) -> augmented (waveform (T,), label) items.

    Each item: the clip at a random gain, placed at a random offset in a window of
    `duration` seconds (None: the clip's own length plus up to 0.1 s each side), white
    noise at a random SNR in snr_db over the whole window. Training items are also
    speed-perturbed: resampled by a random factor within 1 +- speed_perturb, which moves
    tempo, pitch and formants together, as a different vocal tract would (Ko et al.,
    2015: "Audio augmentation for speech recognition"). Training draws from torch's
    global RNG (reseeded per worker by the DataLoader); evaluation uses a generator
    seeded by (seed, index), so every evaluation sees the same items.
    """

    def __init__(self, audio: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor,
                 duration: Optional[float], snr_db: tuple[float, float], train: bool, seed: int = 0,
                 speed_perturb: float = 0.0):
        if not 0.0 <= speed_perturb < 0.5:
            raise ValueError(f"speed_perturb must be in [0, 0.5), got {speed_perturb}")
        self.audio, self.offsets, self.labels = audio, offsets, labels
        self.speed_perturb = speed_perturb
        self.window = None if duration is None else int(duration * SAMPLE_RATE)
        self.snr_db, self.train, self.seed = snr_db, train, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        u = torch.rand(6, generator=g).tolist()
        clip = self.audio[self.offsets[i]:self.offsets[i + 1]].float() / 32768.0
        if self.train and self.speed_perturb:
            # Rates on a 400 Hz grid: resample's kernel size follows rate / gcd, kept small.
            rate = round(SAMPLE_RATE * (1 + self.speed_perturb * (2 * u[5] - 1)) / 400) * 400
            clip = torchaudio.functional.resample(clip, SAMPLE_RATE, rate)
        clip = clip * ((0.2 + 0.7 * u[0]) / clip.abs().max().clamp(min=1e-4))
        window = self.window or len(clip) + int(u[1] * 0.2 * SAMPLE_RATE)
        if len(clip) > window:  # a slow utterance: keep a random window of it
            start = int(u[2] * (len(clip) - window + 1))
            clip = clip[start:start + window]
        out = torch.zeros(window)
        start = int(u[3] * (window - len(clip) + 1))
        out[start:start + len(clip)] = clip
        snr = self.snr_db[0] + (self.snr_db[1] - self.snr_db[0]) * u[4]
        noise_std = (clip.pow(2).mean() / 10 ** (snr / 10)).sqrt()
        return out + noise_std * torch.randn(window, generator=g), int(self.labels[i])


class KeywordDataModule(WaveformDataModule):
    """Spoken keywords synthesized offline with espeak-ng; val/test voices are never heard in training.

    A voice is an English espeak-ng language (accent) with a speaker variant; variants are
    split by a hash of their name, variants that sound alike together (`split_voices`), so
    each split has its own speakers, while accents are shared. Each clip draws an accent, a
    variant of its split, a speed and a pitch. The clean clips are cached in `cache_dir` (keyed by these arguments),
    and augmented on the fly (see KeywordClips).

    Args:
        words: "digits" (zero..nine), "commands" (yes, no, up, down, left, right, on,
            off, stop, go) or a list of words; the label is the index in this list.
        train_per_word, eval_per_word: clips per word in train, and in val and test each.
        duration: seconds of each item (None: variable length, padded per batch).
        snr_db: the range of the added white noise's signal-to-noise ratio.
        speed_perturb: training clips are resampled by a factor in 1 +- this (see KeywordClips).
        speeds, pitches: (min, max) of espeak-ng's -s (words per minute, 80-450) and -p (0-99).
        shares: percentages of the variants in train, val, test (each >= 1).
        cache_dir: where the synthesized set is kept ("~" expanded).
        seed, batch_size, num_workers: as usual; synth_workers: espeak-ng processes at once.

    Raises (in prepare_data or setup) RuntimeError with install instructions when espeak-ng
    is missing and nothing is cached, and RuntimeError naming a cache file it cannot read.
    """

    def __init__(self, words: Union[str, list[str]] = "digits", train_per_word: int = 300, eval_per_word: int = 40,
                 duration: Optional[float] = 1.0, snr_db: tuple[float, float] = (10.0, 40.0),
                 speed_perturb: float = 0.0, speeds: tuple[int, int] = (120, 220), pitches: tuple[int, int] = (20, 80),
                 shares: tuple[int, int, int] = (70, 15, 15), cache_dir: str = "~/.cache/tritonzoo/keywords",
                 seed: int = 0, batch_size: int = 64, num_workers: int = 0, synth_workers: Optional[int] = None):
        super().__init__(batch_size, num_workers)
        if isinstance(words, str):
            if words not in WORD_SETS:
                raise ValueError(f"words must be one of {', '.join(WORD_SETS)} or a list of words, got {words!r}")
            words = list(WORD_SETS[words])
        if len(words) < 2 or len(set(words)) != len(words):
            raise ValueError(f"words must be at least two distinct words, got {words}")
        if not all(isinstance(w, str) and w.strip() for w in words):
            raise ValueError(f"words must be non-empty strings, got {words}")
        self.classes, self.num_classes = list(words), len(words)
        self.check_int("train_per_word", train_per_word, 1)
        self.check_int("eval_per_word", eval_per_word, 1)
        self.train_per_word, self.eval_per_word = train_per_word, eval_per_word
        if duration is not None and not (is_finite_number(duration) and duration > 0):
            raise ValueError(f"{type(self).__name__}: duration must be a number of seconds > 0 or None, "
                             f"got {duration!r}")
        if not (is_finite_number(speed_perturb) and 0.0 <= speed_perturb < 0.5):
            raise ValueError(f"speed_perturb must be in [0, 0.5), got {speed_perturb}")
        self._check_range("snr_db", snr_db, None, None, integer=False)
        # espeak-ng's documented ranges: -s 80..450 words per minute (speak_lib.h), -p 0..99 (man page).
        self._check_range("speeds", speeds, 80, 450, integer=True)
        self._check_range("pitches", pitches, 0, 99, integer=True)
        if (not isinstance(shares, (tuple, list)) or len(shares) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shares)):
            raise ValueError(f"{type(self).__name__}: shares must be three ints >= 1 (train, val, test: each "
                             f"split needs voices of its own), got {shares!r}")
        if synth_workers is not None:
            self.check_int("synth_workers", synth_workers, 1)
        self.duration, self.snr_db, self.speed_perturb = duration, tuple(snr_db), speed_perturb
        self.speeds, self.pitches, self.shares = tuple(speeds), tuple(pitches), tuple(shares)
        self.cache_dir, self.seed = os.path.expanduser(cache_dir), seed
        self.synth_workers = synth_workers or os.cpu_count() or 1
        self.clips: Optional[dict] = None
        self.synthesis_seconds: Optional[float] = None  # set when prepare_data() or setup() synthesized

    def _check_range(self, name: str, value, low, high, integer: bool) -> None:
        """ValueError naming the argument unless value is a (min, max) pair of finite numbers
        (ints where ``integer``) with min <= max, inside [low, high] where those are given."""
        kind = "ints" if integer else "numbers"
        ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
            (isinstance(v, int) and not isinstance(v, bool)) if integer else is_finite_number(v) for v in value)
        ok = ok and value[0] <= value[1] and (low is None or value[0] >= low) and (high is None or value[1] <= high)
        if not ok:
            bounds = f" within [{low}, {high}]" if low is not None else ""
            raise ValueError(f"{type(self).__name__}: {name} must be a (min, max) pair of {kind}{bounds} "
                             f"with min <= max, got {value!r}")

    def cache_path(self) -> str:
        """The cache file of this configuration of the data set."""
        key = json.dumps([self.classes, self.train_per_word, self.eval_per_word, self.speeds, self.pitches,
                          self.shares, self.seed, SAMPLE_RATE, "voice groups", SAME_VOICE])
        return os.path.join(self.cache_dir, f"keywords-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt")

    def synthesize_all(self) -> dict:
        """Synthesizes every clip: {split: {"audio": int16 (N,), "offsets": (n + 1,), "labels": (n,),
        "voices": [str]}}. Raises RuntimeError when espeak-ng is missing or a split gets no variant."""
        languages, variants = espeak_voices()
        by_split = split_voices(variants, self.shares, self.synth_workers)
        for split, names in by_split.items():
            if not names or not languages:
                raise RuntimeError(f"espeak-ng offers no English voice variant for the {split} split "
                                   f"(languages {languages}, variants {variants})")
        jobs = []
        for split, names in by_split.items():
            rng = random.Random(f"{self.seed}:{split}")
            per_word = self.train_per_word if split == "train" else self.eval_per_word
            for label, word in enumerate(self.classes):
                for _ in range(per_word):
                    voice = f"{rng.choice(languages)}+{rng.choice(names)}"
                    jobs.append((split, label, word, voice, rng.randint(*self.speeds), rng.randint(*self.pitches)))
        with ThreadPoolExecutor(self.synth_workers) as pool:
            clips = list(pool.map(lambda job: synthesize(job[2], job[3], job[4], job[5]), jobs))
        out = {}
        for split in by_split:
            picked = [(job, clip) for job, clip in zip(jobs, clips) if job[0] == split]
            lengths = torch.tensor([0] + [len(clip) for _, clip in picked])
            audio = torch.cat([clip for _, clip in picked])
            out[split] = {"audio": (audio.clamp(-1, 1) * 32767).round().to(torch.int16),
                          "offsets": lengths.cumsum(0), "labels": torch.tensor([job[1] for job, _ in picked]),
                          "voices": [job[3] for job, _ in picked]}
        return out

    def prepare_data(self):
        """Synthesizes the set into the cache unless it is there. Lightning calls this on one
        process per node before setup(), so distributed runs synthesize once."""
        path = self.cache_path()
        if os.path.exists(path):
            return
        rank_zero_info(f"KeywordDataModule: synthesizing the keyword set with espeak-ng (minutes, once); "
                       f"it will be cached at {path}")
        start = time.perf_counter()
        clips = self.synthesize_all()
        self.synthesis_seconds = time.perf_counter() - start
        rank_zero_info(f"KeywordDataModule: synthesized in {self.synthesis_seconds:.0f} s")
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(clips, tmp)
        os.replace(tmp, path)  # atomic: a concurrent or interrupted run never sees half a file

    def setup(self, stage: Optional[str] = None):
        if self.clips is not None:
            return
        path = self.cache_path()
        if not os.path.exists(path):  # setup() called without prepare_data(), outside a Trainer
            self.prepare_data()
        try:
            self.clips = torch.load(path, weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot read the keyword cache {path!r} ({e}); delete it to synthesize "
                               f"the set again") from e
        self.train_set, self.val_set, self.test_set = (self.dataset(split) for split in ("train", "val", "test"))

    def dataset(self, split: str) -> KeywordClips:
        """The augmented items of "train", "val" or "test" (after setup)."""
        if self.clips is None:
            raise RuntimeError("KeywordDataModule: call setup() first")
        c = self.clips[split]
        return KeywordClips(c["audio"], c["offsets"], c["labels"], self.duration, self.snr_db,
                            train=split == "train", seed=self.seed + {"train": 0, "val": 1, "test": 2}[split],
                            speed_perturb=self.speed_perturb)
