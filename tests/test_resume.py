"""Resuming mid-epoch: the training loader's state (tasks.data.loaders.ResumableLoader) and the
random states in the checkpoint (tasks.base). The oracle is always the uninterrupted run."""

from __future__ import annotations

import functools
import random
import shutil
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

import kernels
from tasks import ImageClassification
from tasks.data.dates import DatesDataModule
from tasks.data.loaders import ResumableLoader
from tasks.data.speech import KeywordDataModule
from tasks.data.text import LanguageModelDataModule, MaskedLMDataModule
from tasks.data.vision import DigitsDataModule


class _Counting(Dataset):
    """Items 0..n-1, counting how often each is loaded."""

    def __init__(self, n: int):
        self.n, self.loads = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loads.append(i)
        return torch.tensor(i)


def _batches(iterator, count=None):
    out = []
    for batch in iterator:
        out.append(batch.tolist())
        if count is not None and len(out) == count:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loaded_state_continues_the_pass_with_the_batches_not_yet_given(num_workers):
    options = dict(batch_size=4, shuffle=True, num_workers=num_workers, persistent_workers=num_workers > 0)
    uninterrupted = ResumableLoader(_Counting(23), seed=7, **options)
    first_pass = _batches(uninterrupted)
    second = iter(uninterrupted)
    given = _batches(second, 3)
    state = uninterrupted.state_dict()
    assert state == {"seed": 7, "epoch": 1, "batches": 3, "length": 6}
    rest, third_pass = _batches(second), _batches(uninterrupted)
    assert sorted(sum(first_pass, [])) == list(range(23)) and first_pass != given + rest  # reshuffled

    data = _Counting(23)
    resumed = ResumableLoader(data, seed=99, **options)
    resumed.load_state_dict(state)
    assert _batches(resumed) == rest
    if num_workers == 0:  # the skipped batches are never loaded (workers load in their own copies)
        assert sorted(data.loads) == sorted(sum(rest, []))
    assert _batches(resumed) == third_pass
    assert resumed.state_dict() == {"seed": 7, "epoch": 2, "batches": 6, "length": 6}


class _Noisy(Dataset):
    """Item i: i plus draws from torch's, NumPy's and Python's global generators."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([i, float(torch.rand(())), float(np.random.rand()), random.random()])


def _noisy_collate(items):  # the collate function draws too: a fifth column
    return torch.cat([torch.stack(items), torch.randint(0, 1000, (len(items), 1))], dim=1)


def test_random_draws_are_those_of_the_batch_with_or_without_workers_and_after_a_resume():
    def loader(num_workers, seed=11):
        return ResumableLoader(_Noisy(), batch_size=4, shuffle=True, seed=seed, num_workers=num_workers,
                               collate_fn=_noisy_collate, persistent_workers=num_workers > 0)

    main = loader(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    in_main = [_batches(main) for _ in range(2)]
    # The main process's generators (the model's dropout) are as they were.
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    assert in_main[0] != in_main[1]  # each epoch draws anew
    assert _batches(loader(2)) == in_main[0]  # two workers: the same draws
    assert _batches(loader(0, seed=12)) != in_main[0]
    with pytest.MonkeyPatch.context() as patch:  # another DDP rank, seeded alike, draws otherwise
        patch.setattr("tasks.data.loaders._rank", lambda: 1)
        other_rank = _batches(loader(0))
    assert [row[0] for batch in other_rank for row in batch] == [row[0] for batch in in_main[0] for row in batch]
    assert other_rank != in_main[0]
    stopped = loader(2)
    _batches(stopped)
    _batches(iter(stopped), 2)
    resumed = loader(2, seed=None)
    resumed.load_state_dict(stopped.state_dict())
    assert _batches(resumed) == in_main[1][2:]


def test_a_state_taken_at_the_end_of_a_pass_starts_the_next():
    uninterrupted = ResumableLoader(_Counting(10), batch_size=3, shuffle=True, seed=1)
    _batches(uninterrupted)
    state = uninterrupted.state_dict()
    resumed = ResumableLoader(_Counting(10), batch_size=3, shuffle=True)
    resumed.load_state_dict(state)
    assert _batches(resumed) == _batches(uninterrupted)


def test_an_unshuffled_loader_resumes_in_dataset_order():
    loader = ResumableLoader(_Counting(10), batch_size=3, shuffle=False)
    resumed = ResumableLoader(_Counting(10), batch_size=3, shuffle=False)
    _batches(loader, 2)
    resumed.load_state_dict(loader.state_dict())
    assert _batches(resumed) == [[6, 7, 8], [9]]


def test_a_state_of_another_length_restarts_the_epoch_with_a_warning():
    loader = ResumableLoader(_Counting(10), batch_size=3, shuffle=True, seed=3)
    _batches(loader)
    _batches(iter(loader), 1)
    state = loader.state_dict()  # epoch 1, 1 of 4 batches
    other = ResumableLoader(_Counting(10), batch_size=2, shuffle=True)
    with pytest.warns(UserWarning, match=r"5 batches a pass, the checkpoint's had 4 .* epoch 1 starts again"):
        other.load_state_dict(state)
    batches = _batches(other)
    assert len(batches) == 5 and sorted(sum(batches, [])) == list(range(10))
    assert other.state_dict()["epoch"] == 1


def test_a_malformed_state_is_refused_by_name():
    loader = ResumableLoader(_Counting(4), batch_size=2)
    with pytest.raises(ValueError, match=r"lacks \['batches', 'length'\].* got keys \['epoch', 'seed'\]"):
        loader.load_state_dict({"seed": 1, "epoch": 0})


def test_lightning_rebuilds_it_around_a_distributed_sampler():
    """What Lightning does to the training loader under DDP: the same class and seed, the
    DistributedSampler's order, and still resumable."""
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader

    loader = ResumableLoader(_Counting(20), batch_size=2, shuffle=True, seed=5)
    assert _is_dataloader_shuffled(loader)  # so Lightning's DistributedSampler shuffles

    def rank_loader(rank):
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        return _update_dataloader(loader, sampler)

    rank1 = rank_loader(1)
    assert type(rank1) is ResumableLoader and rank1.seed == 5
    expected = list(DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=True, seed=0))
    full = _batches(rank1)
    assert sum(full, []) == expected
    rank1.sampler.set_epoch(1)  # as Lightning does at each epoch's start
    second = iter(rank1)
    _batches(second, 2)
    state = rank1.state_dict()
    assert state["epoch"] == 1
    rest = _batches(second)
    resumed = rank_loader(1)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning, resuming in epoch 1
    assert _batches(resumed) == rest and rest != full[2:]


def _flat(batch):
    """A batch (tensors, strings, in tuples, lists and dicts) as a list of its leaves."""
    if isinstance(batch, dict):
        return [leaf for key in sorted(batch) for leaf in _flat(batch[key])]
    if isinstance(batch, (tuple, list)):
        return [leaf for part in batch for leaf in _flat(part)]
    return [batch]


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_an_iterable_training_set_keeps_a_plain_loader():
    """A data module whose training set is an IterableDataset (no indices to skip or seed by)."""
    from torch.utils.data import DataLoader, IterableDataset

    from tasks.data.loaders import SplitDataModule

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(5))

    dm = SplitDataModule(batch_size=2, num_workers=0, shuffle=False)
    dm.train_set = Stream()
    loader = dm.train_dataloader()
    assert type(loader) is DataLoader and [batch.tolist() for batch in loader] == [[0, 1], [2, 3], [4]]


def _keywords(cache):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return KeywordDataModule(words=["yes", "no", "stop"], train_per_word=12, eval_per_word=6, cache_dir=str(cache),
                             batch_size=8, speed_perturb=0.1)


@pytest.mark.parametrize("make", [
    lambda tmp: DigitsDataModule(batch_size=64, shift=2),
    lambda tmp: MaskedLMDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", max_length=64, batch_size=16),
    lambda tmp: LanguageModelDataModule(corpora=["pydoc_topics"], tokenizer_kind="chars", block_size=64,
                                        batch_size=16),
    lambda tmp: DatesDataModule(train_size=256, val_size=32, test_size=32, batch_size=32),
    _keywords,
], ids=["digits-shift", "masked-lm", "causal-lm", "dates", "spoken-keywords"])
def test_every_embedded_data_module_resumes_its_training_batches(make, tmp_path):
    """Each data module's training loader, stopped after 3 batches of its second epoch and
    rebuilt from its state in a fresh data module, gives the rest of that epoch as the
    uninterrupted loader does, random augmentation (shifts; the clips' gain, offset, noise
    and speed) and masks included."""
    make = functools.partial(make, tmp_path)
    dm = make()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    first_epoch = [_flat(batch) for batch in loader]
    running = iter(loader)
    for _ in range(3):
        next(running)
    state = loader.state_dict()
    rest = [_flat(batch) for batch in running]
    fresh = make()
    fresh.setup("fit")
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    again = [_flat(batch) for batch in resumed]
    assert len(again) == len(rest) == len(first_epoch) - 3 > 0
    for got, want in zip(again, rest):
        assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class _StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(root, steps_before_stop=None, ckpt_path=None, batch_size=128, bound=None, **trainer_options):
    """vit_digits (2 blocks) with everything random on: shuffled batches, shift augmentation,
    drop path and dropout. 1,257 training digits at batch 128: 10 batches an epoch."""
    L.seed_everything(0, verbose=False)
    task = ImageClassification(model="vit_digits", model_args={"depth": 2, "drop_path": 0.2, "dropout": 0.1},
                               lr=3e-3, warmup=3)
    losses = _Losses()
    callbacks = [losses]
    if steps_before_stop is not None:
        callbacks += [_StopAt(steps_before_stop),
                      L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=steps_before_stop)]
    trainer = L.Trainer(default_root_dir=root, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        enable_checkpointing=steps_before_stop is not None, callbacks=callbacks,
                        **(bound or dict(max_steps=16)), **trainer_options)
    with kernels.reference_only(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, DigitsDataModule(batch_size=batch_size, shift=1), ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return losses.losses, task


@pytest.mark.parametrize("bound", [dict(max_steps=16), dict(max_epochs=2)], ids=["max_steps", "max_epochs"])
def test_a_run_resumed_mid_epoch_trains_exactly_as_the_uninterrupted_run(tmp_path, bound):
    """Stopped at step 6 of a 16-step (or 2-epoch) run (mid-epoch 0 of 10-batch epochs) and
    resumed from that checkpoint, the run gives the uninterrupted run's losses at every later
    step and its final weights, across the epoch boundary (without the loader's state it
    retrains batches 1-6: so it did under max_epochs, whose schedule built the loader before
    the state was read; without the random states it draws other shifts, drop paths and dropout)."""
    uninterrupted, expected = _fit(tmp_path / "once", bound=bound)
    stopped, _ = _fit(tmp_path / "stopped", steps_before_stop=6, bound=bound)
    assert stopped == uninterrupted[:6]
    (checkpoint,) = (tmp_path / "stopped").glob("*.ckpt")
    resumed, task = _fit(tmp_path / "resumed", ckpt_path=str(checkpoint), bound=bound)
    assert resumed == uninterrupted[6:]
    loops = torch.load(checkpoint, weights_only=True)["loops"]  # plain types: loads without pickled objects
    assert loops["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 6
    for (name, a), (_, b) in zip(expected.named_parameters(), task.named_parameters()):
        assert torch.equal(a, b), name


def test_a_final_checkpoint_cut_by_max_steps_mid_epoch_warns_that_the_epoch_is_not_continued(tmp_path):
    """Lightning counts an epoch that max_steps ended as done: a checkpoint written then resumes
    with the next epoch. That cannot be exact, so it is said (before: silence, and the rest of
    the epoch was never trained)."""
    L.seed_everything(0, verbose=False)
    task = ImageClassification(model="vit_digits", model_args={"depth": 1}, lr=3e-3, warmup=3)
    options = dict(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    with kernels.reference_only():
        trainer = L.Trainer(max_steps=6, **options)
        trainer.fit(task, DigitsDataModule(batch_size=128))
        trainer.save_checkpoint(tmp_path / "final.ckpt")
        with pytest.warns(UserWarning, match=r"after 6 of epoch 0's 10 batches .* the rest of epoch 0 is not trained"):
            L.Trainer(max_steps=8, **options).fit(task, DigitsDataModule(batch_size=128),
                                                  ckpt_path=str(tmp_path / "final.ckpt"))


def test_a_checkpoint_inside_an_accumulation_window_says_what_a_resume_lacks(tmp_path):
    """Validation after batch 3 of windows of 2: the checkpoint lacks batch 3's gradient (in .grad,
    not in checkpoints). It notes so, and a resume from it warns rather than summing a short window
    in silence."""
    L.seed_everything(0, verbose=False)
    task = ImageClassification(model="vit_digits", model_args={"depth": 1}, lr=3e-3, warmup=3)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="at-validation")
    options = dict(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                   accumulate_grad_batches=2, val_check_interval=3)
    with kernels.reference_only():
        L.Trainer(max_steps=2, callbacks=[saver], **options).fit(task, DigitsDataModule(batch_size=128))
        checkpoint = torch.load(saver.best_model_path, weights_only=False)
        assert checkpoint["zoo_pending_accumulation"] == [1, 2] and checkpoint["global_step"] == 1
        with pytest.warns(UserWarning, match=r"after 1 of 2 accumulated batches"):
            L.Trainer(max_steps=3, enable_checkpointing=False, **options).fit(
                task, DigitsDataModule(batch_size=128), ckpt_path=saver.best_model_path)


def test_evaluation_loaders_take_nothing_from_torchs_generator():
    """A DataLoader draws its workers' base seed from torch's global generator at each iter()
    unless it has its own: validating would then move training's dropout and augmentation,
    differently with and without (persistent) workers and after a resume."""
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        state = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("stop", [4, 6])
def test_a_run_with_shortened_epochs_resumes_exactly(tmp_path, stop):
    """limit_train_batches=4: Lightning ends each epoch after 4 of the loader's 10 batches. A
    checkpoint at an epoch's end (step 4) must start the next epoch afresh, one mid-epoch
    (step 6) continue it."""
    uninterrupted, _ = _fit(tmp_path / "once", limit_train_batches=4)
    _fit(tmp_path / "stopped", steps_before_stop=stop, limit_train_batches=4)
    (checkpoint,) = (tmp_path / "stopped").glob("*.ckpt")
    resumed, _ = _fit(tmp_path / "resumed", ckpt_path=str(checkpoint), limit_train_batches=4)
    assert resumed == uninterrupted[stop:]


def test_a_ddp_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_weights(tmp_path, monkeypatch):
    """The same on 2 gloo processes: Lightning's DistributedSampler inside the loader, each rank's
    random states gathered into the checkpoint and put back (64 a rank: 10 batches an epoch)."""
    # Spawned workers start fresh: without the interpreter variable they take the PyTorch path
    # too. (This process must not launch interpreted kernels while it is unset.)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    def fit(root, **kwargs):
        # Lightning keeps the first run's MASTER_PORT in the environment; the next run's rendezvous
        # on it can find it still taken (EADDRINUSE): each run picks a free port of its own.
        monkeypatch.delenv("MASTER_PORT", raising=False)
        return _fit(root, batch_size=64, devices=2, strategy="ddp_spawn", **kwargs)[1]

    expected = fit(tmp_path / "once")
    stopped = fit(tmp_path / "stopped", steps_before_stop=6)
    (checkpoint,) = (tmp_path / "stopped").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert len(saved["zoo_rng_states"]) == 2
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 6
    resumed = fit(tmp_path / "resumed", ckpt_path=str(checkpoint))
    moved = max((a - b).abs().max().item() for a, b in zip(expected.parameters(), stopped.parameters()))
    assert moved > 1e-3  # steps 7-16 changed the weights: the comparison below is not of step 6's
    for (name, a), (_, b) in zip(expected.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
