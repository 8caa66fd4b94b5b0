"""`zoo fit|validate|test|predict -c CONFIG`: LightningCLI with the defaults people expect.

On top of LightningCLI (so --print_config, dotted overrides and class_path/init_args all
work): one run directory per run, runs/<name>/version_<n>/, holding the TensorBoard and
CSV logs, the resolved config.yaml and checkpoints/ (best by the task's metric, and
last); learning-rate and throughput monitors; gradient clipping at 1.0; bf16-mixed
precision on a GPU; `zoo predict` writes predictions.jsonl there (tasks.callbacks.PredictionWriter)
and prints what it holds. A config's own trainer.logger / callbacks are used as given.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.logger import DummyLogger
from lightning.pytorch.utilities import rank_zero_warn

from .base import ZooTask
from .callbacks import FinalCheckpoint, PredictionWriter


def batch_size_of(batch) -> int:
    """Samples in a batch: the leading size of its first tensor (tuples, lists, dicts)."""
    while not isinstance(batch, torch.Tensor):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return batch.shape[0]


def strategy_of(strategy: Any) -> Any:
    """A strategy given as a bare class path (`--trainer.strategy=tasks.strategies.BlockFSDP`),
    which jsonargparse leaves a string and Lightning would refuse as an unknown name, built
    with its defaults; anything else unchanged."""
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    if not isinstance(strategy, str) or "." not in strategy or strategy.lower() in StrategyRegistry:
        return strategy
    module, _, name = strategy.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return strategy  # Lightning names what it cannot resolve
    return found() if isinstance(found, type) and issubclass(found, Strategy) else strategy


def next_version(root: str, name: str) -> int:
    """The first unused version_<n> under root/name."""
    folder = os.path.join(root, name)
    used = [int(d.split("_", 1)[1]) for d in os.listdir(folder)
            if d.startswith("version_") and d.split("_", 1)[1].isdigit()] if os.path.isdir(folder) else []
    return max(used, default=-1) + 1


class ZooCLI(LightningCLI):
    """LightningCLI over every ZooTask and LightningDataModule, with the project's defaults."""

    def __init__(self, args: Optional[list[str]] = None, run: bool = True):
        # TensorBoard and CSV share the run directory on purpose; the CSV logger warns about it.
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        super().__init__(
            model_class=ZooTask, subclass_mode_model=True,
            datamodule_class=L.LightningDataModule, subclass_mode_data=True,
            trainer_defaults={"gradient_clip_val": 1.0, "default_root_dir": "runs",
                              "precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"},
            save_config_kwargs={"overwrite": True}, args=args, run=run,
            # Options spelled out: jsonargparse (as argparse) would take --trainer.max_epoch for
            # --trainer.max_epochs. The main parser's and each subcommand's.
            parser_kwargs={"allow_abbrev": False, **{name: {"allow_abbrev": False} for name in self.subcommands()}})

    def instantiate_classes(self) -> None:
        """Builds the model, data module and callbacks of the config. A constructor's TypeError or
        ValueError (a misspelled model_args key, a bad value) is a mistake in the config: its
        message alone goes to stderr (`zoo fit: error: ...`) and the process exits with status 2,
        instead of jsonargparse's wrapping of it in a screenful of traceback."""
        try:
            super().instantiate_classes()
        except (TypeError, ValueError) as error:
            cause = error
            # jsonargparse raises its own ValueError ("Does not validate against any of the Union
            # subtypes") from the constructor's error: the innermost one says what is wrong.
            while isinstance(cause.__cause__, (TypeError, ValueError)):
                cause = cause.__cause__
            print(f"zoo {self.subcommand or ''}".rstrip() + f": error: {cause}", file=sys.stderr)
            raise SystemExit(2) from None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI puts a checkpoint's hyperparameters over the config's and the command line's
        model arguments (the model must be the one the weights fit): `fit --ckpt_path` with another
        lr, size or model_args then trains with the checkpoint's, without a word. Warn, naming them."""
        subcommand = self.config.get("subcommand")
        before = self._model_arguments(subcommand)
        super()._parse_ckpt_path()
        after = self._model_arguments(subcommand)
        changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
        if changed and subcommand == "fit":
            details = ", ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in changed)
            warnings.warn(f"--ckpt_path: the checkpoint's model settings replace the config's and the command "
                          f"line's ({details}); a resumed run trains the checkpoint's model with its optimizer "
                          f"settings. To change them, start a new run from its weights instead", stacklevel=2)

    def _model_arguments(self, subcommand) -> dict:
        """The model's init_args in the parsed config, as a plain dict ({} when there are none)."""
        section = self.config.get(subcommand) if subcommand else None
        model = section.get("model") if section is not None else None
        args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if args is None:
            return {}
        return args.as_dict() if hasattr(args, "as_dict") else dict(args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=Optional[str], default=None,
                            help="run name: logs go to <trainer.default_root_dir>/<name>/version_<n> "
                                 "(default: the config file's name)")

    def after_fit(self) -> None:
        """One line that says how the run ended: the monitored metric, last and best, and where it is."""
        checkpoint = next((c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or checkpoint.monitor is None:
            return
        # log_dir is a broadcast from rank 0 under DDP: every rank reads it, or rank 0 waits on a peer
        # that has gone (gloo: "Connection closed by peer").
        # fast_dev_run swaps the loggers for Lightning's DummyLogger, which has no folder.
        logged = any(not isinstance(logger, DummyLogger) for logger in self.trainer.loggers)
        log_dir = self.trainer.log_dir if logged else None
        if self.trainer.global_rank != 0:
            return
        last = self.trainer.callback_metrics.get(checkpoint.monitor)
        best = checkpoint.best_model_score
        # The last validation's value: a run stopped by max_steps mid-epoch validated before its end.
        parts = [f"{checkpoint.monitor} = {float(last):.4f} at the last validation "
                 f"({self.trainer.global_step} steps in all)" if last is not None
                 else f"no {checkpoint.monitor} logged"]
        if best is not None:
            parts.append(f"best {float(best):.4f} ({checkpoint.best_model_path})")
        logs = f"logs in {log_dir}" if logged else "no logs (fast_dev_run or logger=false)"
        print("zoo fit: " + "; ".join(parts) + "; " + logs)

    def _warn_without_checkpoint(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if not config.get("ckpt_path"):
            rank_zero_warn(f"zoo {self.subcommand}: no --ckpt_path given, so the model has the initial "
                           f"(untrained) weights of its config")

    before_validate = before_test = before_predict = _warn_without_checkpoint

    def after_predict(self) -> None:
        """Where the predictions went, and what they add up to (tasks.callbacks.PredictionWriter)."""
        writer = next((c for c in self.trainer.callbacks if isinstance(c, PredictionWriter)), None)
        if writer is not None and writer.written is not None and self.trainer.global_rank == 0:
            print("zoo predict: " + writer.summary())

    def _run_name(self) -> str:
        config = self.config.get(str(self.subcommand), self.config)
        if config.get("name"):
            return config["name"]
        paths = config.get("config") or []
        if paths:
            return os.path.splitext(os.path.basename(str(paths[-1])))[0]
        return type(self.model).__name__.lower()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        config["strategy"] = strategy_of(config.get("strategy"))
        root = config.get("default_root_dir") or "runs"
        if config.get("logger") in (None, True) and not config.get("fast_dev_run"):
            name = self._run_name()
            version = f"version_{next_version(root, name)}"
            config["logger"] = [TensorBoardLogger(root, name=name, version=version, default_hp_metric=False),
                                CSVLogger(root, name=name, version=version)]
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        defaults = []
        if not any(isinstance(c, ModelCheckpoint) for c in given):
            monitor, mode = getattr(self.model, "monitor", ("val/loss", "min"))
            defaults.append(ModelCheckpoint(monitor=monitor, mode=mode, filename="best-{epoch}-{step}",
                                            auto_insert_metric_name=False))
            # "last" as the run's final weights: ModelCheckpoint(save_last=True) writes last.ckpt only
            # when it saves a top-k checkpoint, so a run whose metric stops improving would leave an
            # old one. An unmonitored checkpoint keeping one file is rewritten at every save, and
            # at the end of training (FinalCheckpoint).
            defaults.append(FinalCheckpoint(monitor=None, save_top_k=1, filename="last",
                                            enable_version_counter=False))
        if config.get("logger") not in (None, False) and not config.get("fast_dev_run"):
            if not any(isinstance(c, LearningRateMonitor) for c in given):
                defaults.append(LearningRateMonitor(logging_interval="step"))
            if not any(isinstance(c, ThroughputMonitor) for c in given):
                defaults.append(ThroughputMonitor(batch_size_fn=batch_size_of))
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in given):
            defaults.append(PredictionWriter())
        config["callbacks"] = given + defaults
        return super()._instantiate_trainer(config, callbacks)
