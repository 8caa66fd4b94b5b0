"""How the autotuned kernels (attention forward and backward, decoding) pick a launch
configuration on a GPU.

Each kernel carries a few candidate configurations per head-dim block (see the
``*_CANDIDATES`` tables). On the first call with a new autotune key, ``triton.autotune``
times every candidate and keeps the fastest; each candidate is a separate compile of
about 2 seconds. Two environment variables, read at that first call, change this:

``TRITONZOO_AUTOTUNE``
    ``full`` (the default): time every candidate. ``first``: take each key's first
    candidate without timing it: one compile instead of five, and a choice that does not
    depend on timing noise (the GPU tests use it; the interpreter tests run every
    candidate's tile in tests/test_gpu_tiles_interpreter.py, and a GPU test runs each
    candidate once).
``TRITONZOO_COMPILE_THREADS``
    Threads that compile a key's candidates side by side before they are timed (default:
    one per candidate, at most the CPU count). Triton's compiler spends most of its time
    outside the GIL (MLIR passes, LLVM, ptxas), so this cuts the first call's wait several
    fold. ``1`` compiles them one at a time inside the timing loop, as plain
    ``triton.autotune`` does.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import triton
from triton.runtime.autotuner import Autotuner

AUTOTUNE_VARIABLE = "TRITONZOO_AUTOTUNE"
THREADS_VARIABLE = "TRITONZOO_COMPILE_THREADS"
_MODES = ("full", "first")


def mode() -> str:
    """``full`` or ``first``, from TRITONZOO_AUTOTUNE (ValueError for anything else)."""
    value = os.environ.get(AUTOTUNE_VARIABLE, "full").strip().lower() or "full"
    if value not in _MODES:
        raise ValueError(f"{AUTOTUNE_VARIABLE}={os.environ[AUTOTUNE_VARIABLE]!r}: expected one of {_MODES}")
    return value


def compile_threads(candidates: int) -> int:
    """Threads for compiling ``candidates`` configurations (TRITONZOO_COMPILE_THREADS, else
    one per candidate up to the CPU count)."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return max(1, min(candidates, os.cpu_count() or 1))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VARIABLE}={value!r}: expected a whole number >= 1")
    return min(candidates, int(value))


def table_key(fp32: bool, head_dim: int):
    """The row of a ``*_CANDIDATES`` table a launch takes: ``"fp32"`` (FMA dots need small
    tiles), else the head-dim block 64, 128 or 256."""
    return "fp32" if fp32 else 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def pick(configs: list, wanted: list, describe: Callable) -> list:
    """The configurations to time: those of ``configs`` whose ``describe(config)`` tuple is
    in ``wanted``, in ``wanted``'s order; only the first of them when the mode is ``first``.
    Falls back to ``configs[:1]`` when none matches (the autotuner needs one)."""
    by_shape = {describe(c): c for c in configs}
    kept = [by_shape[w] for w in wanted if w in by_shape] or configs[:1]
    return kept[:1] if mode() == "first" else kept


class ParallelAutotuner(Autotuner):
    """``triton.autotune`` that compiles a new key's candidates on threads before timing them.

    ``Autotuner.run`` calls ``prune_configs`` once per new key, just before it times the
    pruned candidates; here that step also compiles them together (``JITFunction.run`` with
    ``warmup=True``, the autotuner's own arguments, under Triton's ``AsyncCompileMode``), so
    the timing loop finds each one in the kernel cache. A compile that fails is left to the
    timing loop, which reports it as plain autotuning would.
    """

    def prune_configs(self, kwargs: dict) -> list:
        pruned = super().prune_configs(kwargs)
        threads = compile_threads(len(pruned))
        if threads > 1:
            self._compile_together(pruned, kwargs, threads)
        return pruned

    def _compile_together(self, configs: list, kwargs: dict, threads: int) -> None:
        call = {**self.nargs, **kwargs, "warmup": True}
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="tritonzoo-compile") as pool:
                with triton.AsyncCompileMode(pool, ignore_errors=True):
                    for config in configs:
                        self.fn.run(**call, **config.all_kwargs())
        except Exception as exc:  # the timing loop compiles whatever is missing, one by one
            warnings.warn(f"compiling {self.base_fn.__name__}'s autotune candidates on {threads} threads "
                          f"failed ({type(exc).__name__}: {exc}); they compile one at a time instead",
                          RuntimeWarning, stacklevel=2)


def autotune(configs: list, key: list, prune: Callable) -> Callable:
    """``triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})``,
    compiling each new key's candidates on threads (``ParallelAutotuner``)."""
    def decorator(fn):
        return ParallelAutotuner(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                                 prune_configs_by={"early_config_prune": prune})
    return decorator
