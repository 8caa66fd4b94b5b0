"""Test set-up: on a machine without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, so this happens
before anything imports `kernels`. With CUDA, the kernels run on the GPU and tests
that take the `device` fixture run there.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: extra intra-op threads cost more in hand-offs than they
# save (seen 20-100x slower on a loaded 2-core machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def reference_attention(request):
    """Runs a zoo test on the kernels' PyTorch path (what CPU training runs), which is far
    faster than the interpreter; tests whose name mentions "interpreter" opt out and run
    the Triton kernels, and so do GPU tests (marked gpu), which are there to run them on CUDA.
    Use with pytest.mark.usefixtures("reference_attention")."""
    if "interpreter" in request.node.name or request.node.get_closest_marker("gpu") is not None:
        yield
        return
    import kernels

    with kernels.reference_only():
        yield
