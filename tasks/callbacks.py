"""Lightning callbacks of the tasks."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn


class AttentionMapLogger(L.Callback):
    """Logs the task's attention figures (task.attention_figures) for a fixed validation
    sample to TensorBoard every `every_n_epochs` epochs, so one sees attention form as the
    model trains (TensorBoard's IMAGES tab, tags attention/<figure>).

    Args:
        every_n_epochs: draw after the validation of every n-th epoch (and of the last).
        sample: which sample of the first validation batch (the loader is not shuffled,
            so it is the same sample every time).
    Without a TensorBoard logger (e.g. under fast_dev_run, which turns loggers off) it
    warns once at fit start and draws nothing.
    """

    def __init__(self, every_n_epochs: int = 5, sample: int = 0):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if sample < 0:
            raise ValueError(f"sample must be >= 0, got {sample}")
        self.every_n_epochs, self.sample = every_n_epochs, sample
        self._batch: Optional[Any] = None
        self._enabled = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enabled = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        if not self._enabled:
            rank_zero_warn("AttentionMapLogger draws nothing: the trainer has no TensorBoardLogger")

    def _fixed_batch(self, trainer: L.Trainer) -> Any:
        if self._batch is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            self._batch = next(iter(loader))
            size = len(self._batch[0] if isinstance(self._batch, (list, tuple)) else next(iter(self._batch.values())))
            if self.sample >= size:
                raise ValueError(f"sample {self.sample} is past the first validation batch ({size} samples)")
        return self._batch

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._enabled:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        batch = pl_module.transfer_batch_to_device(self._fixed_batch(trainer), pl_module.device, 0)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        figures = pl_module.attention_figures(batch, tokenizer=tokenizer, sample=self.sample)
        import matplotlib.pyplot as plt

        for name, figure in figures.items():
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"attention/{name}", figure, trainer.global_step, close=False)
            plt.close(figure)
