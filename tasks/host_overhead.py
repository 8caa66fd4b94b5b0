"""Host time per call of the kernels' Python side, without a GPU.

On an H100, a decoding call took ~450 us whatever the cache size (docs/benchmarks.md):
host time, not kernel time. This measures that host time on any machine. The Triton launches
are replaced by no-ops (JITFunction.run and Autotuner.run), so what is timed is everything
up to Triton's launcher: argument checks, torch.library dispatch, output allocation and
launch bookkeeping. Triton's own launch cost comes on top; only a GPU shows it. CPU
tensors stand in for CUDA ones, with the Triton path forced on.

    PYTHONPATH=. python -m tasks.host_overhead            # median microseconds per call
    PYTHONPATH=. python -m tasks.host_overhead --jit      # Triton's JIT included (compiles first)

With --jit, Triton's JITFunction.run runs for real against a stand-in CUDA driver: each
kernel compiles for sm_90a once (seconds each, one autotune candidate), and every later call
goes through the kernels' launch path (kernels.launcher: a remembered argument pattern
launches directly; TRITONZOO_BIND_ONCE=0 for Triton's argument binding, specialization and
cache lookup on every call) and launch metadata up to the launcher, which is a no-op. What
remains unmeasured is cuLaunchKernel itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JITFunctions

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.runtime.autotuner as _autotuner  # noqa: E402
import triton.runtime.jit as _jit  # noqa: E402


#: How the autotuned launches (attention, decoding) are run: "stub", a no-op; "triton",
#: Triton's own Autotuner.run for every call; "fast", kernels.autotune's run, which skips
#: Triton's per-call key building once a key is tuned. Tuning times nothing (every candidate
#: ties) and JITFunction.run is the same in all three (a no-op, or with --jit Triton's own),
#: so the last two differ by exactly the Python between a launcher's call and Triton's JIT.
AUTOTUNER_MODES = ("stub", "triton", "fast")


def _set_autotuner(mode: str) -> None:
    from kernels import autotune
    if not hasattr(autotune, "_fast_run"):
        autotune._fast_run = autotune.ParallelAutotuner.run
    autotune.ParallelAutotuner.run = {"stub": lambda self, *args, **kwargs: None,
                                      "triton": _autotuner.Autotuner.run,
                                      "fast": autotune._fast_run}[mode]


def _stub_launches() -> None:
    from kernels import launcher
    _jit.JITFunction.run = lambda self, *args, **kwargs: None
    launcher._BoundRun.__call__ = lambda self, *args, **kwargs: None  # the kernels' own launch path
    _triton_path_on_cpu_tensors()


def _triton_path_on_cpu_tensors() -> None:
    """Every op takes its Triton path for the CPU tensors that stand in for CUDA ones; the
    autotuner's timing is stubbed (every candidate ties)."""
    _autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [1.0, 1.0, 1.0]
    importlib.import_module("kernels")  # every kernels.* module, patched below
    for name, module in list(sys.modules.items()):
        if name.startswith("kernels.") and hasattr(module, "use_triton"):
            module.use_triton = lambda t: True
    # The decoding call's range checks read index values, so they run for CPU tensors only
    # (on CUDA that would sync every step); the CPU tensors here stand in for CUDA ones.
    sys.modules["kernels.decoding_interface"]._check_values = lambda *args: None


class _StandInDriver:
    """What Triton's JIT asks of a CUDA driver, answered for an H100 without one: kernels
    compile for sm_90a for real; loading them and launching them do nothing."""

    def __init__(self):
        self.utils = self

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def launcher_cls(self, src, metadata):
        return lambda *args: None


def _jit_for_real() -> None:
    """Triton's JIT runs (against _StandInDriver); only the autotuner's timing is stubbed."""
    from triton.runtime.driver import driver
    os.environ.setdefault("TRITONZOO_AUTOTUNE", "first")  # one compile per key, not five
    driver.set_active(_StandInDriver())
    _triton_path_on_cpu_tensors()


def _median_us(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def workloads() -> dict:
    """Name -> a call of a public op on small CPU tensors (the shapes do not matter here)."""
    import kernels
    bf16 = torch.bfloat16
    # Tiny shapes: the torch ops around the launches (allocations, the backward's sums) run
    # for real on the CPU, and should cost next to nothing, as they would on a GPU's host.
    q1 = torch.randn(1, 1, 8, 64, dtype=bf16)
    k_cache = torch.zeros(1, 64, 2, 64, dtype=bf16)
    v_cache = torch.zeros_like(k_cache)
    k_new = torch.randn(1, 1, 2, 64, dtype=bf16)
    lens = torch.tensor([40], dtype=torch.int32)
    q, k, v = (torch.randn(1, 16, 2, 64, dtype=bf16).requires_grad_() for _ in range(3))
    x = torch.randn(4, 64, dtype=bf16)
    w = torch.ones(64, dtype=bf16)
    x_grad = x.clone().requires_grad_()
    w_grad = w.clone().requires_grad_()
    b_grad = torch.zeros(64, dtype=bf16, requires_grad=True)
    out_grad = torch.ones(1, 16, 2, 64, dtype=bf16)
    return {
        "flash_attn_with_kvcache (decode step, no grad)": lambda: kernels.flash_attn_with_kvcache(
            q1, k_cache, v_cache, cache_seqlens=lens, causal=True),
        "flash_attn_with_kvcache + append k/v": lambda: kernels.flash_attn_with_kvcache(
            q1, k_cache, v_cache, k=k_new, v=k_new, cache_seqlens=lens, causal=True),
        "flash_attn_func forward (no grad)": lambda: kernels.flash_attn_func(
            q.detach(), k.detach(), v.detach(), causal=True),
        "flash_attn_func forward + backward": lambda: torch.autograd.grad(
            kernels.flash_attn_func(q, k, v, causal=True), (q, k, v), out_grad),
        "rms_norm forward (no grad)": lambda: kernels.rms_norm(x, w),
        "rms_norm forward + backward": lambda: torch.autograd.grad(kernels.rms_norm(x_grad, w), x_grad, x),
        "rms_norm forward + backward, weight trains": lambda: torch.autograd.grad(
            kernels.rms_norm(x_grad, w_grad), (x_grad, w_grad), x),
        "swiglu forward (no grad)": lambda: kernels.swiglu(x),
        "layer_norm forward + backward, weight and bias train": lambda: torch.autograd.grad(
            kernels.layer_norm(x_grad, w_grad, b_grad), (x_grad, w_grad, b_grad), x),
        "gelu with bias forward + backward": lambda: torch.autograd.grad(
            kernels.gelu(x_grad, b_grad), (x_grad, b_grad), x),
        # What the zoo runs instead below zoo.layers.KERNEL_MIN_ELEMENTS on CUDA (here on CPU tensors).
        "torch's F.layer_norm forward + backward, weight and bias train": lambda: torch.autograd.grad(
            F.layer_norm(x_grad, (64,), w_grad, b_grad), (x_grad, w_grad, b_grad), x),
        "torch's F.gelu(x + bias) forward + backward": lambda: torch.autograd.grad(
            F.gelu(x_grad + b_grad), (x_grad, b_grad), x),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed repeat (5 repeats)")
    parser.add_argument("--jit", action="store_true",
                        help="run Triton's JIT for real up to a no-op launcher (compiles each kernel first)")
    args = parser.parse_args(argv)
    if args.jit:
        _jit_for_real()
    else:
        _stub_launches()
    torch.set_num_threads(1)
    launches = "Triton's JIT run up to a no-op launcher" if args.jit else "launches stubbed"
    print(f"torch {torch.__version__}, 1 thread; host microseconds per call, {launches} (median of 5);")
    print("autotuned launches (attention, decoding): no-op / through Triton's Autotuner.run / "
          "through kernels.autotune's fast path")
    print("| call | us, autotuner stubbed | us, Triton's Autotuner.run | us, fast path |")
    print("|---|---|---|---|")
    for name, fn in workloads().items():
        times = []
        for mode in AUTOTUNER_MODES:
            _set_autotuner(mode)
            fn()  # compiles, with --jit, outside the timing
            times.append(f"{_median_us(fn, args.calls):.0f}")
        print(f"| {name} | {' | '.join(times)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
