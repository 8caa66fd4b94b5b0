"""The PyTorch path of flash attention: the same semantics as the Triton kernels.

CPU tensors run here when the Triton interpreter is off, so models train on a CPU.
It computes in float32. Plain attention (no mask but causal, or packed sequences that
all have a key; no dropout, ALiBi, softcap or bias) runs torch's fused CPU flash attention;
everything else runs the chunked path below: memory-efficient (queries in chunks: never a
full S x S score tensor unless the chunk covers it), drawing dropout from the same Philox
stream as the kernels, so for one seed both paths drop the same elements.

Eager float32 calls that do not take the log-sum-exp or the probabilities skip the op and
run torch's attention under torch's autograd where it computes the same function
(native_forward; kernels.runtime.torch_native): plain attention, also with a key-padding
mask under which every query has a key, and with dropout, which is then torch's draw.

Layout: padded q (B, Sq, H, D), k/v (B, Sk, Hk, D); packed (varlen) batches are
padded to max_seqlen by index arithmetic (no host sync), run, and packed back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import runtime
from .flash_attention import dropout_threshold

# Upper bound on elements of one chunk's score tensor (float32): 64 MiB; with dropout the
# Philox draw holds several int64 tensors of that size, so chunks are smaller.
_CHUNK_ELEMENTS = 1 << 24
_CHUNK_ELEMENTS_DROPOUT = 1 << 21

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of a * b, for a constant a and b's bits read as unsigned.

    b holds 32-bit words as int32. Read as uint32 and widened to int64, it multiplies into
    a product of up to 64 unsigned bits, which int64 multiplication wraps to the same bit
    pattern; viewed as a pair of int32 (little-endian: low word first) each product gives
    both words without a shift or a mask.
    """
    product = b.view(torch.uint32).to(torch.int64) * a
    if not runtime.concrete(product):  # traced: inductor may lay the product out with a stride-0 last
        return (product >> 32).to(torch.int32), product.to(torch.int32)  # dim, which the view refuses
    words = product.unsqueeze(-1).view(torch.int32)
    return words[..., 1], words[..., 0]


def _as_int32(word: Tensor) -> Tensor:
    """An int64 tensor holding a 32-bit word, as the int32 of the same bits."""
    return word.to(torch.uint32).view(torch.int32)


def philox_uint32(seed: Tensor, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> Tensor:
    """First output of Philox4x32-10, as triton.language.philox computes it.

    seed: int64 tensor of one element (key = its low and high 32-bit words); the
    counters are int64 tensors holding values in [0, 2^32), broadcast together.
    Returns int64 values in [0, 2^32).

    The words are carried as int32 (xor does not care about sign), and each operation runs
    on the broadcast shape of its operands: the first rounds, whose words depend on only
    some of the counters, cost little.
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0, c1, c2, c3 = (c.to(torch.uint32).view(torch.int32) for c in (c0, c1, c2, c3))
    for _ in range(9):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ _as_int32(k0), lo_b, hi_a ^ c3 ^ _as_int32(k1), lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    # Tenth round: only its first word is returned, which needs only the product with c2.
    hi_b, _ = _mulhilo32(_PHILOX_ROUND_B, c2)
    return (hi_b ^ c1 ^ _as_int32(k0)).view(torch.uint32).to(torch.int64)


def dropout_keep_mask(seed: Tensor, rng_rows: Tensor, rows: Tensor, cols: Tensor, dropout_p: float) -> Tensor:
    """Keep-mask drawn as the kernels draw it: Philox(seed; key j, query i, b*H+h, 0).

    rng_rows, rows, cols: int64 tensors that broadcast to the mask's shape. An element is
    kept when the draw's top 24 bits reach the threshold, that is when the draw reaches
    the threshold shifted up by the 8 bits dropped.
    """
    r = philox_uint32(seed, cols, rows, rng_rows, torch.zeros_like(cols))
    return r >= dropout_threshold(dropout_p) << 8


class _Problem:
    """Per-call constants and broadcast helpers for the chunked computation.

    Scores are held as (B, Hk, G, rows, Sk): the G query heads that share a key head sit
    beside it, so GQA needs no copy of k or v.
    """

    def __init__(self, q, k, seqlens_q, seqlens_k, bias, alibi_slopes, seed, dropout_p, softmax_scale,
                 softcap, window_left, window_right, bottom_right):
        self.B, self.Sq, self.H, self.D = q.shape
        self.Sk, self.Hk = k.shape[1], k.shape[2]
        self.G = self.H // self.Hk
        dev = q.device
        self.cols = torch.arange(self.Sk, device=dev)
        view = (self.B, 1, 1, 1, 1)
        self.len_q = seqlens_q.to(torch.int64).view(view) if seqlens_q is not None else None
        self.len_k = seqlens_k.to(torch.int64).view(view) if seqlens_k is not None else None
        if bottom_right:
            lq = self.len_q if self.len_q is not None else self.Sq
            lk = self.len_k if self.len_k is not None else self.Sk
            self.diag = lk - lq
        else:
            self.diag = 0
        self.bias = None
        # With a float bias the log-sum-exp is float64, as the kernels keep it: a row of one
        # huge mask value (-1e9) would lose log(l) in float32, and the backward's exp(s - lse).
        self.lse_dtype = torch.float64 if bias is not None and bias.dtype != torch.bool else torch.float32
        if bias is not None:
            self.bias = bias.expand(self.B, self.H, self.Sq, self.Sk).unflatten(1, (self.Hk, self.G))
        self.slopes = None
        if alibi_slopes is not None:
            self.slopes = alibi_slopes.float().reshape(-1, self.Hk, self.G, 1, 1)
        self.seed, self.dropout_p = seed, dropout_p
        self.scale, self.softcap = softmax_scale, softcap
        self.window_left, self.window_right = window_left, window_right
        if dropout_p > 0:
            b = torch.arange(self.B, device=dev).view(self.B, 1, 1, 1, 1)
            h = torch.arange(self.H, device=dev).view(1, self.Hk, self.G, 1, 1)
            self.rng_rows = b * self.H + h
        if any(isinstance(n, torch.SymInt) for n in (self.B, self.H, self.Sq, self.Sk)):
            # Traced with dynamic shapes: a loop over chunks would fix the lengths in the graph
            # (a new graph for every sequence length, and none after torch.compile's recompile
            # limit), so the rows go in one chunk, whose S x S scores the compiler schedules.
            self.row_chunks = [(0, self.Sq)]
        else:
            budget = _CHUNK_ELEMENTS_DROPOUT if dropout_p > 0 else _CHUNK_ELEMENTS
            chunk = max(1, min(self.Sq, budget // max(1, self.B * self.H * self.Sk)))
            self.row_chunks = [(m0, min(m0 + chunk, self.Sq)) for m0 in range(0, self.Sq, chunk)]

    def scores(self, qk: Tensor, m0: int, m1: int) -> tuple[Tensor, Optional[Tensor]]:
        """Masked scores (natural units) of query rows [m0, m1), and tanh of the softcap."""
        s = qk * self.scale
        t = None
        if self.softcap > 0:
            t = torch.tanh(s / self.softcap)
            s = t * self.softcap
        rows = torch.arange(m0, m1, device=qk.device).view(-1, 1)
        cols = self.cols.view(1, -1)
        rel = rows + self.diag - cols  # key j sits rel places left of query i's diagonal
        if self.slopes is not None:
            s = s - self.slopes * rel.abs()
        if self.bias is not None:
            chunk_bias = self.bias[:, :, :, m0:m1]
            if chunk_bias.dtype == torch.bool:
                s = s.masked_fill(~chunk_bias, -math.inf)
            else:
                # As the kernels: finite scores clamped to [-2^31, 2^31] (flash_attention._scores).
                s = s + chunk_bias.float()
                s = torch.where(s.abs() == math.inf, s, s.clamp(-2.0 ** 31, 2.0 ** 31))
        valid = torch.ones_like(rel, dtype=torch.bool)
        if self.len_k is not None:
            valid = valid & (cols < self.len_k)
        if self.len_q is not None:
            valid = valid & (rows < self.len_q)
        if self.window_right >= 0:
            valid = valid & (rel >= -self.window_right)
        if self.window_left >= 0:
            valid = valid & (rel <= self.window_left)
        return s.masked_fill(~valid, -math.inf), t

    def keep(self, m0: int, m1: int) -> Tensor:
        rows = torch.arange(m0, m1, device=self.cols.device).view(-1, 1)
        return dropout_keep_mask(self.seed, self.rng_rows, rows, self.cols.view(1, -1), self.dropout_p)


def _heads_grouped(x: Tensor, groups: int) -> Tensor:
    """(B, S, H, D) -> (B, Hk, G, S, D) float32, G = H // Hk."""
    B, S, H, D = x.shape
    return x.float().view(B, S, H // groups, groups, D).permute(0, 2, 3, 1, 4)


def _kv_grouped(x: Tensor) -> Tensor:
    """(B, S, Hk, D) -> (B, Hk, 1, S, D) float32."""
    return x.float().permute(0, 2, 1, 3).unsqueeze(2)


def _ungroup(x: Tensor) -> Tensor:
    """(B, Hk, G, S, D) -> (B, S, H, D), contiguous (FA2's outputs are; callers view them)."""
    B, Hk, G, S, D = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(B, S, Hk * G, D).contiguous()


def _lse_of(s: Tensor) -> Tensor:
    lse = torch.logsumexp(s, dim=-1)
    # A row with no key: +inf, as the kernels store it; exp(s - lse) is then 0.
    return lse.masked_fill(lse == -math.inf, math.inf)


@runtime.without_autocast
def forward_padded(q, k, v, seqlens_q, seqlens_k, bias, alibi_slopes, seed, dropout_p, softmax_scale,
                   softcap, window_left, window_right, bottom_right):
    """Attention on padded tensors; returns (out (B, Sq, H, D), lse (B, H, Sq) float32, float64
    with a float bias)."""
    pb = _Problem(q, k, seqlens_q, seqlens_k, bias, alibi_slopes, seed, dropout_p, softmax_scale,
                  softcap, window_left, window_right, bottom_right)
    qg, kg, vg = _heads_grouped(q, pb.G), _kv_grouped(k), _kv_grouped(v)
    outs, lses = [], []
    for m0, m1 in pb.row_chunks:
        s, _ = pb.scores(qg[:, :, :, m0:m1] @ kg.transpose(-1, -2), m0, m1)
        lse = _lse_of(s.to(pb.lse_dtype))
        p = torch.exp(s - lse.unsqueeze(-1)).float()
        if dropout_p > 0:
            p = p * pb.keep(m0, m1) / (1.0 - dropout_p)
        outs.append(p @ vg)
        lses.append(lse)
    out = _ungroup(torch.cat(outs, dim=3)) if outs else q.new_zeros(q.shape, dtype=torch.float32)
    lse = torch.cat(lses, dim=3).flatten(1, 2) if lses else q.new_zeros((pb.B, pb.H, 0), dtype=pb.lse_dtype)
    return out.to(q.dtype), lse


@runtime.without_autocast
def backward_padded(dout, dlse, q, k, v, out, lse, seqlens_q, seqlens_k, bias, alibi_slopes, seed, dropout_p,
                    softmax_scale, softcap, window_left, window_right, bottom_right):
    """Gradients of forward_padded; returns (dq, dk, dv) in the inputs' dtypes."""
    pb = _Problem(q, k, seqlens_q, seqlens_k, bias, alibi_slopes, seed, dropout_p, softmax_scale,
                  softcap, window_left, window_right, bottom_right)
    qg, kg, vg = _heads_grouped(q, pb.G), _kv_grouped(k), _kv_grouped(v)
    dog = _heads_grouped(dout, pb.G)
    lse_g = lse.reshape(pb.B, pb.Hk, pb.G, pb.Sq)
    delta = (dog * _heads_grouped(out, pb.G)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.reshape(pb.B, pb.Hk, pb.G, pb.Sq).to(delta.dtype)
    dqs = []
    dk = torch.zeros_like(kg.squeeze(2))
    dv = torch.zeros_like(vg.squeeze(2))
    for m0, m1 in pb.row_chunks:
        s, t = pb.scores(qg[:, :, :, m0:m1] @ kg.transpose(-1, -2), m0, m1)
        p = torch.exp(s - lse_g[..., m0:m1, None]).float()
        dp = dog[:, :, :, m0:m1] @ vg.transpose(-1, -2)
        p_dropped = p
        if dropout_p > 0:
            keep = pb.keep(m0, m1) / (1.0 - dropout_p)
            p_dropped = p * keep
            dp = dp * keep
        dv += (p_dropped.transpose(-1, -2) @ dog[:, :, :, m0:m1]).sum(2)
        ds = p * (dp - delta[..., m0:m1, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dqs.append(ds @ kg * softmax_scale)
        dk += (ds.transpose(-1, -2) @ qg[:, :, :, m0:m1]).sum(2) * softmax_scale
    dq = _ungroup(torch.cat(dqs, dim=3)) if dqs else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return dq.to(q.dtype), dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype)


# --------------------------------------------------------------------------------------
# Packed (varlen) batches: pad by index arithmetic, run the padded path, pack back.
# --------------------------------------------------------------------------------------


class Packing:
    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, total: int):
        starts = cu_seqlens[:-1].to(torch.int64)
        self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        pos = torch.arange(max_seqlen, device=cu_seqlens.device)
        self.valid = pos.view(1, -1) < self.lengths.view(-1, 1)
        # Padding slots read row 0 and are masked out; when packing back they write to a
        # spare row past the end that is dropped.
        self.gather = torch.where(self.valid, starts.view(-1, 1) + pos.view(1, -1), 0)
        self.scatter = torch.where(self.valid, self.gather, total).flatten()
        self.total = total

    def pad(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:  # no packed token: the padding slots need a row 0 to read (zeros, masked out)
            x = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        return x[self.gather]

    def pack(self, x: Tensor) -> Tensor:
        out = x.new_zeros((self.total + 1, *x.shape[2:]))
        out.index_copy_(0, self.scatter, x.flatten(0, 1))
        return out[: self.total]


# --------------------------------------------------------------------------------------
# Plain attention (no mask but causal, no dropout, ALiBi, softcap or bias): torch's own
# fused CPU flash attention, run in float32, which returns the log-sum-exp too.
# --------------------------------------------------------------------------------------


def plain_causal(q, k, bias, alibi_slopes, dropout_p, softmax_scale, softcap, window_left, window_right,
                 bottom_right, packing: Optional[tuple["Packing", "Packing"]] = None) -> Optional[bool]:
    """is_causal for torch's CPU flash attention when it computes exactly this call, else None.

    It covers no mask and causal with the diagonal at the keys' start (torch's is_causal),
    which is also FlashAttention-2's bottom-right diagonal where a sequence has as many
    queries as keys. Packed batches (packing = their Packing of q and k) run padded, with
    an additive mask over the padded keys; every sequence must have a key, so that every
    row does. A scale <= 0 takes the general path: torch's kernel returns NaN for it with causal.
    """
    if (q.device.type != "cpu" or bias is not None or alibi_slopes is not None or dropout_p > 0 or softcap > 0
            or softmax_scale <= 0 or window_left >= 0 or window_right > 0 or q.shape[0] == 0):
        return None
    causal = window_right == 0
    if packing is None:
        if k.shape[1] == 0 or q.shape[1] == 0 or (causal and bottom_right and q.shape[1] != k.shape[1]):
            return None
        return causal
    pq, pk = packing
    # The checks below read the lengths. Traced (torch.compile's fake tensors) they are unknown:
    # a data-dependent branch breaks fullgraph, so a trace takes the general path.
    if not runtime.concrete(pk.lengths):
        return None
    if pq.valid.numel() == 0 or pk.valid.shape[1] == 0 or int(pk.lengths.min()) == 0:
        return None
    if causal and bottom_right and not torch.equal(pq.lengths, pk.lengths):
        return None
    return causal


def _key_padding_mask(pk: "Packing") -> Tensor:
    """(B, 1, 1, max_k) float32: 0 for a sequence's keys, -inf for the padding after them."""
    return torch.zeros(pk.valid.shape, dtype=torch.float32, device=pk.valid.device).masked_fill(
        ~pk.valid, -math.inf)[:, None, None]


def _bhsd32(x: Tensor, groups: int = 1) -> Tensor:
    """(B, S, Hk, D) -> (B, Hk * groups, S, D) float32: each key head repeated for its query heads."""
    x = x.float()
    return (x.repeat_interleave(groups, dim=2) if groups > 1 else x).transpose(1, 2)


def _torch_flash_forward(q, k, v, softmax_scale, causal, mask=None):
    groups = q.shape[2] // k.shape[2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd32(q), _bhsd32(k, groups), _bhsd32(v, groups), 0.0, causal, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2).contiguous().to(q.dtype), lse.float().contiguous()


def native_forward(q, k, v, softmax_scale, causal, key_padding_mask=None, dropout_p=0.0):
    """Float32 attention as torch's own, under torch's autograd (runtime.torch_native; the caller
    checked that torch computes this call: flash_attn_interface._native). Returns out (B, Sq, H, D),
    contiguous. key_padding_mask (B, Sk) bool or None; dropout from torch's generator."""
    groups = q.shape[2] // k.shape[2]
    qt, kt, vt = _bhsd32(q), _bhsd32(k, groups), _bhsd32(v, groups)
    if key_padding_mask is None and dropout_p == 0:
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal,
                                                                            scale=softmax_scale)
    else:
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :]
            if causal:  # torch takes a mask or is_causal; the top-left diagonal as plain_causal's
                mask = mask & torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        out = runtime.torch_sdpa(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None,
                                 scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def _torch_flash_backward(dout, q, k, v, out, lse, softmax_scale, causal, mask=None):
    B, Sk, Hk, D = k.shape
    groups = q.shape[2] // Hk
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd32(dout), _bhsd32(q), _bhsd32(k, groups), _bhsd32(v, groups), _bhsd32(out), lse, 0.0, causal,
        attn_mask=mask, scale=softmax_scale)
    dk, dv = (x.transpose(1, 2).reshape(B, Sk, Hk, groups, D).sum(3) for x in (dk, dv))
    return dq.transpose(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@runtime.without_autocast
def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias, alibi_slopes, seed,
            dropout_p, softmax_scale, softcap, window_left, window_right, bottom_right):
    """Same contract as flash_attention.forward."""
    if cu_seqlens_q is None:
        causal = plain_causal(q, k, bias, alibi_slopes, dropout_p, softmax_scale, softcap, window_left,
                              window_right, bottom_right)
        if causal is not None:
            return _torch_flash_forward(q, k, v, softmax_scale, causal)
        return forward_padded(q, k, v, None, None, bias, alibi_slopes, seed, dropout_p, softmax_scale,
                              softcap, window_left, window_right, bottom_right)
    pq = Packing(cu_seqlens_q, max_seqlen_q, q.shape[0])
    pk = Packing(cu_seqlens_k, max_seqlen_k, k.shape[0])
    causal = plain_causal(q, k, bias, alibi_slopes, dropout_p, softmax_scale, softcap, window_left,
                          window_right, bottom_right, (pq, pk))
    if causal is not None:  # rows past a sequence's queries compute garbage that packing drops
        out, lse = _torch_flash_forward(pq.pad(q), pk.pad(k), pk.pad(v), softmax_scale, causal, _key_padding_mask(pk))
    else:
        out, lse = forward_padded(pq.pad(q), pk.pad(k), pk.pad(v), pq.lengths, pk.lengths, bias, alibi_slopes,
                                  seed, dropout_p, softmax_scale, softcap, window_left, window_right, bottom_right)
    lse_packed = pq.pack(lse.transpose(1, 2))  # (total_q, H); rows of no sequence are 0
    lse_packed = torch.where(_covered(pq).view(-1, 1), lse_packed, math.inf)
    return pq.pack(out), lse_packed.transpose(0, 1).contiguous()


@runtime.without_autocast
def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bias,
             alibi_slopes, seed, dropout_p, softmax_scale, softcap, window_left, window_right, bottom_right):
    """Same contract as flash_attention.backward."""
    if cu_seqlens_q is None:
        causal = plain_causal(q, k, bias, alibi_slopes, dropout_p, softmax_scale, softcap, window_left,
                              window_right, bottom_right)
        if causal is not None and dlse is None:
            return _torch_flash_backward(dout, q, k, v, out, lse, softmax_scale, causal)
        return backward_padded(dout, dlse, q, k, v, out, lse, None, None, bias, alibi_slopes, seed, dropout_p,
                               softmax_scale, softcap, window_left, window_right, bottom_right)
    pq = Packing(cu_seqlens_q, max_seqlen_q, q.shape[0])
    pk = Packing(cu_seqlens_k, max_seqlen_k, k.shape[0])
    lse_pad = pq.pad(lse.transpose(0, 1)).transpose(1, 2)  # (B, H, max_q)
    causal = plain_causal(q, k, bias, alibi_slopes, dropout_p, softmax_scale, softcap, window_left,
                          window_right, bottom_right, (pq, pk))
    if causal is not None and dlse is None:
        # Padding rows read packed row 0: a zero output gradient and an lse of +inf (no
        # probability mass) make them add nothing to dk and dv.
        dout_pad = pq.pad(dout) * pq.valid[:, :, None, None]
        lse_pad = lse_pad.masked_fill(~pq.valid[:, None, :], math.inf)
        dq, dk, dv = _torch_flash_backward(dout_pad, pq.pad(q), pk.pad(k), pk.pad(v), pq.pad(out), lse_pad,
                                           softmax_scale, causal, _key_padding_mask(pk))
        return pq.pack(dq), pk.pack(dk), pk.pack(dv)
    dlse_pad = pq.pad(dlse.transpose(0, 1)).transpose(1, 2) if dlse is not None else None
    dq, dk, dv = backward_padded(pq.pad(dout), dlse_pad, pq.pad(q), pk.pad(k), pk.pad(v), pq.pad(out), lse_pad,
                                 pq.lengths, pk.lengths, bias, alibi_slopes, seed, dropout_p, softmax_scale,
                                 softcap, window_left, window_right, bottom_right)
    return pq.pack(dq), pk.pack(dk), pk.pack(dv)


def _covered(p: Packing) -> Tensor:
    """Which packed rows belong to a sequence."""
    covered = torch.zeros(p.total + 1, dtype=torch.bool, device=p.valid.device)
    covered[p.scatter] = True
    return covered[: p.total]


@runtime.without_autocast
def probabilities(q, k, seqlens_q, seqlens_k, bias, alibi_slopes, softmax_scale, softcap, window_left, window_right,
                  bottom_right) -> Tensor:
    """Attention probabilities (B, H, Sq, Sk) float32 of padded q, k; rows with no key are 0."""
    pb = _Problem(q, k, seqlens_q, seqlens_k, bias, alibi_slopes, None, 0.0, softmax_scale, softcap,
                  window_left, window_right, bottom_right)
    s, _ = pb.scores(_heads_grouped(q, pb.G) @ _kv_grouped(k).transpose(-1, -2), 0, pb.Sq)
    return torch.exp(s - _lse_of(s).unsqueeze(-1)).flatten(1, 2)


def dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, dropout_p, device):
    """The keep-mask for this seed, as flash_attention.dropout_mask draws it."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(nheads, device=device).view(1, -1, 1, 1)
    rows = torch.arange(seqlen_q, device=device).view(1, 1, -1, 1)
    cols = torch.arange(seqlen_k, device=device).view(1, 1, 1, -1)
    return dropout_keep_mask(seed, b * nheads + h, rows, cols, dropout_p)


__all__ = ["forward", "backward", "probabilities", "dropout_mask", "philox_uint32", "Packing"]
