"""flash_attn_with_kvcache against a float64 oracle written out per batch row.

Each case runs on the Triton kernels (the interpreter on CPU, the GPU when there is one)
and on the PyTorch path (`reference_only`). The oracle slices each row's keys out of the
cache by hand (pages, cache rows, left padding), appends and rotates in float64
(complex multiplication for interleaved rotary, rotate-half otherwise) and calls the
float64 attention of tests/attention_oracle.py. Sizes are tiny for the interpreter;
the gpu-marked tests at the end repeat the checks at real sizes in bf16/fp16.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import attention_oracle as oracle
from kernels import reference_only
from kernels.decoding import choose_num_splits
from kernels.decoding_interface import flash_attn_with_kvcache


@pytest.fixture(params=["triton", "reference"])
def backend(request, device):
    """(device, context): the Triton kernels on `device`, or the PyTorch path on CPU."""
    if request.param == "triton":
        return device, contextlib.nullcontext
    return "cpu", reference_only


def rope64(x, cos, sin, positions, interleaved):
    """x (S, heads, D) float64 turned by the angles at positions (S,), written independently of the kernels."""
    rd = 2 * cos.shape[1]
    c, s = cos.double()[positions][:, None, :], sin.double()[positions][:, None, :]
    x = x.clone()
    if interleaved:
        pairs = torch.view_as_complex(x[..., :rd].reshape(*x.shape[:2], rd // 2, 2).contiguous())
        x[..., :rd] = torch.view_as_real(pairs * torch.complex(c, s)).flatten(-2)
    else:
        half = x[..., :rd]
        rotated_half = torch.cat([-half[..., rd // 2:], half[..., : rd // 2]], dim=-1)
        x[..., :rd] = half * torch.cat([c, c], -1) + rotated_half * torch.cat([s, s], -1)
    return x


def kvcache_oracle(q, k_cache, v_cache, k, v, lens, *, batch_idx=None, leftpad=None, block_table=None, cos=None,
                   sin=None, interleaved=True, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None,
                   rotary_from_leftpad=False):
    """(out (B, Sq, H, D) f64, lse (B, H, Sq) f64, k_cache and v_cache as they must be after the call).

    Rotary positions are FA2's absolute slots (end + t), or counted from the row's left
    padding (n + t) with rotary_from_leftpad."""
    q, k_cache, v_cache = q.cpu(), k_cache.cpu().clone(), v_cache.cpu().clone()
    block_table = block_table.cpu().long() if block_table is not None else None
    dtype = q.dtype
    B, Sq = q.shape[:2]
    snew = k.shape[1] if k is not None else 0
    page = k_cache.shape[1]
    outs, lses = [], []
    for b in range(B):
        end, start = int(lens[b]), int(leftpad[b]) if leftpad is not None else 0
        n = end - start
        first = n if rotary_from_leftpad else end  # the rotary position of the first new token
        row = int(batch_idx[b]) if batch_idx is not None else b

        def slot(pos):
            return (int(block_table[b, pos // page]), pos % page) if block_table is not None else (row, pos)

        if snew:
            kb = k[b].cpu().double()
            if cos is not None:
                kb = rope64(kb, cos.cpu(), sin.cpu(), torch.arange(first, first + snew), interleaved)
            for t in range(snew):
                k_cache[slot(end + t)] = kb[t].to(dtype)
                v_cache[slot(end + t)] = v[b, t].cpu()
        pos = torch.arange(start, end + snew)
        where = (block_table[b, pos // page], pos % page) if block_table is not None else (row, pos)
        keys, vals = k_cache[where], v_cache[where]
        qb = q[b].double()
        if cos is not None:
            per_token = causal or window != (-1, -1)
            qb = rope64(qb, cos.cpu(), sin.cpu(), first + torch.arange(Sq) * int(per_token), interleaved).to(dtype)
        slopes = None if alibi is None else alibi.cpu() if alibi.dim() == 1 else alibi[b].cpu()
        o, lse = oracle.attention(qb[None], keys[None], vals[None], causal=causal, window=window, softcap=softcap,
                                  alibi_slopes=slopes, scale=scale)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses), k_cache, v_cache


def _rand(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


def _check(out, lse, ref_out, ref_lse, atol=1e-5):
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref_out, rtol=0, atol=atol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.isposinf(lse.cpu()[~finite]).all()
    torch.testing.assert_close(lse.cpu().double()[finite], ref_lse[finite], rtol=0, atol=atol)


# flash_attn_with_kvcache's argument -> the oracle's
_ORACLE_NAMES = {"cache_batch_idx": "batch_idx", "cache_leftpad": "leftpad", "block_table": "block_table",
                 "rotary_cos": "cos", "rotary_sin": "sin", "rotary_interleaved": "interleaved", "causal": "causal",
                 "window_size": "window", "softcap": "softcap", "alibi_slopes": "alibi", "softmax_scale": "scale",
                 "rotary_from_leftpad": "rotary_from_leftpad"}


def _run_and_check(q, kc, vc, k, v, lens, atol=1e-5, **kwargs):
    """Runs the op on copies of the caches, with the lse and without (on the CPU's PyTorch path
    the call without it may run torch's SDPA: kernels/decoding_reference.native_forward); checks
    out, lse and both caches (exactly) against the oracle. Returns the first call's (out, lse)."""
    ref_out, ref_lse, ref_kc, ref_vc = kvcache_oracle(
        q, kc, vc, k, v, lens, **{_ORACLE_NAMES[n]: x for n, x in kwargs.items() if n in _ORACLE_NAMES})
    results = []
    for with_lse in (True, False):
        kc_run, vc_run = kc.clone(), vc.clone()
        result = flash_attn_with_kvcache(q, kc_run, vc_run, k, v, cache_seqlens=lens, return_softmax_lse=with_lse,
                                         **kwargs)
        if with_lse:
            _check(*result, ref_out, ref_lse, atol)
        else:
            assert torch.isfinite(result).all()
            torch.testing.assert_close(result.cpu().double(), ref_out, rtol=0, atol=atol)
        results.append(result)
        assert torch.equal(vc_run.cpu(), ref_vc), "v_cache after the append"
        if kwargs.get("rotary_cos") is None:
            assert torch.equal(kc_run.cpu(), ref_kc), "k_cache after the append"
        else:  # fp32 rotation in the kernels, float64 in the oracle: one rounding apart at most
            torch.testing.assert_close(kc_run.cpu(), ref_kc, rtol=0, atol=1e-6)
    return results[0]


# --------------------------------------------------------------------------------------
# Semantics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("snew", [0, 1, 3])
def test_ragged_cache_lengths(backend, snew):
    """Rows of length 0, short, and full (after the append), GQA 2:1, new keys appended in place."""
    device, ctx = backend
    B, cap, H, Hk, D = 3, 37, 4, 2, 16
    q, kc, vc = (_rand(*shape, device=device) for shape in ((B, 1, H, D), (B, cap, Hk, D), (B, cap, Hk, D)))
    k, v = (_rand(B, snew, Hk, D, device=device) for _ in range(2)) if snew else (None, None)
    lens = torch.tensor([0, 11, cap - snew], dtype=torch.int32, device=device)
    with ctx():
        out, lse = _run_and_check(q, kc, vc, k, v, lens, causal=True)
    if snew == 0:  # a row with no key at all gives 0 and lse +inf
        assert (out[0] == 0).all() and torch.isposinf(lse[0]).all()


def test_rows_without_keys(backend):
    """Sq = 3 causal queries over 1 key: the first two see nothing (FA2's bottom-right rule).
    q, k, v are strided views (heads of a fused projection), taken as they are."""
    device, ctx = backend
    q = _rand(2, 3, 4, 16, device=device)[:, :, ::2]
    kc, vc = _rand(2, 8, 1, 16, device=device), _rand(2, 8, 1, 16, device=device)
    k, v = _rand(2, 1, 2, 16, device=device).unbind(2)
    k, v = k.unsqueeze(2), v.unsqueeze(2)
    lens = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with ctx():
        out, lse = _run_and_check(q, kc, vc, k, v, lens, causal=True)
    assert (out[0, :2] == 0).all() and torch.isposinf(lse[0, :, :2]).all()
    assert torch.isfinite(lse[1]).all()


@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "plain"])
@pytest.mark.parametrize("paged", [False, True])
def test_slots_outside_the_keys_may_hold_nan(backend, paged, alibi):
    """FA2's contract: a cache slot before leftpad or past cache_seqlens + the append may hold
    anything (torch.empty does). NaN and inf there must not reach the output (with the lse and
    without: on the CPU's PyTorch path the plain, unpaged call without it runs torch's SDPA)."""
    device, ctx = backend
    B, H, Hk, D = 2, 4, 2, 16
    lens = torch.tensor([7, 12], dtype=torch.int32, device=device)
    kwargs = dict(causal=True)
    if alibi:
        kwargs["alibi_slopes"] = torch.rand(H, device=device)
    if paged:
        kc = torch.full((6, 8, Hk, D), float("nan"), device=device)
        table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32, device=device)
        kwargs["block_table"] = table
        for b in range(B):  # the keys themselves are real numbers
            for pos in range(int(lens[b])):
                kc[table[b, pos // 8], pos % 8] = _rand(Hk, D, device=device)
    else:
        kc = torch.full((B, 24, Hk, D), float("nan"), device=device)
        kc[0, :7], kc[1, 3:12] = _rand(7, Hk, D, device=device), _rand(9, Hk, D, device=device)
        kc[1, :3] = float("inf")
        kwargs["cache_leftpad"] = torch.tensor([0, 3], dtype=torch.int32, device=device)
    vc = kc.clone() * -1
    q, k, v = _rand(B, 2, H, D, device=device), _rand(B, 2, Hk, D, device=device), _rand(B, 2, Hk, D, device=device)
    finite_k, finite_v = torch.nan_to_num(kc, 0.0, 0.0, 0.0), torch.nan_to_num(vc, 0.0, 0.0, 0.0)
    ref_out, ref_lse, _, _ = kvcache_oracle(q, finite_k, finite_v, k, v, lens, causal=True,
                                            alibi=kwargs.get("alibi_slopes"), leftpad=kwargs.get("cache_leftpad"),
                                            block_table=kwargs.get("block_table"))
    with ctx():
        plain = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens, **kwargs)
        out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, return_softmax_lse=True, **kwargs)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(plain).all()
    _check(out, lse, ref_out, ref_lse)
    torch.testing.assert_close(plain.cpu().double(), ref_out, rtol=0, atol=1e-5)


def test_num_splits_give_the_same_result(device):
    """Split-K + combine equals one pass; more splits than key tiles leave some empty; a count
    past FA2's cap of 128 (and past the keys) is capped, not launched as a million programs."""
    B, cap, H, Hk, D = 2, 70, 4, 1, 16
    q, kc, vc = (_rand(*shape, device=device) for shape in ((B, 2, H, D), (B, cap, Hk, D), (B, cap, Hk, D)))
    k, v = _rand(B, 2, Hk, D, device=device), _rand(B, 2, Hk, D, device=device)
    lens = torch.tensor([66, 23], dtype=torch.int32, device=device)
    outs = [_run_and_check(q, kc, vc, k, v, lens, causal=True, num_splits=n) for n in (1, 3, 8, 10 ** 6)]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=0, atol=2e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=0, atol=2e-6)


def test_many_query_rows_and_window(backend):
    """G = 16 heads x Sq = 5 queries = 80 rows: two query blocks, each with its own key range."""
    device, ctx = backend
    B, cap, H, Hk, D = 1, 60, 16, 1, 16
    q, kc, vc = (_rand(*shape, device=device) for shape in ((B, 5, H, D), (B, cap, Hk, D), (B, cap, Hk, D)))
    k, v = _rand(B, 5, Hk, D, device=device), _rand(B, 5, Hk, D, device=device)
    lens = torch.tensor([41], dtype=torch.int32, device=device)
    with ctx():
        _run_and_check(q, kc, vc, k, v, lens, causal=True, window_size=(7, -1), num_splits=2)


def test_chunked_prefill_appends_many_keys(backend):
    """Sq = seqlen_new = 21 (a prompt chunk): the new keys span several tiles and both splits."""
    device, ctx = backend
    B, cap, H, Hk, D = 2, 60, 2, 1, 16
    q, kc, vc = (_rand(*shape, device=device) for shape in ((B, 21, H, D), (B, cap, Hk, D), (B, cap, Hk, D)))
    k, v = _rand(B, 21, Hk, D, device=device), _rand(B, 21, Hk, D, device=device)
    lens = torch.tensor([0, 30], dtype=torch.int32, device=device)
    with ctx():
        _run_and_check(q, kc, vc, k, v, lens, causal=True, num_splits=2)


@pytest.mark.parametrize("page", [8, 32])
def test_paged_cache(backend, page):
    """block_table with shuffled blocks; pages smaller than a key tile; the append crosses a page."""
    device, ctx = backend
    B, H, Hk, D, blocks_per_seq = 2, 2, 1, 16, 64 // page
    num_blocks = B * blocks_per_seq + 3
    kc, vc = _rand(num_blocks, page, Hk, D, device=device), _rand(num_blocks, page, Hk, D, device=device)
    table = torch.randperm(num_blocks)[: B * blocks_per_seq].view(B, blocks_per_seq).int().to(device)
    q, k, v = _rand(B, 1, H, D, device=device), _rand(B, 3, Hk, D, device=device), _rand(B, 3, Hk, D, device=device)
    lens = torch.tensor([page - 1, 45], dtype=torch.int32, device=device)
    with ctx():
        _run_and_check(q, kc, vc, k, v, lens, block_table=table, causal=True, num_splits=2)


@pytest.mark.parametrize("rotary_from_leftpad", [False, True], ids=["fa2_slots", "from_leftpad"])
@pytest.mark.parametrize("causal", [True, False])
def test_cache_batch_idx_and_leftpad(backend, rotary_from_leftpad, causal):
    """Batch rows map to cache rows 3 and 1 (rows 0 and 2 untouched); row 1 is left-padded by 5.
    Head dim 24 (not a power of two) with 16 rotary dims, turned by FA2's absolute slot
    positions (left padding included, as FA2's own test applies rotary at cache_seqlens)
    or by positions counted from the padding."""
    device, ctx = backend
    q, kc, vc = (_rand(*shape, device=device) for shape in ((2, 2, 4, 24), (4, 30, 2, 24), (4, 30, 2, 24)))
    k, v = _rand(2, 2, 2, 24, device=device), _rand(2, 2, 2, 24, device=device)
    idx = torch.tensor([3, 1], dtype=torch.int32, device=device)
    lens = torch.tensor([9, 20], dtype=torch.int32, device=device)
    leftpad = torch.tensor([0, 5], dtype=torch.int32, device=device)
    cos, sin = torch.rand(40, 8, device=device), torch.rand(40, 8, device=device)
    with ctx():
        _run_and_check(q, kc, vc, k, v, lens, cache_batch_idx=idx, cache_leftpad=leftpad, causal=causal,
                       rotary_cos=cos, rotary_sin=sin, alibi_slopes=torch.rand(4, device=device),
                       rotary_from_leftpad=rotary_from_leftpad)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of t as a view whose last dimension has stride 2 (every other element of a wider tensor)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 99, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_strided_index_tensors_and_slopes(backend):
    """cache_seqlens, cache_batch_idx, cache_leftpad, block_table, ALiBi slopes and rotary
    tables given as strided views are read by value (the oracle gets contiguous copies)."""
    device, ctx = backend
    q, kc, vc = (_rand(*shape, device=device) for shape in ((2, 2, 4, 24), (4, 30, 2, 24), (4, 30, 2, 24)))
    k, v = _rand(2, 2, 2, 24, device=device), _rand(2, 2, 2, 24, device=device)
    idx, lens, leftpad = (torch.tensor(x, dtype=torch.int32, device=device) for x in ([3, 1], [9, 20], [0, 5]))
    cos, sin = torch.rand(40, 8, device=device), torch.rand(40, 24, device=device)[:, :8]  # other row strides
    slopes = torch.rand(4, 2, device=device).t()  # (B, H) with stride (1, B)
    with ctx():
        ref = kvcache_oracle(q, kc, vc, k, v, lens, batch_idx=idx, leftpad=leftpad, cos=cos, sin=sin, causal=True,
                             alibi=slopes.contiguous())
        kc2, vc2 = kc.clone(), vc.clone()
        out, lse = flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=_strided(lens),
                                           cache_batch_idx=_strided(idx), cache_leftpad=_strided(leftpad),
                                           rotary_cos=cos, rotary_sin=sin, alibi_slopes=slopes, causal=True,
                                           return_softmax_lse=True)
    _check(out, lse, ref[0], ref[1])
    assert torch.equal(vc2.cpu(), ref[3])
    torch.testing.assert_close(kc2.cpu(), ref[2], rtol=0, atol=1e-6)

    page, blocks = 8, 4
    kc, vc = _rand(2 * blocks + 1, page, 1, 16, device=device), _rand(2 * blocks + 1, page, 1, 16, device=device)
    table = torch.randperm(2 * blocks + 1)[: 2 * blocks].view(2, blocks).int().to(device)
    q, k, v = _rand(2, 1, 2, 16, device=device), _rand(2, 3, 1, 16, device=device), _rand(2, 3, 1, 16, device=device)
    lens = torch.tensor([page - 1, 20], dtype=torch.int32, device=device)
    with ctx():
        ref = kvcache_oracle(q, kc, vc, k, v, lens, block_table=table, causal=True)
        out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=_strided(table),
                                           causal=True, return_softmax_lse=True)
    _check(out, lse, ref[0], ref[1])
    assert torch.equal(kc.cpu(), ref[2]) and torch.equal(vc.cpu(), ref[3])


@pytest.mark.parametrize("interleaved,rotary_dim,causal", [(True, 16, False), (False, 16, True), (True, 8, True),
                                                           (False, 8, False)])
def test_rotary(backend, interleaved, rotary_dim, causal):
    """Both pair layouts, full and partial rotary dims; q per token when causal, else all at cache_seqlens."""
    device, ctx = backend
    B, H, Hk, D = 2, 2, 1, 16
    q, kc, vc = (_rand(*shape, device=device) for shape in ((B, 2, H, D), (B, 24, Hk, D), (B, 24, Hk, D)))
    k, v = _rand(B, 3, Hk, D, device=device), _rand(B, 3, Hk, D, device=device)
    angles = torch.arange(30, device=device).view(-1, 1) * (0.5 ** torch.arange(rotary_dim // 2, device=device))
    lens = torch.tensor([4, 19], dtype=torch.int32, device=device)
    with ctx():
        _run_and_check(q, kc, vc, k, v, lens, causal=causal, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
                       rotary_interleaved=interleaved)


@pytest.mark.parametrize("options", [dict(window_size=(3, 0)), dict(window_size=(4, 2)),
                                     dict(softcap=2.5, softmax_scale=0.9), dict(softcap=1e4),
                                     dict(alibi="per_row", causal=True)])
def test_masks_softcap_alibi(backend, options):
    device, ctx = backend
    B, H, Hk, D = 2, 4, 2, 16
    q, kc, vc = (_rand(*shape, device=device) for shape in ((B, 2, H, D), (B, 30, Hk, D), (B, 30, Hk, D)))
    k, v = _rand(B, 2, Hk, D, device=device), _rand(B, 2, Hk, D, device=device)
    lens = torch.tensor([13, 26], dtype=torch.int32, device=device)
    if options.get("alibi") == "per_row":
        options = {**options, "alibi_slopes": torch.rand(B, H, device=device)}
        del options["alibi"]
    with ctx():
        _run_and_check(q, kc, vc, k, v, lens, **options)


def test_float16_against_fa2_rule(backend):
    device, ctx = backend
    B, H, Hk, D = 2, 8, 1, 32
    dt = torch.float16
    q, kc, vc = (_rand(*s, device=device, dtype=dt) for s in ((B, 1, H, D), (B, 50, Hk, D), (B, 50, Hk, D)))
    k, v = _rand(B, 1, Hk, D, device=device, dtype=dt), _rand(B, 1, Hk, D, device=device, dtype=dt)
    lens = torch.tensor([49, 17], dtype=torch.int32, device=device)
    ref, _, _, _ = kvcache_oracle(q, kc, vc, k, v, lens)
    with ctx():
        out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, num_splits=2)
    for b in range(B):  # plain torch math in fp16 on the same keys is the yardstick
        n = int(lens[b]) + 1
        pt, _ = oracle.attention(q[b:b + 1].cpu(), kc[b:b + 1, :n].cpu(), vc[b:b + 1, :n].cpu(), dtype=dt)
        oracle.assert_fa2_close(out[b:b + 1].cpu(), ref[b:b + 1], pt, f"row {b}")


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_bfloat16(path):
    """bf16 on both paths (in the interpreter, the kernels' dots upcast bf16 tiles: its bf16 tl.dot is broken)."""
    dt = torch.bfloat16
    q, kc, vc = (torch.randn(*shape, dtype=dt) for shape in ((2, 1, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32)))
    k, v = torch.randn(2, 1, 2, 32, dtype=dt), torch.randn(2, 1, 2, 32, dtype=dt)
    lens = torch.tensor([39, 12], dtype=torch.int32)
    ref, _, ref_kc, _ = kvcache_oracle(q, kc, vc, k, v, lens, causal=True)
    with reference_only() if path == "reference" else contextlib.nullcontext():
        out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
    assert torch.equal(kc, ref_kc)
    for b in range(2):
        n = int(lens[b]) + 1
        pt, _ = oracle.attention(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], dtype=dt)
        oracle.assert_fa2_close(out[b:b + 1], ref[b:b + 1], pt, f"row {b}")


def test_reference_path_computes_the_same_under_autocast():
    """autocast stays on inside the op: the PyTorch path's float32 scores must not drop to bf16."""
    dt = torch.bfloat16
    q, kc, vc = (torch.randn(*shape, dtype=dt) for shape in ((2, 1, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32)))
    lens = torch.tensor([39, 12], dtype=torch.int32)
    with reference_only():
        plain = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True)
        with torch.autocast("cpu", dtype=dt):
            autocast = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True)
    for a, b in zip(autocast, plain):
        assert torch.equal(a, b)


def test_lse_is_the_float64_logsumexp(backend):
    """softmax_lse is log sum_j exp(scale * q.k_j) over the valid keys, computed here directly."""
    device, ctx = backend
    q, kc, vc = (_rand(*shape, device=device) for shape in ((2, 1, 2, 16), (2, 20, 2, 16), (2, 20, 2, 16)))
    lens = torch.tensor([7, 20], dtype=torch.int32, device=device)
    with ctx():
        _, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True)
    for b in range(2):
        scores = torch.einsum("hd,jhd->hj", q[b, 0].cpu().double(), kc[b, : int(lens[b])].cpu().double()) * 0.25
        torch.testing.assert_close(lse[b, :, 0].cpu().double(), scores.logsumexp(-1), rtol=0, atol=1e-5)


def test_int_and_missing_cache_seqlens(backend):
    device, ctx = backend
    q, kc, vc = (_rand(*shape, device=device) for shape in ((2, 1, 2, 16), (2, 12, 1, 16), (2, 12, 1, 16)))
    with ctx():
        full = flash_attn_with_kvcache(q, kc, vc)  # None: the whole cache
        as_int = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=12)
    ref, _, _, _ = kvcache_oracle(q, kc, vc, None, None, [12, 12])
    torch.testing.assert_close(full.cpu().double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(full, as_int)


# --------------------------------------------------------------------------------------
# Bad input, the heuristic, torch.library and torch.compile (CPU)
# --------------------------------------------------------------------------------------


def _spy_paths(monkeypatch):
    """Records which PyTorch path each flash_attn_with_kvcache call takes: "native" (torch's
    SDPA, decoding_reference.native_forward) or "forward" (the op's own PyTorch body)."""
    import kernels.decoding_reference as reference

    taken = []
    for name in ("native_forward", "forward"):
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _n=name, _f=real: taken.append(_n.split("_")[0]) or _f(*a))
    return taken


def _native_case(name):
    """(args, kwargs) of one call; the caches NaN outside each row's keys."""
    torch.manual_seed(0)
    B, H, Hk, D, cap = 3, 6, 2, 8, 20
    lens = torch.tensor([5, 9, 2], dtype=torch.int32)
    leftpad = torch.tensor([0, 4, 1], dtype=torch.int32)
    kc = torch.full((B, cap, Hk, D), float("nan"))
    for b in range(B):
        kc[b, int(leftpad[b]):int(lens[b])] = torch.randn(int(lens[b] - leftpad[b]), Hk, D)
    vc = -kc
    q, k, v = torch.randn(B, 2, H, D), torch.randn(B, 2, Hk, D), torch.randn(B, 2, Hk, D)
    full = torch.randn(B, cap, Hk, D)  # rows of 9 keys each
    full[:, 9:] = float("nan")
    cos, sin = torch.rand(cap, 3), torch.rand(cap, 3)
    rotary = dict(rotary_cos=cos, rotary_sin=sin)
    cases = {
        # served by torch's SDPA (native): GQA 3:1, left padding, ragged ends, NaN slots
        "ragged_leftpad_causal": ((q, kc, vc, k, v), dict(cache_seqlens=lens, cache_leftpad=leftpad, causal=True)),
        "one_step": ((q[:, :1], full, -full, k[:, :1], v[:, :1]), dict(cache_seqlens=9, causal=True)),
        "not_causal": ((q, kc, vc, k, v), dict(cache_seqlens=lens, cache_leftpad=leftpad, softmax_scale=0.2)),
        "rotary_from_leftpad": ((q, kc, vc, k, v), dict(cache_seqlens=lens, cache_leftpad=leftpad, causal=True,
                                                        rotary_from_leftpad=True, rotary_interleaved=False, **rotary)),
        "rotary_interleaved": ((q[:, :1], full, -full, k, v), dict(cache_seqlens=lens, **rotary)),
        "no_append": ((q[:, :1], kc, vc), dict(cache_seqlens=lens, cache_leftpad=leftpad, causal=True)),
        # the op's own path: what SDPA does not compute, or computes otherwise
        "lse": ((q, full, -full, k, v), dict(cache_seqlens=lens, causal=True, return_softmax_lse=True)),
        "query_without_key": ((q, kc, vc, k[:, :1], v[:, :1]), dict(cache_seqlens=leftpad, cache_leftpad=leftpad,
                                                                     causal=True)),
        "alibi": ((q, full, -full, k, v), dict(cache_seqlens=lens, alibi_slopes=torch.rand(H))),
        "softcap": ((q, full, -full, k, v), dict(cache_seqlens=lens, softcap=2.0)),
        "window": ((q, full, -full, k, v), dict(cache_seqlens=lens, window_size=(3, 0))),
        "right_window": ((q, full, -full, k, v), dict(cache_seqlens=lens, window_size=(-1, 1))),
        "batch_idx": ((q, full, -full, k, v), dict(cache_seqlens=lens, cache_batch_idx=torch.tensor([2, 0, 1]).int())),
        "bfloat16": ((q.bfloat16(), full.bfloat16(), -full.bfloat16(), k.bfloat16(), v.bfloat16()),
                     dict(cache_seqlens=lens, causal=True)),
    }
    return cases[name]


_NATIVE = ["ragged_leftpad_causal", "one_step", "not_causal", "rotary_from_leftpad", "rotary_interleaved", "no_append"]
_NOT_NATIVE = ["lse", "query_without_key", "alibi", "softcap", "window", "right_window", "batch_idx", "bfloat16"]


@pytest.mark.parametrize("case", _NATIVE + _NOT_NATIVE)
def test_cpu_calls_torchs_sdpa_where_it_computes_the_op(case, monkeypatch):
    """On the CPU's PyTorch path (runtime.torch_native), float32 calls without the lse, a block
    table, a cache row map, ALiBi, softcap or a window, in which every query has a key, run
    torch's SDPA on views of the cache; they give the op's own body's output (float32
    rounding apart) and caches (exactly). The others run the op's body."""
    taken = _spy_paths(monkeypatch)
    results = []
    for native in (True, False):
        args, kwargs = _native_case(case)
        with reference_only(native=native):
            out = flash_attn_with_kvcache(*args, **kwargs)
        results.append((out, args[1], args[2]))
    assert taken == (["native", "forward"] if case in _NATIVE else ["forward", "forward"])
    (out, kc, vc), (ref, ref_kc, ref_vc) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(kc.nan_to_num(), ref_kc.nan_to_num()) and torch.equal(vc.nan_to_num(), ref_vc.nan_to_num())
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


def _small():
    return torch.randn(2, 1, 4, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)


@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.randn(2, 1, 3, 16)), ValueError, r"nheads \(3\) must be a multiple of nheads_k \(2\)"),
    (dict(q=torch.randn(2, 0, 4, 16)), ValueError, "at least one query"),
    (dict(k_cache=torch.randn(2, 10, 2, 16).half()), TypeError, "k_cache is torch.float16"),
    (dict(k_cache=torch.randn(2, 10, 2, 32)[..., ::2]), ValueError, "k_cache must have a contiguous last dim"),
    (dict(k_cache=torch.randn(3, 10, 2, 16), v_cache=torch.randn(3, 10, 2, 16)), ValueError, "pass cache_batch_idx"),
    (dict(q=torch.randn(2, 1, 4, 8)), ValueError,
     r"\(\.\.\., nheads_k, 8\), 8 being q's head dim; got \(2, 10, 2, 16\)"),
    (dict(k=torch.randn(2, 1, 2, 16)), ValueError, "k and v must be given together"),
    (dict(k=torch.randn(2, 1, 1, 16), v=torch.randn(2, 1, 1, 16), cache_seqlens=0), ValueError,
     r"k must have shape \(batch, seqlen_new, nheads_k, headdim\) = \(2, n, 2, 16\)"),
    (dict(k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16)), ValueError, "appending k/v needs cache_seqlens"),
    (dict(k=torch.randn(2, 2, 2, 16), v=torch.randn(2, 2, 2, 16), cache_seqlens=9), ValueError,
     r"cache_seqlens must be in \[0, 8\]"),
    (dict(cache_seqlens=torch.tensor([3, 11], dtype=torch.int32)), ValueError, r"cache_seqlens must be in \[0, 10\]"),
    (dict(k=torch.randn(2, 11, 2, 16), v=torch.randn(2, 11, 2, 16), cache_seqlens=0), ValueError,
     "k and v hold 11 new keys per row but the cache holds only 10"),
    (dict(cache_seqlens=torch.tensor([3, 4])), TypeError, "cache_seqlens must be int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "must index the 2 cache rows"),
    (dict(cache_seqlens=2, cache_leftpad=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     r"cache_leftpad must be in \[0, cache_seqlens\]"),
    (dict(rotary_cos=torch.randn(20, 4), rotary_sin=torch.randn(20, 4)), ValueError, "apply only when new k and v"),
    (dict(k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16), cache_seqlens=3, rotary_cos=torch.randn(20, 9),
          rotary_sin=torch.randn(20, 9)), ValueError, r"rotary_dim <= headdim \(16\)"),
    (dict(k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16), cache_seqlens=3, rotary_cos=torch.randn(3, 4),
          rotary_sin=torch.randn(3, 4)), ValueError, "rotary_cos/rotary_sin have 3 positions but position 3"),
    (dict(num_splits=-1), ValueError, "num_splits must be an int >= 0"),
    (dict(num_splits=True), ValueError, "num_splits must be an int >= 0.*got True"),
    (dict(cache_seqlens=2.0), ValueError, "cache_seqlens must be an int or a"),
    (dict(window_size=(True, -1)), ValueError, "window_size left must be an int"),
    (dict(q=torch.randn(2, 1, 0, 16)), ValueError, "at least one head each, got nheads = 0"),
    (dict(window_size=(-2, 0)), ValueError, "window_size left must be -1"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes must have shape \(nheads,\) = \(4,\)"),
    (dict(rotary_from_leftpad=1), TypeError, "rotary_from_leftpad must be a bool, got 1"),
    (dict(causal="no"), TypeError, "causal must be a bool, got 'no'"),
    (dict(return_softmax_lse=None), TypeError, "return_softmax_lse must be a bool, got None"),
    (dict(rotary_interleaved=0), TypeError, "rotary_interleaved must be a bool, got 0"),
])
def test_bad_input_names_the_argument(change, error, match):
    q, kc, vc = _small()
    kwargs = {"q": q, "k_cache": kc, "v_cache": vc, **change}
    with reference_only(), pytest.raises(error, match=match):
        flash_attn_with_kvcache(**kwargs)


def test_outputs_do_not_require_grad_as_fa2s():
    """FA2's flash_attn_with_kvcache has no backward and returns tensors that do not require
    grad; so does this one (not an output whose backward fails later). numpy integers act
    as Python ints."""
    np = pytest.importorskip("numpy")
    q, kc, vc = _small()
    q.requires_grad_(True)
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, return_softmax_lse=True)
    assert not out.requires_grad and not lse.requires_grad and out.grad_fn is None
    assert torch.equal(flash_attn_with_kvcache(q, kc, vc, cache_seqlens=np.int64(4), num_splits=np.int32(2)), out)
    # numpy bools act as bools (they were refused for rotary_from_leftpad, no subclass of bool)
    assert torch.equal(flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, causal=np.True_,
                                               rotary_from_leftpad=np.False_),
                       flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, causal=True))


def test_paged_errors():
    q, kc, vc = torch.randn(2, 1, 2, 16), torch.randn(6, 4, 1, 16), torch.randn(6, 4, 1, 16)
    table = torch.tensor([[0, 1], [2, 6]], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table entries in use must index the 6 cache blocks"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), block_table=table)
    with pytest.raises(ValueError, match="not supported with a paged cache"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1, block_table=table,
                                cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_table must have shape \(batch, max_blocks_per_seq\) = \(2, n\)"):
        flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1, block_table=table[:1])


def test_num_splits_heuristic():
    assert choose_num_splits(8, 65536, 132) == 33  # batch 1, 8 kv-heads: 2 programs per SM
    assert choose_num_splits(8, 4096, 132) == 16  # at least 256 keys per split
    assert choose_num_splits(128, 65536, 132) == 3
    assert choose_num_splits(132, 65536, 132) == 1  # already one program per SM
    assert choose_num_splits(8, 100, 132) == 1
    assert choose_num_splits(1, 10 ** 7, 132) == 128  # FlashAttention-2's cap


def _op_args(features: bool):
    q, kc, vc = _small()
    k, v = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    lens = torch.tensor([3, 7], dtype=torch.int32)
    if not features:
        return (q, kc, vc, k, v, None, None, lens, None, None, None, None, 0.25, 0.0, -1, -1, False, False, False, 0)
    cos, sin = torch.rand(16, 4), torch.rand(16, 4)
    return (q, kc, vc, k, v, cos, sin, lens, None, torch.tensor([0, 1], dtype=torch.int32), None, torch.rand(4),
            0.25, 0.0, 5, 0, False, True, True, 0)


@pytest.mark.parametrize("features", [False, True])
def test_opcheck_reference_path(features):
    """Every opcheck test on the plain op; with rotary, left padding and ALiBi, all but the slow
    dynamic-shape AOT one (~20 s more of tracing on a loaded 2-core CPU; test_gpu_opcheck runs it)."""
    tests = None if not features else ("test_schema", "test_autograd_registration", "test_faketensor")
    with reference_only():
        torch.library.opcheck(torch.ops.tritonzoo.kvcache_attention.default, _op_args(features),
                              **({} if tests is None else {"test_utils": tests}))


def test_compile_fullgraph_decode_step_cpu():
    """Two decode steps compiled whole (CPU, reference path): the cache update survives tracing."""
    torch._dynamo.reset()

    def step(q, kc, vc, k, v, lens):
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True) * 2

    q, kc, vc = _small()
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([2, 6], dtype=torch.int32)
    eager_kc, eager_vc = kc.clone(), vc.clone()
    with reference_only():
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for t in range(2):
            got = compiled(q, kc, vc, k + t, v - t, lens + t)
            want = step(q, eager_kc, eager_vc, k + t, v - t, lens + t)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(kc, eager_kc) and torch.equal(vc, eager_vc)
    assert torch.equal(kc[0, 2:4, :, :], torch.cat([k, k + 1], dim=1)[0])


# --------------------------------------------------------------------------------------
# GPU: real sizes, bf16/fp16, CUDA graphs, torch.compile (run with -m gpu on the device)
# --------------------------------------------------------------------------------------


def _assert_close_lowp(out, ref, name):
    """bf16/fp16 against float64: norm-relative error within a few roundings of the dtype (METHOD.md)."""
    assert torch.isfinite(out).all(), name
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < {torch.bfloat16: 8e-3, torch.float16: 1e-3}[out.dtype], f"{name}: relative error {err:.2e}"


def _gpu_problem(dtype, paged, B=4, H=32, Hk=4, D=128, cap=8192, page=256):
    lens = torch.tensor([cap - 1, 1, cap // 2 - 96, 0] * (B // 4), dtype=torch.int32, device="cuda")
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, 1, Hk, D, device="cuda", dtype=dtype) for _ in range(2))
    angles = torch.arange(cap, device="cuda").view(-1, 1) * (10000 ** (-torch.arange(0, D, 2, device="cuda") / D))
    table = None
    if paged:
        kc, vc = (torch.randn(B * cap // page, page, Hk, D, device="cuda", dtype=dtype) for _ in range(2))
        table = torch.randperm(B * cap // page, device="cuda").view(B, cap // page).int()
    else:
        kc, vc = (torch.randn(B, cap, Hk, D, device="cuda", dtype=dtype) for _ in range(2))
    return q, kc, vc, k, v, angles.cos().to(dtype), angles.sin().to(dtype), lens, table


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_real_sizes(dtype, paged):
    """GQA 8:1, D 128, ragged caches up to 8k (one empty), one new token with rotary; 1 / auto / 7 splits."""
    q, kc, vc, k, v, cos, sin, lens, table = _gpu_problem(dtype, paged)
    ref, ref_lse, ref_kc, ref_vc = kvcache_oracle(q, kc, vc, k, v, lens, block_table=table, cos=cos, sin=sin,
                                                  causal=True)
    outs = []
    for splits in (1, 0, 7):
        kc2, vc2 = kc.clone(), vc.clone()
        out, lse = flash_attn_with_kvcache(q, kc2, vc2, k, v, cos, sin, lens, block_table=table, causal=True,
                                           num_splits=splits, return_softmax_lse=True)
        _assert_close_lowp(out, ref, f"splits={splits}")
        torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=0, atol=2e-2)
        assert torch.equal(vc2.cpu(), ref_vc)
        torch.testing.assert_close(kc2.cpu(), ref_kc, rtol=0, atol=2e-2)  # rotated keys: one rounding apart
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_gpu_long_cache_batch_one_fp32_and_features():
    """Batch 1 over 64k keys (many splits), with window, softcap and ALiBi, in fp32 (ieee dots)."""
    B, H, Hk, D, cap = 1, 16, 2, 64, 65536
    q = torch.randn(B, 2, H, D, device="cuda")
    kc, vc = (torch.randn(B, cap, Hk, D, device="cuda") for _ in range(2))
    k, v = (torch.randn(B, 2, Hk, D, device="cuda") for _ in range(2))
    lens = torch.tensor([cap - 2], dtype=torch.int32, device="cuda")
    slopes = torch.rand(H, device="cuda")
    ref, ref_lse, _, _ = kvcache_oracle(q, kc, vc, k, v, lens, window=(30000, 0), softcap=20.0, alibi=slopes * 1e-3)
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, window_size=(30000, 0), softcap=20.0,
                                       alibi_slopes=slopes * 1e-3, return_softmax_lse=True)
    _check(out, lse, ref, ref_lse, atol=2e-5)


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile():
    """A decode step replays from a CUDA graph (no host sync inside) and compiles whole with inductor."""
    q, kc, vc, k, v, cos, sin, lens, _ = _gpu_problem(torch.bfloat16, False)

    def step(q, kc, vc, k, v, lens):
        return flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, lens, causal=True)

    eager = step(q, kc.clone(), vc.clone(), k, v, lens)
    step(q, kc, vc, k, v, lens)  # warm-up: autotuning must happen outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(q, kc, vc, k, v, lens)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(q, kc, vc, k, v, lens)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_opcheck():
    q, kc, vc, k, v, cos, sin, lens, table = _gpu_problem(torch.bfloat16, True, B=4, cap=1024, page=64)
    args = (q, kc, vc, k, v, cos, sin, lens, None, None, table, None, 0.125, 0.0, -1, 0, True, True, False, 0)
    torch.library.opcheck(torch.ops.tritonzoo.kvcache_attention.default, args)


_COMPILE_FOR_HOPPER = """
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import decoding as dec

fn = dec._kvcache_attn_kernel
base = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, FP32=False, PAGED=False, HAS_BATCH_IDX=False, HAS_LEFTPAD=False,
            HAS_NEW=True, HAS_ROTARY=False, INTERLEAVED=True, ROTARY_Q_PER_TOKEN=False, ROTARY_FROM_LEFTPAD=False,
            HAS_SOFTCAP=False,
            HAS_ALIBI=False, HAS_LEFT=False, HAS_RIGHT=False, SPLIT=True, BLOCK_N=64)
every = dict(base, PAGED=True, HAS_ROTARY=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_LEFT=True, HAS_RIGHT=True)
# the flags "every" leaves off: cache rows, left padding, rotate-half with a rotation per query
# token, one split; then fp32 inputs (FMA dots) without new keys
rest = dict(base, HAS_BATCH_IDX=True, HAS_LEFTPAD=True, HAS_ROTARY=True, INTERLEAVED=False,
            ROTARY_Q_PER_TOKEN=True, ROTARY_FROM_LEFTPAD=True, SPLIT=False)
fp32_no_new = dict(base, FP32=True, HAS_NEW=False, BLOCK_N=32)
ints = {"SeqLens", "BatchIdx", "LeftPad", "BlockTable"}
fp32 = {"Alibi", "Lse", "OutPart", "LsePart"}
report = {}
for name, flags in (("every", every), ("rest", rest), ("fp32, no new keys", fp32_no_new)):
    dtype = "fp32" if flags["FP32"] else "bf16"
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in flags:
            sig[arg] = "constexpr"
        elif arg[0].isupper():
            sig[arg] = "*i32" if arg in ints else "*fp32" if arg in fp32 else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ("sm_scale", "qk_scale", "softcap"):
            sig[arg] = "fp32"
        else:  # what the JIT specializes for a (B, L, 8, 128) bf16 cache: strides that are multiples of 16
            sig[arg] = "i32"
            if arg.startswith("stride_") and arg not in ("stride_lb", "stride_lh", "stride_ab"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=flags, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True,
                         check=True).stderr
    os.unlink(f.name)
    spill = re.search(r"(\\d+) bytes spill stores", out)
    report[name] = {"registers": int(re.search(r"Used (\\d+) registers", out).group(1)),
                    "spill": int(spill.group(1)) if spill else 0, "shared": compiled.metadata.shared,
                    "cp_async_16": len(re.findall(r"cp\\.async\\.cg\\.shared\\.global[^;]*0x10", ptx)),
                    "mma": "mma.sync" in ptx or "wgmma" in ptx, "fp32": flags["FP32"]}
print(json.dumps(report))
"""


def test_kernel_compiles_for_hopper_without_spills():
    """The split kernel, every feature on (paged, rotary, softcap, ALiBi, window), compiles for
    sm_90a (what the interpreter cannot check): no register spills, the K/V tiles move by
    16-byte cp.async (pipelined), the dots on tensor cores, shared memory leaves room for
    two programs per SM. So do the flags it leaves off (cache rows, left padding, rotate-half
    per query token, one split), and the fp32 kernel compiles and fits."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True, check=True,
                         env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report) == 3
    for name, r in report.items():
        assert r["registers"] <= 255 and r["shared"] <= 228 * 1024 // 2, (name, r)
        if not r["fp32"]:  # fp32 is the correctness path: FMA dots, no speed target
            assert r["spill"] == 0, (name, r)
            assert r["mma"] and r["cp_async_16"] > 0, (name, r)
