"""Cached generation through the decoding kernel: the zoo's KV cache and kernels.flash_attn_with_kvcache.

On the "triton" backend a decoding step appends to the cache and attends in one call of
kernels.flash_attn_with_kvcache; the oracle is the "eager" backend (softmax(QK^T)V written
out) over the whole sequence with a key-padding mask, and Hugging Face's GPT-2 where a
model is imported from it.
"""

from __future__ import annotations

import pytest
import torch

import kernels
import zoo
from zoo import KVCache

VARIANTS = {
    "learned": dict(),
    "rotary_gqa_qknorm": dict(positions="rotary", kv_heads=2, rotary_dim=4, qk_norm=True, norm="rmsnorm",
                              mlp="swiglu"),
    "alibi_mqa": dict(positions="alibi", kv_heads=1),
}


def _gpt(dtype=torch.float32, **kw) -> zoo.GPT:
    torch.manual_seed(0)
    model = zoo.create_model("gpt_nano", dim=32, depth=2, heads=4, max_seq_len=64, vocab_size=61, **kw)
    with torch.no_grad():  # unit-scale weights: every layer matters and next-token logits are far apart
        for name, p in model.named_parameters():
            if p.dim() > 1 and "pos" not in name:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model.to(dtype).eval()


def _prompts(lengths, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), P), generator=g)
    mask = (torch.arange(P) >= P - torch.tensor(lengths)[:, None]).long()
    return ids, mask


class _Spy:
    """Counts the calls of kernels.flash_attn_with_kvcache made through the zoo."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.rotary = []  # per call: whether the kernel applied the rotary itself
        real = kernels.flash_attn_with_kvcache

        def spy(q, k_cache, v_cache, k=None, v=None, **kw):
            self.calls.append((tuple(q.shape), k_cache.data_ptr(), kw.get("cache_leftpad")))
            self.rotary.append(kw.get("rotary_cos") is not None)
            return real(q, k_cache, v_cache, k, v, **kw)

        monkeypatch.setattr(kernels, "flash_attn_with_kvcache", spy)


@pytest.mark.usefixtures("reference_attention")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_steps_through_the_kernel_equal_the_eager_full_pass(variant, monkeypatch):
    model = _gpt(**VARIANTS[variant])
    ids, mask = _prompts([7, 3, 5])
    new = torch.randint(1, 61, (3, 4))
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    full_pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    model.set_attn_backend("eager")
    with torch.no_grad():
        expected = model(full_ids, attention_mask=full_mask, position_ids=full_pos)
    model.set_attn_backend("triton")
    spy = _Spy(monkeypatch)
    P = ids.shape[1]
    with torch.no_grad():
        cache = model.new_cache(capacity=P + 4, leftpad=P - mask.sum(1))
        got = [model(ids, cache=cache)]
        assert not spy.calls  # the prefill runs the flash-attention forward
        for t in range(new.shape[1]):
            got.append(model(new[:, t:t + 1], cache=cache))
    got = torch.cat(got, dim=1)
    assert len(spy.calls) == model.cfg.backbone.depth * new.shape[1]
    # rotary models: the kernel turns q and the new keys (FA2's rotary_cos/sin), not the model
    assert set(spy.rotary) == {model.cfg.backbone.positions == "rotary"}
    real = full_mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=2e-5)
    assert cache.offset == P + 4
    # the buffers were allocated once, at the capacity asked for
    assert cache.layers[0].k.shape[1] == P + 4
    assert len({ptr for _, ptr, _ in spy.calls[::2]}) == 1


@pytest.mark.usefixtures("reference_attention")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pieces", [(1,) * 9, (4, 5), (2, 6, 1)])
def test_a_left_padded_prompt_fed_in_pieces_equals_the_full_pass(variant, pieces, monkeypatch):
    """A user's own loop may feed a left-padded prompt a token or a chunk at a time: while some
    row's padding goes on past the cache, a step attends on the torch path (the decoding
    kernel takes real new keys only), then through the kernel. Oracle: the eager full pass."""
    model = _gpt(**VARIANTS[variant])
    ids, mask = _prompts([9, 2, 5])  # left padding 0, 7 and 4
    model.set_attn_backend("eager")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
    model.set_attn_backend("triton")
    spy = _Spy(monkeypatch)
    got, start = [], 0
    with torch.no_grad():
        cache = model.new_cache(leftpad=ids.shape[1] - mask.sum(1))
        for size in pieces:
            got.append(model(ids[:, start:start + size], cache=cache))
            start += size
    real = mask.bool()
    torch.testing.assert_close(torch.cat(got, dim=1)[real], expected[real], rtol=0, atol=2e-5)
    # the kernel takes the steps that begin once every row's padding is in the cache (slot 7 on)
    kernel_steps = sum(1 for i in range(len(pieces)) if sum(pieces[:i]) >= 7)
    assert len(spy.calls) == model.cfg.backbone.depth * kernel_steps


@pytest.mark.usefixtures("reference_attention")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_on_the_triton_backend_equals_eager(variant, monkeypatch):
    model = _gpt(**VARIANTS[variant])
    ids, mask = _prompts([9, 2, 6])
    model.set_attn_backend("eager")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    model.set_attn_backend("triton")
    spy = _Spy(monkeypatch)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got, expected)
    assert len(set(got[:, 9:].flatten().tolist())) > 3  # not a constant continuation
    assert len(spy.calls) == model.cfg.backbone.depth * 9  # every step after the prefill
    shape, _, leftpad = spy.calls[0]
    assert shape == (3, 1, 4, 8) and leftpad.tolist() == [0, 7, 3]


def test_generate_through_the_interpreted_decoding_kernel():
    # The Triton kernels themselves (interpreter on CPU, the GPU with CUDA) on a tiny GQA model.
    model = _gpt(**VARIANTS["rotary_gqa_qknorm"])
    ids, mask = _prompts([5, 2])
    model.set_attn_backend("eager")
    with kernels.reference_only():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=3)
    model.set_attn_backend("triton")
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3), expected)


@pytest.mark.parametrize("positions", ["alibi", "rotary"])
def test_half_precision_models_keep_float32_position_buffers(positions):
    """model.to(bfloat16) casts buffers; ALiBi slopes and rotary frequencies stay float32 (the kernels
    take float32 slopes, and bf16 frequencies turn long positions by a visible angle)."""
    from zoo.layers import alibi_slopes

    torch.manual_seed(0)  # 6 heads: slopes that bf16 rounds
    model = zoo.create_model("gpt_nano", dim=48, depth=2, heads=6, max_seq_len=64, vocab_size=61,
                             positions=positions).eval()
    reference = model.backbone.alibi_slopes if positions == "alibi" else model.backbone.rotary.inv_freq
    reference = reference.clone()
    model = model.to(torch.bfloat16)
    kept = model.backbone.alibi_slopes if positions == "alibi" else model.backbone.rotary.inv_freq
    assert kept.dtype == torch.float32 and torch.equal(kept, reference)
    if positions == "alibi":
        assert torch.equal(kept, alibi_slopes(6))
    ids, mask = _prompts([5, 3])
    out = {}
    for backend in ("triton", "sdpa"):
        model.set_attn_backend(backend)
        with torch.no_grad():
            out[backend] = model(ids, attention_mask=mask).float()
    real = mask.bool()
    torch.testing.assert_close(out["triton"][real], out["sdpa"][real], rtol=0.02, atol=0.05)  # bf16 rounding apart


@pytest.mark.usefixtures("reference_attention")
def test_gradients_flow_through_cached_steps(monkeypatch):
    """The decoding kernel has no backward: a cached step that needs gradients appends and attends apart."""
    model = _gpt(**VARIANTS["rotary_gqa_qknorm"]).train()
    ids = torch.randint(1, 61, (2, 7))
    grads = {}
    for backend in ("eager", "triton"):
        model.set_attn_backend(backend)
        model.zero_grad()
        spy = _Spy(monkeypatch)
        cache = model.new_cache()
        logits = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:6], cache=cache),
                            model(ids[:, 6:], cache=cache)], dim=1)
        logits.square().mean().backward()
        assert spy.calls == []
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["triton"], grads["eager"], rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("reference_attention")
def test_non_causal_steps_of_several_tokens_turn_each_token_by_its_position(monkeypatch):
    """Without a causal mask the kernel turns every query of a step by one position (FA2's
    rule); a bidirectional backbone stepping several tokens at once turns them itself."""
    from zoo.backbone import Transformer
    from zoo.config import TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=24, depth=1, heads=4, causal=False, positions="rotary",
                                          max_seq_len=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(30)  # scores of order 1: the positions show in the output
    x = torch.randn(2, 8, 24)
    out = {}
    for backend in ("eager", "triton"):
        model.set_attn_backend(backend)
        spy = _Spy(monkeypatch)
        with torch.no_grad():
            cache = model.new_cache()
            out[backend] = torch.cat([model(x[:, :4], cache=cache), model(x[:, 4:7], cache=cache),
                                      model(x[:, 7:], cache=cache)], dim=1)
    assert spy.rotary == [False, True]  # the 3-token step turned by the model, the 1-token step by the kernel
    torch.testing.assert_close(out["triton"], out["eager"], rtol=1e-5, atol=1e-4)  # outputs of size ~20


@pytest.mark.usefixtures("reference_attention")
def test_explicit_positions_are_rotated_by_the_model_not_the_kernel(monkeypatch):
    # The kernel counts positions from the cache; explicit ones may differ (here: a gap of 5).
    model = _gpt(**VARIANTS["rotary_gqa_qknorm"])
    ids = torch.randint(1, 61, (2, 6))
    positions = torch.arange(7).expand(2, 7) + torch.tensor([0, 0, 0, 5, 5, 5, 5])
    model.set_attn_backend("eager")
    with torch.no_grad():
        expected = model(torch.cat([ids, ids[:, :1]], 1), position_ids=positions)[:, -1]
    model.set_attn_backend("triton")
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, position_ids=positions[:, :6], cache=cache)
        got = model(ids[:, :1], position_ids=positions[:, 6:], cache=cache)[:, -1]
    assert spy.rotary == [False, False]  # one step, two layers: the model rotated
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.usefixtures("reference_attention")
def test_attention_dropout_falls_back_to_the_torch_path(monkeypatch):
    spy = _Spy(monkeypatch)
    ids, mask = _prompts([6, 4])
    model = _gpt(attn_dropout=0.5).train()
    model.set_attn_backend("triton")
    assert model.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (2, 9)
    assert not spy.calls  # dropout in the attention: the kernel has none
    model.eval()
    model.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert len(spy.calls) == 2 * 2


@pytest.mark.usefixtures("reference_attention")
def test_seq2seq_greedy_and_beam_search_on_the_triton_backend(monkeypatch):
    torch.manual_seed(0)
    model = zoo.create_model("seq2seq_tiny", dim=32, depth=2, src_vocab_size=17, tgt_vocab_size=17).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5)
    src = torch.randint(3, 17, (3, 7))
    src[1, 5:] = model.cfg.pad_id
    results = {}
    spy = _Spy(monkeypatch)
    for backend in ("eager", "triton"):
        model.set_attn_backend(backend)
        results[backend] = [model.generate(src, max_new_tokens=8, num_beams=n) for n in (1, 3)]
    for a, b in zip(results["eager"], results["triton"]):
        assert torch.equal(a, b)
    assert spy.calls  # the decoder's self-attention steps ran through the kernel


def test_cache_growth_keeps_keys_and_errors_name_the_problem():
    cache = KVCache(depth=1)
    layer = cache.layers[0]
    chunks = [torch.randn(2, n, 1, 4) for n in (10, 9, 20)]
    for chunk in chunks:
        layer.append(chunk, -chunk)
        cache.offset += chunk.shape[1]
    everything = torch.cat(chunks, dim=1)
    assert layer.k.shape[1] >= 39 and torch.equal(layer.k[:, :39], everything)
    assert torch.equal(layer.v[:, :39], -everything)
    with pytest.raises(ValueError, match="do not fit"):
        layer.append(torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))  # another batch size
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        KVCache(depth=1, capacity=-1)
    with pytest.raises(TypeError, match="leftpad must be a 1-D integer tensor"):
        KVCache(depth=1, leftpad=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="leftpad must be >= 0"):
        KVCache(depth=1, leftpad=torch.tensor([0, -1]))
    model = _gpt()
    with pytest.raises(ValueError, match="leftpad covers 3 rows but the input has 2"):
        model(torch.ones(2, 4, dtype=torch.long), cache=model.new_cache(leftpad=torch.zeros(3, dtype=torch.long)))


def test_cache_reorder_carries_the_left_padding():
    cache = KVCache(depth=1, leftpad=torch.tensor([0, 3, 5]))
    cache.offset = 6
    cache.reorder(torch.tensor([2, 2, 1]))
    assert cache.leftpad.tolist() == [5, 5, 3] and cache.min_leftpad == 3
    assert cache.positions(2, "cpu").tolist() == [[1, 2], [1, 2], [3, 4]]
    assert cache.key_mask(7, "cpu").sum(1).tolist() == [2, 2, 4]


@pytest.mark.usefixtures("reference_attention")
def test_generate_rejects_prompts_that_are_not_left_padded():
    model = _gpt()
    ids, mask = _prompts([5, 3])
    holes = mask.clone()
    holes[0, 1] = 0  # a hole inside the prompt: not left padding
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(ids, attention_mask=holes, max_new_tokens=2)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="at least one prompt token"):
        model.generate(ids, attention_mask=empty, max_new_tokens=2)
    # A batch of no prompts (a loader's empty remainder) gives no rows, with a mask or without.
    for kw in ({}, {"attention_mask": mask[:0]}):
        assert model.generate(ids[:0], max_new_tokens=2, **kw).shape == (0, ids.shape[1] + 2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_cached_decoding_on_gpu_matches_the_fp32_full_pass(variant):
    model = _gpt(**VARIANTS[variant]).cuda()
    ids, mask = _prompts([20, 7, 13])
    new = torch.randint(1, 61, (3, 6))
    full_ids = torch.cat([ids, new], dim=1).cuda()
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1).cuda()
    full_pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    model.set_attn_backend("eager")
    with torch.no_grad():
        ref32 = model(full_ids, attention_mask=full_mask, position_ids=full_pos).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref16 = model(full_ids, attention_mask=full_mask, position_ids=full_pos).float()
    model.set_attn_backend("triton")
    P = ids.shape[1]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = model.new_cache(capacity=P + 6, leftpad=(P - mask.sum(1)).cuda())
        got = [model(full_ids[:, :P], cache=cache)]
        for t in range(6):
            got.append(model(full_ids[:, P + t:P + t + 1], cache=cache))
    got = torch.cat(got, dim=1).float()
    real = full_mask.bool()
    err = (got[real] - ref32[real]).abs().max().item()
    err_ref = (ref16[real] - ref32[real]).abs().max().item()
    assert err <= 2 * err_ref + 1e-3, f"bf16 error {err:.3g} > 2 x eager bf16's {err_ref:.3g}"
