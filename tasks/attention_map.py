"""`zoo attention-map CHECKPOINT`: PNG figures of a trained model's attention for one input.

    zoo attention-map runs/vit_digits/version_0/checkpoints/last.ckpt               # validation sample 0
    zoo attention-map runs/seq2seq_dates/version_0/checkpoints/last.ckpt --text "3 March 2021"
    zoo attention-map CKPT --sample 5 --layer 0 --out figures/

The input is a sample of the run's validation data (the data module of the run's
config.yaml, which LightningCLI saves beside checkpoints/, or --config), or, for text
models, --text. What is drawn is the task's choice (its attention_figures): token x token
heatmaps for text, rollout and class-token attention for vision, the cross-attention
alignment for encoder-decoders, attention over frames beside the log-mel for speech.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Optional

# torch and yaml are imported inside the functions: `zoo --help` builds this parser and should not pay for them.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `zoo attention-map`."""
    parser.add_argument("checkpoint", help="a checkpoint written by `zoo fit`")
    parser.add_argument("--text", default=None, help="input text (text and seq2seq models); default: a validation "
                                                     "sample")
    parser.add_argument("--sample", type=int, default=0, help="which sample of the first validation batch (default 0)")
    parser.add_argument("--layer", type=int, default=-1, help="block to draw (default -1: the last)")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: the one in the run folder: "
                                                       "beside checkpoints/, else beside the checkpoint)")
    parser.add_argument("--out", default=None, help="output folder (default: <run folder>/attention_maps, the run "
                                                    "folder being the one holding checkpoints/, else the "
                                                    "checkpoint's)")


def _import(path: str):
    """The class at a dotted class path; ValueError naming a path that does not import."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import class_path {path!r} ({error})") from None


def run_dir(checkpoint: str) -> str:
    """The folder of the run that wrote `checkpoint`: runs/<name>/version_<n> for a checkpoint in
    its checkpoints/ folder (where `zoo fit` puts them), else the checkpoint's own folder."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def run_config(checkpoint: str, config: Optional[str]) -> str:
    """The config.yaml of the run that wrote `checkpoint` (or `config`); FileNotFoundError if none."""
    path = config or os.path.join(run_dir(checkpoint), "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no run config at {path}: pass the run's config with --config, or an input with "
                                f"--text")
    return path


def validation_batch(config_path: str, tokenizer_state: Optional[dict], task: Optional[str] = None) -> tuple[Any, Any]:
    """(first validation batch, the data module's tokenizer or None) from the data module in a run config.

    task: the checkpoint's task class path; ValueError when the config trains another task
    (its data would not fit the model)."""
    import yaml

    with open(config_path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model")
    trains = model.get("class_path") if isinstance(model, dict) else None
    if task is not None and isinstance(trains, str) and _import(trains) is not _import(task):
        raise ValueError(f"{config_path} trains a {trains}, the checkpoint holds a {task}: pass the config of the "
                         f"run that wrote the checkpoint (--config)")
    data = config.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{config_path} has no data: class_path entry to build the validation data from")
    datamodule = _import(data["class_path"])(**(data.get("init_args") or {}))
    if tokenizer_state is not None and hasattr(datamodule, "load_state_dict"):
        datamodule.load_state_dict({"tokenizer": tokenizer_state})  # the vocabulary the model was trained with
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    return next(iter(loader[0] if isinstance(loader, (list, tuple)) else loader)), getattr(datamodule, "tokenizer",
                                                                                           None)


def main(args: argparse.Namespace) -> int:
    """Loads the checkpoint, builds the input, writes the task's attention figures; prints their
    paths. 0, or 2 with a message for a missing checkpoint or bad options (as `zoo generate`)."""
    try:
        return _write_figures(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"zoo attention-map: error: {error}", file=sys.stderr)
        return 2


def _write_figures(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    from tasks.attention_figures import save
    from tasks.data.tokenizers import tokenizer_from_state
    from tasks.generate import read_checkpoint
    from tasks.lightning_cli import batch_size_of

    checkpoint = read_checkpoint(args.checkpoint)
    task = _import(checkpoint["zoo_task"]).load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    state = checkpoint.get("zoo_tokenizer")
    tokenizer = tokenizer_from_state(state) if state is not None else None
    if args.text is not None:
        if not hasattr(task, "text_batch"):
            raise ValueError(f"--text needs a text model; {type(task).__name__} takes its validation data "
                             f"(use --sample)")
        batch = task.text_batch([args.text], tokenizer)
        sample = 0
    else:
        batch, data_tokenizer = validation_batch(run_config(args.checkpoint, args.config), state,
                                                 checkpoint["zoo_task"])
        tokenizer = tokenizer or data_tokenizer
        sample = args.sample
        size = batch_size_of(batch)
        if not 0 <= sample < size:
            raise ValueError(f"--sample {sample} is not in the first validation batch (samples 0 to {size - 1})")
    figures = task.attention_figures(batch, tokenizer=tokenizer, sample=sample, layer=args.layer)
    out = args.out or os.path.join(run_dir(args.checkpoint), "attention_maps")
    for path in save(figures, out):
        print(path)
    return 0
