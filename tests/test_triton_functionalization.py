"""Every Triton launch can be functionalized by torch.compile without losing a write.

Under torch.compile (and opcheck's AOT dispatch) a kernel launched through wrap_triton is
functionalized: torch finds the arguments the kernel stores into (from its TTIR) and
clones each of them on its own before the launch. One tensor passed as two written
arguments therefore loses one argument's writes. That happened to the packed SwiGLU /
GeGLU backward (the two halves of one gradient tensor as DX and DYg): opcheck on an H100
reported "gradients differ between eager and AOTDispatcher".

This runs each public op forward and backward on CPU tensors with the Triton launches
recorded instead of run (no GPU and no interpreter needed: the TTIR is generated for
sm_90), asks torch's own analysis which arguments each kernel writes, and checks that no
two written arguments share storage. The oracle is torch's functionalization contract,
applied by its own code (torch._higher_order_ops.triton_kernel_wrap).
"""

import os
import subprocess
import sys

_PROBE = r'''
import json
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner


class _Hopper:  # TTIR generation asks the active driver for a target; there is no GPU here
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Hopper())
from torch._higher_order_ops import triton_kernel_wrap as tkw
from torch._higher_order_ops.triton_kernel_wrap import identify_mutated_tensors
import sys
sys.path.insert(0, "tests")
import kernels
from launch_recorder import backward, install, leaf

launches = install()
torch.manual_seed(0)


# Activations: bias / no bias, packed and separate gated units.
backward(kernels.gelu(leaf(4, 32), leaf(32)))
backward(kernels.gelu(leaf(4, 32), approximate="tanh"))
backward(kernels.swiglu(leaf(4, 64)))
backward(kernels.geglu(leaf(4, 32), leaf(4, 32)))
# Norms: fused rows and looped (wide) rows, with and without the residual sum.
backward(kernels.rms_norm(leaf(4, 32), leaf(32)))
backward(*kernels.add_layer_norm(leaf(4, 32), leaf(4, 32), leaf(32), leaf(32)))
backward(*kernels.add_rms_norm(leaf(2, 20000), leaf(2, 20000), leaf(20000)))
backward(kernels.layer_norm(leaf(2, 20000), leaf(20000), leaf(20000)))
# Cross-entropy, plain and fused with the projection.
target = torch.tensor([1, -100, 3, 0])
backward(kernels.cross_entropy(leaf(4, 50), target, label_smoothing=0.1))
backward(kernels.fused_linear_cross_entropy(leaf(4, 16), leaf(50, 16), target))
# Rotary, out of place and in place (the kernel reads and writes one tensor).
cos, sin = torch.randn(8, 8), torch.randn(8, 8)
backward(kernels.apply_rotary_emb(leaf(2, 8, 3, 32), cos, sin))
kernels.apply_rotary_emb(torch.randn(2, 8, 3, 32, dtype=torch.bfloat16), cos, sin, inplace=True)
# Attention: dense (causal, GQA, dropout, softcap, ALiBi), packed, and masked SDPA.
backward(*kernels.flash_attn_func(leaf(2, 64, 4, 64), leaf(2, 64, 2, 64), leaf(2, 64, 2, 64), dropout_p=0.1,
                                  causal=True, softcap=5.0, alibi_slopes=torch.rand(4),
                                  return_attn_probs=False, deterministic=True).unsqueeze(0))
cu = torch.tensor([0, 5, 64], dtype=torch.int32)
backward(kernels.flash_attn_varlen_func(leaf(64, 4, 64), leaf(64, 4, 64), leaf(64, 4, 64), cu, cu, 59, 59,
                                        window_size=(8, 0)))
mask = torch.randn(2, 1, 64, 64)
backward(kernels.scaled_dot_product_attention(leaf(2, 4, 64, 64), leaf(2, 4, 64, 64), leaf(2, 4, 64, 64),
                                              attn_mask=mask))
# Decoding: appending new keys into the cache in place, split over the cache.
k_cache, v_cache = torch.zeros(2, 256, 2, 64, dtype=torch.bfloat16), torch.zeros(2, 256, 2, 64, dtype=torch.bfloat16)
kernels.flash_attn_with_kvcache(torch.randn(2, 1, 8, 64, dtype=torch.bfloat16), k_cache, v_cache,
                                k=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16),
                                v=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16),
                                cache_seqlens=torch.tensor([3, 200], dtype=torch.int32), num_splits=4)

def stored(kernel, named):
    """The arguments the kernel stores into, by torch's analysis on the inlined TTIR.

    torch analyses the TTIR before inlining, where a pointer passed to a helper whose
    result feeds a store address (cu_seqlens into _seq_bounds) counts as written too."""
    from triton._C.libtriton import ir, passes
    module, names = tkw.generate_ttir(kernel, dict(named), {})
    pm = ir.pass_manager(module.context)
    passes.common.add_inliner(pm)
    passes.common.add_canonicalizer(pm)
    passes.common.add_symbol_dce(pm)
    pm.run(module, "inline")
    functions = tkw.ttir_to_functions(module)
    tkw.analyze_kernel_mutations.reset()
    tkw.get_tma_stores.reset()
    flags = tkw.analyze_kernel_mutations(functions, next(iter(functions)), len(names))
    return [n for n, f in zip(names, flags) if f]


report = []
for kernel, args, kwargs in launches:
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    named = dict(zip(fn.arg_names, args), **kwargs)
    cloned = identify_mutated_tensors(kernel, dict(named), {})  # what functionalization clones
    written = stored(kernel, named)
    tensors = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
    clashes = [(a, b) for i, a in enumerate(cloned) for b in cloned[i + 1:]
               if (a in written or b in written)
               and tensors[a].untyped_storage().data_ptr() == tensors[b].untyped_storage().data_ptr()]
    needless = {n: str(tensors[n].dtype) for n in cloned if n not in written}
    report.append(dict(kernel=fn.__name__, cloned=cloned, written=written, clashes=clashes, needless=needless))
print(json.dumps(report))
'''


def test_no_two_written_arguments_of_a_launch_share_storage():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    report = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    kernels_seen = {r["kernel"] for r in report}
    # Every kernel family ran, and torch's analysis found what each one writes.
    for name in ("_gelu_bwd_kernel", "_glu_bwd_kernel", "_bwd_fused", "_bwd_looped", "_dwdb_looped", "_ce_kernel",
                 "_scale_rows_kernel", "_rotary_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq",
                 "_kvcache_attn_kernel"):
        assert name in kernels_seen, (name, sorted(kernels_seen))
    assert all(r["written"] for r in report), [r for r in report if not r["written"]]
    clashes = [r for r in report if r["clashes"]]
    assert not clashes, clashes
    # torch also clones what a kernel only reads but passes to a helper that computes store
    # addresses from it. That costs a copy per launch under torch.compile: acceptable for
    # small integer index tensors (cu_seqlens, block tables), not for a data tensor such as
    # q passed as a placeholder.
    needless = [r for r in report if any("int" not in dtype for dtype in r["needless"].values())]
    assert not needless, needless
