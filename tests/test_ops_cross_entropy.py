"""cross_entropy and fused_linear_cross_entropy against torch's cross-entropy in float64.

The oracle is torch.nn.functional.cross_entropy on float64 inputs (for the fused op, of
float64 hidden @ weight.T + bias), with the same ignore_index, label smoothing and
reduction. Each case runs through the Triton kernels (interpreter on CPU, GPU when
there is one) and the PyTorch path. The CPU vocabularies are small and odd (1003); the
GPU tests use GPT-2's 50257.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from attention_oracle import assert_fa2_close
from kernels import reference_only
from kernels.cross_entropy import cross_entropy, default_chunk_size, fused_linear_cross_entropy


@pytest.fixture(params=["triton", "reference"])
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


def targets(n, vocab, ignore_index=-100, ignored=(1, 4)):
    t = torch.randint(0, vocab, (n,))
    t[[i for i in ignored if i < n]] = ignore_index
    return t


def check_ce(device, ctx, N, V, dtype, reduction, smoothing, ignore_index=-100, scale=3.0):
    logits = (torch.randn(N, V) * scale).to(dtype)
    target = targets(N, V, ignore_index)
    x = logits.to(device).requires_grad_()
    with ctx():
        loss = cross_entropy(x, target.to(device), ignore_index=ignore_index, label_smoothing=smoothing,
                             reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ((N,) if reduction == "none" else ())
    dloss = torch.randn_like(loss)
    (dx,) = torch.autograd.grad(loss, x, dloss)
    # torch's cross-entropy runs where the inputs are (float64 is fine on a GPU).
    target = target.to(device)
    ref_in = logits.to(device).double().requires_grad_()
    ref = F.cross_entropy(ref_in, target, ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    (ref_dx,) = torch.autograd.grad(ref, ref_in, dloss.double())
    same_in = logits.to(device).requires_grad_()
    same = F.cross_entropy(same_in, target, ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction)
    (same_dx,) = torch.autograd.grad(same, same_in, dloss.to(dtype))
    assert_fa2_close(loss.detach(), ref, same.float(), "loss")
    assert_fa2_close(dx, ref_dx, same_dx, "dlogits")
    ignored = target == ignore_index
    assert torch.equal(dx[ignored], torch.zeros_like(dx[ignored]))


@pytest.mark.parametrize("vocab", [1, 33, 1003])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(backend, vocab, reduction, smoothing):
    device, ctx = backend
    check_ce(device, ctx, 9, vocab, torch.float32, reduction, smoothing)


@pytest.mark.parametrize("vocab", [3, 7, 264, 1003])
@pytest.mark.parametrize("layout", ["contiguous", "aligned rows", "offset view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_any_row_layout(backend, vocab, layout, dtype):
    """The kernel walks each row in a 16-byte-aligned window (its first columns, whole blocks, its
    last columns): rows starting at every offset in that window, vocabularies shorter than it,
    and blocks ending exactly at or one past a multiple of it all give torch's loss and
    gradient. Rows: contiguous (stride V), padded to 64 (stride a multiple of 16 bytes, as the
    models' logits), or a view at a storage offset of 5 with stride V + 7.

    float16 for the 2-byte case (8 per window): the interpreter casts to bfloat16 by truncation,
    not rounding (the GPU tests below run bf16). A 16-bit gradient is rounded twice by design
    (stored in the forward, then times grad_output), so on these few elements it is held to
    that analytic bound, 1.5 units in the last place of float16, rather than to 2 x torch's
    single rounding."""
    device, ctx = backend
    N = 11  # rows at 11 different offsets: every shift in the window for an odd stride
    if layout == "offset view":
        flat = (3 * torch.randn(N * (vocab + 7) + 5)).to(dtype).to(device)
        x = flat.as_strided((N, vocab), (vocab + 7, 1), 5)
    else:
        width = vocab if layout == "contiguous" else -(-vocab // 64) * 64
        x = (3 * torch.randn(N, width)).to(dtype).to(device)[:, :vocab]
    x = x.detach().requires_grad_()
    assert x.stride(0) == {"contiguous": vocab, "aligned rows": -(-vocab // 64) * 64, "offset view": vocab + 7}[layout]
    target = targets(N, vocab)
    dloss = torch.randn(N, device=device)
    for smoothing in (0.0, 0.1):
        with ctx():
            loss = cross_entropy(x, target.to(device), label_smoothing=smoothing, reduction="none")
        (dx,) = torch.autograd.grad(loss, x, dloss)
        ref_in = x.detach().double().requires_grad_()
        ref = F.cross_entropy(ref_in, target.to(device), label_smoothing=smoothing, reduction="none")
        (ref_dx,) = torch.autograd.grad(ref, ref_in, dloss.double())
        same_in = x.detach().clone().requires_grad_()
        same = F.cross_entropy(same_in, target.to(device), label_smoothing=smoothing, reduction="none")
        (same_dx,) = torch.autograd.grad(same, same_in, dloss.to(dtype))
        assert_fa2_close(loss.detach(), ref, same.float(), "loss")
        if dtype == torch.float32:
            assert_fa2_close(dx, ref_dx, same_dx, "dlogits")
        else:  # 2^-10: float16's relative spacing; its normal range ends at 2^-14
            ulp = 2.0 ** (torch.floor(torch.log2(ref_dx.abs().clamp(min=2.0 ** -14))) - 10)
            assert ((dx.double() - ref_dx).abs() <= 1.5 * ulp).all()


@pytest.mark.parametrize("vocab", [1, 7, 9, 300])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_scaling_is_one_float32_product(backend, vocab, padded, dtype):
    """The backward's pass over the stored gradient (tritonzoo::scale_rows): each element times its
    row's scale (or one scale for all) in float32, rounded once to the gradient's dtype, in the
    gradient's layout (padded rows stay padded). float16: the interpreter's bfloat16 casts
    truncate (the GPU tests run bf16)."""
    import importlib
    ce = importlib.import_module("kernels.cross_entropy")
    device, ctx = backend
    rows = 5
    grad = (torch.randn(rows, 64 * (vocab // 64 + 1)) if padded else torch.randn(rows, vocab)).to(dtype)
    grad = grad.to(device)[:, :vocab]
    for scale in (torch.tensor([[0.37]]), torch.tensor([[1.5], [0.0], [-3.25], [1e-3], [4096.0]])):
        with ctx():
            out = ce._scale_rows(grad, scale.to(device))
        assert out.stride() == grad.stride() and out.dtype == dtype
        assert torch.equal(out, (grad.float() * scale.to(device)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_half_logits(backend, dtype):
    device, ctx = backend
    check_ce(device, ctx, 6, 517, dtype, "mean", 0.05)


def test_ignore_index_inside_the_vocabulary(backend):
    device, ctx = backend
    check_ce(device, ctx, 7, 40, torch.float32, "sum", 0.2, ignore_index=0)


def test_all_rows_ignored(backend):
    """torch's convention: the mean over no rows is NaN; the gradient is exactly zero."""
    device, ctx = backend
    x = torch.randn(3, 20, device=device, requires_grad=True)
    target = torch.full((3,), -100, device=device)
    with ctx():
        mean = cross_entropy(x, target)
        total = cross_entropy(x, target, reduction="sum")
        (dx,) = torch.autograd.grad(total, x)
    assert torch.isnan(mean) and total.item() == 0.0 and torch.equal(dx, torch.zeros_like(dx))


def test_float16_gradient_under_a_loss_scale(backend):
    """GradScaler's 65536 exceeds float16's range: the product is taken in float32 (as torch's
    backward does), so the gradient is the float64 one times the scale, rounded once."""
    device, ctx = backend
    N, V, H, scale = 64, 300, 16, 65536.0
    logits = torch.randn(N, V).half()
    target = targets(N, V)
    hidden, weight = (0.5 * torch.randn(N, H)).half(), (0.5 * torch.randn(V, H)).half()
    x, h, w = (t.to(device).clone().requires_grad_() for t in (logits, hidden, weight))
    with ctx():
        (cross_entropy(x, target.to(device)) * scale).backward()
        (fused_linear_cross_entropy(h, w, target.to(device)) * scale).backward()
    ref = logits.double().requires_grad_()
    (F.cross_entropy(ref, target) * scale).backward()
    rh, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (F.cross_entropy(rh @ rw.T, target) * scale).backward()
    for ours, expected in ((x.grad, ref.grad), (h.grad, rh.grad), (w.grad, rw.grad)):
        assert torch.isfinite(ours).all()
        # float16 keeps 11 bits: a relative error of a few 2^-11 (the softmax itself is rounded in the forward)
        torch.testing.assert_close(ours.cpu().double(), expected, rtol=4e-3, atol=expected.abs().max().item() * 4e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float16_gradient_of_many_tokens(backend, reduction):
    """Mean over N tokens divides each softmax entry (~1/V) by N: stored that way in float16 it
    fell into the subnormals, losing bits (at 4096 x 4096 the small entries were off by 3e-3).
    The gradient is stored times 2^14 and unscaled in float32: as accurate as float16 allows
    (torch's fp32 gradient rounded to fp16 is off by ~2^-12 on average)."""
    device, ctx = backend
    N, V = (128, 2048) if ctx is contextlib.nullcontext and device == "cpu" else (4096, 4096)  # interpreter: small
    logits = (2 * torch.randn(N, V)).half()
    target = targets(N, V)
    weights = torch.rand(N) if reduction == "none" else None
    x = logits.to(device).clone().requires_grad_()
    with ctx():
        loss = cross_entropy(x, target.to(device), reduction=reduction)
    ((loss * weights.to(device)).sum() if weights is not None else loss).mul(65536.0).backward()
    ref = logits.double().requires_grad_()
    expected = F.cross_entropy(ref, target, reduction=reduction)
    ((expected * weights.double()).sum() if weights is not None else expected).mul(65536.0).backward()
    small = torch.ones(N, V, dtype=torch.bool)  # the entries off the target (and off ignored rows)
    small[torch.arange(N), target.clamp_min(0)] = False
    error = (x.grad.cpu().double() - ref.grad)[small].norm() / ref.grad[small].norm()
    assert error < 4e-4, f"relative gradient error off the targets {error:.2e}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_half_default_dtype_changes_nothing(backend, reduction):
    """Lightning's bf16-true / 16-true set torch's default dtype around each step: float32 logits
    must give the same losses and gradients (a scale built from Python floats took that dtype)."""
    device, ctx = backend
    logits, target = torch.randn(12, 50, device=device), targets(12, 50).to(device)
    hidden, weight = torch.randn(12, 8, device=device), torch.randn(50, 8, device=device)
    results = []
    for default in (torch.float32, torch.bfloat16):
        x, h, w = (t.clone().requires_grad_() for t in (logits, hidden, weight))
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            with ctx():
                losses = (cross_entropy(x, target, reduction=reduction),
                          fused_linear_cross_entropy(h, w, target, reduction=reduction))
                sum(loss.sum() for loss in losses).backward()
        finally:
            torch.set_default_dtype(previous)
        results.append([*losses, x.grad, h.grad, w.grad])
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_ignored_rows_get_zero_gradient_whatever_their_weight(backend):
    """reduction="none" weighted per row, with inf (1 / length for an empty row) on ignored rows: 0, not NaN."""
    device, ctx = backend
    N, V, H = 6, 40, 8
    target = targets(N, V).to(device)
    weights = torch.where(target == -100, torch.inf, torch.rand(N, device=device))
    x = torch.randn(N, V, device=device, requires_grad=True)
    h, w = torch.randn(N, H, device=device, requires_grad=True), torch.randn(V, H, device=device, requires_grad=True)
    with ctx():
        (cross_entropy(x, target, reduction="none") * weights).sum().backward()
        (fused_linear_cross_entropy(h, w, target, reduction="none") * weights).sum().backward()
    ref = x.detach().double().requires_grad_()
    (F.cross_entropy(ref, target, reduction="none") * weights.double()).nan_to_num(posinf=0.0).sum().backward()
    rh, rw = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(rh @ rw.T, target, reduction="none") * weights.double()
    loss.nan_to_num(posinf=0.0).sum().backward()
    for ours, expected in ((x.grad, ref.grad), (h.grad, rh.grad), (w.grad, rw.grad)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    assert (x.grad[target == -100] == 0).all() and (h.grad[target == -100] == 0).all()


def test_second_derivatives_raise(backend):
    """The backward is a first-order formula (the gradient is precomputed in the forward):
    create_graph=True raises instead of giving a gradient penalty without its logits term."""
    device, ctx = backend
    x = torch.randn(4, 30, device=device, requires_grad=True)
    with ctx(), pytest.raises(RuntimeError, match="cross_entropy: create_graph=True .* is not supported"):
        torch.autograd.grad(cross_entropy(x, torch.tensor([1, 2, 3, 4], device=device)), x, create_graph=True)


def test_large_logits_stay_finite(backend):
    device, ctx = backend
    check_ce(device, ctx, 5, 300, torch.float32, "mean", 0.0, scale=1e3)


def test_no_grad_forward_matches(backend):
    device, ctx = backend
    x, target = torch.randn(4, 50, device=device), torch.randint(0, 50, (4,), device=device)
    with ctx(), torch.no_grad():
        loss = cross_entropy(x, target, label_smoothing=0.1)
    ref = F.cross_entropy(x.cpu().double(), target.cpu(), label_smoothing=0.1)
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------


def check_flce(device, ctx, N, H, V, dtype, reduction, smoothing, with_bias, chunk_size, ignore_index=-100):
    h0 = torch.randn(N, H).to(dtype)
    w0 = (torch.randn(V, H) / H ** 0.5 * 2).to(dtype)
    b0 = torch.randn(V).to(dtype) if with_bias else None
    target = targets(N, V, ignore_index, ignored=(0, 3, N - 1))
    leaves = [t.to(device).requires_grad_() for t in (h0, w0, b0) if t is not None]
    with ctx():
        loss = fused_linear_cross_entropy(leaves[0], leaves[1], target.to(device), leaves[2] if with_bias else None,
                                          ignore_index=ignore_index, label_smoothing=smoothing, reduction=reduction,
                                          chunk_size=chunk_size)
        dloss = torch.randn_like(loss)
        grads = torch.autograd.grad(loss, leaves, dloss)

    def torch_loss(h, w, b=None):
        return F.cross_entropy(F.linear(h, w, b), target, ignore_index=ignore_index, label_smoothing=smoothing,
                               reduction=reduction)

    # torch's math runs where the inputs are (float64 is fine on a GPU).
    target = target.to(device)
    ref_in = [t.to(device).double().requires_grad_() for t in (h0, w0, b0) if t is not None]
    ref = torch_loss(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dloss.double())
    same_in = [t.to(device).requires_grad_() for t in (h0, w0, b0) if t is not None]
    same = torch_loss(*same_in)
    same_grads = torch.autograd.grad(same, same_in, dloss.to(dtype))
    assert_fa2_close(loss.detach(), ref, same.float(), "loss")
    for name, g, r, p in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, same_grads):
        assert g.dtype == dtype, name
        assert_fa2_close(g, r, p, name)
    ignored = target == ignore_index
    assert torch.equal(grads[0][ignored], torch.zeros_like(grads[0][ignored]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_cross_entropy(backend, reduction, with_bias):
    device, ctx = backend
    check_flce(device, ctx, 11, 24, 1003, torch.float32, reduction, 0.1, with_bias, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, None])
def test_fused_linear_chunk_sizes(backend, chunk_size):
    device, ctx = backend
    check_flce(device, ctx, 9, 16, 61, torch.float32, "mean", 0.0, True, chunk_size)


def test_fused_linear_half_precision(backend):
    device, ctx = backend
    check_flce(device, ctx, 8, 32, 97, torch.float16, "mean", 0.1, True, chunk_size=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_gradient_rows_are_aligned(backend, dtype):
    """At an odd vocabulary the logits' gradient, which the backward's two GEMMs read, still has rows
    at 16-byte multiples (a padded buffer); its values are checked by the float64 tests above."""
    device, ctx = backend
    x = torch.randn(6, 1003, dtype=dtype, device=device).requires_grad_()
    with ctx():
        (dx,) = torch.autograd.grad(cross_entropy(x, targets(6, 1003).to(device)), x)
    assert dx.shape == x.shape and dx.stride(1) == 1 and (dx.stride(0) * dx.element_size()) % 16 == 0


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_gemms_see_aligned_rows(with_bias):
    """Every GEMM of the chunk loop reads and writes rows at 16-byte multiples.

    cuBLAS needs leading dimensions of 16-byte multiples for its tensor-core kernels; at
    an odd vocabulary (1003 here, 50257 for GPT-2) plain (chunk, V) logits miss that.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels.cross_entropy import flce_chunks

    class GemmStrides(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                for t in (*args, *kwargs.values()):
                    if isinstance(t, torch.Tensor) and t.dim() == 2:
                        self.seen.append((func, tuple(t.shape), t.stride()))
            return func(*args, **kwargs)

    N, H, V = 10, 24, 1003
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    bias = torch.randn(V) if with_bias else None
    grads = (torch.empty(N, H), torch.zeros(V, H), torch.zeros(V) if with_bias else None)
    with reference_only(), GemmStrides() as mode:
        flce_chunks(hidden, weight, bias, targets(N, V), -100, 0.0, True, None, *grads, chunk_size=4)
    assert len(mode.seen) >= 3 * 3 * 2  # three chunks, three GEMMs each, two matrices or more
    for func, shape, stride in mode.seen:
        leading = max(stride)  # the non-unit stride of a row- or column-major matrix
        assert min(stride) == 1 and leading % 4 == 0, f"{func} on {shape} with strides {stride}"


def test_fused_linear_frozen_weight(backend):
    """Only hidden requires grad: the weight's gradient is neither computed nor returned."""
    device, ctx = backend
    h = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(30, 8, device=device)
    target = torch.randint(0, 30, (6,), device=device)
    with ctx():
        (gh,) = torch.autograd.grad(fused_linear_cross_entropy(h, w, target, chunk_size=4), h)
    hd = h.detach().cpu().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(hd @ w.cpu().double().t(), target.cpu()), hd)
    torch.testing.assert_close(gh.cpu().double(), ref, rtol=1e-5, atol=1e-6)


def test_fused_linear_under_autocast(backend):
    """fp32 parameters under bf16 autocast: computed as autocast computes F.linear, in bf16;
    gradients come back in fp32. Tolerance: a few bf16 roundings (2^-8 each)."""
    device, ctx = backend
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    target = torch.randint(0, 40, (6,), device=device)
    with ctx(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, target, chunk_size=4)
        ref = F.cross_entropy(F.linear(h, w), target)
    grads, ref_grads = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref.float(), rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_default_chunk_size():
    # Chunk logits about the size of the hidden states: 16384 tokens, V = 50257, H = 4096
    # -> 13 chunks' worth -> 1261 tokens -> 2048 (a power of two).
    assert default_chunk_size(16384, 50257, 4096) == 2048
    assert default_chunk_size(16384, 50257, 1024) == 512  # 50 chunks' worth -> 328 -> 512
    assert default_chunk_size(16384, 262144, 512) == 256  # 32 tokens' worth, raised to the floor
    assert default_chunk_size(10, 50257, 64) == 16  # never more than the tokens (rounded up)
    assert default_chunk_size(100, 10, 64) == 128


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

_LOGITS, _TARGET = torch.randn(4, 10), torch.tensor([1, 2, -100, 9])


@pytest.mark.parametrize("call,error,match", [
    (lambda: cross_entropy(_LOGITS.long(), _TARGET), TypeError, "logits has dtype torch.int64"),
    (lambda: cross_entropy(_LOGITS[None], _TARGET), ValueError, "logits must have 2 dims"),
    (lambda: cross_entropy(_LOGITS, _TARGET.float()), TypeError, "target must hold class indices"),
    (lambda: cross_entropy(_LOGITS, _TARGET[:3]), ValueError, "target must have shape \\(tokens,\\) = \\(4,\\)"),
    (lambda: cross_entropy(_LOGITS, torch.tensor([1, 2, 10, 0])), ValueError, "target holds 10, outside \\[0, 10\\)"),
    (lambda: cross_entropy(_LOGITS, torch.tensor([1, -1, 0, 0])), ValueError, "target holds -1"),
    (lambda: cross_entropy(_LOGITS, _TARGET, reduction="avg"), ValueError, "reduction must be"),
    (lambda: cross_entropy(_LOGITS, _TARGET, label_smoothing=1.5), ValueError, "label_smoothing must be"),
    (lambda: cross_entropy(_LOGITS, _TARGET, ignore_index=1.0), TypeError, "ignore_index must be an int"),
    (lambda: cross_entropy(_LOGITS, _TARGET.int(), ignore_index=2**32 + 3), ValueError,
     "ignore_index 4294967299 does not fit the torch.int32 target"),
    (lambda: fused_linear_cross_entropy(_LOGITS, torch.randn(7, 9), _TARGET), ValueError,
     "weight must have shape \\(vocab, hidden\\) = \\(V, 10\\)"),
    (lambda: fused_linear_cross_entropy(_LOGITS, torch.randn(7, 10).half(), _TARGET), TypeError,
     "weight has dtype torch.float16 but hidden has torch.float32"),
    (lambda: fused_linear_cross_entropy(_LOGITS, torch.randn(12, 10), _TARGET, bias=torch.randn(11)), ValueError,
     "bias must have shape \\(vocab,\\) = \\(12,\\)"),
    (lambda: fused_linear_cross_entropy(_LOGITS[0], torch.randn(12, 10), _TARGET), ValueError,
     "hidden must have 2 dims"),
    (lambda: fused_linear_cross_entropy(_LOGITS, torch.randn(12, 10), _TARGET, chunk_size=0), ValueError,
     "chunk_size must be a positive int"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile (the PyTorch path on CPU)
# --------------------------------------------------------------------------------------


def test_opcheck():
    logits = torch.randn(5, 13, requires_grad=True)
    target = torch.tensor([0, 12, -100, 3, 3])
    h, w, b = torch.randn(5, 6, requires_grad=True), torch.randn(13, 6, requires_grad=True), torch.randn(13)
    with reference_only():
        torch.library.opcheck(torch.ops.tritonzoo.cross_entropy_fwd.default, (logits, target, -100, 0.1, 2, True))
        torch.library.opcheck(torch.ops.tritonzoo.fused_linear_cross_entropy_fwd.default,
                              (h, w, b, target, -100, 0.1, 1, 2, True, True))
        torch.library.opcheck(torch.ops.tritonzoo.fused_linear_cross_entropy_bwd.default,
                              (torch.randn(5), h.detach(), w.detach(), b, target, -100, 0.0, 3, True, True))
        torch.library.opcheck(torch.ops.tritonzoo.scale_rows.default, (torch.randn(5, 13), torch.randn(5, 1)))


class _LMHead(torch.nn.Module):
    def __init__(self, dim=16, vocab=37, fused=True):
        super().__init__()
        self.fused = fused
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, x, target):
        h = self.norm(x).flatten(0, 1)
        if self.fused:
            return fused_linear_cross_entropy(h, self.head.weight, target.flatten(), self.head.bias, chunk_size=3)
        return cross_entropy(self.head(h), target.flatten(), label_smoothing=0.1)


@pytest.mark.parametrize("fused", [False, True])
def test_compile_fullgraph(fused):
    torch._dynamo.reset()
    model = _LMHead(fused=fused)
    x, target = torch.randn(2, 5, 16, requires_grad=True), torch.randint(0, 37, (2, 5))
    with reference_only():
        eager = model(x, target)
        g_eager = torch.autograd.grad(eager, (x, model.head.weight))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, target)
        g = torch.autograd.grad(compiled, (x, model.head.weight))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, c in zip(g, g_eager):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# GPU: vocab 50257, bf16, peak memory, the compiled CUDA path
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_gpu_cross_entropy_gpt2_vocab(dtype, reduction, smoothing):
    check_ce("cuda", contextlib.nullcontext, 2048, 50257, dtype, reduction, smoothing)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_fused_linear_gpt2_vocab(dtype, reduction):
    check_flce("cuda", contextlib.nullcontext, 1024, 256, 50257, dtype, reduction, 0.0, False, None)


@pytest.mark.gpu
def test_gpu_fused_linear_peak_memory_is_a_fraction_of_eager():
    """16k tokens x vocab 50257: the fused op's peak is under a quarter of eager's."""
    N, H, V = 16384, 1024, 50257
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / 32).requires_grad_()
    target = torch.randint(0, V, (N,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        h.grad = w.grad = None
        return torch.cuda.max_memory_allocated() - base

    eager = peak(lambda: F.cross_entropy(h @ w.t(), target))
    fused = peak(lambda: fused_linear_cross_entropy(h, w, target))
    assert fused <= eager / 4, (fused / 2**20, eager / 2**20)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    logits = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 1000, (64,), device="cuda")
    torch.library.opcheck(torch.ops.tritonzoo.cross_entropy_fwd.default, (logits, target, -100, 0.0, 2, True))
    torch.library.opcheck(torch.ops.tritonzoo.scale_rows.default,
                          (logits.detach()[:, :999], torch.randn(64, 1, device="cuda")))
    torch._dynamo.reset()
    model = _LMHead(64, 5003).cuda()
    x, t = torch.randn(4, 50, 64, device="cuda"), torch.randint(0, 5003, (4, 50), device="cuda")
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x, t), model(x, t), rtol=1e-4, atol=1e-4)
