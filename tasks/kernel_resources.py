"""Registers and spills of the attention kernels on Hopper, without a GPU.

Compiles each kernel ahead of time for sm_90 (Triton needs no device for that), runs
Triton's bundled ptxas with -v on the PTX and reports registers per thread, spill
bytes and whether the dots became wgmma. This is how the autotune candidates in
kernels/flash_attention.py were chosen.

    python -m tasks.kernel_resources                 # the autotune candidates
    python -m tasks.kernel_resources --sweep         # every block shape (slow: ~1 s a compile)
    python -m tasks.kernel_resources --features      # each feature flag on, then all of them
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must precede importing the kernels: we need JIT functions

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import flash_attention as fa  # noqa: E402
from kernels.autotune import table_key  # noqa: E402

KERNELS = {"fwd": (fa._attn_fwd, fa._FWD_CANDIDATES), "dkdv": (fa._attn_bwd_dkdv, fa._DKDV_CANDIDATES),
           "dq": (fa._attn_bwd_dq, fa._DQ_CANDIDATES)}
FLAGS = dict(FP32=False, IS_VARLEN=False, BOTTOM_RIGHT=True, HAS_LEFT=False, HAS_RIGHT=True, HAS_SOFTCAP=False,
             HAS_ALIBI=False, HAS_BIAS=False, BIAS_IS_BOOL=False, HAS_DROPOUT=False)
#: Feature variants over FLAGS (causal): the interpreter runs every branch, but only the
#: compiler checks types strictly, and features add registers and shared memory.
FEATURES = {
    "causal": {}, "non-causal": dict(HAS_RIGHT=False, BOTTOM_RIGHT=False),
    "varlen": dict(IS_VARLEN=True), "window": dict(HAS_LEFT=True), "softcap": dict(HAS_SOFTCAP=True),
    "alibi": dict(HAS_ALIBI=True), "bias": dict(HAS_BIAS=True), "bool bias": dict(HAS_BIAS=True, BIAS_IS_BOOL=True),
    "dropout": dict(HAS_DROPOUT=True),
    "all": dict(IS_VARLEN=True, HAS_LEFT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_BIAS=True, HAS_DROPOUT=True),
}
#: Largest shared memory one block may use on an H100 (227 KiB).
H100_MAX_SHARED = 232448


def feature_variant(kernel: str, dtype: str, head_dim: int, feature: str) -> tuple:
    """(fn, dtype, constexprs, num_warps, num_stages) of a kernel at its first autotune
    candidate for (dtype, head_dim), with a FEATURES variant on."""
    fn, candidates = KERNELS[kernel]
    key = table_key(dtype == "fp32", head_dim)
    bm, bn, w, s = candidates[key][0]
    block_d = max(16, triton.next_power_of_2(head_dim))
    flags = dict(FLAGS, **FEATURES[feature], FP32=dtype == "fp32", HEAD_DIM=head_dim, BLOCK_D=block_d,
                 BLOCK_M=bm, BLOCK_N=bn)
    return fn, dtype, flags, w, s


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    float_pointers = {"Lse", "Delta", "DLse", "Alibi", "Bias"}
    # With a float bias the log-sum-exp (and its gradient) is float64 (flash_attention.forward).
    lse64 = constexprs.get("HAS_BIAS") and not constexprs.get("BIAS_IS_BOOL")
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = ("*fp64" if lse64 and name in ("Lse", "DLse") else "*fp32" if name in float_pointers
                         else "*i64" if name == "Seed"
                         else "*i32" if name in ("CuQ", "CuK") else f"*{dtype}")
        elif name in ("sm_scale", "qk_scale", "softcap", "dropout_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def resources(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    """Compiles one kernel variant for sm_90a; returns registers, spill bytes and the dot instruction."""
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    ptx = compiled.asm["ptx"]
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "dot": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma",
            "shared": compiled.metadata.shared}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--sweep", action="store_true", help="every block shape, not just the candidates")
    parser.add_argument("--features", action="store_true",
                        help="each feature flag on (at the first candidate), instead of the block shapes")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    if args.features:
        print("| kernel | D | dtype | feature | block_m x block_n | warps | registers | spill bytes | dot | smem |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, d, dtype, feature in itertools.product(KERNELS, args.head_dims, args.dtypes, FEATURES):
            fn, dt, flags, w, s = feature_variant(name, dtype, d, feature)
            r = resources(fn, dt, flags, w, s)
            print(f"| {name} | {d} | {dtype} | {feature} | {flags['BLOCK_M']}x{flags['BLOCK_N']} | {w} | "
                  f"{r['registers']} | {r['spill_stores']} | {r['dot']} | {r['shared']} |", flush=True)
        return 0
    print("| kernel | D | dtype | block_m x block_n | warps | stages | registers | spill bytes | dot | smem |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (fn, candidates) in KERNELS.items():
        for d in args.head_dims:
            for dtype in args.dtypes:
                key = table_key(dtype == "fp32", d)
                if args.sweep:
                    shapes = [(bm, bn, w, 2) for bm, bn, w in itertools.product((16, 32, 64, 128), (16, 32, 64, 128),
                                                                                (4, 8)) if bm * bn <= 128 * 128]
                else:
                    shapes = candidates[key]
                for bm, bn, w, s in shapes:
                    flags = dict(FLAGS, FP32=dtype == "fp32", HEAD_DIM=d, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn)
                    r = resources(fn, dtype, flags, w, s)
                    print(f"| {name} | {d} | {dtype} | {bm}x{bn} | {w} | {s} | {r['registers']} | "
                          f"{r['spill_stores']} | {r['dot']} | {r['shared']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
