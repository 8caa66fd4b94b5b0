"""Triton launches recorded instead of run: for probes that run every public op on CPU tensors
without a GPU or the interpreter (tests/test_triton_functionalization.py,
test_dynamic_shapes.py, test_inductor_scalars.py). Import it in a fresh process (no
TRITON_INTERPRET, so that the kernels take their GPU configurations) and call ``install()``."""

import importlib
import sys

import torch

#: (kernel, args, kwargs) of every launch since install(): the kernel as given to
#: kernels.runtime.launch (a JITFunction or an Autotuner).
launches = []


class Recorder:
    """Stands in for kernels.runtime.launch(kernel): records kernel[grid](*args, **kwargs), runs nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))


def install() -> list:
    """Patches every kernels.* module: launches are recorded, and CPU tensors take the Triton path.
    (By sys.modules: kernels.cross_entropy, as an attribute of kernels, is the function.)"""
    importlib.import_module("kernels")  # every module of the package

    for name, mod in list(sys.modules.items()):
        if name.startswith("kernels."):
            if hasattr(mod, "launch"):
                mod.launch = Recorder
            if hasattr(mod, "use_triton"):
                mod.use_triton = lambda t: True
    return launches


def leaf(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def backward(*outs):
    sum(o.float().sum() for o in outs).backward()
