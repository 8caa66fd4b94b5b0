"""`zoo generate`: text from a trained decoder (CausalLM) or encoder-decoder (Seq2Seq) checkpoint.

    zoo generate runs/gpt_char/version_0/checkpoints/last.ckpt --prompt "def " --max_new_tokens 200
    zoo generate runs/seq2seq_dates/version_0/checkpoints/last.ckpt --prompt "3 March 2021" --num_beams 4

The checkpoint carries the task's class and its tokenizer (tasks.base.ZooTask saves both),
so nothing else is needed. A checkpoint that has no text to generate, an option its task
does not take, or a bad value is a usage error: status 2 and `zoo generate: error: ...`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pickle
import sys

# torch is imported inside the functions: `zoo --help` builds this parser and should not pay for it.

#: The generation options of `zoo generate`, as generate_text's keyword arguments.
OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "seed")


def read_checkpoint(checkpoint_path: str, expected: str = "") -> dict:
    """The dict of a checkpoint written by `zoo fit` (on CPU); ValueError naming the file for one
    torch.load cannot read or one without the task's `zoo_task` entry. expected: words that end
    the message's "expected a .ckpt written by `zoo fit`" (e.g. "on a text task")."""
    import torch

    wanted = f"expected a .ckpt written by `zoo fit`{' ' + expected if expected else ''}"
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # not a file torch.save wrote
        raise ValueError(f"{checkpoint_path}: not a checkpoint ({error}); {wanted}") from None
    if not isinstance(checkpoint, dict) or "zoo_task" not in checkpoint:
        raise ValueError(f"{checkpoint_path}: not a tritonzoo task checkpoint (no 'zoo_task' entry); {wanted}")
    return checkpoint


def load(checkpoint_path: str, device: str = "cpu"):
    """(task, tokenizer) from a checkpoint written by a tritonzoo text task.

    Raises FileNotFoundError for a missing file, ValueError for a file that is not such a checkpoint.
    """
    from tasks.data.tokenizers import tokenizer_from_state

    checkpoint = read_checkpoint(checkpoint_path, "on a text task")
    if "zoo_tokenizer" not in checkpoint:
        raise ValueError(f"{checkpoint_path}: the run had no tokenizer: {checkpoint['zoo_task']} "
                         f"does not generate text")
    module, _, name = checkpoint["zoo_task"].rpartition(".")
    task_class = getattr(importlib.import_module(module), name)
    if not hasattr(task_class, "generate_text"):
        raise ValueError(f"{checkpoint_path}: {name} does not generate text")
    task = task_class.load_from_checkpoint(checkpoint_path, map_location=device).eval()
    return task, tokenizer_from_state(checkpoint["zoo_tokenizer"])


def generate(checkpoint_path: str, prompts: list[str], device: str = "cpu", **options) -> list[str]:
    """Completions (CausalLM) or outputs (Seq2Seq) of prompts; options the task's generate_text takes.

    Options that are None are left to the task's defaults. Raises ValueError for an option the
    task does not take, and what load and the task's generate_text raise.
    """
    task, tokenizer = load(checkpoint_path, device)
    accepted = inspect.signature(task.generate_text).parameters
    unknown = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unknown:
        takes = [f"--{k}" for k in OPTIONS if k in accepted]
        raise ValueError(f"{', '.join('--' + k for k in unknown)}: a {type(task).__name__} checkpoint does not "
                         f"take {'it' if len(unknown) == 1 else 'them'}; it takes {', '.join(takes)}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    import torch

    with torch.no_grad():
        return task.generate_text(prompts, tokenizer, **kwargs)


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int (at least 1 new token), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file written by zoo fit on a text task")
    parser.add_argument("--prompt", action="append", default=None,
                        help="input text (repeat for a batch); default: one empty prompt (a decoder starts "
                             "from <bos>; an encoder-decoder needs a --prompt to translate)")
    # At least 1, for decoders and encoder-decoders alike, as Hugging Face's generate (which
    # refuses max_new_tokens=0): zero new tokens is no generation at all.
    parser.add_argument("--max_new_tokens", type=positive_int, default=None,
                        help="at most this many new tokens, >= 1 (default: the task's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")


def _device(name) -> str:
    """--device (cpu or cuda, as the other commands take it) checked against this machine; None:
    cuda if there is one, else cpu. ValueError for cuda without a CUDA device."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> int:
    """Prints each prompt's text; 0, or 2 with a message for a missing checkpoint or bad options."""
    prompts = args.prompt or [""]
    options = {k: getattr(args, k) for k in OPTIONS}
    try:
        device = _device(args.device)
        texts = generate(args.checkpoint, prompts, device, **options)
    except (ValueError, TypeError, FileNotFoundError) as error:  # bad options, a prompt too long, no such file
        print(f"zoo generate: error: {error}", file=sys.stderr)
        return 2
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{text}")
    return 0
