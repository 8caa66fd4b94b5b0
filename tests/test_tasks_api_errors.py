"""The tasks' and data modules' Python API: bad arguments fail at construction with a message
naming the argument and what was expected, and local data problems name the file or folder.

The expectations are the documented domains of the arguments (AdamW's learning rate > 0 and
betas in [0, 1), torch's label smoothing in [0, 1], a DataLoader's batch_size >= 1 and
num_workers >= 0) and the paths the test itself creates.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

import kernels
from tasks.data.dates import DatesDataModule
from tasks.data.speech_corpora import LibriSpeechDataModule
from tasks.data.vision import DigitsDataModule, ImageFolderDataModule
from tasks.seq2seq import Seq2Seq
from tasks.vision import ImageClassification

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs,name", [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": NAN}, "lr"), ({"lr": INF}, "lr"), ({"lr": True}, "lr"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"weight_decay": NAN}, "weight_decay"),
    ({"betas": (1.5, 0.999)}, "betas"), ({"betas": (0.9,)}, "betas"), ({"betas": (0.9, NAN)}, "betas"),
    ({"warmup": INF}, "warmup"), ({"warmup": -0.1}, "warmup"),
    ({"label_smoothing": 1.0}, "label_smoothing"), ({"label_smoothing": -0.1}, "label_smoothing"),
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 2.0}, "num_classes"),
])
def test_bad_optimizer_and_loss_settings_fail_at_construction_naming_the_argument(kwargs, name):
    """Before, lr=0 trained nothing without a word, a negative or NaN lr failed only when fit()
    reached configure_optimizers (torch's "Invalid learning rate"), and warmup=inf raised an
    OverflowError."""
    with kernels.reference_only(), pytest.raises(ValueError, match=rf"^{name} must be"):
        ImageClassification("vit_digits", model_args={"depth": 1}, **kwargs)


def test_seq2seq_checks_its_label_smoothing():
    with kernels.reference_only(), pytest.raises(ValueError, match=r"^label_smoothing must be in \[0, 1\)"):
        Seq2Seq(label_smoothing=2.0)


def test_good_optimizer_settings_are_kept():
    with kernels.reference_only():
        task = ImageClassification("vit_digits", model_args={"depth": 1}, lr=3e-4, weight_decay=0.0,
                                   betas=[0.9, 0.95], warmup=10, label_smoothing=0.1)
    optimizer = torch.optim.AdamW(task.parameters(), lr=task.hparams.lr, betas=tuple(task.hparams.betas))
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (0.9, 0.95)
    assert math.isclose(task.hparams.label_smoothing, 0.1)


@pytest.mark.parametrize("build", [DatesDataModule, DigitsDataModule])
@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"batch_size": True}, "batch_size must be an int >= 1, got True"),
    ({"batch_size": 2.5}, "batch_size must be an int >= 1, got 2.5"),
    ({"num_workers": -1}, r"num_workers must be an int >= 0 .*got -1"),
    ({"num_workers": 1.5}, r"num_workers must be an int >= 0 .*got 1.5"),
])
def test_data_modules_check_batch_size_and_workers_at_construction(build, kwargs, message):
    """Before, the DataLoader refused them only after setup() had built the data (minutes for
    synthesized speech or the stdlib corpus), without naming the data module."""
    with pytest.raises(ValueError, match=rf"^{build.__name__}: {message}"):
        build(**kwargs)


@pytest.mark.parametrize("build,kwargs,message", [
    ("LanguageModelDataModule", {"block_size": 2.5}, "block_size must be an int >= 2, got 2.5"),
    ("LanguageModelDataModule", {"subword_vocab_size": 0}, "subword_vocab_size must be an int >= 1, got 0"),
    ("MaskedLMDataModule", {"max_length": 64.0}, r"max_length must be an int >= 3 .*got 64.0"),
    ("TSVDataModule", {"train_path": "pairs.tsv", "max_length": 1}, r"max_length must be an int >= 2 .*got 1"),
    ("ImageFolderDataModule", {"root": "images", "image_size": 0}, "image_size must be an int >= 1, got 0"),
    ("DigitsDataModule", {"shift": -1}, r"shift must be an int >= 0 \(pixels\), got -1"),
    ("DigitsDataModule", {"shift": 1.5}, r"shift must be an int >= 0 \(pixels\), got 1.5"),
    ("DigitsDataModule", {"shift": 8}, r"shift must be at most 7 \(the images are 8 x 8\), got 8"),
])
def test_data_module_sizes_are_ints_checked_at_construction(build, kwargs, message):
    """A fractional size passed construction and failed when the data was sliced (block_size
    2.5), or a too-small one only at the first loader (max_length 1): now at construction, naming
    the module and the argument, before any data is read."""
    import importlib

    module = {"TSVDataModule": "parallel", "ImageFolderDataModule": "vision", "DigitsDataModule": "vision"}.get(
        build, "text")
    cls = getattr(importlib.import_module(f"tasks.data.{module}"), build)
    with pytest.raises(ValueError, match=rf"^{build}: {message}"):
        cls(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"train_per_word": 0}, r"train_per_word must be an int >= 1, got 0"),
    ({"eval_per_word": 2.5}, r"eval_per_word must be an int >= 1, got 2.5"),
    ({"duration": 0}, r"duration must be a number of seconds > 0 or None, got 0"),
    ({"duration": NAN}, r"duration must be a number of seconds > 0 or None, got nan"),
    ({"snr_db": (40.0, 10.0)}, r"snr_db must be a \(min, max\) pair of numbers with min <= max"),
    ({"snr_db": (10.0, NAN)}, r"snr_db must be a \(min, max\) pair of numbers"),
    ({"snr_db": 20.0}, r"snr_db must be a \(min, max\) pair"),
    ({"speeds": (220, 120)}, r"speeds must be a \(min, max\) pair of ints within \[80, 450\]"),
    ({"speeds": (120.5, 220)}, r"speeds must be a \(min, max\) pair of ints"),
    ({"speeds": (40, 220)}, r"speeds must be .* within \[80, 450\] .*got \(40, 220\)"),
    ({"pitches": (20, 150)}, r"pitches must be a \(min, max\) pair of ints within \[0, 99\]"),
    ({"shares": (100, 0, 0)}, r"shares must be three ints >= 1 \(train, val, test"),
    ({"shares": (70, 30)}, r"shares must be three ints >= 1"),
    ({"synth_workers": 0}, r"synth_workers must be an int >= 1, got 0"),
])
def test_keyword_synthesis_settings_fail_at_construction(kwargs, message):
    """Before, each of these passed construction: reversed or fractional speeds failed inside
    the synthesis loop with random's "empty range", pitches past 99 and speeds below 80 went to
    espeak-ng outside its documented ranges (its man page: -p 0 to 99; speak_lib.h: rate 80 to
    450 words per minute), a NaN SNR made every training clip NaN, a zero share ended in "no
    voice variant for the val split" after listing espeak's voices, and synth_workers=0
    silently became the CPU count."""
    from tasks.data.speech import KeywordDataModule

    with pytest.raises(ValueError, match=rf"^KeywordDataModule: {message}"):
        KeywordDataModule(**kwargs)


def test_keyword_words_must_be_strings():
    from tasks.data.speech import KeywordDataModule

    with pytest.raises(ValueError, match=r"words must be non-empty strings"):
        KeywordDataModule(words=["yes", 3])
    dm = KeywordDataModule(words=["yes", "no"], speeds=(80, 450), pitches=(0, 99), shares=(1, 1, 1), duration=None)
    assert dm.speeds == (80, 450) and dm.pitches == (0, 99) and dm.duration is None


def _librispeech(root, subsets):
    """One (empty) utterance per subset: enough for torchaudio's LIBRISPEECH to list it."""
    for name in subsets:
        chapter = root / "LibriSpeech" / name / "19" / "198"
        chapter.mkdir(parents=True)
        (chapter / "19-198-0000.flac").write_bytes(b"")
        (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO\n")


@pytest.mark.parametrize("shift", [-0.1, 1.5, NAN, "0.1", None])
def test_speech_commands_shift_is_checked_at_construction(shift):
    """A negative shift passed construction and failed at the first training batch, in torch's
    randint ("random_ expects 'from' to be less than 'to'"), naming nothing of ours."""
    from tasks.data.speech_corpora import SpeechCommandsDataModule

    with pytest.raises(ValueError, match=rf"^SpeechCommandsDataModule: shift must be a number of seconds in \[0, 1\], "
                                         rf"got {re.escape(repr(shift))}"):
        SpeechCommandsDataModule("unused", shift=shift)
    assert SpeechCommandsDataModule("unused", shift=0).shift == 0


def test_librispeech_takes_one_training_subset_as_a_str(tmp_path):
    """A str is one subset's name, as for val_subset and test_subset; before, it was read as a
    list of its characters ("LibriSpeech t: no directory at .../LibriSpeech/t")."""
    _librispeech(tmp_path, ["train-clean-100", "dev-clean", "test-clean"])
    dm = LibriSpeechDataModule(str(tmp_path), train_subsets="train-clean-100", num_workers=0)
    dm.setup("fit")
    assert dm.train_subsets == ["train-clean-100"] and len(dm.train_set) == 1
    with pytest.raises(ValueError, match="train_subsets names no subset"):
        LibriSpeechDataModule(str(tmp_path), train_subsets=[], num_workers=0)


def test_an_image_folder_with_an_empty_class_folder_is_named(tmp_path):
    """torchvision says only "Found no valid file for the classes dog": which of the splits'
    folders it means was left to guess."""
    from PIL import Image

    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
    for folder in ("train/cat", "train/dog", "val/cat"):
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "0.png")
    (tmp_path / "val" / "dog" / "notes.txt").write_text("not an image")
    val = re.escape(os.path.abspath(tmp_path / "val"))
    with pytest.raises(FileNotFoundError, match=rf"^ImageFolderDataModule: '{val}': .*dog.*ending in \.jpg"):
        ImageFolderDataModule(str(tmp_path), image_size=8, num_workers=0).setup("fit")


def test_an_image_folder_root_may_start_with_the_home_folder_and_a_huge_image_is_named(tmp_path, monkeypatch):
    """`root: ~/images` as torchvision's own data sets take it; an image past PIL's pixel limit (a
    DecompressionBombError, not an OSError) is named with its path like a corrupt one."""
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / "images" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(tmp_path / "images" / split / "cat" / "0.png")
    monkeypatch.setenv("HOME", str(tmp_path))
    dm = ImageFolderDataModule("~/images", image_size=8, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 1 and dm.root == str(tmp_path / "images")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16 x 16 is more than twice this: PIL refuses
    path = re.escape(str(tmp_path / "images" / "val" / "cat" / "0.png"))
    with pytest.raises(ValueError, match=rf"^{path}: cannot read this image \(DecompressionBombError"):
        dm.val_set[0]


def test_a_warmup_as_long_as_the_run_is_said_to_be_cut():
    """warmup=100 in a 10-step run: the schedule cuts it to 9 steps (the rate peaks at the last
    step; no cosine phase, min_lr_ratio unused). Said, not silent. Oracle: the warmup formula."""
    from types import SimpleNamespace

    with kernels.reference_only():
        task = ImageClassification("vit_digits", model_args={"depth": 1}, lr=1e-2, warmup=100, min_lr_ratio=0.1)
    task._trainer = SimpleNamespace(estimated_stepping_batches=10)
    with pytest.warns(UserWarning, match=r"warmup of 100 steps is not shorter than the run's 10 optimizer steps: "
                                         r"it is cut to 9"):
        scheduler = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-2 * (1e-3 + (1 - 1e-3) * step / 9) for step in range(10)])
