"""Host time against kernel time of one attention call at the models' shapes.

`zoo bench attention` times calls with triton's do_bench, which measures the host's time
whenever it is longer than the GPU's: on the H100 machine a `flash_attn_func` forward cost
350-440 us of CPU time at the models' shapes, where its kernel ran in 80-100 us
(docs/benchmarks.md, "Second H100 run"). This tool separates the two for our kernels at the
shapes of `tasks.bench_attention.MODEL_SHAPES`:

- host time: calls issued back to back without synchronizing, wall time per call (the GPU is
  faster than the host at these shapes, so the queue never fills and the host never waits);
- kernel time: each CUDA kernel's device time per call, from torch.profiler.

    PYTHONPATH=. python -m tasks.host_profile --out DIR      # on a GPU: JSON + a Markdown table

On a CPU (``--device cpu``) the kernels' PyTorch path computes inline, so "host time" there
is the whole call and no kernel time is reported: that mode only checks the tool runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from kernels import flash_attn_func
from tasks.bench_attention import Shape, make_inputs, model_shapes


def _host_us(fn, calls: int, device: str) -> float:
    """Wall time per call of `calls` calls issued without synchronizing, in microseconds."""
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device != "cpu":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _kernel_us(fn, calls: int) -> dict:
    """Device microseconds per call of each CUDA kernel fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {event.key: event.self_device_time_total / calls for event in prof.key_averages()
            if event.self_device_time_total > 0}


def profile_shape(shape: Shape, device: str, calls: int) -> dict:
    """Host and kernel microseconds per forward, and per forward + backward, at one shape."""
    q, k, v, dout = make_inputs(shape, device)

    def forward():
        return flash_attn_func(q, k, v, causal=shape.causal)

    def forward_backward():
        torch.autograd.grad(forward(), (q, k, v), dout)

    for _ in range(3):  # compiles and autotunes outside the timing
        forward_backward()
    entry = {"host_fwd_us": _host_us(forward, calls, device),
             "host_fwd_bwd_us": _host_us(forward_backward, calls, device)}
    if device != "cpu":
        entry["kernels_fwd_us"] = _kernel_us(forward, calls)
        entry["kernels_fwd_bwd_us"] = _kernel_us(forward_backward, calls)
    return entry


def _cpu_shape(shape: Shape) -> Shape:
    """A model's shape cut down to what a CPU runs in well under a second (fp32)."""
    return Shape(1, min(shape.seqlen, 64), min(shape.nheads, 2), shape.head_dim, shape.causal, "float32")


def format_table(results: list[dict]) -> str:
    lines = ["| shape | host fwd us | host fwd+bwd us | kernels fwd us | kernels fwd+bwd us |",
             "|---|---|---|---|---|"]
    for r in results:
        kernels_fwd = sum(r.get("kernels_fwd_us", {}).values())
        kernels_fb = sum(r.get("kernels_fwd_bwd_us", {}).values())
        cells = [f"{r['host_fwd_us']:.0f}", f"{r['host_fwd_bwd_us']:.0f}",
                 f"{kernels_fwd:.0f}" if "kernels_fwd_us" in r else "n/a",
                 f"{kernels_fb:.0f}" if "kernels_fwd_bwd_us" in r else "n/a"]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=30, help="calls per measurement")
    parser.add_argument("--out", default=None, help="folder for host_profile.json and host_profile.md")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    results = []
    for label, shape in model_shapes():
        if args.device == "cpu":
            shape = _cpu_shape(shape)
        results.append({"label": label, "shape": vars(shape), **profile_shape(shape, args.device, args.calls)})
        print(f"  {label}: host fwd {results[-1]['host_fwd_us']:.0f} us, "
              f"fwd+bwd {results[-1]['host_fwd_bwd_us']:.0f} us", flush=True)
    device = torch.cuda.get_device_name() if args.device != "cpu" else "CPU (shapes cut down; host = whole call)"
    table = f"### Attention host time against kernel time, {device}\n\n" + format_table(results)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_profile.json"), "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "host_profile.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
