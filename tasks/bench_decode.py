"""Decoding benchmark: tritonzoo's ``flash_attn_with_kvcache`` beside torch SDPA over the same cache.

One decode step of one attention layer: q (B, 1, H, D); one new key/value per sequence,
written in place at position L - 1 of a (B, L, Hk, D) cache; attention over the L keys.
Both sides do the whole step on the same tensors:

- ``tritonzoo``: ``flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=L - 1)``
  (the append is fused into the attention launch);
- ``sdpa``: ``k_cache[:, L - 1] = k`` (and v), then torch SDPA on (B, Hk, L, D) views of
  the cache's valid prefix with ``enable_gqa=True``; ``sdpa-<backend>`` pins one backend.

Shapes (GPU): bf16, GQA 8:1 (64 query heads, 8 kv-heads, Llama-3-70B's), head dim 128,
L from 4k to 64k, batch 1, 4, 16. Reported per step: time (median of
``triton.testing.do_bench``: CUDA events, L2 flushed before each call, so the launch
overhead hides behind the flush: device time with a cold cache), the same replayed from a
CUDA graph (no launch gaps, L2 warm between replays), tokens/s = batch / step time (one
token per sequence per step, one layer), and the KV bytes read per second. On a CPU only a
smoke run exists: tiny fp32 shapes through tritonzoo's PyTorch path beside CPU SDPA, to
exercise the harness; its outputs say so.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import triton

from kernels import reference_only
from kernels.decoding_interface import flash_attn_with_kvcache
from kernels.sdpa import torch_sdpa  # torch's own SDPA, even if someone patched F's
from tasks.bench_attention import _timed, check_out_dir, progress, run_metadata, write_outputs

OURS = "tritonzoo"
GPU_CACHE_LENS = (4096, 8192, 16384, 32768, 65536)
GPU_BATCHES = (1, 4, 16)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
CPU_TITLE = "CPU smoke run: PyTorch path of tritonzoo vs torch SDPA (CPU); not a kernel benchmark"
GPU_TITLE = "KV-cache decoding: tritonzoo flash_attn_with_kvcache vs torch SDPA (same cache, same append)"
MODES = {"eager": "do_bench (cold L2)", "graph": "CUDA graph replay"}


class AccuracyError(RuntimeError):
    """Our output differs from SDPA's by more than the dtype's tolerance."""


@dataclass(frozen=True)
class Shape:
    """One decode step: batch rows, each with cache_len keys after the append."""

    batch: int
    cache_len: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a torch.dtype (the field is a string so the shape serializes to JSON)."""
        return getattr(torch, self.dtype)

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values one step must read: 2 * B * L * Hk * D elements."""
        return 2 * self.batch * self.cache_len * self.nheads_k * self.head_dim * self.torch_dtype.itemsize


def gpu_shapes(quick: bool = False) -> list[Shape]:
    """bf16, 64:8 heads, D 128; every (batch, L) of the sweep, or batch 1/16 x L 4k/64k when quick."""
    batches, lens = ((1, 16), (4096, 65536)) if quick else (GPU_BATCHES, GPU_CACHE_LENS)
    return [Shape(b, n, 64, 8, 128, "bfloat16") for b in batches for n in lens]


def cpu_shapes() -> list[Shape]:
    """Tiny fp32 shapes a loaded 2-core CPU runs in a second or two."""
    return [Shape(b, n, 8, 1, 32, "float32") for b in (1, 2) for n in (64, 256)]


@dataclass
class Step:
    """The tensors of one decode step; the cache holds exactly cache_len keys after the append."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_seqlens: torch.Tensor  # (B,) int32: cache_len - 1, the keys before the append
    cache_len: int


def make_step(shape: Shape, device: str, seed: int = 0) -> Step:
    """Random inputs (never zeros: they hide unwritten outputs and run faster than real data)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    B, L, H, Hk, D = shape.batch, shape.cache_len, shape.nheads, shape.nheads_k, shape.head_dim

    def randn(*dims):
        return torch.randn(dims, generator=gen, device=device, dtype=shape.torch_dtype)

    return Step(randn(B, 1, H, D), randn(B, L, Hk, D), randn(B, L, Hk, D), randn(B, 1, Hk, D), randn(B, 1, Hk, D),
                torch.full((B,), L - 1, dtype=torch.int32, device=device), L)


def _ours(step: Step) -> torch.Tensor:
    return flash_attn_with_kvcache(step.q, step.k_cache, step.v_cache, step.k, step.v, cache_seqlens=step.cache_seqlens)


def _sdpa(backend=None) -> Callable[[Step], torch.Tensor]:
    """The same step with torch ops: append by slice assignment, SDPA over the prefix (views, no copy)."""
    def decode(step: Step) -> torch.Tensor:
        n = step.cache_len
        step.k_cache[:, n - 1] = step.k[:, 0]
        step.v_cache[:, n - 1] = step.v[:, 0]
        ctx = contextlib.nullcontext() if backend is None else torch.nn.attention.sdpa_kernel(backend)
        with ctx:
            out = torch_sdpa(step.q.transpose(1, 2), step.k_cache[:, :n].transpose(1, 2),
                             step.v_cache[:, :n].transpose(1, 2), enable_gqa=True)
        return out.transpose(1, 2)
    return decode


def implementations(device: str) -> dict[str, Callable[[Step], torch.Tensor]]:
    """Name -> decode step; ours first, then torch SDPA as dispatched, then pinned backends (CUDA)."""
    if device == "cpu":
        return {OURS: _ours, "sdpa-cpu": _sdpa()}
    from torch.nn.attention import SDPBackend
    return {OURS: _ours, "sdpa": _sdpa(), "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION), "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION)}


def check(step: Step, shape: Shape, reference: Callable, ref_name: str) -> dict:
    """Max abs difference of our output from the reference step's; AccuracyError above TOLERANCE."""
    ours = _ours(step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference(step)
    diff = (ours.float() - ref.float()).abs().max().item()
    tolerance = TOLERANCE[shape.torch_dtype]
    if not diff <= tolerance:  # also catches NaN
        raise AccuracyError(f"{OURS} output differs from {ref_name} by {diff:.3g} > {tolerance:g} at {shape}")
    return {"reference": ref_name, "tolerance": tolerance, "max_abs_diff": diff}


def _graph_ms(fn: Callable[[], object], rep: float) -> float:
    """Median ms per call replayed from a CUDA graph (fn already ran once: autotuning is done)."""
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def measure(decode: Callable[[Step], torch.Tensor], step: Step, shape: Shape, device: str, warmup: float,
            rep: float) -> dict:
    """Step time (ms), tokens/s and KV GB/s per mode; failures recorded as {"error": why}."""
    def run():
        return decode(step)

    entry = {}
    modes = ("eager",) if device == "cpu" else ("eager", "graph")
    for mode in modes:
        timer = _timed if mode == "eager" else _timed_graph
        ms, error = timer(run, device, warmup, rep)
        if error is not None:
            entry[mode] = {"error": error}
            continue
        entry[mode] = {"ms": ms, "tokens_per_s": shape.batch / (ms * 1e-3), "kv_gb_per_s": shape.kv_bytes / ms * 1e-6}
    return entry


def _timed_graph(fn, device, warmup, rep):
    del device, warmup
    try:
        return _graph_ms(fn, rep), None
    except Exception as exc:  # a peer that cannot be captured is recorded, not fatal
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {exc}"[:600]


def metadata(device: str, quick: bool, command: Optional[str], warmup: float, rep: float) -> dict:
    """Device, versions, date, command line and the timing method of a run."""
    gpu = device != "cpu"
    return {
        **run_metadata(device, quick, command, GPU_TITLE if gpu else CPU_TITLE),
        "timing": (f"eager: median of triton.testing.do_bench (warmup {warmup} ms, rep {rep} ms, L2 flushed); "
                   f"graph: median of triton.testing.do_bench_cudagraph (rep {rep} ms)") if gpu
                  else f"median wall-clock of repeated calls (warmup {warmup} ms, rep {rep} ms)",
        "step": "append one key/value per sequence in place + attention of 1 query per head over L keys, one layer",
    }


def run(device: Optional[str] = None, quick: bool = False, out_dir: Optional[str] = "bench_out",
        shapes: Optional[list[Shape]] = None, warmup: float = 25, rep: float = 100,
        command: Optional[str] = None) -> dict:
    """Runs the benchmark, prints its table, writes decode.json, decode.md and decode.png to out_dir.

    device: "cuda" or "cpu" (default: cuda when available); on CPU only quick mode runs
    (ValueError otherwise). out_dir None writes nothing. Returns the report
    {"metadata", "implementations", "results"}. Raises AccuracyError if our output is wrong.
    """
    check_out_dir(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not quick:
        raise ValueError("the decoding benchmark needs a CUDA GPU; on CPU use quick mode (--quick), a smoke run")
    if device == "cpu":
        warmup, rep = min(warmup, 10), min(rep, 30)
    shapes = shapes if shapes is not None else cpu_shapes() if device == "cpu" else gpu_shapes(quick)
    impls = implementations(device)
    report = {"metadata": metadata(device, quick, command, warmup, rep), "implementations": list(impls),
              "results": []}
    ref_name = "sdpa-cpu" if device == "cpu" else "sdpa"
    # On CPU ours takes its PyTorch path even when the Triton interpreter is on (tests).
    with reference_only() if device == "cpu" else contextlib.nullcontext():
        for shape in shapes:
            step = make_step(shape, device)
            row = {**asdict(shape), "kv_bytes": shape.kv_bytes, "check": check(step, shape, impls[ref_name], ref_name),
                   "timings": {name: measure(decode, step, shape, device, warmup, rep)
                               for name, decode in impls.items()}}
            report["results"].append(row)
            progress(report, out_dir, "decode", f"B={shape.batch} L={shape.cache_len}")
            del step
    table = format_table(report)
    print(table)
    write_outputs(report, out_dir, "decode", table, plot)
    return report


# --------------------------------------------------------------------------------------
# Reporting: no CUDA needed from here on.
# --------------------------------------------------------------------------------------


def _ms(row: dict, name: str, mode: str) -> Optional[float]:
    return row["timings"].get(name, {}).get(mode, {}).get("ms")


def _best_peer(row: dict, peers: Sequence[str], mode: str) -> tuple[Optional[str], Optional[float]]:
    times = [(name, _ms(row, name, mode)) for name in peers]
    times = [(name, t) for name, t in times if t is not None]
    return min(times, key=lambda nt: nt[1]) if times else (None, None)


def _mode_label(meta: dict, mode: str) -> str:
    return MODES[mode] if "GPU" in meta["mode"] else "wall clock"


def _number(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"  # CPU smoke rates are tiny: keep digits


def format_table(report: dict) -> str:
    """Markdown: per (batch, L) and timing mode, µs per step of each implementation, ours in
    tokens/s and KV GB/s, the speedup over SDPA as dispatched and over the fastest SDPA
    backend (> 1: ours faster), and the max abs difference from the reference."""
    meta, impls = report["metadata"], report["implementations"]
    ours, peers = impls[0], impls[1:]
    modes = sorted({m for r in report["results"] for t in r["timings"].values() for m in t}, key=list(MODES).index)
    lines = [f"### {meta['title']}", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; `{meta['command']}`",
             "", f"Timing: {meta['timing']}. Step: {meta['step']}."]
    header = ["B", "L", "dtype", "timing"] + [f"{n} µs" for n in impls]
    header += [f"{ours} tokens/s", f"{ours} KV GB/s", f"ours/{peers[0]}", "ours/best SDPA (which)", "max abs diff"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    failures = []
    for row in report["results"]:
        for mode in modes:
            cells = [str(row["batch"]), str(row["cache_len"]), row["dtype"], _mode_label(meta, mode)]
            for name in impls:
                t = row["timings"].get(name, {}).get(mode, {"error": "not run"})
                cells.append(f"{t['ms'] * 1e3:.1f}" if "ms" in t else "n/a")
                if "error" in t:
                    failures.append(f"- {name}, B={row['batch']} L={row['cache_len']} {mode}: {t['error']}")
            mine = row["timings"].get(ours, {}).get(mode, {})
            cells.append(_number(mine.get("tokens_per_s")))
            cells.append(_number(mine.get("kv_gb_per_s")))
            t_ours, t_first = _ms(row, ours, mode), _ms(row, peers[0], mode)
            cells.append(f"{t_first / t_ours:.2f}" if t_ours and t_first else "n/a")
            best, t_best = _best_peer(row, peers, mode)
            cells.append(f"{t_best / t_ours:.2f} ({best})" if t_ours and t_best else "n/a")
            diff = row.get("check", {}).get("max_abs_diff")
            cells.append("n/a" if diff is None else f"{diff:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "Unavailable:"] + failures
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    """µs per step against cache length (log-log), one panel per batch, one line per implementation and mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = report["results"]
    batches = sorted({r["batch"] for r in results})
    fig = Figure(figsize=(5.5 * max(1, len(batches)), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(batches)), squeeze=False)[0]
    for batch, ax in zip(batches, axes):
        rows = sorted((r for r in results if r["batch"] == batch), key=lambda r: r["cache_len"])
        for name in report["implementations"]:
            for mode, style in (("eager", "-"), ("graph", ":")):
                points = [(r["cache_len"], _ms(r, name, mode)) for r in rows]
                points = [(n, t * 1e3) for n, t in points if t is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", label=f"{name} ({_mode_label(report['metadata'], mode)})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["cache_len"] for r in rows], [str(r["cache_len"]) for r in rows])
        ax.minorticks_off()
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("keys in the cache (L)")
        ax.set_ylabel("µs per decode step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    meta = report["metadata"]
    fig.suptitle(f"{meta['title']}\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['date'][:10]}", fontsize="medium")
    fig.savefig(path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `zoo bench decode` (and of `python -m tasks.bench_decode`)."""
    parser.add_argument("--quick", action="store_true",
                        help="batch 1/16 x L 4k/64k only (the only mode on CPU, a smoke run of the PyTorch path)")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="output folder (default: bench_out)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m tasks.bench_decode [--quick] [--out DIR] [--device cuda|cpu]`."""
    parser = argparse.ArgumentParser(prog="python -m tasks.bench_decode", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if device == "cpu" and not args.quick:
        parser.error("the decoding benchmark needs a CUDA GPU; on CPU add --quick (a smoke run)")
    try:
        check_out_dir(args.out)
    except ValueError as error:
        parser.error(str(error))
    words = ["python", "-m", "tasks.bench_decode", *(sys.argv[1:] if argv is None else argv)]
    run(device=device, quick=args.quick, out_dir=args.out, command=shlex.join(words))
    return 0


if __name__ == "__main__":
    sys.exit(main())
