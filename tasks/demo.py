"""``zoo demo``: check the attention kernels against float64 math, then a quick benchmark.

On a CUDA machine both parts run the Triton kernels on the GPU. Without CUDA the
check runs the same Triton kernels in Triton's interpreter (slow, so the shapes are
tiny), and the benchmark times the PyTorch path of tritonzoo against torch's CPU SDPA,
which says nothing about kernel speed.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal); nheads_k < nheads is GQA.
CASES = [
    (2, 17, 17, 4, 2, 32, False),
    (2, 17, 17, 4, 2, 32, True),
    (2, 64, 64, 4, 2, 32, False),
    (2, 64, 64, 4, 2, 32, True),
    (2, 17, 64, 4, 2, 32, True),  # fewer queries than keys: the diagonal ends at the last key
    (2, 64, 17, 4, 2, 32, True),  # more queries than keys: the first 47 queries see no key
]
# fp32 against float64: allowed max abs error, relative to max(1, max |reference|).
TOLERANCE = 1e-4


def attention_float64(q, k, v, causal: bool):
    """softmax(q k^T / sqrt(d)) v in float64, written out: the oracle of the check.

    q (B, Sq, H, D), k/v (B, Sk, Hk, D) with H a multiple of Hk (each k/v head serves
    H // Hk consecutive query heads). causal: key j is allowed for query i iff
    j <= i + Sk - Sq (bottom-right, FlashAttention-2's convention); a query with no
    allowed key outputs zeros. Returns (B, Sq, H, D) float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    i = torch.arange(seqlen_q, device=q.device).view(-1, 1)
    j = torch.arange(seqlen_k, device=q.device).view(1, -1)
    allowed = j <= i + seqlen_k - seqlen_q if causal else torch.ones_like(i * j, dtype=torch.bool)
    has_key = allowed.any(dim=-1, keepdim=True)
    # Rows without a key: softmax of zeros instead of all -inf (no NaN, in the gradient
    # either), then multiplied by the all-false mask.
    scores = scores.masked_fill(~allowed, -math.inf).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * allowed
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def check_case(case, device: str, seed: int = 0) -> dict:
    """Max abs errors of flash_attn_func's out, dq, dk, dv (fp32) against attention_float64.

    Returns {"out": err, "dq": ..., "dk": ..., "dv": ..., "passed": bool}.
    """
    from kernels import flash_attn_func

    batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal = case
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    q = randn(batch, seqlen_q, nheads, head_dim).requires_grad_()
    k = randn(batch, seqlen_k, nheads_k, head_dim).requires_grad_()
    v = randn(batch, seqlen_k, nheads_k, head_dim).requires_grad_()
    dout = randn(batch, seqlen_q, nheads, head_dim)
    out = flash_attn_func(q, k, v, causal=causal)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_float64(q64, k64, v64, causal)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), dout.double()))

    result, passed = {}, True
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.double() - w).abs().max().item()
        result[name] = err
        passed &= err <= TOLERANCE * max(1.0, w.abs().max().item())  # NaN fails too
    result["passed"] = passed
    return result


def run_checks(device: str) -> bool:
    """Prints one line per case with its errors and PASS/FAIL; True if all pass."""
    print(f"{'B':>2} {'Sq':>3} {'Sk':>3} {'H':>2} {'Hk':>2} {'D':>3} {'causal':>6}"
          f"  {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8}  result")
    all_passed = True
    for case in CASES:
        batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, causal = case
        try:
            r = check_case(case, device)
            errors = "  ".join(f"{r[n]:8.1e}" for n in ("out", "dq", "dk", "dv"))
            verdict = "PASS" if r["passed"] else "FAIL"
        except Exception as exc:  # a crash is a failed case, reported like one
            errors, verdict = f"{'error':>8}", f"FAIL ({type(exc).__name__}: {exc})"
        all_passed &= verdict == "PASS"
        print(f"{batch:>2} {seqlen_q:>3} {seqlen_k:>3} {nheads:>2} {nheads_k:>2} {head_dim:>3} "
              f"{'yes' if causal else 'no':>6}  {errors}  {verdict}")
    return all_passed


def main(out_dir: str = os.path.join("bench_out", "demo"), command: str = "zoo demo") -> int:
    """Runs the demo, writing the benchmark's attention.json and attention.png to out_dir;
    returns 0 if every correctness case passes, else 1 (and nothing is written).

    Raises ValueError, before anything runs, when out_dir is a file.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        # Triton reads this when `kernels` decorates its kernels: set it before the import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import kernels
    from tasks import bench_attention

    bench_attention.check_out_dir(out_dir)
    device = "cuda" if cuda else "cpu"
    if cuda:
        where = f"GPU {torch.cuda.get_device_name()}: Triton kernels for the check and the benchmark"
    elif kernels.INTERPRET:
        where = ("CPU, no CUDA: the check runs the Triton kernels in Triton's interpreter; the benchmark "
                 "times tritonzoo's PyTorch path against torch's CPU SDPA (not a kernel benchmark)")
    else:
        where = ("CPU, no CUDA, Triton interpreter off (TRITON_INTERPRET=0 or kernels imported earlier): "
                 "both parts run tritonzoo's PyTorch path")
    print(f"tritonzoo demo: torch {torch.__version__}, triton {bench_attention.triton.__version__}")
    print(where)

    print("\n[1/2] flash_attn_func (fp32) forward and backward vs float64 attention: max abs errors "
          f"(pass: <= {TOLERANCE:g} x max(1, max |reference|))")
    start = time.perf_counter()
    passed = run_checks(device)
    print(f"correctness: {'all PASS' if passed else 'FAILED'} ({time.perf_counter() - start:.1f} s)")
    if not passed:
        print("skipping the benchmark: the kernels are wrong on this machine", file=sys.stderr)
        return 1

    print("\n[2/2] quick attention benchmark (full sweep on a GPU: zoo bench attention)")
    start = time.perf_counter()
    bench_attention.run(device=device, quick=True, out_dir=out_dir, command=command)
    print(f"benchmark: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
