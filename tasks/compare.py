"""`zoo compare`: zoo models beside their reference implementations, measured in one run.

    zoo compare vit_base_patch16_224 gpt2 bert_base whisper_base_encoder --device cuda
    zoo compare vit_digits gpt_nano configs/text/seq2seq_dates.yaml --device cpu --runs runs/vit_digits

For each model (a preset, or a config YAML's model preset and model_args): parameters;
forward FLOPs per sample, analytic and counted by torch.utils.flop_counter, with their
ratio; training step (forward + backward + AdamW) and inference (no-grad forward)
throughput in samples/s and tokens/s (speech: also audio-seconds/s); peak memory and MFU
on a GPU; the training throughput of every attention backend (--backends); and the
reference implementation at the same configuration (timm ViT, HF BERT, GPT-2, Whisper
encoder; tasks.compare_reference) on the same inputs, with our throughput as a multiple
of its. --runs adds logged runs' quality metric against steps and training time
(tasks.compare_runs). Writes compare.md, compare.csv, compare.json, compare_throughput.png
(and compare_quality.png) to --out. docs/compare.md explains every number.

This module imports torch only when a comparison runs, so `zoo --help` stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import importlib
import inspect
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

BACKENDS = ("triton", "sdpa", "eager")
# The anchors' setups (/work/shared/ANCHORS.md): preset -> (batch, seq_len; None = the preset's full length).
GPU_SIZES = {"vit_base_patch16_224": (128, None), "vit_small_patch16_224": (256, None), "gpt2": (16, 1024),
             "bert_base": (32, 512), "whisper_base_encoder": (64, None)}
GPU_DEFAULT_NAMES = ("vit_base_patch16_224", "gpt2", "bert_base", "whisper_base_encoder")
CPU_DEFAULT_NAMES = ("vit_digits", "gpt_nano", "bert_tiny", "seq2seq_tiny", "speech_tiny")
# CPU sizes by domain: (batch, seq_len) small enough for a loaded 2-core machine.
CPU_SIZES = {"vision": (16, None), "bert": (4, 128), "gpt": (4, 128), "seq2seq": (4, 32), "speech": (4, 100)}
GPU_BATCH = 32  # other presets on a GPU, at their full length
# On the CPU, 5 timed steps moved the ratios by 10-30% between runs of the same code (2026-11-25); 20 by a few %.
STEPS = {("cuda", False): (20, 5), ("cuda", True): (5, 2), ("cpu", False): (20, 3), ("cpu", True): (2, 1)}


@dataclass
class Target:
    """One model to compare: a preset and the overrides a config gave it."""

    label: str  # how tables name it
    preset: str
    overrides: dict = field(default_factory=dict)
    source: str = "preset"  # "preset", or the config file it came from


# --------------------------------------------------------------------------------------
# Names: presets and config files
# --------------------------------------------------------------------------------------


def _task_overrides(class_path: Optional[str], init_args: dict) -> dict:
    """The model overrides a task class derives from its own init args (see the tasks' __init__)."""
    if not class_path:
        return {}
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"model.class_path {class_path!r} cannot be imported: {exc}") from None
    args = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}
    args.update(init_args)
    if name in ("ImageClassification", "AudioClassification"):
        return {"num_classes": args["num_classes"]}
    if name == "SpeechRecognition":
        return {"num_classes": 0, "vocab_size": args["vocab_size"], "blank_id": args["blank_id"]}
    if name == "Seq2Seq":
        return {"src_vocab_size": args["vocab_size"], "tgt_vocab_size": args["vocab_size"]}
    if name in ("CausalLM", "MaskedLM") and args.get("vocab_size") is not None:
        return {"vocab_size": args["vocab_size"]}
    return {}  # CausalLM / MaskedLM without vocab_size: the tokenizer decides; the preset's vocabulary here


def target_from_config(path: str) -> Target:
    """A Target from a `zoo fit` config: model.init_args.model (the preset), its model_args,
    and what the task class passes to the model from its own arguments (num_classes,
    vocab_size, ...). Raises ValueError for a config without a model preset."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    model = config.get("model") or {}
    init_args = model.get("init_args") or {}
    preset = init_args.get("model")
    if not isinstance(preset, str):
        raise ValueError(f"{path}: no model preset at model.init_args.model")
    overrides = {**_task_overrides(model.get("class_path"), init_args), **(init_args.get("model_args") or {})}
    backbone = init_args.get("backbone")
    if backbone is not None:
        from zoo import TransformerConfig

        values = backbone.get("init_args", backbone) if isinstance(backbone, dict) else None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: model.init_args.backbone must be a mapping of TransformerConfig fields")
        overrides["backbone"] = TransformerConfig(**values)
    label = f"{os.path.splitext(os.path.basename(path))[0]} ({preset})"
    return Target(label, preset, overrides, source=path)


def resolve(name: str) -> Target:
    """A preset name or a config path -> Target. Raises ValueError for an unknown name,
    listing close preset names and config files."""
    import zoo

    if name in zoo.list_models():
        return Target(name, name)
    if name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        return target_from_config(name)
    configs = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    stems = {os.path.splitext(os.path.basename(c))[0]: c for c in configs}
    # Presets first: a near-miss of a preset name is more likely than of a file.
    close = difflib.get_close_matches(name, zoo.list_models(), n=3, cutoff=0.5)
    close += [stems[s] for s in difflib.get_close_matches(name, list(stems), n=2, cutoff=0.6)]
    close += difflib.get_close_matches(name, configs, n=2, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in dict.fromkeys(close))}?" if close else ""
    raise ValueError(f"unknown model or config {name!r}{hint} (a preset of zoo.list_models(), or the path of a "
                     f"config .yaml file)")


def parse_backends(text: str) -> tuple[str, ...]:
    """'triton,sdpa' -> ("triton", "sdpa"); ValueError naming an unknown backend."""
    names = tuple(dict.fromkeys(b.strip() for b in text.split(",") if b.strip()))
    unknown = [b for b in names if b not in BACKENDS]
    if not names or unknown:
        raise ValueError(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}; got {text!r}")
    return names


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def _sizes(kind: str, preset: str, device: str, batch: Optional[int], seq_len: Optional[int]):
    if device == "cuda":
        default_batch, default_seq = GPU_SIZES.get(preset, (GPU_BATCH, None))
    else:
        default_batch, default_seq = CPU_SIZES[kind]
    return batch or default_batch, seq_len or default_seq


def check_target(target: Target, device: str, seq_len: Optional[int]) -> None:
    """Builds target's model on the meta device (no memory, no time) and its input's shape:
    a bad override or a length the model cannot take raises here, before anything is timed."""
    import torch

    import zoo
    from tasks import compare_measure as m

    with torch.device("meta"):
        model = zoo.create_model(target.preset, **target.overrides)
    _, seq_len = _sizes(m.model_kind(model), target.preset, device, 1, seq_len)
    m.make_workload(model, 1, seq_len, "meta")


def compare_model(target: Target, device: str, batch: Optional[int], seq_len: Optional[int], steps: int,
                  warmup: int, backends: Sequence[str], reference: bool, peak: Optional[float]) -> dict:
    """Every measurement of one model (and its reference); see the module docstring."""
    import torch

    import zoo
    from tasks import compare_measure as m
    from tasks.compare_reference import NoReference, reference_for

    def factory(**kw):
        return zoo.create_model(target.preset, **{**target.overrides, **kw})

    with torch.device(device):
        model = factory()
    kind = m.model_kind(model)
    batch, seq_len = _sizes(kind, target.preset, device, batch, seq_len)
    w = m.make_workload(model, batch, seq_len, device)
    analytic, counted = m.analytic_forward_flops(model, w), m.counted_forward_flops(factory, w)
    train_flops = 3 * analytic  # forward + backward (twice the forward's matmuls)
    entry = {"model": target.label, "preset": target.preset, "source": target.source,
             "overrides": {k: repr(v) for k, v in target.overrides.items()}, "kind": kind, "batch": batch,
             "input": w.description, "tokens_per_sample": w.tokens, "audio_s_per_sample": w.audio_seconds,
             "params": m.trainable_parameters(model),
             "flops": {"forward_analytic": analytic, "forward_counter": counted, "counter_over_analytic":
                       counted / analytic, "train_per_sample": train_flops},
             "results": {}, "reference": None}

    def record(impl: str, train: dict, infer: dict) -> None:
        train, infer = m.rates(train, w), m.rates(infer, w)
        if peak and "samples_per_s" in train:
            train["mfu"] = train_flops * train["samples_per_s"] / (peak * 1e12)
        entry["results"][impl] = {"train": train, "infer": infer}
        print(f"  {target.label}: {impl}: train {_ms(train)}, inference {_ms(infer)}", file=sys.stderr, flush=True)

    for backend in backends:
        model.set_attn_backend(backend)
        record(f"ours-{backend}", m.measure_training(model, lambda mod: m.ours_loss(mod, w), device, steps, warmup),
               m.measure_inference(model, lambda mod: m.ours_forward(mod, w), device, steps, warmup))
    try:
        ref = reference_for(model, w) if reference else None
    except NoReference as why:
        ref, entry["reference"] = None, {"name": None, "why_none": str(why)}
    if not reference:
        entry["reference"] = {"name": None, "why_none": "references skipped (--no-reference)"}
    del model
    m.free_memory(device)
    if ref is not None:
        with torch.device(device):
            ref_model = ref.build()
        ref_params = m.trainable_parameters(ref_model)
        entry["reference"] = {"name": ref.name, "params": ref_params, "param_note": ref.param_note}
        if entry["params"] - ref_params != ref.param_difference:
            # Not the same configuration after all: timing it would compare different models.
            entry["reference"]["why_none"] = (f"parameter counts differ: ours {entry['params']:,}, {ref.name} "
                                              f"{ref_params:,} (expected difference {ref.param_difference:,})")
        else:
            record("reference", m.measure_training(ref_model, lambda mod: ref.loss(mod, w), device, steps, warmup),
                   m.measure_inference(ref_model, lambda mod: ref.forward(mod, w), device, steps, warmup))
        del ref_model
        m.free_memory(device)
    return entry


def _ms(entry: dict) -> str:
    return f"{entry['step_ms']:.1f} ms a step" if "step_ms" in entry else entry.get("error", "no time")


def metadata(device: str, command: Optional[str], steps: int, warmup: int, peak: Optional[float],
             peak_note: str) -> dict:
    """Where, when and how the run happened."""
    import datetime
    import platform

    import timm
    import torch
    import transformers
    import triton

    from tasks.compare_measure import device_description

    return {
        "device": device_description(device), "device_type": device,
        "torch": torch.__version__, "triton": triton.__version__, "timm": timm.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
        "precision": "bf16 autocast, fused AdamW" if device == "cuda" else "fp32, AdamW (foreach)",
        "timing": f"median of {steps} step(s) after {warmup} warm-up step(s), each timed between device "
                  f"synchronizations; eager mode (no torch.compile)",
        "peak_tflops": peak, "peak_note": peak_note,
        "kernel_ops": kernel_ops_note(device),
        "flops": "analytic matmul FLOPs, 2 per multiply-add, attention in full (4*S^2*D per layer) also when "
                 "causal; training = 3x forward; cross-checked with torch.utils.flop_counter (eager attention)",
    }


def kernel_ops_note(device: str) -> str:
    """Which of our models' norms and GELUs ran tritonzoo's kernels (zoo.layers.kernel_pays)."""
    from zoo import layers

    if device != "cuda":
        return ("norms, GELU, rotary and losses through the kernels' PyTorch paths (float32 norms, GELU and "
                "attention as torch's own ops: kernels.runtime.torch_native; the norms and GELU called by the "
                "layers themselves: zoo.layers.torch_op_serves)")
    if layers.KERNEL_MIN_ELEMENTS == 0:
        return "norms and GELU through tritonzoo's Triton kernels at every size (TRITONZOO_KERNEL_MIN_ELEMENTS=0)"
    return (f"norms and GELU through tritonzoo's Triton kernels from {layers.KERNEL_MIN_ELEMENTS:,} elements a "
            f"call, torch's fused ops below (TRITONZOO_KERNEL_MIN_ELEMENTS)")


def run(names: Sequence[str] = (), batch_size: Optional[int] = None, seq_len: Optional[int] = None,
        device: Optional[str] = None, steps: Optional[int] = None, warmup: Optional[int] = None,
        backends: Sequence[str] = BACKENDS, reference: bool = True, runs: Sequence[str] = (),
        out_dir: Optional[str] = "compare_out", quick: bool = False, command: Optional[str] = None,
        peak_tflops: Optional[float] = None) -> dict:
    """Compares models (presets or config paths; default: the anchors' four on a GPU, five
    small ones on the CPU), prints the tables and writes compare.{md,csv,json} and the plots
    to out_dir (None: nothing written). Returns the report {"metadata", "models", "runs"}.

    Raises ValueError for an unknown name or backend, a bad size or --peak-tflops, an --out
    that is a file, --device cuda without CUDA, a length a model cannot take, or a run without
    a quality metric; TypeError for an override a model does not have; FileNotFoundError for
    --runs that match no metrics.csv. All before anything is timed.
    """
    import torch

    import kernels
    from tasks import compare_report, compare_runs
    from tasks.bench_attention import check_out_dir
    from tasks.compare_measure import peak_tflops as device_peak

    check_out_dir(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    for what, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--steps", steps)):
        if value is not None and value < 1:
            raise ValueError(f"{what} must be positive, got {value}")
    if warmup is not None and warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        raise ValueError(f"--peak-tflops must be a positive number of TFLOP/s, got {peak_tflops}")
    backends = parse_backends(",".join(backends))
    default_steps, default_warmup = STEPS[(device, quick)]
    steps, warmup = steps or default_steps, default_warmup if warmup is None else warmup
    targets = [resolve(n) for n in (names or (GPU_DEFAULT_NAMES if device == "cuda" else CPU_DEFAULT_NAMES))]
    for target in targets:
        check_target(target, device, seq_len)
    # Read before timing anything: a run without a quality metric fails now, not after the measurements.
    run_records = [compare_runs.read_run(f) for f in (compare_runs.find_metrics_files(runs) if runs else [])]
    peak, peak_note = None, "MFU is reported on a GPU only"
    if device == "cuda":
        peak, peak_note = ((peak_tflops, f"{peak_tflops:g} TFLOP/s (given with --peak-tflops)")
                           if peak_tflops is not None
                           else device_peak(torch.cuda.get_device_name()))
    report = {"metadata": metadata(device, command, steps, warmup, peak, peak_note), "models": [], "runs": []}
    # On the CPU the triton backend takes the kernels' PyTorch path, also under TRITON_INTERPRET.
    with kernels.reference_only() if device == "cpu" else contextlib.nullcontext():
        for target in targets:
            report["models"].append(compare_model(target, device, batch_size, seq_len, steps, warmup, backends,
                                                  reference, peak))
            if out_dir is not None:  # a run stopped midway keeps the models measured so far
                compare_report.write_partial(report, out_dir)
    report["runs"] = run_records
    print(compare_report.markdown(report))
    if out_dir is not None:
        written = compare_report.write(report, out_dir)
        print("wrote " + ", ".join(str(p) for p in written))
    return report


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `zoo compare`'s arguments to parser (no torch import)."""
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="presets (zoo.list_models()) or config .yaml files; default: the anchors' "
                             f"{', '.join(GPU_DEFAULT_NAMES)} on a GPU, {', '.join(CPU_DEFAULT_NAMES)} on the CPU")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="samples per step (default: the anchors' sizes on a GPU, a few on the CPU)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                        help="tokens per sample (each side for seq2seq), mel frames for speech (100/s); "
                             "vision models keep their img_size")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="timed steps (GPU 20, CPU 20)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N", help="untimed steps first (GPU 5, CPU 3)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="attention backends of our models, the first the headline (default: triton,sdpa,eager)")
    parser.add_argument("--no-reference", action="store_true", help="skip the timm / Hugging Face references")
    parser.add_argument("--runs", nargs="+", default=[], metavar="DIR_OR_GLOB",
                        help="logged runs (runs/<name>/version_<n>, runs/<name>, or globs): quality vs steps/time; "
                             "give it after the NAMEs, which it would otherwise take as runs")
    parser.add_argument("--out", default="compare_out", metavar="DIR", help="output folder (default: compare_out)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (GPU 5 + 2, CPU 2 + 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                        help="the GPU's dense bf16 peak for MFU, when its name is not recognized")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Runs a comparison from parsed arguments (add_arguments); exit status 0, or 2 with a
    message for bad input."""
    try:
        run(args.names, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device, steps=args.steps,
            warmup=args.warmup, backends=args.backends.split(","), reference=not args.no_reference, runs=args.runs,
            out_dir=args.out, quick=args.quick, peak_tflops=args.peak_tflops,
            command=getattr(args, "command_line", None))
    except (ValueError, TypeError, FileNotFoundError) as error:  # bad names, options, overrides or paths
        print(f"zoo compare: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m tasks.compare NAME ...`: the same as `zoo compare NAME ...`."""
    parser = add_arguments(argparse.ArgumentParser(prog="zoo compare", description=__doc__.split("\n\n")[0],
                                                   allow_abbrev=False))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["zoo", "compare", *argv])
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
