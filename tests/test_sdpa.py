"""scaled_dot_product_attention and patch_sdpa against torch's own SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import (disable_sdpa_patch, enable_sdpa_patch, fallback_reason, patch_sdpa,
                     scaled_dot_product_attention, sdpa_stats)
from kernels.sdpa import torch_sdpa

SERVED = "served by the Triton kernel"


def _bhsd(B, H, S, D, device, dtype=torch.float32):
    return torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True)


def _math_sdpa(*args, **kwargs):
    """torch's SDPA on its math backend: the softmax written out. (Its CPU flash kernel, which
    also takes float64, rebuilds the weights from a log-sum-exp that a row of one huge mask
    value swamps: wrong gradients there, as ours had.)"""
    with sdpa_kernel(SDPBackend.MATH):
        return torch_sdpa(*args, **kwargs)


def _compare_with_torch(query, key, value, **kwargs):
    """Ours on `device` against torch's SDPA (math backend) in float64 on CPU: outputs and gradients."""
    assert fallback_reason(query, key, value, **kwargs) is None
    out = scaled_dot_product_attention(query, key, value, **kwargs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), dout)
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (query, key, value)]
    ref_kwargs = dict(kwargs)
    if isinstance(kwargs.get("attn_mask"), torch.Tensor):
        mask = kwargs["attn_mask"].cpu()
        ref_kwargs["attn_mask"] = mask if mask.dtype == torch.bool else mask.double()
    ref = _math_sdpa(*ref_in, **ref_kwargs)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.cpu().double())
    assert out.shape == ref.shape
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu().double(), r, rtol=0, atol=2e-5)


@pytest.mark.parametrize("seqlens", [(16, 16), (9, 23), (23, 9)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_causal_is_top_left_as_torch(device, seqlens, is_causal):
    Sq, Sk = seqlens
    _compare_with_torch(_bhsd(2, 2, Sq, 16, device), _bhsd(2, 2, Sk, 16, device), _bhsd(2, 2, Sk, 16, device),
                        is_causal=is_causal)


def test_boolean_key_padding_mask(device):
    B, H, S = 3, 2, 21
    lengths = torch.tensor([21, 7, 0])  # the last row masks every key: torch gives 0, so do we
    mask = (torch.arange(S) < lengths.view(-1, 1)).view(B, 1, 1, S).to(device)
    _compare_with_torch(_bhsd(B, H, S, 16, device), _bhsd(B, H, S, 16, device), _bhsd(B, H, S, 16, device),
                        attn_mask=mask)


def test_left_padding_and_per_head_masks(device):
    B, H, Sq, Sk = 2, 3, 11, 19
    mask = torch.rand(B, H, Sq, Sk, device=device) > 0.3
    _compare_with_torch(_bhsd(B, H, Sq, 16, device), _bhsd(B, H, Sk, 16, device), _bhsd(B, H, Sk, 16, device),
                        attn_mask=mask)


def test_additive_float_mask_broadcast_over_heads(device):
    B, H, Sq, Sk = 2, 2, 13, 17
    bias = torch.randn(B, 1, Sq, Sk, device=device)
    bias[:, :, :, -3:] = float("-inf")
    _compare_with_torch(_bhsd(B, H, Sq, 16, device), _bhsd(B, H, Sk, 16, device), _bhsd(B, H, Sk, 16, device),
                        attn_mask=bias)


def test_two_dim_mask_gqa_and_scale(device):
    B, H, Hk, Sq, Sk = 2, 4, 2, 10, 14
    mask = torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril(diagonal=4)
    _compare_with_torch(_bhsd(B, H, Sq, 16, device), _bhsd(B, Hk, Sk, 16, device), _bhsd(B, Hk, Sk, 16, device),
                        attn_mask=mask, enable_gqa=True, scale=0.2)


def test_fallbacks_return_torchs_result_exactly():
    q = torch.randn(2, 2, 8, 16, dtype=torch.float64)
    assert "dtype torch.float64" in fallback_reason(q, q, q) or "cpu" in fallback_reason(q, q, q)
    assert torch.equal(scaled_dot_product_attention(q, q, q, is_causal=True), torch_sdpa(q, q, q, is_causal=True))
    q3 = torch.randn(2, 8, 16)
    assert "4-D" in fallback_reason(q3, q3, q3)
    assert torch.equal(scaled_dot_product_attention(q3, q3, q3), torch_sdpa(q3, q3, q3))


def test_a_row_masked_with_the_float_minimum_is_uniform_as_torch(device):
    """finfo(float32).min swamps every score of a row equally: torch gives the mean of v. In
    log2 units it would overflow to -inf and the row would read as having no key (zeros)."""
    q, k, v = (_bhsd(1, 2, 5, 8, device) for _ in range(3))
    mask = torch.zeros(1, 1, 5, 5, device=device)
    mask[..., 1, :] = torch.finfo(torch.float32).min
    mask[..., 3, 2:] = torch.finfo(torch.float32).min  # partly masked: exp underflows to 0, as torch's
    _compare_with_torch(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fill", [-1e9, -1e30])
def test_a_row_masked_with_a_huge_constant_has_torchs_gradients(device, fill):
    """-1e9 puts a whole row's scores near -1.44e9 in log2 units, where float32's spacing (128)
    swallows log2(row length): the backward rebuilt weights of ~1 instead of 1/Sk (dq off by 5
    on this shape). The kernels keep that row's log-sum-exp in float64. The oracle is torch's
    math backend in float32: in float64, -1e9 + q.k would keep q.k (weights not uniform)."""
    q, k, v = _bhsd(1, 2, 4, 8, device), _bhsd(1, 2, 8, 8, device), _bhsd(1, 2, 8, 8, device)
    mask = torch.zeros(4, 8, device=device)
    mask[1] = fill
    mask[2, 3:] = fill
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    ref = _math_sdpa(*ref_in, attn_mask=mask.cpu())
    ref_grads = torch.autograd.grad(ref, ref_in, dout.cpu())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.cpu(), r, rtol=0, atol=2e-5)


@pytest.mark.parametrize("fill", [1e20, 1e30, 3e38])
def test_a_huge_positive_mask_entry_has_torchs_results(device, fill):
    """A row with one key raised by a huge positive mask value attends to that key alone, as
    torch: outputs and gradients. Before scores were clamped at +2^31, +1e30 gave inf and NaN
    gradients (the float64 log-sum-exp's round trip through natural-log units, x LN2 then
    x LOG2E, is off by ~1e14 at 1e30 in log2 units) and 3e38 a NaN output."""
    q, k, v = _bhsd(1, 2, 4, 8, device), _bhsd(1, 2, 8, 8, device), _bhsd(1, 2, 8, 8, device)
    mask = torch.zeros(4, 8, device=device)
    mask[0, 2] = mask[2, 7] = mask[3, 0] = fill  # row 1: no big entry
    _compare_with_torch(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_top_scores_above_2_31_are_averaged(device, path):
    """The documented difference from torch (docs/reuse.md): finite scores are clamped to
    [-2^31, 2^31], so a row whose top scores all lie above 2^31 averages their values (torch,
    in float32, attends to the largest alone). Oracle: the mean of those rows of v, by hand."""
    from kernels import reference_only
    from kernels.flash_attn_interface import run_attention

    q, k, v = (torch.randn(1, 1, 3, 8, device=device) for _ in range(3))
    mask = torch.zeros(3, 3, device=device)
    mask[0, 1], mask[0, 2] = 1e30, 2e30
    if path == "kernel":
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:  # the op's PyTorch path (scaled_dot_product_attention hands CPU tensors to torch's own)
        with reference_only():
            out, _, _ = run_attention(*(x.transpose(1, 2) for x in (q, k, v)), max_seqlen_q=3, max_seqlen_k=3,
                                      softmax_scale=8 ** -0.5, bias=mask.expand(1, 1, 3, 3), window_right=-1,
                                      bottom_right=False)
        out = out.transpose(1, 2)
    torch.testing.assert_close(out[0, 0, 0], (v[0, 0, 1] + v[0, 0, 2]) / 2, rtol=0, atol=1e-6)
    expected_rest = _math_sdpa(q.double(), k.double(), v.double(), attn_mask=mask.double())[0, 0, 1:]
    torch.testing.assert_close(out[0, 0, 1:].double(), expected_rest, rtol=0, atol=2e-6)


def test_huge_mask_rows_on_the_pytorch_path_too():
    """The PyTorch path of the same op (kernels.reference_only) keeps the same float64 log-sum-exp."""
    from kernels import reference_only
    from kernels.flash_attn_interface import run_attention

    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    mask = torch.zeros(1, 2, 4, 4)
    mask[..., 1, :] = -1e9
    with reference_only():
        out, lse, _ = run_attention(q, k, v, max_seqlen_q=4, max_seqlen_k=4, softmax_scale=8 ** -0.5, bias=mask,
                                    window_right=-1, bottom_right=False)
    assert lse.dtype == torch.float64
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_in = [x.detach().double().transpose(1, 2).requires_grad_() for x in (q, k, v)]
    ref = _math_sdpa(*ref_in, attn_mask=mask.double() - 1e30 * (mask != 0))  # float64 keeps q.k beside -1e9
    ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), rtol=0, atol=2e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.transpose(1, 2), rtol=0, atol=2e-6)


def test_fallback_reasons(device):
    q = torch.randn(2, 2, 8, 16, device=device)
    mask = torch.zeros(2, 1, 8, 8, device=device, requires_grad=True)
    assert fallback_reason(q, q, q, attn_mask=mask) == "attn_mask requires grad"
    assert "is_causal" in fallback_reason(q, q, q, attn_mask=mask.detach(), is_causal=True)
    k = torch.randn(2, 1, 8, 16, device=device)
    assert "enable_gqa" in fallback_reason(q, k, k)
    assert fallback_reason(q, k, k, enable_gqa=True) is None
    v = torch.randn(2, 2, 8, 24, device=device)
    assert "head dim" in fallback_reason(q, q, v)
    # torch rejects masks of fewer than 2 dims (IndexError); so do we, by running torch.
    assert fallback_reason(q, q, q, attn_mask=torch.ones(8, dtype=torch.bool, device=device)) == \
        "attn_mask of 1 dims (torch needs at least 2)"
    # Whatever torch does with a mask and is_causal together, we do the same.
    both = dict(attn_mask=mask.detach() > 0, is_causal=True)
    try:
        expected = torch_sdpa(q, q, q, **both)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=str(e)[:30]):
            scaled_dot_product_attention(q, q, q, **both)
    else:
        assert torch.equal(scaled_dot_product_attention(q, q, q, **both), expected)


def test_torch_func_transforms_fall_back_to_torchs_function(device):
    """vmap and grad wrap their inputs (functorch tensors): the op has no batching rule and its
    autograd.Function no setup_context, so the call goes to torch's function, which has both.
    Oracle: torch's own function under the same transform."""
    q, k, v = (torch.randn(3, 2, 5, 8, device=device) for _ in range(3))
    per_sample = torch.vmap(lambda q, k, v: scaled_dot_product_attention(q[None], k[None], v[None])[0])
    torch.testing.assert_close(per_sample(q, k, v), torch_sdpa(q, k, v))
    grad = torch.func.grad(lambda q: scaled_dot_product_attention(q, k, v, is_causal=True).square().sum())(q)
    want = torch.func.grad(lambda q: torch_sdpa(q, k, v, is_causal=True).square().sum())(q)
    torch.testing.assert_close(grad, want)


def test_autocast_casts_before_the_dtype_check_and_is_causal_must_be_a_bool(device):
    """Under autocast torch casts q, k, v and a float mask to its dtype first (rotary models hand
    over float32 q, k and a bf16 v): such calls are served, as torch would compute them in bf16.
    Without autocast, mixed dtypes are named as mixed. A tensor is_causal goes to torch, which
    refuses it."""
    q = torch.randn(1, 2, 6, 8, device=device)
    v = q.bfloat16()
    mask = torch.zeros(1, 1, 6, 6, device=device)
    assert fallback_reason(q, q, v) == "query, key and value dtypes differ: torch.float32/torch.float32/torch.bfloat16"
    with torch.autocast(device, dtype=torch.bfloat16):
        assert fallback_reason(q, q, v, attn_mask=mask) is None
        out = scaled_dot_product_attention(q, q, v, attn_mask=mask)
        want = torch_sdpa(q, q, v, attn_mask=mask)
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=2e-2)
    assert fallback_reason(q, q, q, is_causal=torch.tensor(True)) == "is_causal tensor(True) is not a bool"


def test_dropout_is_served_and_reproducible(device):
    q = torch.randn(1, 2, 12, 16, device=device)
    torch.manual_seed(3)
    a = scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(3)
    b = scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, scaled_dot_product_attention(q, q, q))


def test_patch_is_scoped_and_nests():
    assert F.scaled_dot_product_attention is torch_sdpa
    with patch_sdpa():
        assert F.scaled_dot_product_attention is scaled_dot_product_attention
        with patch_sdpa():
            pass
        assert F.scaled_dot_product_attention is scaled_dot_product_attention
    assert F.scaled_dot_product_attention is torch_sdpa


def test_no_heads_neither_kills_the_process_nor_passes(device):
    """torch 2.11's own CPU SDPA dies of SIGFPE on a zero head count; ours returns the empty
    result of torch's math path for no query heads, and refuses keys without heads."""
    empty = torch.randn(2, 0, 5, 8, device=device, requires_grad=True)
    out = scaled_dot_product_attention(empty, empty, empty)
    expected = torch.ops.aten._scaled_dot_product_attention_math(empty, empty, empty)[0]
    assert out.shape == expected.shape == (2, 0, 5, 8)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    with pytest.raises(ValueError, match="key has 0 heads but query has 2"):
        scaled_dot_product_attention(torch.randn(2, 2, 5, 8, device=device), empty, empty, enable_gqa=True)


def test_patch_ends_with_its_last_holder_and_restores_what_was_there():
    """Blocks that end out of order (a Lightning stage and a module's forward hooks) keep the
    patch until the last one ends; then the function in place before comes back, another
    library's patch included; and one patched in on top of ours is left to its owner."""
    first, second = patch_sdpa(), patch_sdpa()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert F.scaled_dot_product_attention is scaled_dot_product_attention
    second.__exit__(None, None, None)
    assert F.scaled_dot_product_attention is torch_sdpa

    def other_library(*args, **kwargs):
        return torch_sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = other_library
    try:
        enable_sdpa_patch()
        with patch_sdpa():
            disable_sdpa_patch()
            assert F.scaled_dot_product_attention is scaled_dot_product_attention  # the block still holds it
        assert F.scaled_dot_product_attention is other_library
        def on_top(*args, **kwargs):
            return scaled_dot_product_attention(*args, **kwargs)

        with patch_sdpa():
            F.scaled_dot_product_attention = on_top
        assert F.scaled_dot_product_attention is on_top
    finally:
        F.scaled_dot_product_attention = torch_sdpa


def _outputs_and_grads(model, inputs, loss_fn):
    model.zero_grad()
    out = model(**inputs)
    loss_fn(out).backward()
    return loss_fn(out).detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_with_and_without_patch(model, inputs, loss_fn):
    plain_loss, plain_grads = _outputs_and_grads(model, inputs, loss_fn)
    sdpa_stats(reset=True)
    with patch_sdpa():
        patched_loss, patched_grads = _outputs_and_grads(model, inputs, loss_fn)
    stats = sdpa_stats(reset=True)
    assert stats.get(SERVED, 0) > 0 and set(stats) == {SERVED}, stats
    torch.testing.assert_close(patched_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == patched_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(patched_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_patch_timm_vit(device):
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10).to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    _assert_same_with_and_without_patch(model, {"x": images}, lambda logits: logits.logsumexp(-1).sum())


def test_patch_hugging_face_bert_with_padding(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa",
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config).to(device)
    ids = torch.randint(0, 99, (3, 19), device=device)
    attention_mask = torch.ones(3, 19, dtype=torch.long, device=device)
    attention_mask[1, 11:] = 0
    attention_mask[2, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": attention_mask}
    _assert_same_with_and_without_patch(model, inputs, lambda out: (out.last_hidden_state ** 2).mean())
