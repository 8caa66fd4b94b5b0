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

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver

from . import launcher

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


#: Values a key holds as they are; bools and floats go in with their type (_plain), since
#: True == 1 == 1.0 hash alike and Triton specializes the three differently.
_PLAIN = (int, str, type(None))
_TAGGED = (bool, float)


def _plain(value, tensors: bool = True):
    """A key entry for an argument: ints, strings and None as they are, bools and floats with
    their type, tensors by dtype (where ``tensors``). Anything else raises TypeError: its hash
    may be its identity, so a key would never repeat, or two different values could share one entry."""
    if type(value) in _PLAIN:
        return value
    if type(value) in _TAGGED:
        return type(value), value
    if tensors and isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    raise TypeError(f"no autotune fast-path key for {type(value).__name__}")


class ParallelAutotuner(Autotuner):
    """``triton.autotune`` that compiles a new key's candidates on threads before timing them,
    and launches a tuned key's pick without Triton's per-call key building (``run``).

    ``Autotuner.run`` calls ``prune_configs`` once per new key, just before it times the
    pruned candidates; here that step also compiles them together (``JITFunction.run`` with
    ``warmup=True``, the autotuner's own arguments, under Triton's ``AsyncCompileMode``), so
    the timing loop finds each one in the kernel cache. A compile that fails is left to the
    timing loop, which reports it as plain autotuning would.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = self.arg_names
        self._arg_set = frozenset(names)
        self._key_positions = tuple((names.index(k), k) for k in self.keys)
        self._chosen: dict = {}
        self._direct: dict = {}  # bind-once launch key -> ((compiled kernel, tail), config kwargs)

    def forget(self) -> None:
        """Drops every key's choice: Triton's ``cache`` and the two tables ``run`` consults before
        it, so that the next call of each key tunes again among the current candidates (clearing
        ``cache`` alone leaves tuned keys launching their old pick)."""
        self.cache.clear()
        self._chosen.clear()
        self._direct.clear()

    def run(self, *args, **kwargs):
        """``Autotuner.run``, with cheap paths once a key is tuned.

        Triton's ``run`` rebuilds its key on every call from dicts of all arguments (a list
        membership test per argument, then ``hasattr(arg, "dtype")`` on each): with the
        attention kernels' ~45 arguments that was ~100 us a launch on the H100 machine's host,
        as much as the launch itself (docs/kernel-notes.md, "Host time"). Here a key that
        determines Triton's (the autotune arguments' values, every keyword argument the kernel
        takes, and each positional argument's dtype) maps to the ``Config`` that
        ``Autotuner.run`` chose for it, and later calls launch that config directly. Where the
        kernel has kernels.launcher's bind-once run, the launch key of that run (a superset)
        maps straight to the compiled kernel and its config: one key and one lookup a launch.
        """
        bound = launcher.bound_run(self.fn)
        direct_key = None
        if bound is not None and not kwargs.get("warmup") and not self.fn.pre_run_hooks:
            device = driver.active.get_current_device()
            named = {k: v for k, v in kwargs.items() if k != "grid" and k != "warmup"}
            try:
                direct_key = bound.key(device, args, named)
                hit = self._direct.get(direct_key)
            except TypeError:  # an argument the key cannot hold: the paths below
                direct_key = hit = None
            if hit is not None:
                remembered, config_kwargs = hit
                return bound.launch(remembered, device, args, {**named, **config_kwargs}, kwargs["grid"])
        kernel, config = self._run(args, kwargs)
        if direct_key is not None and config is not None and config.pre_hook is None:
            config_kwargs = config.all_kwargs()
            # What the launch of fn.run(*args, **kwargs, **config_kwargs) just remembered.
            remembered = bound.bindings.get(bound.key(device, args, {**named, **config_kwargs}))
            if remembered is not None:
                launcher.remember(self._direct, direct_key, (remembered, config_kwargs))
        return kernel

    def _run(self, args: tuple, kwargs: dict):
        """(what the launch returned, the Config it used or None)."""
        try:
            key = self._fast_key(args, kwargs)
        except TypeError:  # an argument the key cannot hold: Triton's path every time
            return super().run(*args, **kwargs), None
        config = self._chosen.get(key)
        if config is not None:
            return self.fn.run(*args, **kwargs, **config.all_kwargs()), config
        self.best_config = None
        try:
            return super().run(*args, **kwargs), self.best_config
        finally:
            # Set by Triton just before its launch: the pick for this key, even if the launch
            # itself then failed; still None if tuning failed.
            if self.best_config is not None and self.best_config.pre_hook is None:
                self._chosen[key] = self.best_config

    def _fast_key(self, args: tuple, kwargs: dict) -> tuple:
        """Raises TypeError where an argument the key needs is not a plain value. (List
        comprehensions: this runs on every launch, and they are the cheapest loop here.)"""
        plain, arg_set, n = _PLAIN, self._arg_set, len(args)
        named = tuple([(k, v if type(v) in plain else _plain(v)) for k, v in kwargs.items() if k in arg_set])
        values = tuple([_plain(args[i], tensors=False) for i, _ in self._key_positions if i < n])
        return values, named, tuple([getattr(a, "dtype", None) for a in args])

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
