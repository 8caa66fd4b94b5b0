"""The ``zoo`` command line: one subcommand per job.

    zoo fit|validate|test|predict -c CONFIG     training and evaluation (LightningCLI)
    zoo generate CHECKPOINT --prompt TEXT       text from a trained decoder / seq2seq model
    zoo attention-map CHECKPOINT [--text TEXT]  PNG figures of the model's attention for one input
    zoo demo [--out DIR]                        correctness check + a quick benchmark
    zoo bench attention [--quick] [--out DIR] [--device cuda|cpu]
    zoo bench decode [--quick] [--out DIR] [--device cuda|cpu]
    zoo bench generate [--quick] [--out DIR] [--device cuda|cpu]
    zoo bench ops [--quick] [--out DIR] [--device cuda|cpu] [--ops OP ...]
    zoo compare NAME ... [--device cuda|cpu] [--runs DIR ...]   models beside their timm / HF references

Each subcommand registers itself in build_parser() with a handler taking the parsed
arguments and returning the exit status. Handlers import their modules lazily: the
demo must set TRITON_INTERPRET before anything imports ``kernels``, and ``zoo --help``
should not pay for importing torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser without abbreviations: an option must be spelled out, so that a
    misspelled one (`--qui`, `--max_new_tok`) is an error rather than silently another option.
    Subparsers are of the parser's class (add_subparsers), so every `zoo` subcommand is too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tasks import demo

    try:
        return demo.main(out_dir=args.out, command=args.command_line)
    except ValueError as error:  # a bad --out, refused before anything runs
        parser.error(str(error))


def _bench(module: str, what: str, *options: str):
    """The handler of `zoo bench <target>`: picks the device, refuses full runs on a CPU, and
    calls tasks.<module>.run with the standard options plus `options` (argument names)."""
    def handler(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        import importlib

        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        if device == "cpu" and not args.quick:
            parser.error(f"the full {what} benchmark needs a CUDA GPU; on CPU add --quick (a smoke run)")
        from tasks.bench_attention import check_out_dir

        bench = importlib.import_module(f"tasks.{module}")
        try:
            check_out_dir(args.out)
        except ValueError as error:
            parser.error(str(error))
        unknown = sorted(set(getattr(args, "ops", None) or ()) - set(getattr(bench, "OPS", ())))
        if unknown:
            parser.error(f"--ops: unknown op(s) {unknown}; expected names from {list(bench.OPS)}")
        bench.run(device=device, quick=args.quick, out_dir=args.out, command=args.command_line,
                  **{name: getattr(args, name) for name in options})
        return 0
    return handler


def _standard_bench_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="output folder (default: bench_out)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tasks import generate

    return generate.main(args)


def _attention_map(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tasks import attention_map

    return attention_map.main(args)


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tasks import compare

    return compare.run_from_args(args)


def _add_bench(subcommands) -> None:
    bench = subcommands.add_parser("bench", help="benchmarks, each beside its peers in the same process")
    targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    attention = targets.add_parser(
        "attention", help="flash_attn_func vs torch SDPA backends and FlexAttention",
        description="Times tritonzoo's flash attention forward and backward beside torch SDPA "
                    "(flash, cuDNN, memory-efficient backends) and FlexAttention. Writes attention.json "
                    "and attention.png to --out.")
    _standard_bench_arguments(attention, "a few shapes only (the only mode on CPU, where it times the PyTorch path)")
    attention.set_defaults(handler=_bench("bench_attention", "attention"))
    ops = targets.add_parser(
        "ops", help="norms, RoPE, activations, cross-entropy vs torch eager and torch.compile",
        description="Times tritonzoo's training ops (forward and forward+backward, peak memory on CUDA) beside "
                    "the same PyTorch code run eager and under torch.compile. Writes ops.json and ops.png to --out.")
    _standard_bench_arguments(ops, "one size per op (the only mode on CPU, where it times the PyTorch path)")
    ops.add_argument("--ops", nargs="+", default=None, metavar="OP",
                     help="only these ops (layer_norm rms_norm add_rms_norm rotary gelu_bias swiglu geglu "
                          "cross_entropy fused_linear_cross_entropy)")
    ops.set_defaults(handler=_bench("bench_ops", "ops", "ops"))
    decode = targets.add_parser(
        "decode", help="flash_attn_with_kvcache vs torch SDPA over the same KV cache",
        description="Times one decode step (append + attention; GQA 64:8, D 128, bf16, cache 4k-64k, batch 1-16) "
                    "of tritonzoo's flash_attn_with_kvcache beside torch SDPA backends on the same cache. "
                    "Writes decode.json, decode.md and decode.png to --out.")
    _standard_bench_arguments(decode, "batch 1/16 x cache 4k/64k (on CPU: a smoke run)")
    decode.set_defaults(handler=_bench("bench_decode", "decoding"))
    generate = targets.add_parser(
        "generate", help="GPT-2 generate(): zoo on the triton and sdpa backends vs Hugging Face",
        description="Times greedy generation (left-padded prompts of 512 tokens, 256 new, batch 1-32, bf16) of "
                    "zoo's gpt2 on the triton backend (flash_attn_with_kvcache) and the sdpa backend beside Hugging "
                    "Face's generate with the same weights. Writes generate.json and generate.md to --out.")
    _standard_bench_arguments(generate, "batch 1 and 32, 64 new tokens (on CPU: a smoke run of a tiny GPT-2)")
    generate.set_defaults(handler=_bench("bench_generate", "generation"))


LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: Import names of what the `tasks` extra installs (pyproject.toml), beyond torch and triton.
EXTRAS_MODULES = frozenset({"lightning", "torchmetrics", "jsonargparse", "tensorboard", "sklearn", "tokenizers",
                            "matplotlib", "timm", "torchvision", "torchaudio", "yaml", "numpy"})


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``zoo`` with all its subcommands."""
    parser = ArgumentParser(prog="zoo", description="tritonzoo: Triton attention kernels and a transformer zoo")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        # Listed for --help only: main() hands these to LightningCLI before argparse runs.
        subcommands.add_parser(name, add_help=False, help=f"{name} a task from a YAML config (LightningCLI: "
                                                          f"zoo {name} --help)")
    demo = subcommands.add_parser("demo", help="check the kernels against float64 math, then a quick benchmark")
    demo.add_argument("--out", default=os.path.join("bench_out", "demo"), metavar="DIR",
                      help="output folder of the benchmark (default: bench_out/demo)")
    demo.set_defaults(handler=_demo)
    _add_bench(subcommands)
    from tasks.compare import add_arguments as add_compare_arguments

    compare_parser = subcommands.add_parser(
        "compare", help="zoo models beside timm / Hugging Face references: params, FLOPs, throughput, memory, MFU",
        description="Measures presets or config files in one run beside their reference implementations; writes "
                    "compare.md/.csv/.json and PNG plots to --out.")
    add_compare_arguments(compare_parser)
    compare_parser.set_defaults(handler=_compare)
    gen = subcommands.add_parser("generate", help="text from a trained GPT or seq2seq checkpoint")
    from tasks.generate import add_arguments

    add_arguments(gen)
    gen.set_defaults(handler=_generate)
    maps = subcommands.add_parser("attention-map", help="PNG figures of a trained model's attention for one input")
    from tasks.attention_map import add_arguments as add_map_arguments

    add_map_arguments(maps)
    maps.set_defaults(handler=_attention_map)
    _record_leaf_parsers(parser)
    return parser


def _record_leaf_parsers(parser: argparse.ArgumentParser) -> None:
    """Sets the default `usage_parser` of every innermost subcommand's parser to that parser, so
    that its usage errors (unknown options included, which argparse reports from the top) show
    that subcommand's usage and prog (`zoo bench attention: error: ...`), not `zoo`'s."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        parser.set_defaults(usage_parser=parser)
    for action in subparsers:
        for sub in set(action.choices.values()):
            _record_leaf_parsers(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses argv (default: sys.argv[1:]) and runs the subcommand; returns its exit status.

    Raises SystemExit (status 2) on a usage error, as argparse does.
    """
    try:
        return _run(argv)
    except ModuleNotFoundError as error:
        # `pip install tritonzoo` brings the kernels only; the CLI's jobs need the extras.
        if error.name is None or error.name.split(".")[0] not in EXTRAS_MODULES:
            raise
        print(f"zoo: this command needs {error.name!r}, which `pip install tritonzoo` alone does not install; "
              f'install the extras: pip install "tritonzoo[tasks]"', file=sys.stderr)
        return 1


def _run(argv: Optional[Sequence[str]]) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        # Training and evaluation belong to LightningCLI: its own parser, config files and help.
        from tasks.lightning_cli import ZooCLI

        ZooCLI(args=None if from_command_line else argv)
        _close_process_group()
        return 0
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    usage_parser = getattr(args, "usage_parser", parser)
    if unknown:
        usage_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.command_line = shlex.join(["zoo", *argv])
    return args.handler(args, usage_parser)


def _close_process_group() -> None:
    """Ends a distributed run's process group (DDP, FSDP) before the process exits.

    Lightning leaves it open. Left to interpreter shutdown, a gloo group's worker thread can
    take the GIL while the main thread finalizes and abort the rank after a finished run
    (tasks.base.close_process_group_at_exit, which every task also registers per rank for the
    processes that never come back here: ddp_spawn's, or a script's own Trainer). The barrier
    first: no rank closes its connections while a peer still talks to it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
