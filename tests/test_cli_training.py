"""Training through the CLI and Lightning: configs, convergence, resume, DDP, backends, errors."""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler

import kernels
import zoo
from tasks import CausalLM, ImageClassification, MaskedLM, Seq2Seq
from tasks.base import ClassificationTask
from tasks.data.vision import DigitsDataModule
from tasks.lightning_cli import ZooCLI, batch_size_of

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "**", "*.yaml"), recursive=True))


def _local_data_path(config_path: str):
    """The local data folder/file a config reads, if it names one (GPU-sized configs on real data)."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    args = (config.get("data") or {}).get("init_args") or {}
    for key in ("root", "path", "paths", "train_path", "train_file"):
        value = args.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, str):
            return value
    return None


def _fit(args, tmp_path):
    return ZooCLI(args=["fit", *args, f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.dirname(CONFIGS[0]) + "/.."))
def test_every_config_parses_and_runs_fast_dev_run(config, tmp_path, capsys):
    data_path = _local_data_path(config)
    args = ["-c", config, "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true"]
    with kernels.reference_only():
        if data_path is not None and not os.path.exists(data_path):
            # Real-data configs point at local folders; here they are absent and must say where they looked.
            with pytest.raises(FileNotFoundError, match=re.escape(os.path.basename(data_path.rstrip("/")))):
                _fit(args, tmp_path)
        else:
            cli = _fit(args, tmp_path)
            assert cli.trainer.state.finished
            # fast_dev_run logs nothing (Lightning's DummyLogger): the closing line says so.
            assert "; no logs (fast_dev_run" in capsys.readouterr().out and not os.listdir(tmp_path)


EMBEDDED_DATA_CONFIGS = [c for c in CONFIGS if _local_data_path(c) is None]


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "predictions.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("config", EMBEDDED_DATA_CONFIGS,
                         ids=lambda p: os.path.relpath(p, os.path.dirname(CONFIGS[0]) + "/.."))
def test_predict_writes_a_record_per_sample(config, tmp_path, capsys):
    """`zoo predict` on every config with embedded data: predictions.jsonl holds one record per
    sample of the first test batch, each equal to what the model computes for that sample here
    (float64 softmax / cross-entropy of its logits), and the printed summary adds them up."""
    with kernels.reference_only():
        cli = ZooCLI(args=["predict", "-c", config, "--trainer.limit_predict_batches=1", "--trainer.accelerator=cpu",
                           "--trainer.devices=1", "--trainer.precision=32-true", "--seed_everything=0",
                           "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
        batch = next(iter(cli.datamodule.predict_dataloader()))
        task = cli.model.eval()
        records = _records(cli.trainer.log_dir)
        assert len(records) == batch_size_of(batch)
        summary = capsys.readouterr().out
        assert f"zoo predict: {len(records)} predictions in " in summary
        with torch.no_grad():
            if isinstance(task, ClassificationTask):
                logits, labels = task.logits_and_labels(batch)
                probs = logits.double().softmax(dim=-1)
                assert [r["prediction"] for r in records] == probs.argmax(dim=-1).tolist()
                assert [r["label"] for r in records] == labels.tolist()
                torch.testing.assert_close(torch.tensor([r["probability"] for r in records], dtype=torch.float64),
                                           probs.amax(dim=-1), rtol=1e-5, atol=1e-7)
                top = torch.tensor([[p for _, p in r["top"]] for r in records], dtype=torch.float64)
                torch.testing.assert_close(top, probs.topk(min(5, probs.shape[-1]), dim=-1).values, rtol=1e-5,
                                           atol=1e-7)
                assert [r["class"] for r in records] == [cli.datamodule.classes[r["prediction"]] for r in records]
                correct = sum(r["prediction"] == r["label"] for r in records)
                assert [r["correct"] for r in records] == [r["prediction"] == r["label"] for r in records]
                assert f"{correct}/{len(records)} correct" in summary
            elif isinstance(task, (CausalLM, MaskedLM)):
                logits = task(batch["input_ids"], attention_mask=batch.get("attention_mask")).double()
                labels = batch["labels"]
                losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
                scored = labels != -100
                assert [r["tokens"] for r in records] == scored.sum(dim=1).tolist()
                expected = losses.sum(dim=1) / scored.sum(dim=1)
                torch.testing.assert_close(torch.tensor([r["loss"] for r in records], dtype=torch.float64), expected,
                                           rtol=1e-5, atol=1e-6)
                mean = float(losses.sum() / scored.sum())
                assert f"loss {mean:.4f} nats over {int(scored.sum())} tokens (ppl {math.exp(mean):.3f})" in summary
                tokenizer = cli.datamodule.tokenizer
                if isinstance(task, MaskedLM):
                    guesses = logits.argmax(dim=-1)
                    assert [r["matched"] for r in records] == ((guesses == labels) & scored).sum(dim=1).tolist()
                    assert records[0]["masked"] == [tokenizer.decode([i]) for i in labels[0][scored[0]].tolist()]
                else:
                    assert records[0]["prediction"] == tokenizer.decode(logits[0].argmax(dim=-1)[scored[0]].tolist())
            else:
                texts = batch["target_text"] if isinstance(task, Seq2Seq) else batch["texts"]
                assert [r["reference"] for r in records] == list(texts)
                assert [r["correct"] for r in records] == [r["prediction"] == r["reference"] for r in records]


def test_prediction_writer_rejects_a_predict_step_without_records(tmp_path):
    """A predict_step that returns a tensor, not one dict per sample, is named in the error."""
    from tasks.callbacks import PredictionWriter

    class Probabilities(ImageClassification):
        def predict_step(self, batch, batch_idx):
            return self.model(batch[0]).softmax(dim=-1)

    writer = PredictionWriter(str(tmp_path / "out" / "p.jsonl"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[writer],
                        enable_progress_bar=False, enable_model_summary=False)
    images = DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)),
                        batch_size=2)
    with kernels.reference_only(), pytest.raises(TypeError, match="Probabilities.predict_step must return a list"):
        trainer.predict(Probabilities(model="vit_digits", model_args={"depth": 1}), images)
    assert writer.written == str(tmp_path / "out" / "p.jsonl") and writer._file is None  # closed after the error


def test_print_config_resolves_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ZooCLI(args=["fit", "-c", "configs/vision/vit_digits.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "tasks.ImageClassification"
    assert printed["model"]["init_args"]["model"] == "vit_digits"
    assert printed["trainer"]["gradient_clip_val"] == 1.0


@pytest.mark.parametrize("config,key,value,expected", [
    ("speech/ctc_librispeech.yaml", "train_subsets", "train-clean-360", "train-clean-360"),
    ("speech/ctc_librispeech.yaml", "train_subsets", "[train-clean-100, train-clean-360]",
     ["train-clean-100", "train-clean-360"]),
    ("speech/kws_speech_commands.yaml", "words", "up", "up"),
    ("speech/kws_speech_commands.yaml", "words", "[up, down]", ["up", "down"]),
    ("text/gpt_char.yaml", "corpora", "stdlib", "stdlib"),
    ("text/gpt_char.yaml", "suffixes", ".md", ".md"),
])
def test_list_options_take_one_name_as_a_str_on_the_command_line(config, key, value, expected, capsys):
    """The data modules take a str for one subset, word, corpus or suffix (their docstrings); the
    CLI refused it before ("Expected a <class 'collections.abc.Sequence'>"), as their type hints
    allowed only lists."""
    with pytest.raises(SystemExit) as exit_info:
        ZooCLI(args=["fit", "-c", f"configs/{config}", f"--data.init_args.{key}={value}", "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert yaml.safe_load(capsys.readouterr().out)["data"]["init_args"][key] == expected


@pytest.mark.parametrize("override,key", [
    ("--model.init_args.lr=fast", "lr"),
    ("--model.init_args.learning_rate=0.1", "learning_rate"),
    ("--data.init_args.batch_sise=8", "batch_sise"),
])
def test_bad_keys_and_types_are_rejected_naming_the_key(override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ZooCLI(args=["fit", "-c", "configs/vision/vit_digits.yaml", override])
    assert exit_info.value.code != 0
    assert key in capsys.readouterr().err


@pytest.mark.parametrize("override,build", [
    ('--model.init_args.model_args={"dpeth": 2}', lambda: zoo.create_model("vit_digits", dpeth=2)),
    ("--model.init_args.warmup=1.5", lambda: ImageClassification("vit_digits", warmup=1.5)),
])
def test_a_constructor_error_of_the_config_is_one_line_without_traceback(override, build, capsys):
    """A misspelled model_args key (or a value the task refuses) fails where the class is built,
    inside jsonargparse: what the user sees is the constructor's own message, the same as building
    it directly (the oracle) says, on one line, with status 2, not jsonargparse's traceback."""
    with pytest.raises((TypeError, ValueError)) as direct:
        build()
    with pytest.raises(SystemExit) as exit_info:
        ZooCLI(args=["fit", "-c", "configs/vision/vit_digits.yaml", override, "--trainer.fast_dev_run=true",
                     "--trainer.accelerator=cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"zoo fit: error: {direct.value}\n"
    if "dpeth" in override:
        assert str(direct.value) == "ViTConfig has no option 'dpeth'; did you mean 'depth'?"


@pytest.mark.parametrize("option", ["--trainer.max_epoch=1", "--trainer.max_epoch", "--seed_every=1", "--nam=x"])
def test_abbreviated_options_are_refused(option, capsys):
    """jsonargparse, as argparse, would take an unambiguous prefix for the option (max_epoch for
    max_epochs); `zoo fit` names it as unrecognized instead, at the top level and in groups."""
    args = ["fit", "-c", "configs/vision/vit_digits.yaml", option, "--print_config"]
    if "=" not in option:
        args.insert(4, "1")
    with pytest.raises(SystemExit) as exit_info:
        ZooCLI(args=args)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {option}" in capsys.readouterr().err


def test_fit_with_the_throughput_monitor_does_not_warn_about_flops(tmp_path):
    """ThroughputMonitor (a default callback of `zoo fit`) warned on every run that the task has
    no flops_per_batch; it still logs the samples it counts (2 steps of the config's batch)."""
    from lightning.pytorch.callbacks import ThroughputMonitor

    with kernels.reference_only(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _fit(["-c", "configs/vision/vit_digits.yaml", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                    "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false"], tmp_path)
    assert any(isinstance(c, ThroughputMonitor) for c in cli.trainer.callbacks)
    assert [str(w.message) for w in caught if "flops_per_batch" in str(w.message)] == []
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert cli.trainer.logged_metrics["train/samples"] == 2 * batch_size_of(batch)


def test_wrong_data_path_names_the_path(tmp_path):
    missing = tmp_path / "no_such_images"
    with pytest.raises(FileNotFoundError, match="no_such_images"):
        _fit(["--model=tasks.ImageClassification", "--model.init_args.model=vit_digits",
              "--data=tasks.data.vision.ImageFolderDataModule", f"--data.init_args.root={missing}",
              "--trainer.fast_dev_run=true"], tmp_path)


def test_shift_augmentation_differs_across_loader_workers():
    """Each worker holds a copy of the dataset: seeded alike, two workers drew the same shifts in pairs."""
    from torch.utils.data import DataLoader, TensorDataset

    from tasks.data.vision import _Shift

    image = torch.zeros(1, 9, 9)
    image[0, 4, 4] = 1.0  # one lit pixel: its position after the shift is the shift
    shifted = _Shift(TensorDataset(image.expand(16, 1, 9, 9), torch.zeros(16, dtype=torch.long)), pixels=2)
    loader = DataLoader(shifted, batch_size=1, num_workers=2, shuffle=False)
    moves = [tuple((batch[0][0, 0] == 1).nonzero()[0].tolist()) for batch in loader]
    assert all(0 <= dy - 4 + 2 <= 4 and 0 <= dx - 4 + 2 <= 4 for dy, dx in moves)
    assert moves[0::2] != moves[1::2]  # worker 0 serves the even samples, worker 1 the odd ones


def test_digit_shifts_bring_in_the_background():
    """The shift runs after standardization: the pixels it brings in must be the background's
    standardized value (a digit's blank border), not 0, which is the training mean, a grey stroke.
    Oracle: the image moved by the drawn shift, the rows and columns it vacates set to the border
    value of the unshifted images (blank in every digit)."""
    dm = DigitsDataModule(batch_size=32, shift=3)
    dm.setup("fit")
    background = dm.val_set[0][0][0, 0, 0]
    assert background < -0.5 and all(dm.val_set[i][0][0, 0, 0] == background for i in range(20))
    for i in range(20):
        torch.manual_seed(i)
        dy, dx = torch.randint(-3, 4, (2,)).tolist()  # the draw _Shift makes
        torch.manual_seed(i)
        got = dm.train_set[i][0][0]
        expected = torch.full((8, 8), float(background))
        plain = dm.train_set.base[i][0][0]
        expected[max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
            plain[max(-dy, 0):8 - max(dy, 0), max(-dx, 0):8 - max(dx, 0)]
        assert torch.equal(got, expected), (i, dy, dx)


def test_data_module_loaders():
    """Every data module's loaders (tasks/data/loaders.py): asking before setup() names the
    module; training shuffles unless shuffle=False; val, test and predict keep their order."""
    dm = DigitsDataModule(batch_size=32)
    with pytest.raises(RuntimeError, match=r"DigitsDataModule: call setup\(\)"):
        dm.train_dataloader()
    dm.setup()
    first = [next(iter(dm.train_dataloader()))[1] for _ in range(2)]
    assert not torch.equal(*first)  # two epochs' first batches: reshuffled
    for loader in (dm.val_dataloader, dm.test_dataloader, dm.predict_dataloader):
        assert torch.equal(next(iter(loader()))[1], next(iter(loader()))[1])
    assert torch.equal(next(iter(dm.predict_dataloader()))[1], next(iter(dm.test_dataloader()))[1])
    fixed = DigitsDataModule(batch_size=32, shuffle=False)
    fixed.setup()
    assert torch.equal(next(iter(fixed.train_dataloader()))[1], next(iter(fixed.train_dataloader()))[1])


def _image_folders(root, splits: dict) -> None:
    """root/<split>/<class>/<i>.png: 2 tiny images per class, each class its own grey level."""
    from PIL import Image

    for split, classes in splits.items():
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(2):
                Image.new("L", (8, 8), color=10 * (ord(name[0]) - 96)).save(root / split / name / f"{i}.png")


def test_image_folder_evaluation_splits_keep_the_training_labels(tmp_path):
    """torchvision numbers each folder's own classes: a val split without "dog" must still label
    fox as train's fox (2), not 1; a class the training split lacks is an error naming it."""
    from tasks.data.vision import ImageFolderDataModule

    _image_folders(tmp_path / "a", {"train": ["cat", "dog", "fox"], "val": ["cat", "fox"]})
    dm = ImageFolderDataModule(root=str(tmp_path / "a"), image_size=8, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "fox"] and dm.num_classes == 3
    for dataset in (dm.val_set, dm.test_set):
        labels = {os.path.basename(os.path.dirname(path)): label for path, label in dataset.samples}
        assert labels == {"cat": 0, "fox": 2} and dataset.targets == [0, 0, 2, 2]
        assert [int(dataset[i][1]) for i in range(len(dataset))] == [0, 0, 2, 2]
    _image_folders(tmp_path / "b", {"train": ["cat", "dog"], "val": ["cat", "emu"]})
    with pytest.raises(ValueError, match="class folders that the training folder .* lacks: emu"):
        ImageFolderDataModule(root=str(tmp_path / "b"), image_size=8, num_workers=0).setup("fit")


def test_image_folders_read_gif_and_name_a_truncated_image(tmp_path):
    from PIL import Image

    from tasks.data.vision import ImageFolderDataModule

    _image_folders(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    Image.new("L", (8, 8), color=50).save(tmp_path / "train" / "dog" / "2.gif")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image: ignored")
    broken = tmp_path / "val" / "cat" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # cut off inside the image data
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert sorted(os.path.basename(p) for p, _ in dm.train_set.samples) == ["0.png", "0.png", "1.png", "1.png",
                                                                             "2.gif"]
    assert dm.train_set[4][0].shape == (3, 8, 8)
    names = [os.path.basename(p) for p, _ in dm.val_set.samples]
    with pytest.raises(ValueError, match=re.escape(f"{broken}: cannot read this image")):
        dm.val_set[names.index("1.png")]


def test_a_missing_or_corrupt_cifar_file_is_named(tmp_path):
    from tasks.data.vision import CIFAR10DataModule

    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / 'data_batch_1'}' is missing")):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup("fit")
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not CIFAR")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder / 'data_batch_1'}' is corrupt")) as error:
        CIFAR10DataModule(root=str(tmp_path), num_workers=0).setup("fit")
    assert "download" not in str(error.value)  # no advice to use an option the module does not have


def test_classifier_head_is_checked_against_the_data(tmp_path):
    _image_folders(tmp_path, {"train": ["cat", "dog", "fox"], "val": ["cat", "dog", "fox"]})
    args = ["--model=tasks.ImageClassification", "--model.init_args.model=vit_digits",
            "--model.init_args.model_args={'img_size': 8, 'in_chans': 3, 'depth': 1}",
            "--data=tasks.data.vision.ImageFolderDataModule", f"--data.init_args.root={tmp_path}",
            "--data.init_args.image_size=8", "--data.init_args.num_workers=0", "--trainer.fast_dev_run=true"]
    with kernels.reference_only():
        with pytest.raises(ValueError, match="the data has 3 classes but the model's head has 2"):
            _fit(args + ["--model.init_args.num_classes=2"], tmp_path)
        with pytest.warns(UserWarning, match="outputs 3 to 4 are never a target"):
            _fit(args + ["--model.init_args.num_classes=5"], tmp_path)


def test_digits_converges(tmp_path, capsys):
    """A short run of the README's main job: far above chance (10%) on held-out digits."""
    with kernels.reference_only():
        cli = _fit(["-c", "configs/vision/vit_digits.yaml", "--trainer.max_epochs=12",
                    "--trainer.enable_progress_bar=false"], tmp_path)
    accuracy = float(cli.trainer.callback_metrics["val/acc"])
    assert accuracy >= 0.90, accuracy
    summary = capsys.readouterr().out
    assert "zoo fit: val/acc = " in summary
    assert f"at the last validation ({cli.trainer.global_step} steps in all)" in summary
    run_dir = cli.trainer.log_dir
    for artefact in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt"):
        assert os.path.exists(os.path.join(run_dir, artefact)), artefact
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    # last.ckpt holds the final weights, whether or not the last epoch was the best.
    last = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), weights_only=False, map_location="cpu")
    assert last["global_step"] == cli.trainer.global_step
    (best,) = glob.glob(os.path.join(run_dir, "checkpoints", "best-*.ckpt"))
    assert torch.load(best, weights_only=False, map_location="cpu")["global_step"] <= cli.trainer.global_step


def _task(**kwargs):
    return ImageClassification(model="vit_digits", model_args={"drop_path": 0.0, "depth": 2}, lr=3e-3, **kwargs)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_resume_continues_at_the_same_step_with_the_same_optimizer_state(tmp_path):
    with kernels.reference_only():
        first = _trainer(tmp_path, max_epochs=2, enable_checkpointing=True,
                         callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        first.fit(_task(), DigitsDataModule(batch_size=128))
        saved = torch.load(tmp_path / "last.ckpt", weights_only=False)

        class Probe(L.Callback):
            def on_train_start(self, trainer, module):
                self.step = trainer.global_step
                self.state = copy.deepcopy(trainer.optimizers[0].state_dict())  # the live tensors move on
                self.lr = trainer.optimizers[0].param_groups[0]["lr"]

        probe = Probe()
        resumed = _trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[
            probe, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "resumed", save_last=True)])
        resumed.fit(_task(), DigitsDataModule(batch_size=128), ckpt_path=str(tmp_path / "last.ckpt"))
    assert probe.step == saved["global_step"] == first.global_step
    expected = saved["optimizer_states"][0]
    assert probe.state["state"].keys() == expected["state"].keys()
    for index, slot in expected["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(probe.state["state"][index][name]), torch.as_tensor(value)), name
    assert probe.lr == pytest.approx(expected["param_groups"][0]["lr"])
    assert resumed.global_step == saved["global_step"] + first.num_training_batches


def test_fit_from_a_checkpoint_names_the_settings_the_checkpoint_replaces(tmp_path):
    """LightningCLI puts the checkpoint's model hyperparameters over the command line's: a resume
    with another lr or model size trains the checkpoint's. Said, naming each (before: silence)."""
    with kernels.reference_only():
        _fit(["-c", "configs/vision/vit_digits.yaml", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
              "--model.init_args.model_args={'depth': 1}", "--trainer.enable_progress_bar=false"], tmp_path)
    (checkpoint,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    resume = ["-c", "configs/vision/vit_digits.yaml", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
              "--model.init_args.model_args={'depth': 1}", f"--ckpt_path={checkpoint}"]  # step 1: nothing to do
    with kernels.reference_only(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit([*resume, "--model.init_args.lr=1e-4"], tmp_path)
        said = [str(w.message) for w in caught if "checkpoint's model settings" in str(w.message)]
        assert len(said) == 1 and "lr 0.0001 -> 0.003" in said[0]
        caught.clear()
        _fit(resume, tmp_path)  # the same settings: nothing to say
        assert not [w for w in caught if "checkpoint's model settings" in str(w.message)]


def test_learning_rate_schedule_and_a_longer_resumed_run():
    """Warmup then cosine, against the formula written out; resumed with more steps, the schedule
    follows the new length from where it stopped (never back up towards the peak)."""
    from tasks.base import warmup_cosine

    def expected(step, total, warmup, lr=1e-3, floor=0.1):
        if step < warmup:
            return lr * (1e-3 + (1 - 1e-3) * step / warmup)
        progress = min(step - warmup, total - warmup) / (total - warmup)
        return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=3, min_lr_ratio=0.1)
    seen = []
    for _ in range(12):  # two steps past the end: it stays at the floor
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([expected(t, 10, 3) for t in range(12)], rel=1e-12, abs=0)
    # Resume after 6 steps with 20 in all: the saved state is the step count, the curve the new one's.
    state = warmup_cosine(torch.optim.AdamW([param], lr=1e-3), 10, 3, 0.1)
    for _ in range(6):
        state.optimizer.step()
        state.step()
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    resumed = warmup_cosine(optimizer, total_steps=20, warmup_steps=3, min_lr_ratio=0.1)
    resumed.load_state_dict(state.state_dict())
    after = []
    for _ in range(14):
        optimizer.step()
        resumed.step()
        after.append(optimizer.param_groups[0]["lr"])
    assert after == pytest.approx([expected(t, 20, 3) for t in range(7, 21)], rel=1e-12, abs=0)
    assert all(a >= b for a, b in zip(after, after[1:]))


class _RecordLR(L.Callback):
    """The learning rate each optimizer step uses (read as its batch starts)."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_longer_resumed_run_uses_the_new_curve_from_its_first_step(tmp_path):
    """Lightning restores the optimizer's last learning rate; the first resumed step must still use
    the longer schedule's (the formula of warmup_cosine: warmup 2 steps, floor 0.01 x 3e-3)."""
    def expected(step, total, warmup=2, lr=3e-3, floor=0.01):
        if step < warmup:
            return lr * (1e-3 + (1 - 1e-3) * step / warmup)
        return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2)

    with kernels.reference_only():
        _trainer(tmp_path, max_steps=6, limit_val_batches=0, enable_checkpointing=True, callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
            _task(warmup=2), DigitsDataModule(batch_size=64, shuffle=False))
        record = _RecordLR()
        _trainer(tmp_path / "resumed", max_steps=12, limit_val_batches=0, callbacks=[record]).fit(
            _task(warmup=2), DigitsDataModule(batch_size=64, shuffle=False), ckpt_path=str(tmp_path / "last.ckpt"))
    assert record.lrs == pytest.approx([expected(t, 12) for t in range(6, 12)], rel=1e-9, abs=0)


def test_training_length_and_warmup_fraction(monkeypatch):
    """An unbounded run is refused by name; a warmup fraction rounds (0.29 x 100 is 28.999... in floats)."""
    from types import SimpleNamespace

    task = _task(warmup=0.29)
    task._trainer = SimpleNamespace(estimated_stepping_batches=100, precision_plugin=None)
    factor = task.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert factor(28) < 1.0 and factor(29) == 1.0  # 29 warmup steps: the peak at step 29
    task._trainer = SimpleNamespace(estimated_stepping_batches=math.inf, precision_plugin=None)
    with pytest.raises(ValueError, match="needs a finite training length"):
        task.configure_optimizers()


def test_fused_adamw_is_clipped_under_bf16_mixed(tmp_path, monkeypatch):
    """The CLI's GPU defaults, bf16-mixed + gradient clipping, with the fused AdamW of CUDA runs
    (fused AdamW runs on CPU too): Lightning refuses to clip a fused optimizer; the task clips it
    and trains exactly as with the foreach one that Lightning clips itself."""
    from tasks.base import ZooTask

    states = []
    for fused in (False, True):
        monkeypatch.setattr(ZooTask, "_use_fused_adamw", lambda self, fused=fused: fused)
        torch.manual_seed(0)
        task = _task()
        with kernels.reference_only():
            _trainer(tmp_path, max_steps=3, limit_val_batches=0, precision="bf16-mixed", gradient_clip_val=0.05,
                     enable_checkpointing=False).fit(task, DigitsDataModule(batch_size=64, shuffle=False))
        assert task.optimizers().optimizer.defaults["fused"] is fused
        states.append(task.state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=1e-6, msg=name)


def test_norm_clipping_under_fsdp_uses_the_sharded_norm(tmp_path):
    """Lightning's FSDP precision plugin refuses norm clipping; the task calls the FSDP module's
    clip_grad_norm_ (here FSDP on one CPU process, gloo), which clips as torch's clip_grad_norm_."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    task, reference = _task(), _task()
    reference.load_state_dict(task.state_dict())
    images = torch.randn(8, 1, 8, 8)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(task, device_id=torch.device("cpu"), use_orig_params=True)
        task._trainer = SimpleNamespace(strategy=SimpleNamespace(model=wrapped), gradient_clip_val=1e-3,
                                        gradient_clip_algorithm="norm", precision_plugin=FSDPPrecision("32-true"))
        wrapped(images).square().mean().backward()
        task.configure_gradient_clipping(None, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
        grads = {name: p.grad.clone() for name, p in task.named_parameters()}
    finally:
        dist.destroy_process_group()
    reference(images).square().mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)
    assert norm > 1e-2  # the clip bites
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-9, msg=name)


def test_weight_decay_groups_survive_fsdp_sharding_across_two_processes(tmp_path):
    """FSDP (use_orig_params, as Lightning's) makes each sharded parameter a 1-D view before
    configure_optimizers runs: a weight matrix would read as a bias and lose its weight decay.
    Two CPU processes (gloo), FULL_SHARD over the Blocks; oracle: the parameters' real shapes,
    taken before wrapping (2 and more dims decay, but embedding tables and tokens)."""
    import torch.multiprocessing as mp

    import fsdp_worker

    results = mp.Manager().dict()
    mp.spawn(fsdp_worker.optimizer_groups, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2)
    for rank in (0, 1):
        got = results[rank]
        assert got["sharded_dims"] == [1]  # the views the bug read: every parameter 1-D
        shapes = got["shapes"]
        tables = {name for name in shapes if name.endswith(("pos_embed", "cls_token", "reg_token"))}
        matrices = sorted(name for name, shape in shapes.items() if len(shape) >= 2 and name not in tables)
        assert matrices and got["groups"] == [(0.05, matrices), (0.0, sorted(set(shapes) - set(matrices)))]


def test_last_checkpoint_holds_the_final_step_and_schedule_options_are_checked(tmp_path):
    """With validation every 3 steps and 5 steps in all, last.ckpt is written at step 5, not 3."""
    from tasks.callbacks import FinalCheckpoint

    with kernels.reference_only():
        trainer = _trainer(tmp_path, max_steps=5, val_check_interval=3, limit_val_batches=1,
                           check_val_every_n_epoch=None, enable_checkpointing=True, callbacks=[
                               FinalCheckpoint(dirpath=tmp_path, monitor=None, save_top_k=1, filename="last",
                                               enable_version_counter=False)])
        task = _task()
        trainer.fit(task, DigitsDataModule(batch_size=32))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == trainer.global_step == 5
    for name, value in task.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name
    for bad in (dict(min_lr_ratio=-0.5), dict(min_lr_ratio=3.0)):
        with pytest.raises(ValueError, match="min_lr_ratio must be in"):
            _task(**bad)
    for bad in (dict(warmup=-5), dict(warmup=1.5)):
        with pytest.raises(ValueError, match="warmup must be"):
            _task(**bad)


class _DistributedOrderOnOneProcess(DigitsDataModule):
    """Training batches in the order Lightning's DistributedSampler draws (seed 0), on one process."""

    def train_dataloader(self):
        sampler = DistributedSampler(self.train_set, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)


def test_ddp_two_processes_match_one_process_with_the_doubled_batch(tmp_path, monkeypatch):
    """Gloo DDP on 2 CPU processes with batch B trains the same weights as 1 process with batch 2B.

    Lightning gives each rank r the samples perm[r::2] of one seeded permutation, so the two
    ranks' batch i together are perm[2iB:2(i+1)B]: the single process's batch i when it
    walks the same permutation. DDP averages the two ranks' mean gradients: the mean over
    2B. The last, partial batch (padded by DistributedSampler) is left out.
    """
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(0)
    single = _task()
    ddp = _task()
    ddp.load_state_dict(single.state_dict())
    initial = copy.deepcopy(single.state_dict())
    common = dict(max_epochs=1, limit_train_batches=19, limit_val_batches=0, enable_checkpointing=False,
                  deterministic=True)
    with kernels.reference_only():
        _trainer(tmp_path / "one", devices=1, **common).fit(single, _DistributedOrderOnOneProcess(batch_size=64))
    # Spawned workers start fresh: without the interpreter variable they take the PyTorch path
    # too. (This process must not launch interpreted kernels while it is unset.)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _trainer(tmp_path / "two", devices=2, strategy="ddp_spawn", **common).fit(ddp, DigitsDataModule(batch_size=32))
    moved = max((p - initial[n]).abs().max().item() for n, p in single.named_parameters())
    assert moved > 1e-2  # both trained: the comparison below is not of two untouched models
    for (name, a), (_, b) in zip(single.named_parameters(), ddp.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


_EXIT_PROBE = """
import atexit, sys
import torch.distributed as dist
from tasks import ImageClassification
registered = []
register = atexit.register
atexit.register = lambda fn, *a, **k: registered.append(fn) or register(fn, *a, **k)
register(lambda: print("group open at exit:", dist.is_initialized()))  # runs after the later registrations
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
task = ImageClassification(model="vit_digits", model_args={"depth": 1})
task.setup("fit")
task.setup("validate")
print("registered:", len(registered))
"""


def test_every_rank_closes_its_process_group_at_exit(tmp_path):
    """A task's setup registers the process group's end at exit: the group is closed before
    interpreter shutdown (where a gloo worker thread freeing a collective aborted a finished
    rank), by a handler registered once however many stages run."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(tmp_path / "store")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["registered: 1", "group open at exit: False"]


def test_triton_and_sdpa_backends_train_the_same(tmp_path):
    """The Triton kernels (the interpreter here) and torch SDPA give one loss curve."""
    losses = {}
    for backend in ("triton", "sdpa"):
        torch.manual_seed(0)
        task = ImageClassification(model="vit_digits", lr=3e-3,
                                   model_args={"attn_backend": backend, "drop_path": 0.0, "depth": 2, "heads": 2,
                                               # attention alone differs between the runs
                                               "kernel_ops": False})

        class Record(L.Callback):
            def __init__(self):
                self.losses = []

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                self.losses.append(float(outputs["loss"]))

        record = Record()
        # Small batches: the interpreter runs every (batch, head) program in Python.
        _trainer(tmp_path, max_steps=12, callbacks=[record], enable_checkpointing=False, limit_val_batches=0).fit(
            task, DigitsDataModule(batch_size=8, shuffle=False))
        losses[backend] = torch.tensor(record.losses)
    # fp32 rounding differences grow slowly with steps; a semantic difference (a mask, a
    # scale) shows at the first step at the 1e-2 level.
    assert losses["triton"][0].item() == pytest.approx(losses["sdpa"][0].item(), abs=1e-5)
    torch.testing.assert_close(losses["triton"], losses["sdpa"], rtol=0, atol=1e-3)
    assert losses["sdpa"][-1] < losses["sdpa"][0]


def test_fsdp_strategy_parses_from_yaml(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ZooCLI(args=["fit", "-c", "configs/vision/vit_digits.yaml", "--trainer.strategy=tasks.strategies.BlockFSDP",
                     "--trainer.strategy.activation_checkpointing=true", "--print_config"])
    assert exit_info.value.code == 0
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "tasks.strategies.BlockFSDP"
    assert strategy["init_args"]["activation_checkpointing"] is True


def test_fsdp_strategy_from_the_cli_wraps_and_checkpoints_each_block(tmp_path):
    """LightningCLI passes FSDPStrategy's policies as None: BlockFSDP must still put in its own."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from zoo import Block

    cli = ZooCLI(args=["-c", "configs/vision/vit_digits.yaml", "--trainer.strategy=tasks.strategies.BlockFSDP",
                       "--trainer.strategy.activation_checkpointing=true",
                       f"--trainer.default_root_dir={tmp_path}"], run=False)
    strategy = cli.trainer.strategy
    wrap, checkpointed = strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {Block}
    assert checkpointed["auto_wrap_policy"]._module_classes == {Block}
    blocks = [m for m in cli.model.modules() if isinstance(m, Block)]
    assert len(blocks) == 4 and all(wrap._module_classes.intersection({type(b)}) for b in blocks)


def test_a_strategy_given_as_a_bare_class_path_is_built(tmp_path):
    """jsonargparse leaves `--trainer.strategy=tasks.strategies.BlockFSDP` (no init args) a string,
    which Lightning refused as an unknown strategy name; registered names stay names."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from tasks.lightning_cli import strategy_of
    from tasks.strategies import BlockFSDP
    from zoo import Block

    cli = ZooCLI(args=["-c", "configs/vision/vit_digits.yaml", "--trainer.strategy=tasks.strategies.BlockFSDP",
                       f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.trainer.strategy, BlockFSDP)
    wrap = cli.trainer.strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {Block}
    assert strategy_of("ddp") == "ddp" and strategy_of("auto") == "auto"
    assert strategy_of("tasks.strategies.NoSuchStrategy") == "tasks.strategies.NoSuchStrategy"  # Lightning names it
    assert strategy_of("zoo.Block") == "zoo.Block"  # importable, but not a strategy
    assert isinstance(strategy_of("lightning.pytorch.strategies.DDPStrategy"), DDPStrategy)


def test_zoo_fit_under_ddp_ends_cleanly_on_every_rank(tmp_path):
    """Two gloo processes through the CLI: after_fit must not leave rank 0 waiting on a broadcast."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "fit", "-c", "configs/vision/vit_digits.yaml",
                             "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                             "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                             "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                             f"--trainer.default_root_dir={tmp_path}"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"logs in {tmp_path}/vit_digits/version_0" in result.stdout
    checkpoint = tmp_path / "vit_digits" / "version_0" / "checkpoints" / "last.ckpt"
    assert os.path.isfile(checkpoint)
    # zoo predict on both ranks: the printed summary is of the whole test split (270 digits), not rank 0's half.
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "predict", "-c", "configs/vision/vit_digits.yaml",
                             "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                             f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={tmp_path}"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for path in glob.glob(str(tmp_path / "vit_digits" / "version_1" / "predictions.rank*"))
               for line in open(path)]
    correct = sum(r["correct"] for r in records)
    assert len(records) == 270
    summary = rf"270 predictions in .*predictions\.rank\*\.jsonl \(2 files, one per rank\); {correct}/270 correct"
    assert re.search(summary, result.stdout), result.stdout


class _RecordLoss(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fsdp_and_plain_curves(accelerator, precision, steps=10):
    """Loss curves of plain training and of BlockFSDP (each Block a unit, checkpointed), with the
    CLI's clipping (and, on a GPU's plain run, the fused AdamW of CUDA), from the same weights.

    Both walk the dataset's order (shuffle=False). Lightning gives a distributed strategy's
    training loader a shuffling DistributedSampler even when the loader does not shuffle, one
    process included, unless the loader brings a DistributedSampler of its own, as the data
    modules do with shuffle=False. Before they did, the curves differed by 0.06 at step 2
    (H100, 2026-11-24): different batches, not FSDP.
    """
    from tasks.strategies import BlockFSDP

    torch.manual_seed(0)
    plain, sharded = _task(), _task()
    sharded.load_state_dict(plain.state_dict())
    initial = copy.deepcopy(plain.state_dict())
    curves = []
    for task, strategy in ((plain, "auto"), (sharded, BlockFSDP(activation_checkpointing=True))):
        data = DigitsDataModule(batch_size=64, shuffle=False)
        record = _RecordLoss()
        L.Trainer(max_steps=steps, limit_val_batches=0, enable_checkpointing=False, accelerator=accelerator, devices=1,
                  logger=False, enable_progress_bar=False, enable_model_summary=False, strategy=strategy,
                  callbacks=[record], precision=precision, gradient_clip_val=0.5).fit(task, data)
        curves.append(torch.tensor(record.losses))
    moved = max((p.detach().cpu() - initial[n].cpu()).abs().max().item() for n, p in plain.named_parameters())
    assert len(curves[0]) == steps and moved > 1e-3  # it trained: the curves are not of an untouched model
    return curves


def test_fsdp_trains_like_single_device_on_cpu(tmp_path, monkeypatch):
    """BlockFSDP on one CPU process (gloo) gives plain training's loss curve, float32.

    FSDP picks its device from device_id, which Lightning sets to the root device's index: None
    on a CPU, where FSDP then refuses to run ("needs a non-CPU accelerator device"). The test
    hands FSDP the CPU device; sharding, checkpointing and clipping are FSDP's and the task's own.
    """
    import torch.distributed.fsdp._init_utils as init_utils
    import torch.distributed.fsdp.fully_sharded_data_parallel as fsdp_module

    choose = init_utils._init_device_handle

    def on_cpu(state, module, ignored_params, device_id):
        return choose(state, module, ignored_params, torch.device("cpu") if device_id is None else device_id)

    monkeypatch.setattr(fsdp_module, "_init_device_handle", on_cpu)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.chdir(tmp_path)
    import torch.distributed as dist

    try:
        with kernels.reference_only():
            plain, sharded = _fsdp_and_plain_curves("cpu", "32-true")
    finally:  # Lightning leaves the (gloo, one process) group up; later tests may start their own
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.testing.assert_close(sharded, plain, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fsdp_trains_like_single_device(tmp_path, monkeypatch, precision):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.chdir(tmp_path)
    plain, sharded = _fsdp_and_plain_curves("cuda", precision)
    torch.testing.assert_close(sharded, plain, rtol=0, atol=1e-3 if precision == "32-true" else 3e-2)
