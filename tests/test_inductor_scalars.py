"""Every Triton kernel compiles with its float arguments typed fp64, as torch.compile types them.

Inductor passes a Python float argument of a kernel as fp64. On an H100 that made the attention
and decoding kernels fail to compile under torch.compile (an fp64 softmax scale turned the
accumulator fp64, and tl.dot refused it); the kernels now cast such arguments to fp32 at entry.

Here each public op runs forward and backward on CPU tensors with its launches recorded
instead of run (no GPU, no interpreter); then every recorded launch is compiled for sm_90a
with the signature inductor would give it: pointers by tensor dtype, ints, and fp64 for
floats. The oracle is Triton's own compiler.
"""

import os
import subprocess
import sys

_PROBE = r'''
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
sys.path.insert(0, "tests")
import kernels
from launch_recorder import backward, install, leaf

launches = install()


target = torch.tensor([1, -100, 3, 0])
cos, sin = torch.randn(8, 8), torch.randn(8, 8)
backward(kernels.layer_norm(leaf(4, 32), leaf(32), leaf(32)))
backward(*kernels.add_rms_norm(leaf(2, 20000), leaf(2, 20000), leaf(20000)))
backward(kernels.gelu(leaf(4, 32), leaf(32)))
backward(kernels.swiglu(leaf(4, 64)))
backward(kernels.cross_entropy(leaf(4, 50), target, label_smoothing=0.1))
backward(kernels.apply_rotary_emb(leaf(2, 8, 3, 32), cos, sin))
backward(kernels.flash_attn_func(leaf(2, 64, 4, 64), leaf(2, 64, 2, 64), leaf(2, 64, 2, 64), dropout_p=0.1,
                                 causal=True, softcap=5.0, alibi_slopes=torch.rand(4)))
k_cache, v_cache = torch.zeros(2, 256, 2, 64, dtype=torch.bfloat16), torch.zeros(2, 256, 2, 64, dtype=torch.bfloat16)
kernels.flash_attn_with_kvcache(torch.randn(2, 1, 8, 64, dtype=torch.bfloat16), k_cache, v_cache,
                                k=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16),
                                v=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16), softcap=3.0,
                                cache_seqlens=torch.tensor([3, 200], dtype=torch.int32), num_splits=4)

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
           torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1", torch.uint8: "*u8"}
OPTIONS = ("num_warps", "num_stages")
compiled = set()
for kernel, args, kwargs in launches:
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    constexprs = {k: v for k, v in kwargs.items() if k not in OPTIONS}
    fn = kernel
    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        config = kernel.configs[0]
        constexprs.update(config.kwargs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    named = dict(zip(fn.arg_names, args))
    signature, floats = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = named[name]
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp64"  # as inductor types a Python float
            floats.append(name)
        elif value is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            raise TypeError(f"{fn.__name__}.{name}: {type(value).__name__}")
    key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())))
    if key in compiled:
        continue
    compiled.add(key)
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options=options)
    print(fn.__name__, ",".join(floats) or "-")
'''


def test_every_kernel_compiles_with_fp64_float_arguments():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=root,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = dict(line.split() for line in out.stdout.splitlines())
    expected = {"_fwd_fused", "_bwd_fused", "_fwd_looped", "_bwd_looped", "_dwdb_looped", "_gelu_fwd_kernel",
                "_gelu_bwd_kernel", "_glu_fwd_kernel", "_glu_bwd_kernel", "_ce_kernel", "_scale_rows_kernel",
                "_rotary_kernel", "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq",
                "_kvcache_attn_kernel", "_combine_kernel"}
    assert expected <= set(compiled), sorted(set(compiled))
    # The kernels with float arguments were compiled with them fp64 (the case under test).
    for name in ("_fwd_fused", "_ce_kernel", "_attn_fwd", "_attn_bwd_dkdv", "_kvcache_attn_kernel"):
        assert compiled[name] != "-", (name, compiled[name])
