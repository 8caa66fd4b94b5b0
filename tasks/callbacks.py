"""Lightning callbacks of the tasks."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn


class AttentionMapLogger(L.Callback):
    """Logs the task's attention figures (task.attention_figures) for a fixed validation
    sample to TensorBoard every `every_n_epochs` epochs, so one sees attention form as the
    model trains (TensorBoard's IMAGES tab, tags attention/<figure>).

    Args:
        every_n_epochs: draw after the validation of every n-th epoch (and of the last). In a
            run bounded by max_steps only (max_epochs -1, validation every val_check_interval
            steps, often inside one long epoch): after every n-th validation, and the one at
            max_steps; a run resumed from a checkpoint goes on counting from it.
        sample: which sample of the first validation batch (the loader is not shuffled,
            so it is the same sample every time); checked when training starts.
    Drawing takes nothing from the random streams training draws from: a run with this
    callback trains exactly as one without it.
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
        self._validations = 0  # of this fit, sanity check not counted

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enabled = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        # A resumed run goes on counting where its checkpoint was (restored before this hook).
        self._validations = self.__dict__.pop("_restored_validations", 0)
        if not self._enabled:
            rank_zero_warn("AttentionMapLogger draws nothing: the trainer has no TensorBoardLogger")

    def state_dict(self) -> dict:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_validations = int(state_dict.get("validations", 0))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.val_dataloaders is not None:
            self._fixed_batch(trainer)  # a bad `sample` fails now, not after the first n epochs

    def _fixed_batch(self, trainer: L.Trainer) -> Any:
        if self._batch is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            # A loader's iterator draws its base seed from torch's generator: the run's dropout
            # and augmentation would then draw other numbers than without the callback.
            with torch.random.fork_rng(devices=[]):
                self._batch = next(iter(loader))
            size = len(self._batch[0] if isinstance(self._batch, (list, tuple)) else next(iter(self._batch.values())))
            if self.sample >= size:
                raise ValueError(f"sample {self.sample} is past the first validation batch ({size} samples)")
        return self._batch

    # Every rank runs the forward, not rank 0 alone: under FSDP it gathers the sharded weights,
    # a collective that would wait forever for the other ranks. Only rank 0 logs.
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._enabled:
            return
        self._validations += 1
        # The last validation: of the last epoch, or the one at max_steps (which may come first).
        last = 0 < trainer.max_steps <= trainer.global_step
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            count = trainer.current_epoch + 1
            last = last or count >= trainer.max_epochs
        else:  # only max_steps bounds the run (max_epochs -1 or None): count validations
            count = self._validations
        if count % self.every_n_epochs and not last:
            return
        batch = pl_module.transfer_batch_to_device(self._fixed_batch(trainer), pl_module.device, 0)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        figures = pl_module.attention_figures(batch, tokenizer=tokenizer, sample=self.sample)
        import matplotlib.pyplot as plt

        for name, figure in figures.items():
            for logger in trainer.loggers if trainer.is_global_zero else ():
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"attention/{name}", figure, trainer.global_step, close=False)
            plt.close(figure)


class PredictionWriter(BasePredictionWriter):
    """Writes what `trainer.predict` predicts, one JSON line per sample, as the batches come
    (nothing waits in memory for the end), and prints where it went.

    The task's predict_step returns a list of JSON-serializable dicts, one per sample
    (each zoo task documents its fields). Two fields are summarized at the end: `correct`
    (true/false per record: "k/N correct") and `loss` with `tokens` (the token-weighted
    mean loss), in summary(). `zoo predict` adds this callback unless the config has one,
    and prints the summary.

    Args:
        path: the output file; None: predictions.jsonl in the run directory (trainer.log_dir).
            In a multi-process run each rank writes its own file, .rank<r> before the suffix.
    """

    def __init__(self, path: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.path = path
        self.written: Optional[str] = None  # the file of the last run
        self._file = None
        self._counts = {"records": 0, "judged": 0, "correct": 0, "tokens": 0, "loss": 0.0}
        self._ranks = 1  # the processes whose files the counts cover (summed in on_predict_end)

    def _target(self, trainer: L.Trainer) -> str:
        path = self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.jsonl")
        if trainer.world_size > 1:
            stem, suffix = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{suffix}"
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written = self._target(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(self.written)), exist_ok=True)
        self._file = open(self.written, "w", encoding="utf-8")
        self._counts = dict.fromkeys(self._counts, 0)
        self._ranks = 1

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if not isinstance(prediction, list) or not all(isinstance(r, dict) for r in prediction):
            raise TypeError(f"PredictionWriter: {type(pl_module).__name__}.predict_step must return a list of "
                            f"dicts (one per sample), got {type(prediction).__name__}")
        counts = self._counts
        for record in prediction:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["records"] += 1
            if isinstance(record.get("correct"), bool):
                counts["judged"] += 1
                counts["correct"] += record["correct"]
            if "loss" in record and "tokens" in record:
                counts["tokens"] += record["tokens"]
                counts["loss"] += record["loss"] * record["tokens"]
        self._file.flush()

    def summary(self) -> str:
        """One line: how many records, where, and the summarized fields (of every rank's file)."""
        counts = self._counts
        where = self.written
        if self._ranks > 1:
            stem, suffix = os.path.splitext(self.written)
            where = f"{stem.rsplit('.rank', 1)[0]}.rank*{suffix} ({self._ranks} files, one per rank)"
        parts = [f"{counts['records']} predictions in {where}"]
        if counts["judged"]:
            parts.append(f"{counts['correct']}/{counts['judged']} correct "
                         f"({100 * counts['correct'] / counts['judged']:.2f}%)")
        if counts["tokens"]:
            loss = counts["loss"] / counts["tokens"]
            parts.append(f"loss {loss:.4f} nats over {counts['tokens']} tokens (ppl {math.exp(loss):.3f})")
        return "; ".join(parts)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        if trainer.world_size > 1:  # the summary is of the whole split, not of one rank's share
            keys = list(self._counts)
            local = torch.tensor([float(self._counts[k]) for k in keys], dtype=torch.float64, device=pl_module.device)
            total = trainer.strategy.reduce(local, reduce_op="sum").tolist()
            self._counts = {k: v if k == "loss" else int(round(v)) for k, v in zip(keys, total)}
            self._ranks = trainer.world_size

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


class FinalCheckpoint(ModelCheckpoint):
    """An unmonitored checkpoint file (one, rewritten at each save) that also saves when
    training ends: the run's final weights, also when the last steps came after the last
    validation (max_steps not a multiple of val_check_interval)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
