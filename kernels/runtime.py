"""Where an op runs: a Triton kernel or its PyTorch reference.

CUDA tensors take the Triton kernels. CPU tensors take the PyTorch reference path,
except when the Triton interpreter is on (TRITON_INTERPRET=1 in the environment
before `kernels` is imported): then the Triton kernels run on CPU tensors too,
which is how the kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

#: True when the Triton interpreter is on. Triton reads the variable when a kernel is
#: decorated, so it is fixed for the life of the process.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_state = threading.local()


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the Triton kernel (else the PyTorch path)."""
    if getattr(_state, "reference_only", False):
        return False
    if t.device.type == "cuda":
        return True
    return INTERPRET and t.device.type == "cpu"


@contextlib.contextmanager
def reference_only():
    """Run every op through its PyTorch reference path inside this block.

    For tools that cannot run interpreted Triton kernels (``torch.library.opcheck``,
    ``torch.compile`` tracing on CPU), and for comparing the two paths.
    """
    previous = getattr(_state, "reference_only", False)
    _state.reference_only = True
    try:
        yield
    finally:
        _state.reference_only = previous
