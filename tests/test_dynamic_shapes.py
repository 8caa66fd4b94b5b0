"""Under torch.compile with dynamic shapes, every Triton launch gets concrete launch options and
compile-time constants.

With dynamic=True (and in opcheck's dynamic AOT check) a triton_op's body is traced with symbolic
sizes, so a block size or warp count computed from a size is a SymInt unless the code makes it
an int. wrap_triton then carries the SymInt into the traced graph, and Triton hashes its launch
options when the graph runs: on an H100 the norms' opcheck failed with "unhashable type:
non-nested SymInt" (num_warps computed from the hidden size). A kernel has to be compiled for
concrete constants anyway, so the launchers specialize them (int(), a guard on the size).

The oracle is the type of each constexpr and launch option every launch receives, recorded in
place of the launch while torch.compile traces every public op forward and backward (CPU
tensors on the Triton path, launches not run; no GPU or interpreter needed).
"""

import os
import subprocess
import sys

_PROBE = r'''
import json, sys
import torch
sys.path.insert(0, "tests")
import kernels
from launch_recorder import install, leaf

launches = install()


def run(f, *args):
    out = torch.compile(f, dynamic=True, backend="aot_eager", fullgraph=True)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs if o.requires_grad).backward()


target = torch.tensor([1, -100, 3, 0, 7, 2])
cos, sin = torch.randn(40, 12), torch.randn(40, 12)
run(lambda x, w, b: kernels.layer_norm(x, w, b), leaf(6, 40), leaf(40), leaf(40))
run(lambda x, r, w: kernels.add_rms_norm(x, r, w), leaf(6, 40), leaf(6, 40), leaf(40))
run(lambda x, w: kernels.rms_norm(x, w), leaf(3, 20000), leaf(20000))
run(lambda x, b: kernels.gelu(x, b, approximate="tanh"), leaf(6, 40), leaf(40))
run(lambda x: kernels.swiglu(x), leaf(6, 80))
run(lambda x: kernels.cross_entropy(x, target, label_smoothing=0.1), leaf(6, 50))
run(lambda h, w: kernels.fused_linear_cross_entropy(h, w, target), leaf(6, 16), leaf(50, 16))
run(lambda x: kernels.apply_rotary_emb(x, cos, sin), leaf(2, 10, 3, 32))
run(lambda q, k, v: kernels.flash_attn_func(q, k, v, causal=True), leaf(2, 70, 4, 64), leaf(2, 70, 2, 64),
    leaf(2, 70, 2, 64))
k_cache, v_cache = torch.zeros(2, 96, 2, 64), torch.zeros(2, 96, 2, 64)
lens = torch.tensor([3, 50], dtype=torch.int32)
torch.compile(lambda q, kc, vc: kernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True),
              dynamic=True, backend="aot_eager", fullgraph=True)(torch.randn(2, 3, 8, 64), k_cache, v_cache)
print(json.dumps([(getattr(kernel, "fn", kernel).__name__, {k: type(v).__name__ for k, v in kwargs.items()})
                  for kernel, _, kwargs in launches]))
'''


def test_launch_constants_are_concrete_under_dynamic_shapes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=root,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    launches = json.loads(out.stdout.strip().splitlines()[-1])
    kernels_seen = {name for name, _ in launches}
    expected = {"_fwd_fused", "_bwd_fused", "_fwd_looped", "_ce_kernel", "_scale_rows_kernel", "_rotary_kernel"}
    assert expected <= kernels_seen, kernels_seen
    symbolic = sorted({(name, k) for name, kwargs in launches for k, t in kwargs.items() if t.startswith("Sym")})
    assert not symbolic, f"symbolic launch constants (kernel, argument): {symbolic}"


# --------------------------------------------------------------------------------------
# One graph for every length, and float arguments that change (the PyTorch path, traced)
# --------------------------------------------------------------------------------------


def _counted(fn):
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=True), counter


def test_attention_with_extras_compiles_one_graph_for_every_sequence_length():
    """The chunked PyTorch path (softcap, a window, a key-padding mask; varlen's max_seqlen)
    looped over query chunks, which fixed the length in the graph even with dynamic=True: a
    graph per length, and under fullgraph an error at the recompile limit (the 9th length),
    e.g. for a compiled BERT with attention dropout on batches padded to their longest item."""
    import torch

    import kernels

    def padded(q, k, v):
        return kernels.flash_attn_func(q, k, v, softcap=5.0, window_size=(3, 0))

    def packed(q, k, v, cu, max_seqlen):
        return kernels.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, softcap=5.0)

    with kernels.reference_only():
        for fn in (padded, packed):
            compiled, counter = _counted(fn)
            for S in range(4, 15):
                torch.manual_seed(S)
                if fn is padded:
                    args = [torch.randn(2, S, 2, 16, requires_grad=True) for _ in range(3)]
                else:
                    args = [torch.randn(S + 3, 2, 16, requires_grad=True) for _ in range(3)]
                    args += [torch.tensor([0, 3, S + 3], dtype=torch.int32), S]
                out = compiled(*args)
                grads = torch.autograd.grad(out.sum(), args[:3])
                expected = fn(*args)
                torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
                for g, e in zip(grads, torch.autograd.grad(expected.sum(), args[:3])):
                    torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
            assert counter.frame_count == 1, (fn.__name__, counter.frame_count)


def test_changing_float_arguments_keep_fullgraph():
    """A float argument that differs between calls is traced as a symbolic float (dynamic=True,
    or automatic dynamic on the second call); the argument checks used math.isfinite, which
    breaks the graph ("torch.* op returned non-Tensor"): torch.compile(model, dynamic=True,
    fullgraph=True) of every zoo model failed at its norms' eps."""
    import torch

    import kernels

    x = torch.randn(2, 5, 16, requires_grad=True)
    q, k, v = (torch.randn(1, 6, 2, 8, requires_grad=True) for _ in range(3))
    target = torch.tensor([1, 3, -100, 0, 2])
    cases = [
        (lambda x, eps: kernels.layer_norm(x, eps=eps), (x,), (1e-5, 1e-3)),
        (lambda x, eps: kernels.rms_norm(x, eps=eps), (x,), (1e-5, 1e-3)),
        (lambda q, k, v, s: kernels.flash_attn_func(q, k, v, softmax_scale=s), (q, k, v), (0.3, 0.5)),
        (lambda q, k, v, c: kernels.flash_attn_func(q, k, v, softcap=c), (q, k, v), (2.0, 4.0)),
        (lambda x, e: kernels.cross_entropy(x[0], target, label_smoothing=e), (x,), (0.1, 0.2)),
    ]
    with kernels.reference_only():
        for fn, tensors, values in cases:
            compiled, _ = _counted(fn)
            for value in values:
                torch.testing.assert_close(compiled(*tensors, value), fn(*tensors, value), rtol=0, atol=1e-6)
