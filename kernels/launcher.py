"""A launch path for this project's Triton kernels that binds each argument pattern once.

Triton's ``JITFunction.run`` binds the arguments on every launch: it specializes each one
(``native_specialize_impl``: ~40 calls for an attention kernel), turns the options into a
string for the cache key, looks the compiled kernel up, and only then launches. On the H100
machine's host that was most of ~125 us a launch (docs/kernel-notes.md, "Host time").

``bind_once(kernel)`` gives a ``@triton.jit`` kernel a ``run`` that keys each call on a
superset of what Triton's specialization reads: each tensor's dtype and whether its address
is a multiple of 16 (Triton's pointer alignment), each other argument's value (ints,
floats, bools, None), the keyword arguments (constexprs and launch options), the current
device and Triton's debug and instrumentation knobs. A new key goes through Triton's own
``run``, which compiles or finds the kernel and launches it; its compiled kernel is then
remembered, and later calls with that key launch it directly, with the same arguments in
the same order as Triton's ``run`` passes to the launcher (tests/test_launcher.py records
both and compares them). An argument of any other type, a pre-run hook, a warmup call or
an asynchronous compile takes Triton's ``run`` every time. What the direct path skips:
the check that the kernel's global variables kept their values (ours are constants).

``TRITONZOO_BIND_ONCE=0`` in the environment (read at import) leaves every kernel on
Triton's ``run``. In the interpreter nothing changes (its kernels are not JITFunctions).
"""

from __future__ import annotations

import os
import sys

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

VARIABLE = "TRITONZOO_BIND_ONCE"


def enabled_by_environment() -> bool:
    """TRITONZOO_BIND_ONCE: unset, empty or 1 for the direct path, 0 for Triton's run; ValueError
    naming the variable for anything else (a typo must not silently keep the default)."""
    value = os.environ.get(VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{VARIABLE}={os.environ[VARIABLE]!r}: expected 0 or 1")
    return value != "0"


#: Whether bind_once installs the direct path (TRITONZOO_BIND_ONCE, read at import).
ENABLED: bool = enabled_by_environment()
#: Argument patterns remembered per kernel. Past this, the oldest is dropped (a workload
#: whose shapes change on every call gains nothing but stays bounded).
MAX_BINDINGS = 512

_TENSORS = (torch.Tensor, torch.nn.Parameter)
#: Arguments a key holds as they are, and those it holds with their type: True == 1 == 1.0
#: hash alike, and Triton specializes a bool, an int and a float differently.
_VALUES = (int, type(None))
_TAGGED = (float, bool)


def _unkeyable(arg):
    raise TypeError(f"no bind-once key for {type(arg).__name__}")


class _BoundRun:
    """``JITFunction.run`` with a per-kernel table from argument pattern to compiled kernel."""

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self.params = [(p.name, p.default if p.has_default else None) for p in fn.params]
        self.bindings: dict = {}

    def triton_run(self, *args, **kwargs):
        # Looked up on the class at each call, so that a patch of JITFunction.run (the host
        # time tools stub it) applies here too.
        return JITFunction.run(self.fn, *args, **kwargs)

    def key(self, device, args: tuple, kwargs: dict) -> tuple:
        """The call's key; TypeError for an argument it cannot hold."""
        # Tensors by dtype and alignment, never by identity: a key must not hold a tensor (it
        # would never repeat, and the table would keep the tensor alive). torch.compile's
        # wrapper passes every argument by keyword.
        tensors, values, tagged = _TENSORS, _VALUES, _TAGGED
        return (device, knobs.runtime.debug, knobs.compilation.instrumentation_mode,
                tuple([(k, v if type(v) in values else (v.dtype, v.data_ptr() & 15 == 0) if type(v) in tensors
                         else (type(v), v) if type(v) in tagged else _unkeyable(v)) for k, v in kwargs.items()]),
                tuple([a if type(a) in values else (a.dtype, a.data_ptr() & 15 == 0) if type(a) in tensors
                       else (type(a), a) if type(a) in tagged else _unkeyable(a) for a in args]))

    def __call__(self, *args, grid, warmup, **kwargs):
        if warmup or self.fn.pre_run_hooks:
            return self.triton_run(*args, grid=grid, warmup=warmup, **kwargs)
        device = driver.active.get_current_device()
        try:
            key = self.key(device, args, kwargs)
            bound = self.bindings.get(key)
        except TypeError:  # an argument the key cannot hold (or hash): Triton's run every time
            return self.triton_run(*args, grid=grid, warmup=False, **kwargs)
        if bound is None:
            kernel = self.triton_run(*args, grid=grid, warmup=False, **kwargs)
            if kernel is not None and not hasattr(kernel, "result"):  # compiled, not a pending future
                remember(self.bindings, key, (kernel, self.tail(len(args))))
            return kernel
        return self.launch(bound, device, args, kwargs, grid)

    def tail(self, positional: int) -> tuple:
        """The parameters after the positional ones, in signature order, with their defaults:
        Triton's run launches with every parameter's value (keyword or default) in that order."""
        return tuple(self.params[positional:])

    def launch(self, bound: tuple, device, args: tuple, kwargs: dict, grid):
        """Launches a remembered (kernel, tail) as Triton's run would for these arguments."""
        kernel, tail = bound
        values = args + tuple([kwargs[name] if name in kwargs else default for name, default in tail])
        if callable(grid):
            try:
                grid = grid(kwargs)  # the launch-time constexprs (BLOCK_M...) are keywords
            except KeyError:  # a grid that reads another parameter: all of them, as Triton's run
                grid = grid({name: value for (name, _), value in zip(self.params, values)})
        size = len(grid)
        stream = driver.active.get_current_stream(device)
        launch_metadata = kernel.launch_metadata(grid, stream, *values)
        kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, kernel.function,
                   kernel.packed_metadata, launch_metadata, knobs.runtime.launch_enter_hook,
                   knobs.runtime.launch_exit_hook, *values)
        return kernel


def remember(table: dict, key, value) -> None:
    """table[key] = value, dropping the oldest entry past MAX_BINDINGS."""
    if len(table) >= MAX_BINDINGS:
        del table[next(iter(table))]
    table[key] = value


def bound_run(kernel) -> "_BoundRun | None":
    """The bind-once run of a JITFunction, or None where it has none."""
    run = getattr(kernel, "run", None)
    return run if isinstance(run, _BoundRun) else None


def bind_all(prefix: str = "kernels.") -> None:
    """bind_once on every ``@triton.jit`` function of the loaded modules named ``prefix*`` (the
    helpers inlined into kernels get it too, unused: only launched kernels call ``run``)."""
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix):
            for value in list(vars(module).values()):
                bind_once(value)


def bind_once(kernel):
    """``kernel`` (a ``@triton.jit`` function) with the bind-once launch path; anything else
    (the interpreter's kernels), or with TRITONZOO_BIND_ONCE=0, unchanged. Returns ``kernel``."""
    if ENABLED and isinstance(kernel, JITFunction) and not isinstance(kernel.run, _BoundRun):
        kernel.run = _BoundRun(kernel)
    return kernel
