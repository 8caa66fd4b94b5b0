"""Where an op runs: a Triton kernel or its PyTorch reference.

CUDA tensors take the Triton kernels. CPU tensors take the PyTorch reference path,
except when the Triton interpreter is on (TRITON_INTERPRET=1 in the environment
before `kernels` is imported): then the Triton kernels run on CPU tensors too,
which is how the kernels are tested on machines without a GPU.

Every op is a torch.library ``triton_op`` (torch.compile traces through it without graph
breaks). Eager calls skip torch.library's dispatch layers: ``eager_op`` runs the op's body
under an ``autograd.Function`` with the op's own autograd formulas, the same computation
without about 0.15 ms of dispatch per call, which on the CPU is more than a small op's own
work. On the Triton path the body then launches its kernels directly, not through
``wrap_triton``'s higher-order op (which costs more again); the dispatch cost of the op
was most of the ~450 us a decoding call took on an H100 (docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import threading
from typing import Callable, Optional

import torch
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import wrap_triton

try:  # kernels needs torch and triton only; numpy's bools are flags too where it is installed
    from numpy import bool_ as _numpy_bool
    _BOOLS: tuple = (bool, _numpy_bool)
except ImportError:
    _BOOLS = (bool,)

#: True when the Triton interpreter is on. Triton reads the variable when a kernel is
#: decorated, so it is fixed for the life of the process.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_state = threading.local()

#: torch's own scaled_dot_product_attention, captured before kernels.patch_sdpa can replace it.
torch_sdpa = torch.nn.functional.scaled_dot_product_attention


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the Triton kernel (else the PyTorch path)."""
    if getattr(_state, "reference_only", False):
        return False
    if t.device.type == "cuda":
        return True
    return INTERPRET and t.device.type == "cpu"


@contextlib.contextmanager
def reference_only(native: bool = True):
    """Run every op through its PyTorch reference path inside this block.

    For tools that cannot run interpreted Triton kernels (``torch.library.opcheck``,
    ``torch.compile`` tracing on CPU), and for comparing the two paths. native=False also
    turns off the torch-native calls of ``torch_native`` (what a CPU run without the
    interpreter takes), so that the ops' own PyTorch bodies and autograd formulas run.
    """
    previous = getattr(_state, "reference_only", False), getattr(_state, "no_native", False)
    _state.reference_only = True
    _state.no_native = previous[1] or not native
    try:
        yield
    finally:
        _state.reference_only, _state.no_native = previous


def torch_native(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may run torch's own differentiable op in place of the op's PyTorch path.

    Some ops' PyTorch path is, for float32 inputs without extras, one torch op: LayerNorm,
    RMSNorm, GELU, SwiGLU and GeGLU, attention (torch's CPU kernels). Their public functions
    then call that op directly, under torch's autograd: the op's outputs, gradients to float32
    rounding, without the op's autograd.Function and dispatch, which cost more on the CPU than
    a small op's own work (on the vit_digits ViT, 64 wide, about a fifth of a training step).
    Attention dropout there is torch's draw, not the kernels' Philox stream (docs/kernels.md).
    True for CPU tensors on the PyTorch path (not ``use_triton``), for eager calls on plain
    tensors (``concrete``: a trace sees the op), outside ``reference_only(native=False)``. Not
    for CUDA tensors under ``reference_only()``: the native routes read index tensors' values
    on the host (decoding's cache lengths), a sync there, and an error under CUDA-graph capture.
    """
    return (t.device.type == "cpu" and not use_triton(t) and concrete(t)
            and not getattr(_state, "no_native", False))


_NO_AUTOCAST = frozenset({"meta"})


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts to on this device type now, or None when it is off there
    or the device type has no autocast (meta tensors, for shape propagation)."""
    # A set, not torch.amp.is_autocast_available: dynamo cannot trace that one.
    if device_type not in _NO_AUTOCAST and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def without_autocast(fn: Callable) -> Callable:
    """fn run with torch.autocast off (CPU and CUDA) when it is on.

    A PyTorch path that upcasts to float32 on purpose (attention scores, the log-sum-exp)
    would otherwise have its matmuls cast back down to the autocast dtype: autocast stays on
    inside a custom op's body. The kernels compute in the dtypes they choose; so does fn.
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


def scalar_value(value):
    """A 0-dim (non-bool) tensor's value (one host read, as torch's own scalar arguments), else value."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def as_bool(value, name: str) -> bool:
    """value as a Python bool: bools and numpy bools (which are no subclass of bool), as
    FlashAttention-2's Python functions take them; anything else refused with TypeError
    naming the argument (no truthiness: a 0 or a string passed by mistake is not a flag)."""
    if isinstance(value, _BOOLS):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def as_int(value, name: str, expected: str, error: type = ValueError) -> int:
    """value as a Python int: ints, numpy integers and 0-dim integer tensors (as torch takes
    them); bools and floats refused with ``error`` naming the argument."""
    value = scalar_value(value)
    if not isinstance(value, bool) and isinstance(value, numbers.Integral):
        return int(value)
    raise error(f"{name} must be {expected}, got {value!r}")


def as_float(value, name: str, expected: str, error: type = ValueError) -> float:
    """value as a finite Python float: real numbers, numpy scalars and 0-dim tensors; bools,
    NaN and infinities refused with ``error`` naming the argument."""
    value = scalar_value(value)
    # A comparison, not math.isfinite: under torch.compile a float argument may be symbolic
    # (dynamic=True, or one that changed between calls), where math.isfinite breaks the graph.
    if not isinstance(value, bool) and isinstance(value, numbers.Real) and -math.inf < value < math.inf:
        return float(value)
    raise error(f"{name} must be {expected}, got {value!r}")


def unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t, or a contiguous copy of it when its last dimension is not at unit stride; None stays None.

    For tensors a kernel indexes along their last dimension without a stride: the small
    index tensors (sequence offsets, cache lengths, block tables, ALiBi slopes), where a
    view such as x[::2] or x.t() would otherwise be read as the wrong elements, and the
    data tensors whose other dimensions the kernel does walk by stride (q, k, v, rows).
    """
    if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def on_device(body: Callable) -> Callable:
    """An op's body, run with the current CUDA device set to its first tensor's, as
    FlashAttention-2's CUDAGuard does: Triton launches on the current device and stream, so a
    tensor on cuda:1 while cuda:0 is current would otherwise be read by a kernel on the wrong
    GPU, unordered with cuda:1's stream. Costs one device query when the devices agree;
    skipped on CPU and while tracing (fake tensors have no device to switch to)."""
    @functools.wraps(body)
    def guarded(*args, **kwargs):
        index = args[0].get_device()  # -1 off CUDA
        if index >= 0 and concrete(args[0]) and index != torch.cuda.current_device():
            with torch.cuda.device(index):
                return body(*args, **kwargs)
        return body(*args, **kwargs)
    # torch.library infers the op's schema from the signature, evaluating string annotations
    # in the globals of the function it is given: hand it the body's, evaluated there.
    guarded.__signature__ = inspect.signature(body, eval_str=True)
    return guarded


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for ints and SymInts: triton.cdiv without its constexpr_function wrapper,
    which costs about 5 us a call on the host (a decoding step makes several)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for ints n >= 1 and SymInts; as cdiv, a plain function
    in place of triton.next_power_of_2."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def shared_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a and b with unit stride in their last dimension and the same strides (copied when not).

    For pairs a kernel walks with one set of strides, such as rotary cos and sin.
    """
    if a.stride() == b.stride() and (a.shape[-1] <= 1 or a.stride(-1) == 1):
        return a, b
    return a.contiguous(), b.contiguous()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def concrete(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values Python may read (``int(t.min())``): a plain tensor outside
    torch.compile, not a fake or functional tensor of a trace, where such a read is a graph break."""
    return not torch.compiler.is_compiling() and type(t) in _PLAIN_TENSORS


def eager_path(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may run its op's body directly instead of through torch.library.

    True for a plain tensor outside torch.compile and export tracing, which must see the op
    itself. On the Triton path also only while no dispatch mode is active: make_fx and the
    like (FlopCounterMode too) see the op, not kernel launches they cannot record. (On the
    PyTorch path such a mode sees the body's aten ops, which it can.)
    """
    if not concrete(t):
        return False
    return not use_triton(t) or torch._C._len_torch_dispatch_stack() == 0


def launch(kernel):
    """What to index with the grid to launch ``kernel``: ``wrap_triton(kernel)``, through which
    torch.compile and make_fx see the launch, or the kernel itself where nothing traces
    (inside run_direct and torch.library's own eager dispatch of a triton_op, which switch
    wrap_triton off) and in the interpreter (whose kernels wrap_triton refuses)."""
    if INTERPRET or not is_wrap_triton_enabled():
        return kernel
    return wrap_triton(kernel)


def run_direct(body: Callable, args: tuple, mutated: tuple = ()):
    """``body(*args)`` outside the op: Triton kernels launch directly (not through the
    wrap_triton higher-order op), and the tensors at positions ``mutated``, written in
    place by a kernel, get their autograd version bumped as the op's dispatch would."""
    if not use_triton(args[0]):
        return body(*args)
    with set_wrap_triton_enabled(False):
        out = body(*args)
    for i in mutated:
        torch.autograd.graph.increment_version(args[i])
    return out


def _first_order(backward: Callable, name: str) -> Callable:
    """backward, raising when autograd runs it to build a graph (create_graph=True)."""

    @functools.wraps(backward)
    def first_order(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"tritonzoo {name}: create_graph=True (a second derivative) is not supported; "
                               f"its backward is a first-order formula")
        return backward(ctx, *grads)

    return first_order


def eager_op(op, body: Callable, setup_context: Optional[Callable] = None,
             backward: Optional[Callable] = None, double_backward: bool = False,
             mutated: tuple = ()) -> Callable:
    """Registers ``backward`` / ``setup_context`` on the triton_op ``op`` (when given) and
    returns the function to call it with: ``op`` itself, or, where ``eager_path`` holds
    for the first argument, ``body`` (the plain function ``op`` was made from).

    With grad mode on, ``body`` runs in an autograd.Function with the same two formulas,
    so gradients are computed exactly as through ``op``; its ctx has ``eager = True``
    (see ``run_backward``). Without grad mode, or with no argument requiring grad, ``body``
    runs bare; an op without a backward otherwise takes ``op``.
    Unless ``double_backward`` says the formula is itself differentiable, a backward
    with create_graph=True raises: the formula treats saved statistics or a gradient
    precomputed in the forward as constants, so its second derivatives would be wrong
    without a word (torch's once_differentiable only catches the case where the incoming
    gradient requires grad, not a penalty on the gradient itself). ``mutated``: the positions
    of the arguments the op writes in place (its ``mutates_args``).
    """
    function = None
    if backward is not None:
        if not double_backward:
            backward = _first_order(backward, body.__name__.strip("_").removesuffix("_fwd"))
        op.register_autograd(backward, setup_context=setup_context)

        # forward(ctx, ...) rather than a setup_context staticmethod: apply() then skips
        # binding the arguments with inspect.signature, which costs more than the dispatch.
        class _Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = run_direct(body, args)
                setup_context(ctx, args, output)
                ctx.eager = True
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Eager.__name__ = _Eager.__qualname__ = f"{body.__name__}_eager"
        function = _Eager.apply

    def call(*args):
        if eager_path(args[0]):
            if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad
                                                      for a in args):
                return run_direct(body, args, mutated)
            if function is not None:
                return function(*args)
        return op(*args)

    call.__name__ = call.__qualname__ = body.__name__.lstrip("_")
    call.__doc__ = body.__doc__
    return call


def run_backward(ctx, op, body: Callable, *args):
    """Calls a backward op from an autograd formula, on the path its forward took.

    ``ctx.reference`` (set by the op's setup_context) says the forward ran the PyTorch
    path, which the backward then takes too, on whichever thread autograd runs it. After
    an ``eager_op`` forward (``ctx.eager``) the backward op's ``body`` runs directly.
    """
    if ctx.reference:
        with reference_only():
            return (body if getattr(ctx, "eager", False) else op)(*args)
    # With create_graph (grad mode on in a backward) the op: its own autograd formula makes the
    # gradient differentiable, which raw kernel launches are not.
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return run_direct(body, args)
    return op(*args)
