"""GELU (+ bias), SwiGLU and GeGLU against float64 formulas.

The oracle writes each activation from its definition (erf / tanh GELU, x * sigmoid(x))
in float64 and differentiates it with autograd. Each case runs through the Triton
kernels (interpreter on CPU, GPU when there is one) and the PyTorch path.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from attention_oracle import assert_fa2_close
from kernels import reference_only
from kernels.activations import geglu, gelu, swiglu


@pytest.fixture(params=["triton", "reference"])
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


def gelu_formula(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu_formula(x):
    # x * sigmoid(x), not x / (1 + exp(-x)): in float16 exp(-x) overflows for x < -11 and the
    # same-dtype yardstick's gradient came out NaN (seen on an H100 at (4096, 4096) x 3).
    return x * torch.sigmoid(x)


def check(ours_fn, formula, inputs, device, ctx):
    """Runs ours and the formula (float64, and in the inputs' dtype) forward and backward."""
    xs = [t.to(device).requires_grad_() for t in inputs]
    with ctx():
        out = ours_fn(*xs)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, xs, dout)
    assert out.dtype == inputs[0].dtype
    # The formulas run where the inputs are (float64 is fine on a GPU).
    ref_in = [t.to(device).double().requires_grad_() for t in inputs]
    ref = formula(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    same_in = [t.to(device).requires_grad_() for t in inputs]
    same = formula(*same_in)
    same_grads = torch.autograd.grad(same, same_in, dout)
    assert out.shape == ref.shape
    assert_fa2_close(out.detach(), ref, same, "out")
    for i, (g, r, p) in enumerate(zip(grads, ref_grads, same_grads)):
        assert g.dtype == inputs[i].dtype
        assert_fa2_close(g, r, p, f"grad {i}")


# Rows span several row tiles; columns 1, 33 and 4099 (several column tiles, ragged).
SHAPES = [(5, 1), (19, 33), (3, 4099)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[-1]}")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gelu(backend, shape, approximate, with_bias):
    device, ctx = backend
    x = torch.randn(shape) * 3
    if with_bias:
        b = torch.randn(shape[-1])
        check(lambda x, b: gelu(x, b, approximate), lambda x, b: gelu_formula(x + b, approximate), [x, b],
              device, ctx)
    else:
        check(lambda x: gelu(x, approximate=approximate), lambda x: gelu_formula(x, approximate), [x], device, ctx)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[-1]}")
@pytest.mark.parametrize("kind", ["swiglu", "geglu", "geglu_tanh"])
@pytest.mark.parametrize("packed", [False, True])
def test_gated(backend, shape, kind, packed):
    device, ctx = backend
    act = {"swiglu": silu_formula, "geglu": lambda a: gelu_formula(a, "none"),
           "geglu_tanh": lambda a: gelu_formula(a, "tanh")}[kind]
    ours = {"swiglu": swiglu, "geglu": geglu, "geglu_tanh": lambda x, y=None: geglu(x, y, approximate="tanh")}[kind]
    N = shape[-1]
    if packed:
        x = torch.randn(shape[0], 2 * N) * 2
        check(lambda x: ours(x), lambda x: act(x[:, :N]) * x[:, N:], [x], device, ctx)
    else:
        x, y = torch.randn(shape) * 2, torch.randn(shape)
        check(ours, lambda x, y: act(x) * y, [x, y], device, ctx)


def _second_derivatives(fn, inputs, device, ctx, compiled=False):
    """Gradients of <v, d/dinputs <w, fn(inputs)>>: a Hessian-vector product, every input's."""
    xs = [t.to(device).requires_grad_() for t in inputs]
    g = torch.Generator().manual_seed(1)
    with ctx():
        # backend "eager": torch.compile with aot_autograd has no double backward at all (torch 2.11)
        f = torch.compile(fn, fullgraph=True, backend="eager") if compiled else fn
        out = f(*xs)
        w = torch.randn(out.shape, generator=g).to(device, out.dtype)
        first = torch.autograd.grad(out, xs, w, create_graph=True)
        v = [torch.randn(t.shape, generator=g).to(device, t.dtype) for t in first]
        return torch.autograd.grad(first, xs, v), w, v


GATED = {"gelu": lambda x, b: gelu_formula(x + b, "none"), "gelu_tanh": lambda x, b: gelu_formula(x + b, "tanh"),
         "swiglu": lambda x, y: silu_formula(x) * y, "geglu": lambda x, y: gelu_formula(x, "none") * y,
         "geglu_tanh": lambda x, y: gelu_formula(x, "tanh") * y}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind", list(GATED))
@pytest.mark.parametrize("packed", [False, True])
def test_second_derivatives(backend, kind, packed, compiled):
    """Through the op (the Triton path, and torch.compile) as through the eager body: against float64."""
    device, ctx = backend
    if compiled and ctx is contextlib.nullcontext and device == "cpu":
        pytest.skip("the Triton interpreter does not run under torch.compile (fake tensors): compiled on a GPU")
    torch._dynamo.reset()
    ours = {"gelu": lambda x, b: gelu(x, b), "gelu_tanh": lambda x, b: gelu(x, b, "tanh"), "swiglu": swiglu,
            "geglu": geglu, "geglu_tanh": lambda x, y=None: geglu(x, y, approximate="tanh")}[kind]
    formula = GATED[kind]
    x, other = torch.randn(7, 33) * 2, torch.randn(33 if kind.startswith("gelu") else (7, 33))
    if packed and kind.startswith("gelu"):
        pytest.skip("gelu takes no packed input")
    if packed:
        inputs = [torch.cat([x, other], dim=1)]
        fn, ref_fn = (lambda p: ours(p)), (lambda p: formula(p[:, :33], p[:, 33:]))
    else:
        inputs, fn, ref_fn = [x, other], ours, formula
    got, w, v = _second_derivatives(fn, inputs, device, ctx, compiled)
    ref_in = [t.double().requires_grad_() for t in inputs]
    first = torch.autograd.grad(ref_fn(*ref_in), ref_in, w.cpu().double(), create_graph=True)
    expected = torch.autograd.grad(first, ref_in, [t.cpu().double() for t in v])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.cpu().double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    device, ctx = backend
    x, b = (torch.randn(9, 70) * 3).to(dtype), torch.randn(70).to(dtype)
    check(lambda x, b: gelu(x, b, "tanh"), lambda x, b: gelu_formula(x + b, "tanh"), [x, b], device, ctx)
    x, y = torch.randn(9, 70).to(dtype), torch.randn(9, 70).to(dtype)
    check(swiglu, lambda x, y: silu_formula(x) * y, [x, y], device, ctx)


def test_batch_dims_and_strided_input(backend):
    """(B, S, N) inputs, and a gate half sliced out of a wider tensor (row stride != N)."""
    device, ctx = backend
    x = torch.randn(2, 3, 40) * 2
    check(lambda x: geglu(x), lambda x: gelu_formula(x[..., :20], "none") * x[..., 20:], [x], device, ctx)
    wide = torch.randn(6, 50, device=device)
    with ctx():
        out = swiglu(wide[:, :20], wide[:, 30:])
    ref = silu_formula(wide[:, :20].double()) * wide[:, 30:].double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 0), (0,), (0, 6)])
def test_empty_inputs(backend, shape):
    """Empty tensors give empty results of torch's shapes, as F.gelu and friends do."""
    device, ctx = backend
    x = torch.randn(*shape, device=device)
    with ctx():
        assert gelu(x).shape == shape and geglu(x, x).shape == shape
        assert swiglu(x).shape == (*shape[:-1], shape[-1] // 2)


def test_extreme_inputs_stay_finite(backend):
    device, ctx = backend
    x = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]], device=device, requires_grad=True)
    with ctx():
        for out in (gelu(x), gelu(x, approximate="tanh"), swiglu(x, torch.ones_like(x))):
            (g,) = torch.autograd.grad(out.sum(), x)
            assert torch.isfinite(out).all() and torch.isfinite(g).all()
            # All three tend to x for large x and to 0 for very negative x, slopes 1 and 0.
            assert out[0, -1].item() == pytest.approx(1e4) and abs(out[0, 0].item()) < 1e-3
            assert g[0, -1].item() == pytest.approx(1.0) and abs(g[0, 0].item()) < 1e-3


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda x: gelu(x.long()), TypeError, "x has dtype torch.int64"),
    (lambda x: gelu(x, torch.ones(3)), ValueError, "bias must have shape \\(x.shape\\[-1\\],\\) = \\(8,\\)"),
    (lambda x: gelu(x, torch.ones(8).half()), TypeError, "bias has dtype torch.float16"),
    (lambda x: gelu(x, approximate="fast"), ValueError, "approximate must be 'none' or 'tanh'"),
    (lambda x: swiglu(x[..., :7]), ValueError, "it must be even"),
    (lambda x: swiglu(x, x[:1]), ValueError, "y must have x's shape"),
    (lambda x: geglu(x, x.half()), TypeError, "y has dtype torch.float16"),
    (lambda x: swiglu(x.numpy()), TypeError, "x must be a torch.Tensor"),
    (lambda x: gelu(torch.tensor(1.0)), ValueError, "at least 1 dim"),
    (lambda x: gelu(x, approximate=["tanh"]), ValueError, "approximate must be 'none' or 'tanh', got \\['tanh'\\]"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 8))


# --------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile (the PyTorch path on CPU)
# --------------------------------------------------------------------------------------


def test_opcheck():
    x = torch.randn(6, 10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    y = torch.randn(6, 10, requires_grad=True)
    with reference_only():
        torch.library.opcheck(torch.ops.tritonzoo.gelu_fwd.default, (x, b, 2))
        torch.library.opcheck(torch.ops.tritonzoo.glu_fwd.default, (x, y, 0))
        torch.library.opcheck(torch.ops.tritonzoo.glu_fwd.default, (x, None, 1))
        torch.library.opcheck(torch.ops.tritonzoo.gelu_bwd.default, (y.detach(), x.detach(), b.detach(), 1))
        torch.library.opcheck(torch.ops.tritonzoo.glu_bwd.default, (y.detach()[:, :5], x.detach(), None, 0))


class _MLP(torch.nn.Module):
    """LLaMA's gated MLP (fused gate/up projection) followed by a GPT-2 style GELU MLP."""

    def __init__(self, dim=16, hidden=24):
        super().__init__()
        self.gate_up = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)
        self.fc = torch.nn.Linear(dim, hidden, bias=False)
        self.fc_bias = torch.nn.Parameter(torch.randn(hidden))
        self.proj = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.down(swiglu(self.gate_up(x)))
        return x + self.proj(gelu(self.fc(x), self.fc_bias, approximate="tanh"))


def test_compile_fullgraph():
    torch._dynamo.reset()
    model = _MLP()
    x = torch.randn(2, 5, 16, requires_grad=True)
    with reference_only():
        eager = model(x)
        g_eager = torch.autograd.grad(eager.sum(), (x, model.fc_bias))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        g = torch.autograd.grad(compiled.sum(), (x, model.fc_bias))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, c in zip(g, g_eager):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# GPU: real sizes, bf16, the compiled CUDA path
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 11008), (257, 4099)], ids=str)
def test_gpu_real_sizes(dtype, shape):
    x, b = (torch.randn(shape) * 3).to(dtype), torch.randn(shape[-1]).to(dtype)
    check(lambda x, b: gelu(x, b), lambda x, b: gelu_formula(x + b, "none"), [x, b], "cuda", contextlib.nullcontext)
    check(lambda x, b: gelu(x, b, "tanh"), lambda x, b: gelu_formula(x + b, "tanh"), [x, b], "cuda",
          contextlib.nullcontext)
    y = torch.randn(shape).to(dtype)
    check(swiglu, lambda x, y: silu_formula(x) * y, [x, y], "cuda", contextlib.nullcontext)
    packed = (torch.randn(shape[0], 2 * shape[1]) * 2).to(dtype)
    n = shape[1]
    check(lambda x: geglu(x), lambda x: gelu_formula(x[:, :n], "none") * x[:, n:], [packed], "cuda",
          contextlib.nullcontext)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.tritonzoo.gelu_fwd.default, (x, b, 1))
    torch.library.opcheck(torch.ops.tritonzoo.glu_fwd.default, (x, None, 0))
    torch._dynamo.reset()
    model = _MLP(256, 512).cuda()
    xs = torch.randn(4, 64, 256, device="cuda")
    eager = model(xs)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(xs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    # The packed SwiGLU's backward writes both halves of one gradient: under compile each
    # written kernel argument is cloned on its own, and one half was lost when the two
    # halves were passed as two arguments (tests/test_triton_functionalization.py).
    compiled.square().sum().backward()
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-3)
