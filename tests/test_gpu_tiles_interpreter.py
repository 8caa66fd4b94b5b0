"""The GPU's tile configurations, run through the Triton interpreter.

The interpreter tests elsewhere run each kernel at one small tile (so tiny inputs still
cross several tiles). On a GPU the kernels run at other tiles: the autotuner's candidates
for attention and decoding, wider rows and vocabulary chunks, more heads per program,
and as many norm-backward programs as an H100 has SMs x 4. Edge logic that holds at one
tile can break at another (a causal block boundary, a ragged last key tile, programs
with no rows), and the compiled kernels are not checked until a GPU is at hand. Here
the same kernels run at each GPU tile on CPU tensors, against the float64 oracles of
the op tests, with shapes chosen to cross and straddle those tiles.

On a CUDA machine these tiles run for real (tests/test_gpu.py and the op tests' gpu
cases), so the module is skipped there.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

import attention_oracle as oracle
from kernels import flash_attn_func, flash_attn_varlen_func, runtime
from kernels.activations import gelu, geglu, swiglu
from test_decoding import _run_and_check
from test_flash_attn import _check as check_attention
from test_ops_activations import check as check_activation
from test_ops_activations import gelu_formula, silu_formula
from test_ops_cross_entropy import check_ce, check_flce
from test_ops_norms import run_case as check_norm
from test_ops_rotary import run_case as check_rotary

pytestmark = pytest.mark.skipif(not runtime.INTERPRET,
                                reason="the interpreter's own run of the GPU tiles; a GPU runs them for real")

CPU = ("cpu", contextlib.nullcontext)
# The modules (kernels/__init__ exports functions under some of these names).
activations, cross_entropy, decoding, flash_attention, norms, rotary = (
    importlib.import_module(f"kernels.{name}")
    for name in ("activations", "cross_entropy", "decoding", "flash_attention", "norms", "rotary"))


# --------------------------------------------------------------------------------------
# Flash attention: every autotune candidate of the forward and both backward kernels
# --------------------------------------------------------------------------------------


def _tiles(candidates, key):
    return sorted({(bm, bn) for bm, bn, _, _ in candidates[key]})


def _rounds():
    """(head-dim key, round): round i runs the i-th tile of each kernel (cycling the shorter lists)."""
    out = []
    for key in flash_attention._FWD_CANDIDATES:
        n = max(len(_tiles(c, key)) for c in (flash_attention._FWD_CANDIDATES, flash_attention._DKDV_CANDIDATES,
                                               flash_attention._DQ_CANDIDATES))
        out += [(key, i) for i in range(n)]
    return out


@pytest.fixture
def attention_tiles(monkeypatch):
    def use(key, i):
        chosen = []
        for name, candidates in (("_INTERPRET_FWD", flash_attention._FWD_CANDIDATES),
                                 ("_INTERPRET_DKDV", flash_attention._DKDV_CANDIDATES),
                                 ("_INTERPRET_DQ", flash_attention._DQ_CANDIDATES)):
            tiles = _tiles(candidates, key)
            bm, bn = tiles[i % len(tiles)]
            monkeypatch.setattr(flash_attention, name, dict(BLOCK_M=bm, BLOCK_N=bn))
            chosen.append((bm, bn))
        monkeypatch.setattr(flash_attention, "_DROPOUT_MASK_BLOCK", flash_attention.GPU_DROPOUT_MASK_BLOCK)
        return chosen
    return use


def _qkv(B, Sq, Sk, H, Hk, D, dtype):
    return [torch.randn(B, S, h, D, dtype=dtype).requires_grad_() for S, h in ((Sq, H), (Sk, Hk), (Sk, Hk))]


@pytest.mark.parametrize("key,i", _rounds(), ids=lambda v: str(v))
def test_attention_at_gpu_tiles(attention_tiles, key, i):
    """Forward and the three gradients by FA2's rule: causal both ways round (bottom-right
    diagonal inside a tile), a window with GQA, one query row, and a packed batch with
    ALiBi and softcap whose sequences straddle the tiles."""
    torch.manual_seed(i)
    tiles = attention_tiles(key, i)
    # fp16 for the 16-bit keys: in the interpreter, bf16 dots run upcast to fp32 (see _dot), fp16 ones as such.
    dtype = torch.float32 if key == "fp32" else torch.float16
    D = 64 if key == "fp32" else key
    # Lengths past two of the key's largest tile, none a multiple of a tile.
    n = 2 * max(max(c[:2]) for c in flash_attention._FWD_CANDIDATES[key] + flash_attention._DKDV_CANDIDATES[key]
                + flash_attention._DQ_CANDIDATES[key]) + 13
    cases = [((1, n // 3, n, 1, 1), dict(causal=True)),
             ((1, n, n // 3, 1, 1), dict(causal=True)),
             ((1, n - 40, n - 40, 2, 1), dict(window_size=(37, 5))),
             ((1, 1, n, 1, 1), dict())]
    for shape, kwargs in cases:
        q, k, v = _qkv(*shape, D, dtype)
        check_attention(lambda q, k, v: flash_attn_func(q, k, v, **kwargs), q, k, v, name=f"{tiles} {shape}",
                        causal=kwargs.get("causal", False), window=kwargs.get("window_size", (-1, -1)))

    lens_q, lens_k = [5, 0, n - 60, 33], [9, 4, n - 71, n]
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    H, Hk = 2, 1
    q = torch.randn(sum(lens_q), H, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), Hk, D, dtype=dtype, requires_grad=True) for _ in range(2))
    slopes = torch.rand(H) * 0.3
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, softcap=4.0,
                                 alibi_slopes=slopes)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    opts = dict(causal=True, softcap=4.0, alibi_slopes=slopes)
    ref, _ = oracle.attention_varlen(*leaves, cu_q, cu_k, **opts)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    same, _ = oracle.attention_varlen(*leaves, cu_q, cu_k, dtype=dtype, **opts)
    same_grads = torch.autograd.grad(same, leaves, dout)
    oracle.assert_fa2_close(out, ref, same, f"{tiles} varlen out")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, same_grads):
        oracle.assert_fa2_close(g, r, p, f"{tiles} varlen {name}")


@pytest.mark.parametrize("key,i", [r for r in _rounds() if r[0] == 64], ids=lambda v: str(v))
def test_attention_dropout_at_gpu_tiles(attention_tiles, key, i):
    """The keep-mask does not depend on the tile: the mask drawn at the GPU's mask tile is
    the one the forward and backward kernels apply at each of their tiles (fp32 inputs,
    exact to 1e-5)."""
    torch.manual_seed(i)
    tiles = attention_tiles(key, i)
    p = 0.25
    q, k, v = _qkv(2, 70, 150, 2, 1, 64, torch.float32)
    out, _, probs = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    keep = probs >= 0
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = oracle.attention(*leaves, causal=True, keep=keep, dropout_p=p)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5, msg=lambda m: f"{tiles} out: {m}")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-5, msg=lambda m: f"{tiles} {name}: {m}")


# --------------------------------------------------------------------------------------
# Decoding: every key-tile size among the autotune candidates
# --------------------------------------------------------------------------------------


def _decoding_tiles():
    return sorted({(key, n) for key, group in decoding._CANDIDATES.items() for n, _, _ in group}, key=str)


@pytest.mark.parametrize("key,block_n", _decoding_tiles(), ids=lambda v: str(v))
def test_decoding_at_gpu_tiles(monkeypatch, key, block_n):
    """Ragged cache lengths around the tile size, left padding, GQA 4:1, rotary on the new
    keys, split-K; and a paged cache whose pages are smaller than the tile. fp32 inputs
    (exact to 1e-5) at the head dim the candidates are for."""
    monkeypatch.setattr(decoding, "_INTERPRET_BLOCK_N", block_n)
    torch.manual_seed(block_n)
    D = 64 if key == "fp32" else key
    B, cap, H, Hk = 3, 3 * block_n + 5, 4, 1
    q = torch.randn(B, 2, H, D)
    kc, vc = torch.randn(B, cap, Hk, D), torch.randn(B, cap, Hk, D)
    k, v = torch.randn(B, 2, Hk, D), torch.randn(B, 2, Hk, D)
    lens = torch.tensor([block_n - 1, block_n, cap - 2], dtype=torch.int32)
    leftpad = torch.tensor([0, 3, block_n + 1], dtype=torch.int32)
    angles = torch.arange(cap, dtype=torch.float32)[:, None] * 0.5 ** torch.arange(D // 4)
    for splits in (1, 3):
        _run_and_check(q, kc, vc, k, v, lens, causal=True, cache_leftpad=leftpad, rotary_cos=angles.cos(),
                       rotary_sin=angles.sin(), rotary_interleaved=False, num_splits=splits)

    page = max(8, block_n // 2)
    per_seq = triton_cdiv(cap, page)
    table = torch.randperm(B * per_seq + 2)[: B * per_seq].view(B, per_seq).int()
    kp, vp = torch.randn(B * per_seq + 2, page, Hk, D), torch.randn(B * per_seq + 2, page, Hk, D)
    _run_and_check(q, kp, vp, k, v, lens, block_table=table, causal=True, num_splits=0)


def triton_cdiv(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------------------
# Norms, cross-entropy, activations, rotary at the GPU's launch parameters
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_norms_at_gpu_tiles(monkeypatch, rms):
    """Rows held whole up to 8192 columns, chunks of 4096 past that, and 4 x 132 backward
    programs (most of them with no rows here)."""
    monkeypatch.setattr(norms, "MAX_FUSED_BLOCK", norms.GPU_MAX_FUSED_BLOCK)
    monkeypatch.setattr(norms, "_programs", lambda device: 4 * decoding.H100_SMS)
    torch.manual_seed(0)
    for hidden in (33, 4099, norms.GPU_MAX_FUSED_BLOCK + 1):
        assert norms._plan(hidden)[0] == (hidden <= norms.GPU_MAX_FUSED_BLOCK)
        check_norm(*CPU, (7, hidden), torch.float16, rms, residual=True, affine="both")
    check_norm(*CPU, (600, 65), torch.float32, rms, residual=False, affine="weight")


def test_cross_entropy_at_gpu_tiles(monkeypatch):
    """Vocabulary chunks of 8192: GPT-2's 50257 (a ragged last chunk) and one under a chunk."""
    monkeypatch.setattr(cross_entropy, "_MAX_BLOCK_V", cross_entropy.GPU_MAX_BLOCK_V)
    torch.manual_seed(0)
    check_ce(*CPU, 6, 50257, torch.float32, "mean", 0.1)
    check_ce(*CPU, 6, 1003, torch.float16, "none", 0.0)
    check_flce(*CPU, 7, 16, 9000, torch.float32, "sum", 0.1, with_bias=True, chunk_size=3)


def test_activations_at_gpu_tiles(monkeypatch):
    """16 x 256 tiles: rows and columns that end inside a tile and exactly on one."""
    monkeypatch.setattr(activations, "_TILE", activations.GPU_TILE)
    torch.manual_seed(0)
    for shape in ((17, 257), (16, 512), (3, 4099)):
        x, b = torch.randn(shape) * 3, torch.randn(shape[-1])
        check_activation(lambda x, b: gelu(x, b, "tanh"), lambda x, b: gelu_formula(x + b, "tanh"), [x, b], *CPU)
        x, y = torch.randn(shape) * 2, torch.randn(shape)
        check_activation(swiglu, lambda x, y: silu_formula(x) * y, [x, y], *CPU)
        packed = torch.randn(shape[0], 2 * shape[1]) * 2
        n = shape[1]
        check_activation(lambda x: geglu(x), lambda x: gelu_formula(x[:, :n], "none") * x[:, n:], [packed], *CPU)


@pytest.mark.parametrize("mode,inplace", [("tensor", False), ("position_ids", True)])
def test_rotary_at_gpu_tiles(monkeypatch, mode, inplace):
    """8 heads per program over 11 heads, 64 positions per tile over 130, head dims 64 (full
    rotary) and 128 (partial: 8 positions per tile)."""
    monkeypatch.setattr(rotary, "_HEADS_PER_PROGRAM", rotary.GPU_HEADS_PER_PROGRAM)
    monkeypatch.setattr(rotary, "_MAX_BLOCK_S", rotary.GPU_MAX_BLOCK_S)
    torch.manual_seed(0)
    for interleaved in (False, True):
        check_rotary(*CPU, (2, 130, 11, 64), 64, torch.float32, interleaved, mode, inplace)
        check_rotary(*CPU, (1, 19, 11, 128), 96, torch.float16, interleaved, mode, inplace)
