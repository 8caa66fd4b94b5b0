"""The loaders every data module shares: setup() fills train_set, val_set and test_set."""

from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SplitDataModule(L.LightningDataModule):
    """train/val/test/predict loaders over the datasets setup() puts in self.train_set,
    val_set and test_set (predict reads the test split).

    The training loader shuffles unless shuffle=False (exact comparisons); the others keep
    their order. A module with its own batching overrides collate_fn. Under a distributed
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
        sampler = None
        if train and not self.shuffle and dist.is_available() and dist.is_initialized():
            sampler = DistributedSampler(dataset, shuffle=False)  # kept by Lightning, which would shuffle
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train and self.shuffle,
                          sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate_fn(train),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
