"""Training-ops benchmark: tritonzoo's kernels beside torch eager and torch.compile, in one process.

For each op (LayerNorm, RMSNorm, fused add + RMSNorm, RoPE, GELU + bias, SwiGLU, GeGLU,
cross-entropy, fused linear + cross-entropy) it times the forward and the forward +
backward of three implementations on the same inputs: ours (``kernels.*``), the plain
PyTorch code a model would write (``eager``) and ``torch.compile(fullgraph=True)`` of
that same code (``compile``); and, on CUDA, the peak memory of a forward + backward.
Before timing, our output and gradients are compared with eager's.

On a CPU only ``quick`` runs, at tiny sizes: ours takes its PyTorch path (the
interpreter is never used for timing) and the compile peer is not run (inductor's C++
build would dominate a smoke test). It checks the harness, not the kernels; the title
says so. ``--resources`` instead compiles the kernels for Hopper (sm_90a) without a GPU
and reports registers, spills and 16-byte loads and stores per kernel configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from kernels import reference_only
from kernels.activations import geglu, gelu, swiglu
from kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
from kernels.norms import add_rms_norm, layer_norm, rms_norm
from kernels.rotary import apply_rotary_emb
from tasks.bench_attention import (AccuracyError, check_out_dir, progress, run_metadata, time_ms, write_json,
                                   write_outputs)
from tasks.ops_resources import hopper_resources

OURS, EAGER, COMPILE = "tritonzoo", "eager", "compile"
#: The cross-entropy variant whose logits rows are padded to 64 elements, as the zoo models'
#: (a contiguous (N, 50257) tensor, as Hugging Face's, is the plain case).
PADDED = "padded rows"
OPS = ("layer_norm", "rms_norm", "add_rms_norm", "rotary", "gelu_bias", "swiglu", "geglu", "cross_entropy",
       "fused_linear_cross_entropy")
# Relative error ||ours - eager|| / ||eager|| allowed for the output before the run stops.
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4}
CPU_TITLE = "CPU: PyTorch path of tritonzoo vs torch eager (harness smoke test, not a kernel benchmark)"
GPU_TITLE = "Training ops: tritonzoo Triton kernels vs torch eager and torch.compile"


@dataclass(frozen=True)
class Case:
    """One benchmark problem: an op, its sizes (see SIZES) and a dtype."""

    op: str
    dims: tuple
    dtype: str
    variant: str = ""

    @property
    def label(self) -> str:
        """Short text for tables and plots."""
        return f"{self.op}{f' ({self.variant})' if self.variant else ''} {'x'.join(map(str, self.dims))}"


# What the dims mean, per op.
SIZES = {"layer_norm": "tokens x hidden", "rms_norm": "tokens x hidden", "add_rms_norm": "tokens x hidden",
         "rotary": "batch x seqlen x heads x headdim", "gelu_bias": "tokens x width", "swiglu": "tokens x width",
         "geglu": "tokens x width", "cross_entropy": "tokens x vocab",
         "fused_linear_cross_entropy": "tokens x hidden x vocab"}


def gpu_cases(quick: bool = False) -> list[Case]:
    """bf16 problems of a 16k-token training step; quick: one size per op."""
    hidden = (4096,) if quick else (1024, 4096, 16384)
    cases = [Case(op, (16384, h), "bfloat16") for op in ("layer_norm", "rms_norm") for h in hidden]
    cases += [Case("add_rms_norm", (16384, 4096), "bfloat16")]
    cases += [Case("rotary", (8, 2048, 32, 128), "bfloat16", v) for v in (("neox",) if quick else ("neox", "gptj"))]
    cases += [Case("gelu_bias", (16384, 16384), "bfloat16", "tanh"), Case("swiglu", (16384, 11008), "bfloat16"),
              Case("geglu", (16384, 11008), "bfloat16"), Case("cross_entropy", (16384, 50257), "bfloat16")]
    if not quick:  # the zoo models' logits: rows padded to 64 elements (zoo.layers.vocab_logits)
        cases += [Case("cross_entropy", (16384, 50257), "bfloat16", PADDED)]
    cases += [Case("fused_linear_cross_entropy", (16384, 4096, 50257), "bfloat16")]
    return cases


def cpu_cases() -> list[Case]:
    """Tiny fp32 problems: seconds on a 2-core CPU."""
    return [Case("layer_norm", (64, 96), "float32"), Case("rms_norm", (64, 96), "float32"),
            Case("add_rms_norm", (64, 96), "float32"), Case("rotary", (2, 16, 4, 32), "float32", "neox"),
            Case("gelu_bias", (64, 96), "float32", "tanh"), Case("swiglu", (64, 96), "float32"),
            Case("geglu", (64, 96), "float32"), Case("cross_entropy", (32, 1003), "float32"),
            Case("cross_entropy", (32, 1003), "float32", PADDED),
            Case("fused_linear_cross_entropy", (32, 64, 1003), "float32")]


# --------------------------------------------------------------------------------------
# The ops: inputs, ours, the plain PyTorch code, the minimum traffic or FLOPs
# --------------------------------------------------------------------------------------


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[list, dict]:
    """(leaves requiring grad, constants) of a case, from a seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case.dtype)

    def randn(*shape, scale=1.0, grad=True):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype).requires_grad_(grad)

    op, d = case.op, case.dims
    if op in ("layer_norm", "rms_norm", "add_rms_norm"):
        leaves = [randn(*d), randn(d[1]) + 1] + ([randn(d[1])] if op == "layer_norm" else [])
        if op == "add_rms_norm":
            leaves.insert(1, randn(*d))
        return [t.detach().requires_grad_() for t in leaves], {}
    if op == "rotary":
        B, S, H, D = d
        angles = torch.arange(S, device=device)[:, None] * 10000.0 ** (-torch.arange(0, D, 2, device=device) / D)
        return [randn(B, S, H, D)], {"cos": angles.cos(), "sin": angles.sin()}
    if op == "gelu_bias":
        return [randn(*d), randn(d[1])], {}
    if op in ("swiglu", "geglu"):
        return [randn(*d), randn(*d)], {}
    target = torch.randint(0, d[-1], (d[0],), generator=gen, device=device)
    target[::17] = -100  # some padding, as in a real batch
    if op == "cross_entropy":
        if case.variant == PADDED:
            rows = randn(d[0], -(-d[1] // 64) * 64, scale=2.0, grad=False)
            return [rows[:, :d[1]].detach().requires_grad_()], {"target": target}
        return [randn(*d, scale=2.0)], {"target": target}
    return [randn(d[0], d[1]), randn(d[2], d[1], scale=d[1] ** -0.5)], {"target": target}


def ours(case: Case) -> Callable:
    """Our implementation of the case's op: (leaves, constants) -> output(s)."""
    interleaved = case.variant == "gptj"
    return {
        "layer_norm": lambda a, c: layer_norm(*a),
        "rms_norm": lambda a, c: rms_norm(*a),
        "add_rms_norm": lambda a, c: add_rms_norm(*a),
        "rotary": lambda a, c: apply_rotary_emb(a[0], c["cos"], c["sin"], interleaved=interleaved),
        "gelu_bias": lambda a, c: gelu(a[0], a[1], approximate=case.variant or "none"),
        "swiglu": lambda a, c: swiglu(*a),
        "geglu": lambda a, c: geglu(*a),
        "cross_entropy": lambda a, c: cross_entropy(a[0], c["target"]),
        "fused_linear_cross_entropy": lambda a, c: fused_linear_cross_entropy(a[0], a[1], c["target"]),
    }[case.op]


def _rotate(x, cos, sin, interleaved):
    """The rotary embedding as LLaMA (rotate_half) and GPT-J (pairs) write it, tables in x's dtype."""
    S = x.shape[1]
    c, s = cos[None, :S, None, :].to(x.dtype), sin[None, :S, None, :].to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return x * torch.cat((c, c), -1) + torch.cat((-x2, x1), -1) * torch.cat((s, s), -1)


def torch_code(case: Case) -> Callable:
    """The plain PyTorch code of the case's op (run eager, and under torch.compile)."""
    n = case.dims[1] if len(case.dims) > 1 else case.dims[0]
    interleaved = case.variant == "gptj"

    def add_rms(x, r, w):
        s = x + r
        return F.rms_norm(s, (n,), w, 1e-6), s

    return {
        "layer_norm": lambda a, c: F.layer_norm(a[0], (n,), a[1], a[2], 1e-5),
        "rms_norm": lambda a, c: F.rms_norm(a[0], (n,), a[1], 1e-6),
        "add_rms_norm": lambda a, c: add_rms(*a),
        "rotary": lambda a, c: _rotate(a[0], c["cos"], c["sin"], interleaved),
        "gelu_bias": lambda a, c: F.gelu(a[0] + a[1], approximate=case.variant or "none"),
        "swiglu": lambda a, c: F.silu(a[0]) * a[1],
        "geglu": lambda a, c: F.gelu(a[0]) * a[1],
        "cross_entropy": lambda a, c: F.cross_entropy(a[0], c["target"]),
        "fused_linear_cross_entropy": lambda a, c: F.cross_entropy(F.linear(a[0], a[1]), c["target"]),
    }[case.op]


def cost(case: Case) -> tuple[float, str]:
    """(amount, unit) of the forward + backward: minimum bytes moved ("GB/s") or FLOPs ("TFLOP/s").

    Bytes count each input read once and each output written once, parameters aside:
    e.g. LayerNorm reads x and writes y, then reads x and dy and writes dx (5 passes);
    add_rms_norm reads x and r and writes y and s = x + r, then reads s, dy and ds and writes
    the one gradient x and r share (8; ours writes that gradient twice, as separate tensors).
    """
    e = torch.finfo(getattr(torch, case.dtype)).bits // 8
    numel = math.prod(case.dims)
    if case.op == "fused_linear_cross_entropy":
        return 6.0 * numel, "TFLOP/s"  # logits, then grad_hidden and grad_weight: 3 GEMMs of 2*N*H*V
    passes = {"layer_norm": 5, "rms_norm": 5, "add_rms_norm": 8, "rotary": 4, "gelu_bias": 5, "swiglu": 8,
              "geglu": 8, "cross_entropy": 3}[case.op]
    return float(passes * numel * e), "GB/s"


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _fwd_bwd(fn: Callable, leaves: list, consts: dict, grads: list) -> Callable:
    def step():
        outs = _outputs(fn(leaves, consts))
        torch.autograd.grad(outs, leaves, grads)
    return step


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(case: Case, leaves: list, consts: dict, grads: list) -> dict:
    """Relative errors of our output(s) and gradients from eager's; raises AccuracyError past TOLERANCE."""
    ref = _outputs(torch_code(case)(leaves, consts))
    ref_grads = torch.autograd.grad(ref, leaves, grads)
    out = _outputs(ours(case)(leaves, consts))
    out_grads = torch.autograd.grad(out, leaves, grads)
    errors = {"out": max(_rel_err(o, r) for o, r in zip(out, ref))}
    errors["grads"] = max(_rel_err(g, r) for g, r in zip(out_grads, ref_grads))
    if not errors["out"] <= TOLERANCE[case.dtype]:  # also catches NaN
        raise AccuracyError(f"{OURS} output differs from eager by {errors['out']:.3g} (relative) > "
                            f"{TOLERANCE[case.dtype]:g} at {case}")
    return errors


def measure(fn: Callable, leaves: list, consts: dict, grads: list, device: str, warmup: float, rep: float) -> dict:
    """Forward and forward + backward medians (ms), and on CUDA the peak memory of one step (MiB)."""
    try:
        entry = {"fwd_ms": time_ms(lambda: fn(leaves, consts), device, warmup, rep)}
        step = _fwd_bwd(fn, leaves, consts, grads)
        entry["fwd_bwd_ms"] = time_ms(step, device, warmup, rep)
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            entry["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return entry
    except Exception as exc:  # a peer may not run a size (out of memory): record it, go on
        if device != "cpu":
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {exc}"[:600]}


def implementations(case: Case, device: str) -> dict[str, Callable]:
    """Name -> implementation; the compile peer only on CUDA."""
    impls = {OURS: ours(case), EAGER: torch_code(case)}
    if device != "cpu":
        impls[COMPILE] = torch.compile(torch_code(case), fullgraph=True, dynamic=False)
    return impls


def metadata(device: str, quick: bool, command: Optional[str], warmup: float, rep: float) -> dict:
    """Where and how the run happened: device, versions, date, command line, method."""
    gpu = device != "cpu"
    return {
        **run_metadata(device, quick, command, GPU_TITLE if gpu else CPU_TITLE),
        "timing": (f"median of triton.testing.do_bench (warmup {warmup} ms, rep {rep} ms)" if gpu
                   else f"median wall-clock of repeated calls (warmup {warmup} ms, rep {rep} ms)")
                  + "; forward with inputs requiring grad; fwd+bwd = forward + torch.autograd.grad",
        "notes": ("compile = torch.compile(fullgraph=True, dynamic=False) of the eager code; peak memory = "
                  "max_memory_allocated during one forward + backward, above what was allocated before" if gpu
                  else "ours runs its PyTorch path (not the Triton interpreter); torch.compile is not run on CPU"),
        "sizes": SIZES,
    }


def run(device: Optional[str] = None, quick: bool = False, out_dir: Optional[str] = "bench_out",
        cases: Optional[list[Case]] = None, ops: Optional[Sequence[str]] = None, warmup: float = 25,
        rep: float = 100, command: Optional[str] = None) -> dict:
    """Runs the benchmark, prints its table, writes ops.json and ops.png to out_dir (None: nothing).

    device: "cuda" or "cpu" (default: cuda when available); on CPU only quick mode runs
    (ValueError otherwise). ops: names from OPS to keep (default all). Returns the report
    {"metadata", "implementations", "results"}. Raises AccuracyError if our output is wrong.
    """
    check_out_dir(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not quick:
        raise ValueError("the full ops benchmark needs a CUDA GPU; on CPU use quick mode (--quick)")
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; expected names from {list(OPS)}")
    if device == "cpu":
        warmup, rep = min(warmup, 10), min(rep, 50)
    else:
        # One compile per case: more than the default recompile limit of the peer's code.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    cases = cases if cases is not None else cpu_cases() if device == "cpu" else gpu_cases(quick)
    cases = [c for c in cases if not ops or c.op in ops]
    names = [OURS, EAGER] + ([COMPILE] if device != "cpu" else [])
    report = {"metadata": metadata(device, quick, command, warmup, rep), "implementations": names, "results": []}
    with reference_only() if device == "cpu" else contextlib.nullcontext():
        for case in cases:
            leaves, consts = make_inputs(case, device)
            grads = [torch.randn_like(o) for o in _outputs(torch_code(case)(leaves, consts))]
            amount, unit = cost(case)
            row = {**asdict(case), "label": case.label, "cost": amount, "unit": unit,
                   "check": check(case, leaves, consts, grads), "timings": {}}
            for name, fn in implementations(case, device).items():
                row["timings"][name] = measure(fn, leaves, consts, grads, device, warmup, rep)
            report["results"].append(row)
            progress(report, out_dir, "ops", case.label)
            del leaves, consts, grads
    print(format_table(report))
    write_outputs(report, out_dir, "ops", plot=plot)
    return report


# --------------------------------------------------------------------------------------
# Reporting: no CUDA needed from here on
# --------------------------------------------------------------------------------------


def _ms(entry: dict, key: str) -> Optional[float]:
    return None if "error" in entry else entry.get(key)


def _fmt(x: Optional[float], digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def speedup(report_row: dict, peer: str, key: str = "fwd_bwd_ms") -> Optional[float]:
    """Time of the peer over ours (> 1: ours faster), or None when either did not run."""
    a = _ms(report_row["timings"].get(OURS, {"error": ""}), key)
    b = _ms(report_row["timings"].get(peer, {"error": ""}), key)
    return b / a if a and b else None


def format_table(report: dict) -> str:
    """Markdown table: per case, each implementation's fwd / fwd+bwd ms, ours/peer speedups,
    peak memory (CUDA), our throughput and our errors relative to eager."""
    meta, impls = report["metadata"], report["implementations"]
    peers = impls[1:]
    lines = [f"### {meta['title']}", "", f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
             f"{meta['date']}; `{meta['command']}`", "",
             f"Times in ms, forward / forward+backward; speedup = peer time / {OURS} time (> 1: {OURS} faster); "
             f"peak = MiB above the inputs during forward+backward; rel err = ||ours - eager|| / ||eager||."]
    header = ["op", "dtype"] + [f"{n} ms" for n in impls] + [f"speedup vs {p}" for p in peers]
    has_peak = any("peak_mib" in t for row in report["results"] for t in row["timings"].values())
    header += (["peak MiB " + " / ".join(impls)] if has_peak else []) + [f"{OURS} fwd+bwd", "rel err out / grads"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failures = []
    for row in report["results"]:
        cells = [row["label"], row["dtype"]]
        for name in impls:
            t = row["timings"].get(name, {"error": "not run"})
            cells.append(f"{_fmt(_ms(t, 'fwd_ms'), 3)} / {_fmt(_ms(t, 'fwd_bwd_ms'), 3)}")
            if "error" in t:
                failures.append(f"- {name}, {row['label']}: {t['error']}")
        for peer in peers:
            cells.append(f"{_fmt(speedup(row, peer, 'fwd_ms'), 2)} / {_fmt(speedup(row, peer), 2)}")
        if has_peak:
            cells.append(" / ".join(_fmt(row["timings"].get(n, {}).get("peak_mib"), 0) for n in impls))
        ms = _ms(row["timings"].get(OURS, {"error": ""}), "fwd_bwd_ms")
        scale = 1e-9 if row["unit"] == "TFLOP/s" else 1e-6
        cells.append("n/a" if not ms else f"{row['cost'] / ms * scale:.{1 if 'GPU' in meta['mode'] else 4}f} "
                                          f"{row['unit']}")
        cells.append(f"{row['check']['out']:.1e} / {row['check']['grads']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "Unavailable:"] + failures
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    """Bars of our forward+backward speedup over each peer (log scale), one group per case (1 = parity)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, peers = report["results"], report["implementations"][1:]
    fig = Figure(figsize=(10, 1.2 + 0.45 * max(1, len(rows)) * len(peers)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    height = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        ys = [j + i * height for j in range(len(rows))]
        # Bars grow from parity (1) on a log axis, so 2x faster and 2x slower look alike;
        # missing runs draw no bar (NaN).
        values = [speedup(r, peer) or math.nan for r in rows]
        ax.barh(ys, [v - 1.0 for v in values], left=1.0, height=height, label=f"vs {peer}")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))], [r["label"] for r in rows], fontsize="small")
    ax.invert_yaxis()
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"forward+backward speedup of {OURS} (peer time / ours; > 1: ours faster)")
    ax.legend(fontsize="small")
    meta = report["metadata"]
    ax.set_title(f"{meta['title']}\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['date'][:10]}", fontsize="medium")
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------
# Command line (`zoo bench ops` calls run(); this is the same for python -m tasks.bench_ops)
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options: --quick, --out, --device, --ops."""
    parser.add_argument("--quick", action="store_true", help="one size per op (the only mode on CPU)")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="output folder (default: bench_out)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=None, metavar="OP",
                        help=f"only these ops, from: {', '.join(OPS)}")
    parser.add_argument("--resources", action="store_true",
                        help="instead of timing: compile the kernels for sm_90a (no GPU needed) and report "
                             "registers, spills and 16-byte loads and stores (resources.json in --out)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tasks.bench_ops [--quick] [--out DIR] [--device cuda|cpu] [--ops OP ...]``."""
    parser = argparse.ArgumentParser(prog="python -m tasks.bench_ops", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.resources:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            parser.error("--resources compiles the kernels: unset TRITON_INTERPRET")
        print("| kernel | warps | registers | spill bytes | 16-byte loads | 16-byte stores |\n"
              "|---|---|---|---|---|---|")
        rows = hopper_resources()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json({"target": "sm_90a", "dtype": "bfloat16", "kernels": rows}, Path(args.out) / "resources.json")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device == "cpu" and not args.quick:
        parser.error("the full ops benchmark needs a CUDA GPU; on CPU add --quick")
    try:
        check_out_dir(args.out)
    except ValueError as error:
        parser.error(str(error))
    run(device=device, quick=args.quick, out_dir=args.out, ops=args.ops,
        command=" ".join(["python -m tasks.bench_ops", shlex.join(argv)]).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
