"""Real speech from local copies in torchaudio's layouts, never downloaded: Google Speech
Commands v2 (keyword spotting) and LibriSpeech (transcribed speech for CTC).

Speech Commands batches are (waveforms (B, T) float32 at 16 kHz, lengths (B,) samples,
labels (B,)); LibriSpeech batches are dicts of waveforms, lengths, targets (B, L) symbol
ids (padded with 0, the CTC blank), target_lengths (B,) and the texts.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torchaudio
from torch.utils.data import Dataset

from zoo.config import is_finite_number

from .speech import SAMPLE_RATE, WaveformDataModule, collate_waveforms, read_audio, read_wav
from .tokenizers import CharTokenizer, tokenizer_from_state
from .vision import require_dir


class _SpeechCommandsItems(Dataset):
    """(waveform (T,), label) of a torchaudio SPEECHCOMMANDS subset, read with the wave module;
    training items are shifted in time by up to `shift` seconds (zero fill)."""

    def __init__(self, dataset, archive: str, class_index: dict[str, int], unknown: Optional[int], shift: float):
        self.archive, self.shift = archive, int(shift * SAMPLE_RATE)
        self.items = []
        for n in range(len(dataset)):
            relpath, _, word, _, _ = dataset.get_metadata(n)
            label = class_index.get(word, unknown)
            if label is not None:
                self.items.append((relpath, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        relpath, label = self.items[i]
        samples, rate = read_wav(os.path.join(self.archive, relpath))
        if rate != SAMPLE_RATE:
            samples = torchaudio.functional.resample(samples, rate, SAMPLE_RATE)
        if self.shift:
            offset = int(torch.randint(-self.shift, self.shift + 1, ()))
            samples = torch.roll(samples, offset)
            if offset > 0:
                samples[:offset] = 0
            elif offset < 0:
                samples[offset:] = 0
        return samples, label


class SpeechCommandsDataModule(WaveformDataModule):
    """Google Speech Commands v2 from a local copy: root/SpeechCommands/speech_commands_v0.02/<word>/*.wav.

    torchaudio's SPEECHCOMMANDS (download=False) with the official validation_list.txt and
    testing_list.txt splits (speakers are disjoint across them).
    Args:
        root: the folder holding SpeechCommands/.
        words: the classes (a str: one word); None: all 35 words of v2. With a list, every other word is
            the class "_unknown_" (the last label) when unknown=True, else left out. In YAML, quote
            "yes", "no", "on" and "off" (unquoted they are booleans, which are refused).
        shift: training time-shift augmentation, in seconds.
        batch_size, num_workers: of the loaders.
    Raises (in setup) FileNotFoundError naming a missing folder or list, ValueError naming a
    word that has no folder or a split left without clips.
    """

    def __init__(self, root: str, words: Union[list[str], str, None] = None, unknown: bool = True, shift: float = 0.1,
                 batch_size: int = 128, num_workers: int = 8):
        super().__init__(batch_size, num_workers)
        if not is_finite_number(shift) or not 0 <= shift <= 1:  # the clips are 1 s long
            raise ValueError(f"SpeechCommandsDataModule: shift must be a number of seconds in [0, 1], got {shift!r}")
        words = [words] if isinstance(words, str) else words  # one word, not its letters
        self.root, self.words, self.unknown, self.shift = root, words, unknown, shift
        self.classes: Optional[list[str]] = None

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            raise RuntimeError("SpeechCommandsDataModule: call setup() first")
        return len(self.classes)

    def setup(self, stage: Optional[str] = None):
        if self.train_set is not None:
            return
        folder = require_dir(os.path.join(self.root, "SpeechCommands", "speech_commands_v0.02"),
                             "Speech Commands v2 (torchaudio's layout, root/SpeechCommands/speech_commands_v0.02)")
        for listing in ("validation_list.txt", "testing_list.txt"):
            if not os.path.isfile(os.path.join(folder, listing)):
                raise FileNotFoundError(f"Speech Commands split list not found: {os.path.join(folder, listing)!r}")
        present = sorted(d for d in os.listdir(folder)
                         if os.path.isdir(os.path.join(folder, d)) and not d.startswith("_"))
        if not present:
            raise FileNotFoundError(f"Speech Commands: no word folders under {folder!r}")
        missing = [w for w in self.words or () if w not in present]
        if missing:
            raise ValueError(f"Speech Commands has no word {', '.join(map(repr, missing))} under {folder!r}; "
                             f"its words: {', '.join(present)}")
        words = self.words or present
        self.classes = list(words) + (["_unknown_"] if self.words and self.unknown else [])
        index = {w: i for i, w in enumerate(words)}
        unknown = len(words) if self.words and self.unknown else None
        archive = os.path.join(self.root, "SpeechCommands")
        self.train_set, self.val_set, self.test_set = (_SpeechCommandsItems(
            torchaudio.datasets.SPEECHCOMMANDS(self.root, download=False, subset=subset), archive, index, unknown,
            self.shift if subset == "training" else 0.0) for subset in ("training", "validation", "testing"))
        for subset, items in zip(("training", "validation", "testing"), (self.train_set, self.val_set, self.test_set)):
            if not len(items):
                raise ValueError(f"Speech Commands under {folder!r}: the {subset} split holds no clip of "
                                 f"{self.classes} (see validation_list.txt and testing_list.txt)")


# Upper-case letters, apostrophe and space: every character of LibriSpeech's transcripts.
LIBRISPEECH_ALPHABET = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TranscriptCollate:
    """(waveform (T,), text) items -> {"waveforms", "lengths", "targets" (padded with 0), "target_lengths",
    "texts"}, the text encoded with `tokenizer` (a plain object, so workers pickle only the tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[tuple[torch.Tensor, str]]) -> dict:
        waveforms, lengths, _ = collate_waveforms([(w, 0) for w, _ in items])
        ids = [self.tokenizer.encode(text) for _, text in items]
        targets = torch.zeros(len(ids), max(1, max(map(len, ids))), dtype=torch.long)
        for i, row in enumerate(ids):
            targets[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {"waveforms": waveforms, "lengths": lengths, "targets": targets,
                "target_lengths": torch.tensor([len(r) for r in ids], dtype=torch.long),
                "texts": [text for _, text in items]}


class _LibriSpeechItems(Dataset):
    """(waveform (T,) at 16 kHz, transcript) of torchaudio LIBRISPEECH subsets."""

    def __init__(self, datasets, archive: str):
        self.archive = archive
        self.index = [(d, n) for d in datasets for n in range(len(d))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        dataset, n = self.index[i]
        relpath, _, transcript, *_ = dataset.get_metadata(n)
        samples, rate = read_audio(os.path.join(self.archive, relpath))
        if rate != SAMPLE_RATE:
            samples = torchaudio.functional.resample(samples, rate, SAMPLE_RATE)
        return samples, transcript


class LibriSpeechDataModule(WaveformDataModule):
    """LibriSpeech from a local copy (root/LibriSpeech/<subset>/...flac), for CTC with characters.

    torchaudio's LIBRISPEECH (download=False). The tokenizer is a CharTokenizer over
    LIBRISPEECH_ALPHABET (vocab_size 33; id 0, the pad, is the CTC blank). FLAC is read
    with soundfile (the tasks extra installs it), else torchaudio.load (torchcodec).
    Args: root (the folder holding LibriSpeech/), train_subsets, val_subset, test_subset
    (e.g. "train-clean-100", "dev-clean", "test-clean"; train_subsets a list, or a str for one),
    batch_size, num_workers.
    Raises (in setup) FileNotFoundError naming a missing or empty subset folder.
    """

    def __init__(self, root: str, train_subsets: Union[Sequence[str], str] = ("train-clean-100",),
                 val_subset: str = "dev-clean", test_subset: str = "test-clean", batch_size: int = 32,
                 num_workers: int = 8):
        super().__init__(batch_size, num_workers)
        # A str is one subset: list("train-clean-100") would look for the folders "t", "r", ...
        self.root = root
        self.train_subsets = [train_subsets] if isinstance(train_subsets, str) else list(train_subsets)
        if not self.train_subsets:
            raise ValueError("LibriSpeechDataModule: train_subsets names no subset (e.g. 'train-clean-100')")
        self.val_subset, self.test_subset = val_subset, test_subset
        self.tokenizer = CharTokenizer(LIBRISPEECH_ALPHABET)

    def collate_fn(self, train: bool):
        return TranscriptCollate(self.tokenizer)  # the tokenizer of the moment: load_state_dict may replace it

    def setup(self, stage: Optional[str] = None):
        if self.train_set is not None:
            return
        archive = os.path.join(self.root, "LibriSpeech")

        for name in (*self.train_subsets, self.val_subset, self.test_subset):
            require_dir(os.path.join(archive, name), f"LibriSpeech {name} (torchaudio's layout, root/LibriSpeech/"
                                                     f"{name})")

        def subsets(names):
            datasets = [torchaudio.datasets.LIBRISPEECH(self.root, url=n, download=False) for n in names]
            for name, dataset in zip(names, datasets):
                if not len(dataset):
                    raise FileNotFoundError(f"LibriSpeech {name}: no <speaker>/<chapter>/*.flac under "
                                            f"{os.path.join(archive, name)!r}")
            return _LibriSpeechItems(datasets, archive)

        self.train_set = subsets(self.train_subsets)
        self.val_set, self.test_set = subsets([self.val_subset]), subsets([self.test_subset])

    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "tokenizer" in state_dict:
            self.tokenizer = tokenizer_from_state(state_dict["tokenizer"])
