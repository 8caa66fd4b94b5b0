"""The GPU-sized configs on real data sets, run on the CPU against tiny stand-ins in the real
on-disk layouts (tests/fake_corpora.py): each config as written (its task, data module, tokenizer,
compile and evaluation settings), with the model shrunk and batches cut so that fast_dev_run takes
seconds. tests/test_cli_training.py checks the same configs without their data."""

from __future__ import annotations

import json
import math
import os

import pytest
import torchvision

import fake_corpora
import kernels
from tasks.lightning_cli import ZooCLI

TINY = json.dumps({"dim": 32, "depth": 1, "heads": 2})


def _cifar10(tmp_path, monkeypatch):
    # The stand-in's MD5s are not CIFAR-10's: let torchvision read it as the real files.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return [f"--data.init_args.root={fake_corpora.cifar10(tmp_path)}", "--data.init_args.batch_size=8"]


def _image_folders(tmp_path, monkeypatch):
    return [f"--data.init_args.root={fake_corpora.image_folders(tmp_path)}", "--data.init_args.batch_size=4"]


def _text(tmp_path, monkeypatch, length_key):
    return [f"--data.init_args.paths={fake_corpora.text_files(tmp_path)}", "--data.init_args.subword_vocab_size=200",
            f"--data.init_args.{length_key}=64", "--data.init_args.batch_size=4"]


def _parallel(tmp_path, monkeypatch):
    train, valid = fake_corpora.parallel_text(tmp_path)
    return [f"--data.init_args.train_path={train}", f"--data.init_args.val_path={valid}",
            "--data.init_args.vocab_size=300", "--model.init_args.vocab_size=300", "--data.init_args.max_length=32",
            "--model.init_args.max_new_tokens=12", "--data.init_args.batch_size=4"]


def _speech_commands(tmp_path, monkeypatch):
    return [f"--data.init_args.root={fake_corpora.speech_commands(tmp_path)}", "--data.init_args.batch_size=4"]


def _librispeech(tmp_path, monkeypatch):
    return [f"--data.init_args.root={fake_corpora.librispeech(tmp_path)}", "--data.init_args.batch_size=2"]


CONFIGS = {
    "vision/vit_cifar10.yaml": _cifar10,
    "vision/vit_imagefolder.yaml": _image_folders,
    "text/gpt2_text.yaml": lambda tmp_path, mp: _text(tmp_path, mp, "block_size"),
    "text/bert_base_text.yaml": lambda tmp_path, mp: _text(tmp_path, mp, "max_length"),
    "text/seq2seq_tsv.yaml": _parallel,
    "speech/kws_speech_commands.yaml": _speech_commands,
    "speech/ctc_librispeech.yaml": _librispeech,
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_gpu_sized_config_runs_fast_dev_run_on_its_data_layout(config, tmp_path, monkeypatch):
    data_args = CONFIGS[config](tmp_path / "data", monkeypatch)
    args = ["fit", "-c", os.path.join(os.path.dirname(__file__), "..", "configs", config), *data_args,
            f"--model.init_args.model_args={TINY}", "--data.init_args.num_workers=0",
            "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path / 'runs'}"]
    # The ops' own PyTorch bodies, as a CPU run without the interpreter takes under torch.compile (the
    # interpreter of this test process would otherwise run the Triton kernels).
    with kernels.reference_only(native=False):
        cli = ZooCLI(args=args)
    assert cli.trainer.state.finished
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"]), metrics
