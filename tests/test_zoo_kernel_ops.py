"""kernel_ops: the zoo through tritonzoo's norm, rotary, activation and cross-entropy kernels.

Oracle: the same model with kernel_ops=False (torch's own LayerNorm, RMSNorm written out,
F.gelu / F.silu, the rotate-half rotary, F.cross_entropy) and the same weights. Both must
give the same logits, losses and gradients up to float32 rounding, with the kernels' PyTorch
paths (CPU training), through the Triton interpreter, and under torch.compile.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

import kernels
import zoo
from zoo import layers
from zoo.layers import LayerNorm, RMSNorm, Rotary, apply_rotary, kernel_pays, token_cross_entropy

pytestmark = pytest.mark.usefixtures("reference_attention")

GPT_MODERN = dict(positions="rotary", rotary_dim=12, mlp="swiglu", norm="rmsnorm", qk_norm=True, kv_heads=2,
                  qkv_bias=False, mlp_bias=False)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Unit-scale random weights, norm scales and shifts included, so every branch and
    every parameter's plumbing shows in the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model


def _pair(name: str, **overrides):
    """(kernel_ops=True model, kernel_ops=False model) with the same weights, in eval mode."""
    torch.manual_seed(0)
    ours = _randomize(zoo.create_model(name, **overrides)).eval()
    torch_ops = zoo.create_model(name, kernel_ops=False, **overrides).eval()
    assert list(ours.state_dict()) == list(torch_ops.state_dict())  # same parameter names
    torch_ops.load_state_dict(ours.state_dict())
    return ours, torch_ops


def _left_padded(B: int, S: int, vocab: int, pad: int = 3):
    """ids, a mask with row 1 left-padded, and positions counting real tokens in steps of
    b + 1 in row b: rotary is blind to a shift of a whole row's positions, not to this."""
    ids = torch.randint(0, vocab, (B, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :pad] = False
    return ids, mask, (mask.long().cumsum(1) - 1).clamp_min(0) * torch.arange(1, B + 1)[:, None]


# Each case: (preset, overrides, run(model) -> (output, scalar loss)).
def _vit(model):
    images = torch.randn(2, 1, 8, 8)
    logits = model(images)
    return logits, F.cross_entropy(logits, torch.tensor([3, 7]))


def _bert(model):
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, [2, 5, 6]] = ids[:, [2, 5, 6]]
    return model(ids, attention_mask=mask, labels=labels)


def _gpt(model):
    ids = torch.randint(0, 256, (2, 10))
    return model(ids, labels=ids)


def _gpt_left_padded(model):
    # Per-row positions (left padding): the rotary kernel reads one table row per token.
    ids, mask, positions = _left_padded(2, 10, 256)
    labels = ids.masked_fill(~mask, -100)
    return model(ids, attention_mask=mask, position_ids=positions, labels=labels)


def _seq2seq(model):
    src = torch.randint(3, 16, (2, 9))
    src[0, 6:] = 0
    labels = torch.randint(3, 16, (2, 7))
    labels[1, 5:] = -100
    tgt = zoo.seq2seq.shift_tokens_right(labels, 1, 0)
    return model(src, tgt, labels=labels)


def _speech(model):
    mels = torch.randn(2, 40, 24)
    logits = model(mels, torch.tensor([24, 17]))
    return logits, F.cross_entropy(logits, torch.tensor([1, 4]))


CASES = {
    "vit": ("vit_digits", dict(depth=2), _vit),
    "vit_fc_norm_no_norm_bias": ("vit_digits", dict(depth=1, norm_bias=False, mlp="gelu_tanh"), _vit),
    "bert": ("bert_tiny", dict(vocab_size=97, dim=32, heads=2), _bert),
    "bert_geglu_rotary": ("bert_tiny", dict(vocab_size=97, dim=32, heads=2, mlp="geglu", positions="rotary"), _bert),
    "gpt": ("gpt_nano", dict(depth=2, dim=32, heads=2), _gpt),
    "gpt_rotary_swiglu_rmsnorm": ("gpt_nano", dict(depth=2, dim=64, **GPT_MODERN), _gpt),
    "gpt_rotary_swiglu_rmsnorm_left_padded": ("gpt_nano", dict(depth=2, dim=64, **GPT_MODERN), _gpt_left_padded),
    "seq2seq": ("seq2seq_tiny", dict(dim=32, heads=2, src_vocab_size=16, tgt_vocab_size=16, mlp="gelu"), _seq2seq),
    "speech": ("speech_tiny", dict(depth=1), _speech),
}


def _outputs_and_grads(model, run):
    torch.manual_seed(1)
    out, loss = run(model)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return out, loss, grads


def _assert_same_results(model, results, ref_results, tol=1e-5):
    (out, loss, grads), (ref_out, ref_loss, ref_grads) = results, ref_results
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, g, ref in zip(names, grads, ref_grads):
        assert (g is None) == (ref is None), n
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_ops_match_torch_ops(case):
    name, overrides, run = CASES[case]
    ours, torch_ops = _pair(name, **overrides)
    _assert_same_results(ours, _outputs_and_grads(ours, run), _outputs_and_grads(torch_ops, run))


def _count_kernel_calls(monkeypatch) -> collections.Counter:
    """Counts the calls of the kernels that kernel_pays routes (norms, GELU) from here on."""
    calls = collections.Counter()

    def counting(name, op):
        def call(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return call

    for name in ("layer_norm", "rms_norm", "gelu"):
        monkeypatch.setattr(kernels, name, counting(name, getattr(kernels, name)))
    return calls


@pytest.mark.parametrize("case", ["vit", "vit_fc_norm_no_norm_bias", "bert", "gpt_rotary_swiglu_rmsnorm"])
def test_small_ops_take_torchs_fused_ops_with_the_same_results(case, monkeypatch):
    """Where kernel_pays says no (on CUDA, below KERNEL_MIN_ELEMENTS; forced here), the norms
    and the GELU run torch's F.layer_norm, F.rms_norm and F.gelu(linear(x)), not the kernels:
    the same outputs and gradients as through the kernels, which the same model calls otherwise."""
    name, overrides, run = CASES[case]
    ours, _ = _pair(name, **overrides)
    calls = _count_kernel_calls(monkeypatch)
    with kernels.reference_only(native=False):  # the ops' own PyTorch bodies, which the layers call
        through_kernels = _outputs_and_grads(ours, run)
    assert sum(calls.values()) > 0
    calls.clear()
    monkeypatch.setattr(layers, "kernel_pays", lambda x, numel=None: False)
    _assert_same_results(ours, _outputs_and_grads(ours, run), through_kernels)
    assert not calls


@pytest.mark.parametrize("case", ["vit", "vit_fc_norm_no_norm_bias", "bert", "gpt_rotary_swiglu_rmsnorm"])
def test_float32_layers_call_torchs_op_where_the_kernels_would(case, monkeypatch):
    """On the kernels' PyTorch path with torch's native ops on (the fixture's reference_only(),
    what CPU training runs), float32 norms and GELUs call torch's op themselves, skipping the
    kernels' public functions, which would call the same op (torch_op_serves): the outputs and
    gradients of the ops' own PyTorch bodies, to float32 rounding. Under autocast, and with
    native ops off, the layers call the kernels."""
    name, overrides, run = CASES[case]
    ours, _ = _pair(name, **overrides)
    calls = _count_kernel_calls(monkeypatch)
    direct = _outputs_and_grads(ours, run)
    assert not calls
    with kernels.reference_only(native=False):
        _assert_same_results(ours, direct, _outputs_and_grads(ours, run))
    assert sum(calls.values()) > 0
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(ours)
    assert calls["layer_norm"] + calls["rms_norm"] > 0


class _Sized:
    """What kernel_pays reads of a tensor: its device and its element count."""

    def __init__(self, device: str, numel: int):
        self.device, self._numel = torch.device(device), numel

    def numel(self) -> int:
        return self._numel


def test_kernel_pays_from_the_threshold_on_cuda_only(monkeypatch):
    monkeypatch.setattr(layers, "KERNEL_MIN_ELEMENTS", 1000)
    assert not kernel_pays(_Sized("cuda", 999)) and kernel_pays(_Sized("cuda", 1000))
    assert kernel_pays(_Sized("cuda", 10), numel=1000) and not kernel_pays(_Sized("cuda", 10 ** 6), numel=999)
    assert kernel_pays(_Sized("cpu", 1)) and kernel_pays(_Sized("meta", 1))  # the PyTorch path / interpreter


@pytest.mark.parametrize("text, expected", [(None, 1 << 27), ("0", 0), ("4096", 4096), (" 12 ", 12)])
def test_kernel_min_elements_from_the_environment(text, expected, monkeypatch):
    if text is None:
        monkeypatch.delenv("TRITONZOO_KERNEL_MIN_ELEMENTS", raising=False)
    else:
        monkeypatch.setenv("TRITONZOO_KERNEL_MIN_ELEMENTS", text)
    assert layers._kernel_min_elements() == expected


@pytest.mark.parametrize("text", ["-1", "1e6", "1.5", "", "many", "\u00b2"])
def test_bad_kernel_min_elements_is_refused(text, monkeypatch):
    monkeypatch.setenv("TRITONZOO_KERNEL_MIN_ELEMENTS", text)
    with pytest.raises(ValueError, match=r"TRITONZOO_KERNEL_MIN_ELEMENTS must be an integer >= 0 .*got '"):
        layers._kernel_min_elements()


@pytest.mark.gpu
def test_cuda_takes_torchs_ops_below_the_threshold_under_autocast(monkeypatch):
    """On CUDA under bf16 autocast: below KERNEL_MIN_ELEMENTS the norms and the GELU run torch's
    ops (no kernel call), from it up the kernels, with the same outputs, gradients and dtypes
    (torch's layer_norm returns float32 under autocast; the zoo's norms return x's dtype)."""
    ours, _ = _pair("vit_digits", depth=2)
    model = ours.cuda()
    images = torch.randn(4, 1, 8, 8, device="cuda")
    calls = _count_kernel_calls(monkeypatch)
    results, counts = [], []
    for threshold in (1 << 40, 0):
        monkeypatch.setattr(layers, "KERNEL_MIN_ELEMENTS", threshold)
        calls.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images)
        grads = torch.autograd.grad(logits.float().square().sum(), list(model.parameters()), allow_unused=True)
        results.append((logits, grads))
        counts.append(sum(calls.values()))
        for norm in (LayerNorm(64), RMSNorm(64)):
            norm = norm.cuda().bfloat16()
            x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = norm(x)
            assert y.dtype == torch.bfloat16
            reference = F.layer_norm if isinstance(norm, LayerNorm) else F.rms_norm
            args = (norm.weight.double(), norm.bias.double()) if isinstance(norm, LayerNorm) else \
                (norm.weight.double(), norm.eps)
            torch.testing.assert_close(y.double(), reference(x.double(), (64,), *args), rtol=2e-2, atol=2e-2)
    assert counts[0] == 0 and counts[1] > 0
    (logits, grads), (kernel_logits, kernel_grads) = results
    assert logits.dtype == kernel_logits.dtype
    torch.testing.assert_close(logits.float(), kernel_logits.float(), rtol=2e-2, atol=2e-2)
    for g, ref in zip(grads, kernel_grads):
        assert (g is None) == (ref is None)
        if g is not None:
            torch.testing.assert_close(g, ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


def test_left_padded_generation_matches_torch_ops():
    """KV-cache decoding with per-row positions (left padding) and positions continuing
    from the cache offset: rotary tables built per step."""
    ours, torch_ops = _pair("gpt_nano", depth=2, dim=64, **GPT_MODERN)
    ids, mask, _ = _left_padded(3, 7, 256)
    mask[2, :5] = False  # generate counts positions from the mask
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(out, torch_ops.generate(ids, attention_mask=mask, max_new_tokens=8))
    assert torch.equal(ours.generate(ids[:1], max_new_tokens=5), torch_ops.generate(ids[:1], max_new_tokens=5))


def test_seq2seq_beam_search_matches_torch_ops():
    ours, torch_ops = _pair("seq2seq_tiny", dim=32, heads=2, src_vocab_size=16, tgt_vocab_size=16, mlp="swiglu",
                            norm="rmsnorm")
    src = torch.randint(3, 16, (2, 6))
    assert torch.equal(ours.generate(src, max_new_tokens=6, num_beams=3),
                       torch_ops.generate(src, max_new_tokens=6, num_beams=3))


def test_modules_and_parameter_names():
    ours, torch_ops = _pair("bert_tiny", dim=32, heads=2, vocab_size=50, norm_bias=False)
    norms = [m for m in ours.modules() if isinstance(m, LayerNorm)]
    assert norms and all(isinstance(m, torch.nn.LayerNorm) and m.bias is None and m.kernel_ops for m in norms)
    assert not any(m.kernel_ops for m in torch_ops.modules() if isinstance(m, LayerNorm))
    assert ours.cfg.backbone.kernel_ops and not torch_ops.cfg.backbone.kernel_ops
    with pytest.raises(ValueError, match="kernel_ops must be a bool"):
        zoo.TransformerConfig(kernel_ops="yes")


@pytest.mark.parametrize("kwargs", [dict(), dict(bias=False), dict(elementwise_affine=False)])
def test_layer_norm_matches_nn_layer_norm(kwargs):
    ours, ref = LayerNorm(24, eps=1e-6, **kwargs), torch.nn.LayerNorm(24, eps=1e-6, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    gx, = torch.autograd.grad(ours(x).square().sum(), x)
    rx, = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_ops", [True, False])
@pytest.mark.parametrize("reduction, smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_token_cross_entropy_is_torchs(kernel_ops, reduction, smoothing):
    logits = torch.randn(9, 13, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 13, (9,))
    labels[[1, 4]] = -100
    loss = token_cross_entropy(logits, labels, kernel_ops, label_smoothing=smoothing, reduction=reduction)
    ref = F.cross_entropy(logits.detach().double(), labels, label_smoothing=smoothing, reduction=reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_rotary_tables_rotate_as_cos_sin():
    """Rotary.rope's kernel tables (per-row and shared positions, partial rotary) against
    the rotate-half formula on Rotary.cos_sin; float64 input takes the torch fallback."""
    ours, torch_ops = Rotary(6, 500.0), Rotary(6, 500.0, kernel_ops=False)
    x = torch.randn(2, 5, 3, 8)
    positions = torch.tensor([[0, 0, 0, 1, 2], [7, 8, 9, 10, 11]])
    expected = apply_rotary(x, *torch_ops.cos_sin(positions))
    torch.testing.assert_close(apply_rotary(x, *ours.rope(positions)), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(x.double(), *ours.rope(positions)), expected.double(), rtol=0, atol=1e-6)
    shared = torch.arange(4, 9)
    expected = apply_rotary(x, *torch_ops.cos_sin(shared.expand(2, 5)))
    torch.testing.assert_close(apply_rotary(x, *ours.rope(shared)), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(x, *torch_ops.rope(shared)), expected, rtol=0, atol=0)


def test_float64_model_falls_back_to_torch_ops():
    ours, torch_ops = _pair("gpt_nano", depth=1, dim=32, heads=2, attn_backend="eager", **GPT_MODERN)
    ids, mask, positions = _left_padded(2, 6, 256)
    out = ours.double()(ids, attention_mask=mask, position_ids=positions)
    ref = torch_ops.double()(ids, attention_mask=mask, position_ids=positions)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["rotary_swiglu_rmsnorm", "gelu_layernorm"])
def test_kernel_ops_through_the_interpreter(variant, device, monkeypatch):
    """The Triton kernels themselves (the interpreter on CPU), forward and backward, against
    torch's ops. Attention is eager in both, so only the ops under test differ."""
    overrides = dict(GPT_MODERN) if variant == "rotary_swiglu_rmsnorm" else dict(mlp="gelu_tanh", norm_bias=False)
    ours, torch_ops = _pair("gpt_nano", depth=1, dim=32, heads=2, vocab_size=64, attn_backend="eager", **overrides)
    assert device == "cuda" or kernels.INTERPRET  # Triton runs, not the ops' PyTorch paths
    monkeypatch.setattr(layers, "KERNEL_MIN_ELEMENTS", 0)  # on CUDA, not torch's ops at these sizes
    ours, torch_ops = ours.to(device), torch_ops.to(device)
    ids, mask, positions = _left_padded(2, 7, 64, pad=2)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    labels = ids.masked_fill(~mask, -100)
    results = []
    for model in (ours, torch_ops):
        logits, loss = model(ids, attention_mask=mask, position_ids=positions, labels=labels)
        results.append((logits, loss, torch.autograd.grad(loss, list(model.parameters()))))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (n, _), g, ref in zip(ours.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("padded", [False, True])
def test_compile_fullgraph_with_kernel_ops(padded):
    """torch.compile(fullgraph=True) traces the kernel ops (their PyTorch path on CPU) without
    graph breaks, forward and backward, and computes what the uncompiled model does."""
    torch._dynamo.reset()
    model, _ = _pair("gpt_nano", depth=1, dim=32, heads=2, vocab_size=64, **GPT_MODERN)
    ids, mask, positions = _left_padded(2, 9, 64)
    kwargs = dict(attention_mask=mask, position_ids=positions, labels=ids.masked_fill(~mask, -100)) if padded else \
        dict(labels=ids)
    with kernels.reference_only():
        logits, loss = model(ids, **kwargs)
        expected = torch.autograd.grad(loss, list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        c_logits, c_loss = compiled(ids, **kwargs)
        grads = torch.autograd.grad(c_loss, list(model.parameters()))
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
    for g, ref in zip(grads, expected):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)
