"""`zoo generate`: text from a trained decoder (CausalLM) or encoder-decoder (Seq2Seq) checkpoint.

    zoo generate runs/gpt_char/version_0/checkpoints/last.ckpt --prompt "def " --max_new_tokens 200
    zoo generate runs/seq2seq_dates/version_0/checkpoints/last.ckpt --prompt "3 March 2021" --num_beams 4

The checkpoint carries the task's class and its tokenizer (tasks.base.ZooTask saves both),
so nothing else is needed. Raises SystemExit with a message for a checkpoint that has no
text to generate.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

# torch is imported inside the functions: `zoo --help` builds this parser and should not pay for it.


def load(checkpoint_path: str, device: str = "cpu"):
    """(task, tokenizer) from a checkpoint written by a tritonzoo text task."""
    import torch

    from tasks.data.tokenizers import tokenizer_from_state

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if "zoo_task" not in checkpoint:
        raise SystemExit(f"{checkpoint_path}: not a tritonzoo task checkpoint (no 'zoo_task' entry)")
    if "zoo_tokenizer" not in checkpoint:
        raise SystemExit(f"{checkpoint_path}: the run had no tokenizer: {checkpoint['zoo_task']} "
                         f"does not generate text")
    module, _, name = checkpoint["zoo_task"].rpartition(".")
    task_class = getattr(importlib.import_module(module), name)
    if not hasattr(task_class, "generate_text"):
        raise SystemExit(f"{checkpoint_path}: {name} does not generate text")
    task = task_class.load_from_checkpoint(checkpoint_path, map_location=device).eval()
    return task, tokenizer_from_state(checkpoint["zoo_tokenizer"])


def generate(checkpoint_path: str, prompts: list[str], device: str = "cpu", **options) -> list[str]:
    """Completions (CausalLM) or outputs (Seq2Seq) of prompts; options the task's generate_text takes."""
    task, tokenizer = load(checkpoint_path, device)
    accepted = inspect.signature(task.generate_text).parameters
    unknown = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unknown:
        raise SystemExit(f"{type(task).__name__}.generate_text does not take {', '.join(unknown)}")
    kwargs = {k: v for k, v in options.items() if v is not None}
    import torch

    with torch.no_grad():
        return task.generate_text(prompts, tokenizer, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file written by zoo fit on a text task")
    parser.add_argument("--prompt", action="append", default=None,
                        help="input text (repeat for a batch); default: one empty prompt")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def main(args: argparse.Namespace) -> int:
    """Prints each prompt's text; 0, or 2 with a message for a missing checkpoint or bad options."""
    prompts = args.prompt or [""]
    options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "seed")}
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        texts = generate(args.checkpoint, prompts, device, **options)
    except (ValueError, TypeError, FileNotFoundError) as error:  # bad options, a prompt too long, no such file
        print(f"zoo generate: error: {error}", file=sys.stderr)
        return 2
    for prompt, text in zip(prompts, texts):
        print(f"--- {prompt!r}\n{text}")
    return 0
