"""Attention benchmark: tritonzoo's ``flash_attn_func`` beside the peers, in one process.

On a CUDA GPU, for each shape of the sweep (bf16, B*S = 16384 tokens, H*D = 2048), it
times our forward and backward beside torch SDPA restricted to each backend in turn
(flash, cuDNN, memory-efficient) and FlexAttention under torch.compile, after checking
our output against SDPA's flash backend. On a CPU it can only compare the PyTorch
reference path of tritonzoo with torch's CPU SDPA (``quick`` mode): that is a smoke
test of the harness, not a kernel benchmark, and every output says so.

FLOPs follow /work/shared/ANCHORS.md: 4*B*H*Sq*Sk*D for the forward, halved when
causal, and 2.5 times that for the backward. Times are medians; the backward is timed
as (forward + backward from a fresh forward) minus the forward, for every
implementation alike (FlexAttention's compiled backward cannot be replayed).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import triton

from kernels import flash_attn_func, reference_only
from kernels.sdpa import torch_sdpa  # torch's own SDPA, even if someone patched F's

OURS = "tritonzoo"
GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_HEAD_DIMS = (64, 128)
TOKENS = 16384  # batch * seqlen
WIDTH = 2048  # nheads * headdim
# Max abs difference of our output from the reference allowed before the run stops.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
CPU_TITLE = "CPU: PyTorch path of tritonzoo vs torch SDPA (CPU)"
FLOP_CONVENTION = "forward 4*B*H*Sq*Sk*D, halved when causal; backward 2.5x forward"


class AccuracyError(RuntimeError):
    """Our output differs from the reference by more than the dtype's tolerance."""


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: q, k, v of shape (batch, seqlen, nheads, head_dim)."""

    batch: int
    seqlen: int
    nheads: int
    head_dim: int
    causal: bool
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a torch.dtype (the field is a string so the shape serializes to JSON)."""
        return getattr(torch, self.dtype)


def attention_flops(shape: Shape) -> tuple[float, float]:
    """(forward, backward) FLOPs of one attention call, by the ANCHORS.md convention."""
    fwd = 4.0 * shape.batch * shape.nheads * shape.seqlen * shape.seqlen * shape.head_dim
    if shape.causal:
        fwd /= 2
    return fwd, 2.5 * fwd


def gpu_shapes(quick: bool = False) -> list[Shape]:
    """The GPU sweep (bf16, B*S = 16384, H*D = 2048); quick: D=128, S in 1024/4096 only."""
    head_dims, seqlens = ((128,), (1024, 4096)) if quick else (GPU_HEAD_DIMS, GPU_SEQLENS)
    return [Shape(TOKENS // s, s, WIDTH // d, d, causal, "bfloat16")
            for d in head_dims for causal in (False, True) for s in seqlens]


#: The attention of the models `zoo compare` puts beside their references, at ANCHORS.md's
#: setups (bf16): (model, its zoo preset, batch, tokens, heads, head dim, causal).
MODEL_SHAPES = (
    ("ViT-B/16 at batch 128", "vit_base_patch16_224", 128, 197, 12, 64, False),
    ("BERT-base at 32 x 512", "bert_base", 32, 512, 12, 64, False),
    ("GPT-2 124M at 16 x 1024", "gpt2", 16, 1024, 12, 64, True),
    ("Whisper-base encoder at 64 x 30 s", "whisper_base_encoder", 64, 1500, 8, 64, False),
)


def model_shapes() -> list[tuple[str, Shape]]:
    """(label, shape) of one attention call of each model of MODEL_SHAPES: where issue 6's
    training-speed gaps between a zoo model and its reference can be read per layer."""
    return [(f"{label} ({preset})", Shape(batch, tokens, heads, head_dim, causal, "bfloat16"))
            for label, preset, batch, tokens, heads, head_dim, causal in MODEL_SHAPES]


def cpu_shapes() -> list[Shape]:
    """Small fp32 shapes a 2-core CPU runs in seconds."""
    return [Shape(2, s, 4, 64, causal, "float32") for causal in (False, True) for s in (128, 256, 512)]


# --------------------------------------------------------------------------------------
# Implementations: each takes q, k, v in (B, S, H, D) and returns out in (B, S, H, D).
# --------------------------------------------------------------------------------------


def _ours(q, k, v, causal):
    return flash_attn_func(q, k, v, causal=causal)


def _sdpa(backend=None) -> Callable:
    """torch SDPA on (B, H, S, D) views of the same data, optionally pinned to one backend."""
    def attend(q, k, v, causal):
        ctx = contextlib.nullcontext() if backend is None else torch.nn.attention.sdpa_kernel(backend)
        with ctx:
            out = torch_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)
    return attend


def _causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class _Flex:
    """FlexAttention under torch.compile, with a cached causal block mask per length."""

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention
        # Every new length recompiles; the default limit (8) is too low for the sweep.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compiled = torch.compile(flex_attention, dynamic=False)
        self.masks = {}

    def __call__(self, q, k, v, causal):
        from torch.nn.attention.flex_attention import create_block_mask
        mask = None
        if causal:
            key = (q.shape[1], k.shape[1])
            if key not in self.masks:
                self.masks[key] = create_block_mask(_causal_mask, None, None, *key, device=q.device)
            mask = self.masks[key]
        out = self.compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
        return out.transpose(1, 2)


def implementations(device: str) -> dict[str, Callable]:
    """Name -> attention function; ours first. On CPU: the PyTorch path and torch's SDPA."""
    if device == "cpu":
        return {OURS: _ours, "sdpa-cpu": _sdpa()}
    from torch.nn.attention import SDPBackend
    return {OURS: _ours,
            "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
            "flex": _Flex()}


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def make_inputs(shape: Shape, device: str, seed: int = 0):
    """Random q, k, v (requiring grad) and an upstream gradient, all (B, S, H, D)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dims = (shape.batch, shape.seqlen, shape.nheads, shape.head_dim)
    q, k, v, dout = (torch.randn(dims, generator=gen, device=device, dtype=shape.torch_dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def time_ms(fn: Callable, device: str, warmup: float, rep: float) -> float:
    """Median milliseconds of fn(): triton's do_bench on CUDA, a wall-clock loop on CPU."""
    if device != "cpu":
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    start = time.perf_counter()
    fn()  # a slow first call only shortens the warmup: there is always at least one
    estimate = max(time.perf_counter() - start, 1e-6) * 1e3
    for _ in range(max(1, int(warmup / estimate))):
        fn()
    times = []
    for _ in range(min(100, max(3, int(rep / estimate)))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _error_text(exc: BaseException, caught) -> str:
    # SDPA says only "No available kernel"; the reasons come as warnings just before.
    text = f"{type(exc).__name__}: {exc}".strip()
    reasons = "; ".join(str(w.message).strip() for w in caught)
    return (text + (f" ({reasons})" if reasons else ""))[:600]


def _timed(fn: Callable, device: str, warmup: float, rep: float) -> tuple[Optional[float], Optional[str]]:
    """(median ms, None), or (None, why) when fn raises: a peer may not support a shape."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return time_ms(fn, device, warmup, rep), None
        except Exception as exc:
            if device != "cpu":
                torch.cuda.empty_cache()
            return None, _error_text(exc, caught)


def measure(attend: Callable, inputs, shape: Shape, device: str, warmup: float, rep: float) -> dict:
    """Forward and backward times (ms) and TFLOP/s of one implementation.

    Failures are recorded, not raised: {"error": why} when the forward fails, the
    forward's numbers and {"bwd_error": why} when only the backward does.
    """
    q, k, v, dout = inputs
    causal = shape.causal

    def forward():
        return attend(q, k, v, causal)

    def forward_backward():
        torch.autograd.grad(attend(q, k, v, causal), (q, k, v), dout)

    flops_fwd, flops_bwd = attention_flops(shape)
    fwd_ms, error = _timed(forward, device, warmup, rep)
    if error is not None:
        return {"error": error}
    entry = {"fwd_ms": fwd_ms, "fwd_tflops": flops_fwd / fwd_ms * 1e-9}
    fwd_bwd_ms, error = _timed(forward_backward, device, warmup, rep)
    if error is not None:
        return {**entry, "bwd_error": error}
    bwd_ms = fwd_bwd_ms - fwd_ms
    # Noise can make the difference <= 0 for tiny CPU shapes: no rate then.
    return {**entry, "fwd_bwd_ms": fwd_bwd_ms, "bwd_ms": bwd_ms,
            "bwd_tflops": flops_bwd / bwd_ms * 1e-9 if bwd_ms > 0 else None}


def check(shape: Shape, inputs, device: str) -> dict:
    """Max abs differences of our output and gradients from torch SDPA's on the same inputs.

    The reference is SDPA's flash backend on CUDA (the memory-efficient one if flash is
    unavailable), torch's CPU SDPA on CPU. Raises AccuracyError if the output differs
    by more than TOLERANCE for the dtype; gradients are recorded, not judged.
    """
    q, k, v, dout = inputs
    if device == "cpu":
        references = {"sdpa-cpu": _sdpa()}
    else:
        from torch.nn.attention import SDPBackend
        references = {"sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
                      "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        ours = _ours(q, k, v, shape.causal)
        ours_grads = torch.autograd.grad(ours, (q, k, v), dout)
    except Exception as exc:
        return {"reference": None, "error": f"{OURS} failed: {type(exc).__name__}: {exc}"[:600]}
    for name, attend in references.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = attend(q, k, v, shape.causal)
                ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        except Exception:
            continue  # this backend does not run the shape: try the next
        diffs = {"out": (ours - ref).abs().max().item()}
        for grad_name, g, r in zip(("dq", "dk", "dv"), ours_grads, ref_grads):
            diffs[grad_name] = (g - r).abs().max().item()
        tolerance = TOLERANCE[shape.torch_dtype]
        if not diffs["out"] <= tolerance:  # also catches NaN
            raise AccuracyError(f"{OURS} output differs from {name} by {diffs['out']:.3g} > {tolerance:g} "
                                f"at {shape}")
        return {"reference": name, "tolerance": tolerance, "max_abs_diff": diffs}
    return {"reference": None, "error": "no reference SDPA backend ran this shape"}


def _cpu_name() -> str:
    model = platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU ({model}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"


def run_metadata(device: str, quick: bool, command: Optional[str], title: str) -> dict:
    """What every benchmark records about its run: device, mode, title, versions, date, command line."""
    return {
        "device": torch.cuda.get_device_name() if device != "cpu" else _cpu_name(),
        "mode": ("quick " if quick else "") + ("CPU" if device == "cpu" else "GPU"),
        "title": title,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv),
    }


def metadata(device: str, quick: bool, command: Optional[str], warmup: float, rep: float) -> dict:
    """Where and how the run happened: device, versions, date, command line, conventions."""
    title = CPU_TITLE if device == "cpu" else "Attention kernels: tritonzoo vs torch SDPA backends and FlexAttention"
    return {
        **run_metadata(device, quick, command, title),
        "flops": FLOP_CONVENTION,
        "timing": (f"median of triton.testing.do_bench (warmup {warmup} ms, rep {rep} ms)" if device != "cpu"
                   else f"median wall-clock of repeated calls (warmup {warmup} ms, rep {rep} ms)")
                  + "; forward with inputs requiring grad; backward = (forward + backward) - forward",
    }


def run(device: Optional[str] = None, quick: bool = False, out_dir: Optional[str] = "bench_out",
        shapes: Optional[list[Shape]] = None, warmup: float = 25, rep: float = 100,
        command: Optional[str] = None, models: Optional[list[tuple[str, Shape]]] = None) -> dict:
    """Runs the benchmark, prints its table(s), writes attention.json and attention.png to out_dir.

    device: "cuda" or "cpu" (default: cuda when available). On CPU only quick mode
    runs (ValueError otherwise). out_dir None writes nothing. models: (label, shape) pairs
    measured after the sweep, in their own table (default: model_shapes() in a full GPU
    run without `shapes`, none otherwise). Returns the report dict {"metadata",
    "implementations", "results", "model_results"}. Raises AccuracyError if our output is
    wrong for a shape.
    """
    check_out_dir(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not quick:
        raise ValueError("the full attention benchmark needs a CUDA GPU; on CPU use quick mode (--quick)")
    if device == "cpu":
        warmup, rep = min(warmup, 10), min(rep, 50)  # keep the CPU smoke test to seconds
    if models is None:
        models = model_shapes() if device != "cpu" and not quick and shapes is None else []
    if shapes is None:
        shapes = cpu_shapes() if device == "cpu" else gpu_shapes(quick)
    impls = implementations(device)
    report = {"metadata": metadata(device, quick, command, warmup, rep), "implementations": list(impls),
              "results": [], "model_results": []}
    cases = [("results", None, shape) for shape in shapes] + [("model_results", label, s) for label, s in models]
    # On CPU ours must take its PyTorch path, forward and backward alike, even when the
    # Triton interpreter is on (as in the tests); on CUDA this context is not needed.
    with reference_only() if device == "cpu" else contextlib.nullcontext():
        for key, label, shape in cases:
            inputs = make_inputs(shape, device)
            row = {**({"model": label} if label else {}), **asdict(shape), "flops_fwd": attention_flops(shape)[0],
                   "flops_bwd": attention_flops(shape)[1], "check": check(shape, inputs, device), "timings": {}}
            for name, attend in impls.items():
                row["timings"][name] = measure(attend, inputs, shape, device, warmup, rep)
            report[key].append(row)
            progress(report, out_dir, "attention",
                     label or f"D={shape.head_dim} S={shape.seqlen} causal={shape.causal}", key)
            del inputs
    metrics = ("ms", "tflops") if device == "cpu" else ("tflops",)
    for metric in metrics:
        print(format_table(report, metric))
        if report["model_results"]:
            print(format_table(report, metric, models=True))
    write_outputs(report, out_dir, "attention", plot=plot)
    return report


# --------------------------------------------------------------------------------------
# Reporting: no CUDA needed from here on.
# --------------------------------------------------------------------------------------


def _value(entry: dict, metric: str, direction: str) -> Optional[float]:
    if "error" in entry:
        return None
    return entry.get(f"{direction}_{metric}")


def _pair(a: Optional[float], b: Optional[float], digits: int) -> str:
    def one(x):
        return "n/a" if x is None else f"{x:.{digits}f}"
    return f"{one(a)} / {one(b)}"


def _speedup(ours: dict, peer: dict, direction: str) -> Optional[float]:
    a, b = _value(ours, "tflops", direction), _value(peer, "tflops", direction)
    return a / b if a is not None and b else None


def format_table(report: dict, metric: str = "tflops", models: bool = False) -> str:
    """Markdown table of a report: ours and each peer (forward / backward), ours/peer speedups.

    metric: "tflops" (TFLOP/s) or "ms" (milliseconds). Speedups are always rates
    (> 1: ours faster). Failed implementations show n/a and are listed under the table.
    models: the table of report["model_results"] (the models' own shapes), else the sweep's.
    """
    meta, impls = report["metadata"], report["implementations"]
    ours, peers = impls[0], impls[1:]
    unit = "TFLOP/s" if metric == "tflops" else "ms"
    # CPU rates are tiny: more digits, so they do not all print as 0.0.
    digits = (1 if "GPU" in meta["mode"] else 4) if metric == "tflops" else 2
    title = f"### {meta['title']}" + (": the models' attention shapes" if models else "")
    lines = [title, "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; "
             f"`{meta['command']}`", "",
             f"Forward / backward in {unit}; ours/peer = speedup of {ours} (> 1: {ours} faster); "
             f"max abs diff of {ours}'s output from the reference."]
    header = (["model", "B", "H"] if models else []) + ["D", "S", "causal", "dtype", f"{ours} fwd / bwd"]
    header += [f"{p} fwd / bwd" for p in peers] + [f"ours/{p} fwd / bwd" for p in peers] + ["max abs diff"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failures = []
    for row in report.get("model_results", []) if models else report["results"]:
        timings = row["timings"]
        cells = [row["model"], str(row["batch"]), str(row["nheads"])] if models else []
        cells += [str(row["head_dim"]), str(row["seqlen"]), "yes" if row["causal"] else "no", row["dtype"]]
        for name in impls:
            t = timings.get(name, {"error": "not run"})
            cells.append(_pair(_value(t, metric, "fwd"), _value(t, metric, "bwd"), digits))
            for key, what in (("error", ""), ("bwd_error", "backward: ")):
                if key in t:
                    where = row.get("model") or f"D={row['head_dim']} S={row['seqlen']} causal={row['causal']}"
                    failures.append(f"- {name}, {where}: {what}{t[key]}")
        for peer in peers:
            t_ours, t_peer = timings.get(ours, {"error": ""}), timings.get(peer, {"error": ""})
            cells.append(_pair(_speedup(t_ours, t_peer, "fwd"), _speedup(t_ours, t_peer, "bwd"), 2))
        diff = row.get("check", {}).get("max_abs_diff", {}).get("out")
        cells.append("n/a" if diff is None else f"{diff:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "Unavailable:"] + failures
    return "\n".join(lines) + "\n"


def write_json(report: dict, path) -> None:
    """Writes the report as JSON (strict: no NaN or Infinity)."""
    Path(path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def _brief(entry) -> str:
    """One implementation's times in a few characters: its ``*ms`` and ``seconds`` figures, or "error"."""
    if "error" in entry:
        return "error"
    parts = [f"{key} {value:.3g}" for key, value in entry.items()
             if key.endswith(("ms", "seconds")) and isinstance(value, (int, float))]
    parts += [f"{key}: {_brief(value)}" for key, value in entry.items() if isinstance(value, dict)]
    return ", ".join(parts)


def check_out_dir(out_dir: Optional[str], option: str = "--out") -> None:
    """Raises ValueError, before anything is measured, when out_dir, or the nearest part of its
    path that exists, is not a folder (a folder could then not be created there)."""
    if out_dir is None:
        return
    path = Path(out_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is below {str(existing)!r}, a file"
        raise ValueError(f"{option} {str(out_dir)!r} {where}; expected a folder (created when missing)")


def progress(report: dict, out_dir: Optional[str], name: str, label: str, key: str = "results") -> None:
    """After each measured case (the last of report[key]): prints its times to stderr and writes
    <name>.json with the results so far, so a run stopped midway (a device call's time limit)
    keeps what it measured."""
    figures = "; ".join(f"{impl} {_brief(entry)}" for impl, entry in report[key][-1]["timings"].items())
    print(f"  measured {label}: {figures}", file=sys.stderr, flush=True)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(report, Path(out_dir) / f"{name}.json")


def write_outputs(report: dict, out_dir: Optional[str], name: str, table: Optional[str] = None,
                  plot: Optional[Callable[[dict, Path], None]] = None) -> None:
    """Writes <name>.json, and <name>.md (the table) and <name>.png (plot(report, path)) when
    given, to out_dir (created if needed); says what it wrote. out_dir None writes nothing."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json"]
    write_json(report, written[0])
    if table is not None:
        written.append(out / f"{name}.md")
        written[-1].write_text(table)
    if plot is not None:
        written.append(out / f"{name}.png")
        plot(report, written[-1])
    print("wrote " + ", ".join(str(p) for p in written))


def plot(report: dict, path) -> None:
    """TFLOP/s vs sequence length: one panel per (head dim, causal, direction), one line per implementation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = report["results"]
    groups = sorted({(r["head_dim"], r["causal"]) for r in results})
    fig = Figure(figsize=(11, 3.2 * max(1, len(groups))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(groups)), 2, squeeze=False)
    for (head_dim, causal), row_axes in zip(groups, axes):
        rows = sorted((r for r in results if (r["head_dim"], r["causal"]) == (head_dim, causal)),
                      key=lambda r: r["seqlen"])
        for direction, ax in zip(("fwd", "bwd"), row_axes):
            for name in report["implementations"]:
                points = [(r["seqlen"], _value(r["timings"].get(name, {"error": ""}), "tflops", direction))
                          for r in rows]
                points = [(s, y) for s, y in points if y is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks([r["seqlen"] for r in rows], [str(r["seqlen"]) for r in rows])
            ax.minorticks_off()
            ax.set_title(f"D={head_dim}, {'causal' if causal else 'non-causal'}, "
                         f"{'forward' if direction == 'fwd' else 'backward'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    meta = report["metadata"]
    fig.suptitle(f"{meta['title']}\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['date'][:10]}", fontsize="medium")
    fig.savefig(path, dpi=110)
