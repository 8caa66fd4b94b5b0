"""Host time per call of the kernels' Python side, without a GPU.

On an H100, a decoding call took ~450 us whatever the cache size (docs/benchmarks.md):
host time, not kernel time. This measures that host time on any machine. The Triton launches
are replaced by no-ops (JITFunction.run and Autotuner.run), so what is timed is everything
up to Triton's launcher: argument checks, torch.library dispatch, output allocation and
launch bookkeeping. Triton's own launch cost comes on top; only a GPU shows it. CPU
tensors stand in for CUDA ones, with the Triton path forced on.

    PYTHONPATH=. python -m tasks.host_overhead            # median microseconds per call
    PYTHONPATH=. python -m tasks.host_overhead --jit      # Triton's JIT included (compiles first)
    PYTHONPATH=. python -m tasks.host_overhead --models   # host ms per training step, models vs references

--models times a forward + backward of the models `zoo compare` measures on a GPU, narrowed to
64 wide with one head and small inputs (the same ops in the same number, almost no CPU work in
them), beside their timm / Hugging Face references at the same configuration: the host time
of a training step, which on the H100 machine bounds the step when it exceeds the GPU time.

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
from typing import Optional

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
    launcher.bound_run = lambda kernel: None  # and the autotuner's direct use of it
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


def _time_us(fn, calls: int, repeats: int = 5, summary=statistics.median) -> float:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return summary(runs)


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


#: The models `zoo compare` puts beside their references, narrowed (MODEL_NARROWING) so that
#: their CPU work is small: the same ops in the same number, on tiny tensors.
MODELS = ("vit_base_patch16_224", "bert_base", "gpt2", "whisper_base_encoder")
MODEL_NARROWING = dict(dim=64, heads=1)
MODEL_SIZES = {"vit_base_patch16_224": dict(img_size=32), "whisper_base_encoder": dict(max_seq_len=8),
               "bert_base": dict(vocab_size=512), "gpt2": dict(vocab_size=512)}
#: Tokens per sample (speech: mel frames, two per encoder position).
MODEL_INPUT_LENGTHS = {"whisper_base_encoder": 16}


def _fastest_ms(fn, steps: int) -> float:
    """The fastest of 7 repeats of ``steps`` calls, in ms a call: whole model steps on a shared
    2-core machine vary by 20-30% between repeats, and interference only ever adds time."""
    return _time_us(fn, steps, repeats=7, summary=min) / 1e3


def _route_as_on_cuda() -> None:
    """zoo.layers.kernel_pays as on CUDA for the CPU tensors that stand in for CUDA ones: torch's
    fused norms and GELU below KERNEL_MIN_ELEMENTS (read at each call, so 0 means every size)."""
    from zoo import layers

    layers.kernel_pays = lambda x, numel=None: (x.numel() if numel is None else numel) >= layers.KERNEL_MIN_ELEMENTS


def model_steps(names, steps: int) -> list[tuple[str, str, Optional[float]]]:
    """(model, implementation, host ms per training step): forward + backward of each model of
    ``names`` (narrowed), on the triton and sdpa backends with the zoo's routing of the norms and
    GELU, on triton with every op on the kernels, and its reference (timm, Hugging Face)."""
    import zoo
    from tasks.compare_measure import make_workload, ours_loss
    from tasks.compare_reference import NoReference, reference_for
    from zoo import layers

    rows = []
    for name in names:
        model = zoo.create_model(name, **MODEL_NARROWING, **MODEL_SIZES.get(name, {}))
        w = make_workload(model, 1, MODEL_INPUT_LENGTHS.get(name, 8), "cpu")
        threshold = layers.KERNEL_MIN_ELEMENTS
        for label, backend, min_elements in (("ours, triton", "triton", threshold), ("ours, sdpa", "sdpa", threshold),
                                             ("ours, triton, every op on the kernels", "triton", 0)):
            model.set_attn_backend(backend)
            layers.KERNEL_MIN_ELEMENTS = min_elements
            try:
                rows.append((name, label, _fastest_ms(lambda: ours_loss(model, w).backward(), steps)))
            finally:
                layers.KERNEL_MIN_ELEMENTS = threshold
        try:
            ref = reference_for(model, w)
        except NoReference as why:
            rows.append((name, f"no reference: {why}", None))
            continue
        ref_model = ref.build()
        rows.append((name, ref.name, _fastest_ms(lambda: ref.loss(ref_model, w).backward(), steps)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--calls", type=int, default=None,
                        help="calls per timed repeat (default 200; with --models, training steps, default 10)")
    parser.add_argument("--jit", action="store_true",
                        help="run Triton's JIT for real up to a no-op launcher (compiles each kernel first)")
    parser.add_argument("--models", nargs="*", default=None, metavar="PRESET",
                        help=f"host ms per training step of narrowed models and their references instead "
                             f"(default with no names: {' '.join(MODELS)}); implies --jit")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = 10 if args.models is not None else 200
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.models:
        import zoo
        unknown = [name for name in args.models if name not in zoo.list_models()]
        if unknown:
            parser.error(f"unknown preset(s) {', '.join(unknown)}; the presets: {', '.join(zoo.list_models())}")
    if args.jit or args.models is not None:
        _jit_for_real()
    else:
        _stub_launches()
    torch.set_num_threads(1)
    if args.models is not None:
        _route_as_on_cuda()
        print(f"torch {torch.__version__}, 1 thread; host ms per training step (forward + backward, batch 1, "
              f"{MODEL_NARROWING} and small inputs), Triton's JIT run up to a no-op launcher, the zoo's norm and "
              f"GELU routing as on CUDA (fastest of 7 repeats of {args.calls} steps)")
        print("| model | implementation | host ms a step |")
        print("|---|---|---|")
        for name, label, ms in model_steps(args.models or MODELS, args.calls):
            print(f"| {name} | {label} | {'—' if ms is None else f'{ms:.2f}'} |", flush=True)
        return 0
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
            times.append(f"{_time_us(fn, args.calls):.0f}")
        print(f"| {name} | {' | '.join(times)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
