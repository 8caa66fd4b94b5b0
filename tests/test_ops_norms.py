"""LayerNorm / RMSNorm (plain and fused with a residual add) against float64 math.

Each case runs through the Triton kernels (the interpreter on CPU, the GPU when there is
one) and through the PyTorch path (`reference_only`). On CPU the interpreter's fused
kernels hold rows up to 1024 elements, so hidden 4099 runs the looped kernels; the GPU
tests at the bottom repeat the checks at real sizes (hidden up to 20000, bf16).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from attention_oracle import assert_fa2_close
from kernels import norms, reference_only
from kernels.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm

BACKENDS = ["triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


def oracle(x, residual, weight, bias, eps, rms):
    """Float64 norm written out: returns (y, s) with s = x + residual (or x)."""
    s = x.double() + residual.double() if residual is not None else x.double()
    centered = s if rms else s - s.mean(-1, keepdim=True)
    y = centered / torch.sqrt(centered.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y, s


def torch_same_dtype(x, residual, weight, bias, eps, rms):
    """torch's own functions in the inputs' dtype: the yardstick of the error rule."""
    s = x + residual if residual is not None else x
    shape = (x.shape[-1],)
    y = F.rms_norm(s, shape, weight, eps) + (bias if bias is not None else 0) if rms else \
        F.layer_norm(s, shape, weight, bias, eps)
    return y, s


def run_case(device, ctx, shape, dtype, rms, residual, affine, param_dtype=None, eps=1e-5):
    """Forward and backward of ours, the float64 oracle and torch in dtype; compares all."""
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(device, dtype).requires_grad_()
    r = torch.randn(shape).to(device, dtype).requires_grad_() if residual else None
    pdt = param_dtype or dtype
    w = (torch.rand(N) + 0.5).to(device, pdt).requires_grad_() if affine in ("weight", "both") else None
    b = torch.randn(N).to(device, pdt).requires_grad_() if affine == "both" else None
    inputs = [t for t in (x, r, w, b) if t is not None]
    with ctx():
        if residual:
            y, s = (add_rms_norm if rms else add_layer_norm)(x, r, w, b, eps=eps)
        else:
            y = (rms_norm if rms else layer_norm)(x, w, b, eps=eps)
            s = None
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn_like(y)
    ds = torch.randn_like(y) if residual else None
    outs, grads_out = ([y, s], [dy, ds]) if residual else ([y], [dy])
    grads = torch.autograd.grad(outs, inputs, grads_out)

    # The oracle and torch's own math run where the inputs are (float64 is fine on a GPU).
    plain = [t.detach() if t is not None else None for t in (x, r, w, b)]
    ref_in = [t.double().requires_grad_() if t is not None else None for t in plain]
    same_in = [t.clone().requires_grad_() if t is not None else None for t in plain]
    ref_y, ref_s = oracle(*ref_in, eps, rms)
    pt_y, pt_s = torch_same_dtype(*same_in, eps, rms)
    ref_outs, pt_outs = ([ref_y, ref_s], [pt_y, pt_s]) if residual else ([ref_y], [pt_y])
    ref_grads = torch.autograd.grad(ref_outs, [t for t in ref_in if t is not None],
                                    [g.double() for g in grads_out])
    pt_grads = torch.autograd.grad(pt_outs, [t for t in same_in if t is not None], grads_out)
    assert_fa2_close(y.detach(), ref_y, pt_y, "y")
    if residual:
        # The sum is one rounding of x + residual: exactly torch's.
        torch.testing.assert_close(s.detach(), pt_s.detach(), rtol=0, atol=0)
    names = [n for n, t in zip(("dx", "dresidual", "dweight", "dbias"), (x, r, w, b)) if t is not None]
    for name, g, ref, pt in zip(names, grads, ref_grads, pt_grads):
        assert g.dtype == {"dweight": pdt, "dbias": pdt}.get(name, dtype), name
        assert_fa2_close(g, ref, pt, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [1, 33, 4099])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_matches_oracle(backend, rms, residual, hidden, dtype):
    device, ctx = backend
    rows = (1, 3) if hidden > 1000 else (3, 7)  # the interpreter loops over long rows slowly
    run_case(device, ctx, (*rows, hidden), dtype, rms, residual, "both")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_of_one_element_is_its_bias_with_zero_gradient(backend, dtype):
    """Analytic: with hidden size 1, x - mean(x) = 0, so y = bias whatever x is, and dy/dx = 0
    exactly (torch's fused CPU backward gives about 1e-4 here, from rstd = eps^-1/2 times a
    rounding)."""
    device, ctx = backend
    x = (torch.randn(6, 1) * 3).to(device, dtype).requires_grad_()
    w = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
    with ctx():
        y = layer_norm(x, w, b)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
    assert torch.equal(y.detach(), b.detach().expand_as(y))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("hidden", [40, 2000])  # fused rows; looped rows in the interpreter
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_frozen_weight_and_bias_get_no_gradient_and_leave_the_others_unchanged(backend, rms, hidden):
    """A weight or bias that does not require grad is skipped in the backward (no reduction);
    the gradients that are asked for are bit-identical to those of a run where all are."""
    device, ctx = backend
    x, r = torch.randn(5, hidden, device=device), torch.randn(5, hidden, device=device)
    w, b = torch.rand(hidden, device=device) + 0.5, torch.randn(hidden, device=device)
    dy, ds = torch.randn(5, hidden, device=device), torch.randn(5, hidden, device=device)
    fn = add_rms_norm if rms else add_layer_norm

    def grads(trainable):
        leaves = [t.clone().requires_grad_(name in trainable) for name, t in zip("xrwb", (x, r, w, b))]
        with ctx():
            y, s = fn(*leaves)
        wanted = [t for t in leaves if t.requires_grad]
        return dict(zip([n for n in "xrwb" if n in trainable], torch.autograd.grad((y, s), wanted, (dy, ds))))

    every = grads("xrwb")
    for trainable in ("xr", "xrw", "xrb", "wb"):
        some = grads(trainable)
        assert set(some) == set(trainable)
        for name, g in some.items():
            assert torch.equal(g, every[name]), (trainable, name)


@pytest.mark.parametrize("affine", ["none", "weight"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_optional_weight_and_bias(backend, rms, affine):
    device, ctx = backend
    run_case(device, ctx, (70, 40), torch.float32, rms, True, affine)


def test_float32_params_with_half_activations(backend):
    """Mixed precision: fp32 weight/bias with fp16 x; grads keep each tensor's dtype."""
    device, ctx = backend
    run_case(device, ctx, (9, 65), torch.float16, False, False, "both", param_dtype=torch.float32)


def test_looped_kernels_match_fused(monkeypatch, device):
    """The looped kernels (long rows) compute what the fused ones do, on the same rows."""
    x = torch.randn(5, 100, device=device)
    r = torch.randn(5, 100, device=device)
    w, b = torch.rand(100, device=device), torch.randn(100, device=device)
    results = []
    for limit in (1024, 64):  # 100 -> BLOCK_N 128: fused under 1024, looped (chunks of 32) under 64
        monkeypatch.setattr(norms, "MAX_FUSED_BLOCK", limit)
        xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
        y, s = add_layer_norm(xs, rs, ws, bs)
        grads = torch.autograd.grad((y * torch.cos(y.detach())).sum() + s.sum(), (xs, rs, ws, bs))
        results.append((y, s, *grads))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_reference_path_float32_takes_torchs_fused_norm(monkeypatch, rms):
    """In float32 the PyTorch path runs torch's fused LayerNorm (forward and backward) and
    RMSNorm (forward: its backward has no CPU kernel), with the same outputs and gradients
    as the elementwise path that half precision takes (held to the oracle above)."""
    calls = []
    fused_fwd, fused_bwd = norms._torch_fused_fwd, norms._torch_fused_layer_norm_bwd
    monkeypatch.setattr(norms, "_torch_fused_fwd", lambda *a: calls.append("fwd") or fused_fwd(*a))
    monkeypatch.setattr(norms, "_torch_fused_layer_norm_bwd", lambda *a: calls.append("bwd") or fused_bwd(*a))
    x, r = torch.randn(13, 70) * 2 + 0.5, torch.randn(13, 70)
    w, b = torch.rand(70) + 0.5, torch.randn(70)

    def run():
        xs, rs, ws, bs = (t.clone().requires_grad_() for t in (x, r, w, b))
        with reference_only():
            y, s = (add_rms_norm if rms else add_layer_norm)(xs, rs, ws, bs)
        return (y, s, *torch.autograd.grad((y * torch.cos(y.detach())).sum() + s.sum(), (xs, rs, ws, bs)))

    fused = run()
    assert calls == (["fwd"] if rms else ["fwd", "bwd"])
    monkeypatch.setattr(norms, "_torch_fused_applies", lambda *a: False)
    elementwise = run()
    assert calls == (["fwd"] if rms else ["fwd", "bwd"])
    for name, a, c in zip(("y", "s", "dx", "dresidual", "dweight", "dbias"), fused, elementwise):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("rms", [False, True])
def test_add_norm_gradients_accumulate_separately(backend, rms):
    """x and residual as leaves get equal gradients in separate tensors: two backward passes
    (gradient accumulation) give twice the float64 gradient in each, and zeroing one leaves the other."""
    device, ctx = backend
    x, residual = (torch.randn(5, 24, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(24, device=device)
    fn = add_rms_norm if rms else add_layer_norm
    for _ in range(2):
        with ctx():
            y, s = fn(x, residual, weight)
        (y.square().sum() + s.sum()).backward()
    assert x.grad.data_ptr() != residual.grad.data_ptr()
    x64 = (x.detach().double() + residual.detach().double()).requires_grad_()
    y64, _ = oracle(x64, None, weight.double(), None, 1e-5 if not rms else 1e-6, rms)
    (g64,) = torch.autograd.grad(y64.square().sum() + x64.sum(), x64)
    for grad in (x.grad, residual.grad):
        torch.testing.assert_close(grad.cpu().double(), 2 * g64, rtol=0, atol=1e-4)
    x.grad.zero_()
    torch.testing.assert_close(residual.grad.cpu().double(), 2 * g64, rtol=0, atol=1e-4)


def test_eps_is_used(backend):
    device, ctx = backend
    x = torch.full((2, 8), 3.0, device=device)
    x[:, 0] = 3.5  # tiny variance: eps dominates
    with ctx():
        y = layer_norm(x, eps=1.0)
    ref, _ = oracle(x.cpu(), None, None, None, 1.0, False)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-6, atol=1e-6)


def test_empty_rows(backend):
    device, ctx = backend
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    with ctx():
        y = rms_norm(x, w)
        (gw,) = torch.autograd.grad(y.sum(), w)
    assert y.shape == (0, 16) and torch.equal(gw, torch.zeros_like(gw))


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda x: layer_norm(x.long()), TypeError, "x has dtype torch.int64"),
    (lambda x: layer_norm(x[0, 0, 0]), ValueError, "last \\(hidden\\) dim"),
    (lambda x: layer_norm(x, torch.ones(7)), ValueError, "weight must have shape \\(hidden,\\) = \\(8,\\)"),
    (lambda x: layer_norm(x, None, torch.ones(8, dtype=torch.int32)), TypeError, "bias has dtype"),
    (lambda x: rms_norm(x, [1.0] * 8), TypeError, "weight must be a torch.Tensor"),
    (lambda x: layer_norm(x, eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda x: add_layer_norm(x, x[:, :1]), ValueError, "residual must have x's shape"),
    (lambda x: add_rms_norm(x, x.half()), TypeError, "residual has dtype torch.float16"),
    (lambda x: add_layer_norm(x, None), TypeError, "residual must be a torch.Tensor"),
    (lambda x: layer_norm(torch.empty(2, norms.MAX_HIDDEN + 1, device="meta")), ValueError, "1 to 1048576"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 8))


# --------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile (the PyTorch path on CPU; tests/test_gpu-style
# CUDA checks below)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_opcheck(rms, residual):
    x = torch.randn(6, 10, requires_grad=True)
    r = torch.randn(6, 10, requires_grad=True) if residual else None
    w, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    with reference_only():
        torch.library.opcheck(torch.ops.tritonzoo.norm_fwd.default, (x, r, w, b, 1e-5, rms))
        y, s, mean, rstd = (t.detach() for t in torch.ops.tritonzoo.norm_fwd(x, r, w, b, 1e-5, rms))
        src = s if residual else x.detach()
        torch.library.opcheck(torch.ops.tritonzoo.norm_bwd.default,
                              (torch.randn_like(y), torch.randn_like(y) if residual else None, src, w.detach(), True,
                               mean, rstd, rms, True))


class _PreNorm(torch.nn.Module):
    """A pre-norm residual step as a transformer block writes it."""

    def __init__(self, dim=24):
        super().__init__()
        self.norm1 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.norm2 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.bias2 = torch.nn.Parameter(torch.randn(dim))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, residual):
        h, residual = add_rms_norm(x, residual, self.norm1)
        return layer_norm(self.proj(h), self.norm2, self.bias2) + residual


def test_compile_fullgraph():
    # aot_eager: the whole graph through AOT autograd, quickly; inductor is checked on CUDA.
    torch._dynamo.reset()
    model = _PreNorm()
    x, r = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, 24, requires_grad=True)
    with reference_only():
        eager = model(x, r)
        g_eager = torch.autograd.grad(eager.sum(), (x, r, model.norm1))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, r)
        g = torch.autograd.grad(compiled.sum(), (x, r, model.norm1))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, c in zip(g, g_eager):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# GPU: real sizes, bf16, determinism, the compiled CUDA path
# --------------------------------------------------------------------------------------


# bf16 at every size (fused up to 8192, looped beyond); fp16 and fp32 on one size of each.
GPU_SIZES = [(h, torch.bfloat16) for h in (768, 4096, 8192, 16384, 20000)] + \
    [(h, dt) for h in (4096, 20000) for dt in (torch.float16, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,dtype", GPU_SIZES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_gpu_real_sizes(rms, residual, hidden, dtype):
    run_case("cuda", contextlib.nullcontext, (4, 512, hidden), dtype, rms, residual, "both")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 16384])
def test_gpu_backward_is_deterministic(hidden):
    x = torch.randn(8192, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", requires_grad=True)
    b = torch.randn(hidden, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    first = torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
    for _ in range(3):
        again = torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
        for a, c in zip(first, again):
            assert torch.equal(a, c)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.tritonzoo.norm_fwd.default, (x, r, w, None, 1e-6, True))
    torch._dynamo.reset()
    model = _PreNorm(256).cuda()
    xs, rs = torch.randn(4, 128, 256, device="cuda"), torch.randn(4, 128, 256, device="cuda")
    eager = model(xs, rs)
    compiled = torch.compile(model, fullgraph=True)(xs, rs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
