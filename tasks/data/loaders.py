"""The loaders every data module shares: setup() fills train_set, val_set and test_set."""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler, default_collate)


class ResumableLoader(DataLoader):
    """The training DataLoader: Lightning checkpoints where it is in an epoch, so a run resumed
    from a mid-epoch checkpoint continues with the batches that epoch had not yet given, in the
    same order (a plain DataLoader restarts the epoch: its first batches are seen twice).

    Each epoch draws from generators seeded with (seed, epoch): the shuffle order and the
    DataLoader's base seed for its workers. Each batch is loaded and collated with Python's,
    NumPy's and torch's global generators seeded with (seed, epoch, process rank, batch), put
    back afterwards in the main process: the random draws of data sets and collate functions
    (augmentation, masks) are a function of the batch, the same with or without workers, and
    again after a resume. ``seed`` defaults to a draw from torch's global generator, so the
    run's seed (``seed_everything``) sets it; it is part of the state.

    The epoch is Lightning's, which it passes to the sampler's set_epoch at each epoch's start
    (without it, as outside Lightning, each pass over the data is the next epoch). So a pass
    that Lightning cut short (limit_train_batches) ends the epoch: a checkpoint at its end
    resumes with the next epoch, not with the rest of the pass.

    ``state_dict()`` is {seed, epoch, batches (given in that epoch), length (batches an epoch)};
    after ``load_state_dict`` the next pass, if it is that epoch's, starts after its first
    `batches` batches, which are skipped by index (never loaded). Under a distributed strategy
    Lightning rebuilds the loader around its DistributedSampler (whose order is its own seed
    and the epoch); the skipping, counting and seeding stay. Counting what was given is what
    was trained on: Lightning fetches ahead only from loaders without a length, and every data
    set here has one.
    """

    def __init__(self, dataset: Dataset, batch_size: Optional[int] = 1, shuffle: Optional[bool] = None,
                 sampler=None, *, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 **kwargs):
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()))
        self.seed = seed
        self._order = torch.Generator()
        if sampler is None and kwargs.get("batch_sampler") is None:
            sampler = _EpochRandomSampler(dataset, generator=self._order) if shuffle \
                else _EpochSequentialSampler(dataset)
            shuffle = None
        collate = kwargs.pop("collate_fn", None)
        if isinstance(dataset, _SeededFetch):  # rebuilt from this loader's own attributes
            dataset, collate = dataset.dataset, dataset.collate
        if batch_size is not None or kwargs.get("batch_sampler") is not None:  # batches: each seeded
            dataset, collate = _SeededFetch(dataset, collate or default_collate), _collated
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate,
                         generator=generator if generator is not None else torch.Generator(), **kwargs)
        self._epoch = -1  # the pass in progress (or last finished); -1 before the first
        self._given = 0  # batches that pass has given
        self._skip = 0  # batches the pass in progress skipped (read when its index sampler starts)
        self._resume = False  # the next pass continues self._epoch instead of starting the next one

    @property
    def _index_sampler(self):
        return _SkipFirst(DataLoader._index_sampler.fget(self), self)

    def __iter__(self):
        return self._one_pass()

    def _one_pass(self):
        # A generator: nothing happens until the first batch is asked for (Lightning calls iter()
        # to check a loader is iterable, and before it sets the sampler's epoch).
        told = getattr(self.sampler, "epoch", None)  # Lightning's epoch, set through set_epoch
        if self._resume and told in (None, self._epoch):
            pass  # the checkpoint's epoch goes on (Lightning may have ended it early: limit_train_batches)
        else:
            self._epoch, self._given, self._skip = self._epoch + 1 if told is None else told, 0, 0
        self._resume = False
        base = (self.seed * 1_000_003 + 2 * self._epoch) % 2 ** 62
        self._order.manual_seed(base)
        self.generator.manual_seed(base + 1)
        for batch in super().__iter__():
            self._given += 1
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self._epoch, "batches": self._given, "length": len(self)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"seed", "epoch", "batches", "length"} - set(state)
        if missing:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state lacks {sorted(missing)}; "
                             f"expected what state_dict() returns, got keys {sorted(state)}")
        self.seed = int(state["seed"])
        epoch, batches, length = int(state["epoch"]), int(state["batches"]), int(state["length"])
        if length != len(self):
            warnings.warn(f"the training data has {len(self)} batches a pass, the checkpoint's had {length} "
                          f"(another data set or batch size): epoch {epoch} starts again from its first batch",
                          stacklevel=2)
            self._epoch, self._resume, self._given, self._skip = epoch, True, 0, 0
        elif batches >= length:  # that pass was complete: the next one starts afresh
            self._epoch, self._resume, self._given, self._skip = epoch, False, length, 0
        else:
            self._epoch, self._resume, self._given, self._skip = epoch, True, batches, batches


class _EpochRandomSampler(RandomSampler):
    """RandomSampler with the set_epoch Lightning calls at each epoch's start (the order comes from
    the loader's generator, seeded for the epoch); epoch None until then."""

    epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _EpochSequentialSampler(SequentialSampler):
    """SequentialSampler with set_epoch, as _EpochRandomSampler."""

    epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _SkipFirst(Sampler):
    """The loader's index sampler, less the first batches a resumed epoch skips; each batch of
    indices carries the seed of its loading (_SeededBatch)."""

    def __init__(self, inner, loader: ResumableLoader):
        self.inner, self.loader = inner, loader

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        # Read, not consumed: a worker pool's iterator starts its index sampler twice.
        loader = self.loader
        skip, base = loader._skip, (loader.seed * 1_000_003 + loader._epoch) % 2 ** 62
        # The rank too (rank 0's seeds are the plain ones): ranks seeded alike by one
        # seed_everything would otherwise draw alike for their different samples.
        rank = (_rank() * 0x9E3779B97F4A7C15) % 2 ** 62
        for number, indices in enumerate(self.inner):
            if number >= skip:
                yield _SeededBatch(indices, ((base * 1_000_003 + number) % 2 ** 62) ^ rank) \
                    if isinstance(indices, list) else indices


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _SeededBatch(list):
    """A batch of indices and the seed its loading draws from."""

    def __init__(self, indices, seed: int):
        super().__init__(indices)
        self.seed = seed


@contextlib.contextmanager
def _global_generators_seeded(seed: int):
    """Python's, NumPy's and torch's CPU generator seeded with `seed`, then put back."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class _SeededFetch(Dataset):
    """The data set as a ResumableLoader reads it: a batch of indices is loaded and collated in
    one call (DataLoader's __getitems__ hook) under its seed; the loader's collate_fn then only
    unwraps it (_collated)."""

    def __init__(self, dataset: Dataset, collate: Callable):
        self.dataset, self.collate = dataset, collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, indices) -> list:
        seed = getattr(indices, "seed", None)
        with _global_generators_seeded(seed) if seed is not None else contextlib.nullcontext():
            fetch = getattr(self.dataset, "__getitems__", None)
            items = fetch(list(indices)) if fetch is not None else [self.dataset[i] for i in indices]
            return [self.collate(items)]


def _collated(data: list):
    return data[0]


class SplitDataModule(L.LightningDataModule):
    """train/val/test/predict loaders over the datasets setup() puts in self.train_set,
    val_set and test_set (predict reads the test split).

    The training loader shuffles unless shuffle=False (exact comparisons); the others keep
    their order; the training loader is a ResumableLoader (a run resumed mid-epoch continues
    that epoch). A module with its own batching overrides collate_fn. Under a distributed
    strategy Lightning gives the training loader a DistributedSampler that shuffles whatever
    the loader did; with shuffle=False the loader brings its own, which does not (each rank
    then reads every world-size-th sample of the dataset order).

    Raises ValueError for a batch_size that is not a positive int or a num_workers that is not
    a non-negative int: at construction, not after setup() has read or synthesized the data.
    """

    def __init__(self, batch_size: int, num_workers: int, shuffle: bool = True):
        super().__init__()
        self.check_int("batch_size", batch_size, 1)
        self.check_int("num_workers", num_workers, 0, " (0: load in the main process)")
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def check_int(self, name: str, value, minimum: int, note: str = "") -> None:
        """ValueError naming this data module and the argument unless value is an int (not a
        bool) >= minimum: at construction, before setup() reads or synthesizes any data."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{type(self).__name__}: {name} must be an int >= {minimum}{note}, got {value!r}")

    def collate_fn(self, train: bool) -> Optional[Callable]:
        """The collate function of the training (train=True) or an evaluation loader; None is
        torch's default. It must pickle, for loader workers."""
        return None

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a data loader")
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate_fn(train),
                       persistent_workers=self.num_workers > 0)
        if not train or isinstance(dataset, IterableDataset):  # an iterable set has no indices to skip by
            # A generator of its own: a DataLoader draws its workers' base seed from torch's global
            # generator at each iter() (a persistent one, once), which would make training's dropout
            # and masks depend on when validation ran, and on num_workers, and differ after a resume.
            generator = torch.Generator().manual_seed(0) if not train else None
            return DataLoader(dataset, shuffle=self.shuffle if train else None, generator=generator, **options)
        sampler = None
        if not self.shuffle and dist.is_available() and dist.is_initialized():
            sampler = DistributedSampler(dataset, shuffle=False)  # kept by Lightning, which would shuffle
        return ResumableLoader(dataset, shuffle=self.shuffle, sampler=sampler, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
