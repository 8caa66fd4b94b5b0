"""Hopper resources of the training-op kernels without a GPU: each kernel compiled for
sm_90a at its launcher's configuration (registers, spills, 16-byte loads).

    python -m tasks.bench_ops --resources
"""

from __future__ import annotations

import os
from typing import Optional

import triton

def kernel_variants() -> list[tuple]:
    """(name, jit function, argument types, constexprs, num_warps[, unaligned]) of each op kernel
    (bf16); unaligned names the integer arguments not to declare divisible by 16.

    The configurations are the launchers' GPU choices (kernels.norms._plan etc.), so this
    must run without TRITON_INTERPRET (the interpreter's configurations differ).
    """
    import importlib

    from kernels import activations, norms, rotary

    # By module path: `kernels.cross_entropy` the attribute may be the exported function.
    ce = importlib.import_module("kernels.cross_entropy")

    types = dict(Mean="*fp32", Rstd="*fp32", DW="*fp32", DB="*fp32", Cos="*fp32", Sin="*fp32", Offsets="*i32",
                 Pos="*i64", Target="*i64", Loss="*fp32", NValid="*fp32", RowScale="*fp32", eps="fp32",
                 smoothing="fp32")
    variants = []
    for hidden in (4096, 16384):
        fused, bm, bn, warps = norms._plan(hidden)
        flags = dict(IS_RMS=False, HAS_W=True, HAS_B=True, BLOCK_N=bn, **({"BLOCK_M": bm} if fused else {}))
        kind = "fused" if fused else "looped"
        variants.append((f"norm fwd {kind} N={hidden}", norms._fwd_fused if fused else norms._fwd_looped, types,
                         dict(flags, HAS_RES=True), warps))
        if fused:
            variants.append((f"norm bwd fused N={hidden}", norms._bwd_fused, types,
                             dict(flags, HAS_DS=True, NEED_DW=True), min(16, 2 * warps)))
        else:
            variants.append((f"norm bwd looped (dx) N={hidden}", norms._bwd_looped, types,
                             dict(IS_RMS=False, HAS_W=True, HAS_DS=True, BLOCK_N=bn), min(16, 2 * warps)))
            variants.append((f"norm bwd looped (dweight, dbias) N={hidden}", norms._dwdb_looped, types,
                             dict(IS_RMS=False, NEED_DW=True, HAS_B=True, BLOCK_N=bn), warps))
    for interleaved in (False, True):
        variants.append((f"rotary {'gptj' if interleaved else 'neox'} D=128 rotary 64", rotary._rotary_kernel,
                         types, dict(INTERLEAVED=interleaved, CONJ=False, HAS_OFFSETS=True, HAS_POS=False,
                                     COPY_TAIL=True, BLOCK_S=32, BLOCK_HALF=32, BLOCK_TAIL=64,
                                     HEADS=rotary.GPU_HEADS_PER_PROGRAM), 4))
    tile = dict(BLOCK_M=activations.GPU_TILE["BLOCK_M"], BLOCK_N=activations.GPU_TILE["BLOCK_N"])
    warps = activations.GPU_TILE["num_warps"]
    variants.append(("gelu bwd tanh + bias", activations._gelu_bwd_kernel, types,
                     dict(tile, ACT=activations.GELU_TANH, HAS_B=True), warps))
    variants.append(("geglu bwd erf", activations._glu_bwd_kernel, types, dict(tile, ACT=activations.GELU_ERF), warps))
    ce_flags = dict(HAS_GRAD=True, MEAN=True, SMOOTH=True, HAS_ROW_SCALE=False, ALIGN=8, BLOCK_V=ce.GPU_MAX_BLOCK_V)
    variants.append(("cross_entropy, vocab a multiple of 16, smoothing", ce._ce_kernel, types,
                     dict(ce_flags, LOGITS_ALIGNED=True), 16))
    # V = 50257: the models' padded logits rows (stride a multiple of 16), and a contiguous
    # (N, 50257) tensor's, whose rows start at every 2-byte offset.
    variants.append(("cross_entropy, vocab 50257, aligned rows", ce._ce_kernel, types,
                     dict(ce_flags, LOGITS_ALIGNED=True), 16, ("V",)))
    variants.append(("cross_entropy, vocab 50257, contiguous rows", ce._ce_kernel, types,
                     dict(ce_flags, LOGITS_ALIGNED=False), 16, ("V", "stride_l")))
    variants.append(("cross_entropy backward scaling, vocab 50257", ce._scale_rows_kernel, dict(types, Scale="*fp32"),
                     dict(ALIGN=8, BLOCK_V=ce.GPU_MAX_BLOCK_V), 16, ("V", "stride_s")))
    return variants


def hopper_resources(variants: Optional[list] = None) -> list[dict]:
    """Compiles each variant for sm_90a (no GPU needed): registers, spill bytes, 16-byte global loads.

    Pointers, strides and sizes are declared divisible by 16, as the JIT specializes them
    for a hidden size such as 4096.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    rows = []
    for name, fn, types, constexprs, warps, *unaligned in variants if variants is not None else kernel_variants():
        # Capitalized arguments are tensors, except the sizes M, N, V.
        sig = {a: "constexpr" if a in constexprs else
               types.get(a, "*bf16" if a[0].isupper() and a not in ("M", "N", "V") else "i32") for a in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                   if sig[a] not in ("constexpr", "fp32") and a not in ("offset", "ignore_index", "rows_per_program")
                   and a not in (unaligned[0] if unaligned else ())}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        ptx = compiled.asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                    text=True, check=True).stderr
        finally:
            os.unlink(f.name)
        rows.append({"kernel": name, "num_warps": warps,
                     "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
                     "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
                     "loads_16B": len(re.findall(r"ld\.global[.\w:]*\.v4\.b32", ptx)),
                     "stores_16B": len(re.findall(r"st\.global[.\w:]*\.v4\.b32", ptx))})
        print(f"| {name} | {warps} | {rows[-1]['registers']} | {rows[-1]['spill_bytes']} | "
              f"{rows[-1]['loads_16B']} | {rows[-1]['stores_16B']} |", flush=True)
    return rows




def flag_variants() -> list[tuple]:
    """Every combination of each op kernel's feature flags, at its launcher's GPU tile, in bf16
    (and all flags on in fp32): (name, jit function, types, constexprs, num_warps).

    The interpreter runs each branch, but only the compiler checks types strictly; a
    combination no test launches on a GPU would otherwise fail there first.
    """
    import importlib
    import itertools

    from kernels import activations, norms, rotary

    ce = importlib.import_module("kernels.cross_entropy")
    base_types = dict(kernel_variants()[0][2])

    def combos(names):
        return [dict(zip(names, bits)) for bits in itertools.product((False, True), repeat=len(names))]

    variants = []
    for dtype in ("bf16", "fp32"):
        types = dict(base_types, **({"X": "*fp32", "R": "*fp32", "Y": "*fp32", "S": "*fp32", "DY": "*fp32",
                                     "DS": "*fp32", "DX": "*fp32", "W": "*fp32", "B": "*fp32"} if dtype == "fp32"
                                    else {}))

        def pick(flag_sets):
            return flag_sets if dtype == "bf16" else flag_sets[-1:]  # fp32: every flag on

        for hidden in (4096, 16384):
            fused, bm, bn, warps = norms._plan(hidden)
            tile = dict(BLOCK_N=bn, **({"BLOCK_M": bm} if fused else {}))
            fwd, bwd = (norms._fwd_fused, norms._bwd_fused) if fused else (norms._fwd_looped, norms._bwd_looped)
            for flags in pick(combos(("IS_RMS", "HAS_RES", "HAS_W", "HAS_B"))):
                variants.append((f"norm fwd N={hidden} {dtype} {flags}", fwd, types, dict(flags, **tile), warps))
            if fused:
                for flags in pick(combos(("IS_RMS", "HAS_W", "HAS_B", "HAS_DS"))):
                    variants.append((f"norm bwd N={hidden} {dtype} {flags}", bwd, types,
                                     dict(flags, NEED_DW=flags["HAS_W"], **tile), min(16, 2 * warps)))
                continue
            for flags in pick(combos(("IS_RMS", "HAS_W", "HAS_DS"))):
                variants.append((f"norm bwd (dx) N={hidden} {dtype} {flags}", bwd, types, dict(flags, **tile),
                                 min(16, 2 * warps)))
            for flags in pick(combos(("IS_RMS", "NEED_DW", "HAS_B"))):
                variants.append((f"norm bwd (dweight, dbias) N={hidden} {dtype} {flags}", norms._dwdb_looped, types,
                                 dict(flags, **tile), warps))
        rot_types = dict(types, X=f"*{dtype}", Out=f"*{dtype}")
        for flags in pick(combos(("INTERLEAVED", "CONJ", "HAS_OFFSETS", "HAS_POS", "COPY_TAIL"))):
            variants.append((f"rotary {dtype} {flags}", rotary._rotary_kernel, rot_types,
                             dict(flags, BLOCK_S=32, BLOCK_HALF=32, BLOCK_TAIL=64, HEADS=rotary.GPU_HEADS_PER_PROGRAM),
                             4))
        act_types = {k: f"*{dtype}" for k in ("X", "B", "Y", "DY", "DX", "DB", "Yg", "Out", "DO", "DYg")}
        tile = {k: activations.GPU_TILE[k] for k in ("BLOCK_M", "BLOCK_N")}
        warps = activations.GPU_TILE["num_warps"]
        gelus = [dict(ACT=act, HAS_B=has_b) for act in (activations.GELU_ERF, activations.GELU_TANH)
                 for has_b in (False, True)]
        glus = [dict(ACT=act) for act in (activations.SILU, activations.GELU_ERF, activations.GELU_TANH)]
        for kernel, flag_sets in ((activations._gelu_fwd_kernel, gelus), (activations._gelu_bwd_kernel, gelus),
                                  (activations._glu_fwd_kernel, glus), (activations._glu_bwd_kernel, glus)):
            for flags in pick(flag_sets):
                variants.append((f"{kernel.__name__} {dtype} {flags}", kernel, act_types, dict(flags, **tile), warps))
        ce_types = dict(types, Logits=f"*{dtype}", Grad=f"*{dtype}")
        for flags in pick(combos(("HAS_GRAD", "MEAN", "SMOOTH", "HAS_ROW_SCALE"))):
            variants.append((f"cross_entropy {dtype} {flags}", ce._ce_kernel, ce_types,
                             dict(flags, LOGITS_ALIGNED=False, ALIGN=16 // (4 if dtype == "fp32" else 2),
                                  BLOCK_V=ce.GPU_MAX_BLOCK_V), 16))
    return variants


def compile_for_hopper(variants: list[tuple]) -> list[dict]:
    """Compiles each variant for sm_90a (Triton's ptxas included; no GPU needed): name and shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for name, fn, types, constexprs, warps, *_ in variants:
        sig = {a: "constexpr" if a in constexprs else
               types.get(a, "*bf16" if a[0].isupper() and a not in ("M", "N", "V") else "i32") for a in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        rows.append({"kernel": name, "shared": compiled.metadata.shared})
    return rows
