"""kernels.runtime's eager shortcut: eager calls run each op's body under an
autograd.Function instead of going through torch.library's dispatch; on the Triton path
the body launches its kernels directly (not through wrap_triton's higher-order op).

The oracle is the op itself: every public op is run both ways on the same inputs (the
shortcut switched off by patching ``runtime.eager_path``), and outputs, in-place cache
writes and gradients must be bit-identical. A dispatch mode shows which way each call
went, and a dynamo graph shows that torch.compile still sees the ops. Also here:
``runtime.torch_native``, where a float32 call on the PyTorch path runs torch's own op.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import runtime


class _OpLog(TorchDispatchMode):
    """Records the names of the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def tritonzoo(self):
        return sorted({n for n in self.names if n.startswith("tritonzoo.")})


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _norms():
    x, r, w, b = _leaf(3, 5, 33), _leaf(3, 5, 33), _leaf(33), _leaf(33)
    return (x, r, w, b), lambda: (kernels.layer_norm(x, w, b), *kernels.add_rms_norm(x, r, w, b))


def _norms_half():
    x, w = _leaf(4, 40, dtype=torch.bfloat16), _leaf(40)
    return (x, w), lambda: kernels.add_layer_norm(x, x.detach() * 0.5, w)


def _activations():
    x, b, y, z = _leaf(6, 17), _leaf(17), _leaf(6, 17), _leaf(5, 12)
    return (x, b, y, z), lambda: (kernels.gelu(x, b, approximate="tanh"), kernels.swiglu(x, y), kernels.geglu(z))


def _rotary():
    x, cos, sin = _leaf(2, 7, 3, 16), torch.randn(9, 6), torch.randn(9, 6)

    def run():
        ref = x * 1.0  # a non-leaf, so that the in-place variant may write into it
        return (kernels.apply_rotary_emb(x, cos, sin, seqlen_offsets=2),
                kernels.apply_rotary_emb(ref, cos, sin, interleaved=True, inplace=True))
    return (x,), run


def _cross_entropy():
    logits, h, w, b = _leaf(11, 29), _leaf(11, 8), _leaf(29, 8), _leaf(29)
    t = torch.randint(0, 29, (11,))
    t[3] = -100
    return (logits, h, w, b), lambda: (
        kernels.cross_entropy(logits, t, label_smoothing=0.1),
        kernels.fused_linear_cross_entropy(h, w, t, b, chunk_size=4),
        kernels.fused_linear_cross_entropy(h, w, t, reduction="none", chunk_size=4))


def _attention():
    q, k, v = _leaf(2, 9, 4, 16), _leaf(2, 12, 2, 16), _leaf(2, 12, 2, 16)
    qp, kp, vp = _leaf(13, 2, 8), _leaf(13, 2, 8), _leaf(13, 2, 8)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)

    def run():
        torch.manual_seed(7)  # the same dropout key both ways
        return (kernels.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, softcap=5.0),
                kernels.flash_attn_varlen_func(qp, kp, vp, cu, cu, 8, 8, window_size=(3, 0)))
    return (q, k, v, qp, kp, vp), run


CASES = {"norms": _norms, "norms_bf16": _norms_half, "activations": _activations, "rotary": _rotary,
         "cross_entropy": _cross_entropy, "attention": _attention}


def _run(case, eager: bool, monkeypatch):
    torch.manual_seed(0)
    leaves, fn = CASES[case]()
    with monkeypatch.context() as m:
        if not eager:
            m.setattr(runtime, "eager_path", lambda t: False)
        log = _OpLog()
        with kernels.reference_only(native=False), log:  # the ops' own bodies (not torch_native's calls)
            outs = [o for o in fn() if o.is_floating_point()]
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
            grads = torch.autograd.grad(loss, leaves)
    return outs, grads, log.tritonzoo()


def _run_triton(case, eager: bool, monkeypatch):
    """As _run on the Triton path (the interpreter); the route is counted at run_direct,
    since a dispatch mode would itself send the calls through the op."""
    torch.manual_seed(0)
    leaves, fn = CASES[case]()
    direct = []
    with monkeypatch.context() as m:
        if not eager:
            m.setattr(runtime, "eager_path", lambda t: False)
        real = runtime.run_direct
        m.setattr(runtime, "run_direct", lambda body, *a: direct.append(body.__name__) or real(body, *a))
        outs = [o for o in fn() if o.is_floating_point()]
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves)
    return outs, grads, direct


@pytest.mark.skipif(not kernels.INTERPRET, reason="the Triton path on CPU needs the interpreter")
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_shortcut_on_the_triton_path_matches_the_op_bit_for_bit(case, monkeypatch):
    outs, grads, direct = _run_triton(case, True, monkeypatch)
    outs_op, grads_op, direct_op = _run_triton(case, False, monkeypatch)
    # Forward and backward bodies ran directly in the first run, never in the second.
    assert direct and not direct_op, (direct, direct_op)
    for a, b in zip(outs + list(grads), outs_op + list(grads_op)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_shortcut_matches_the_op_bit_for_bit(case, monkeypatch):
    outs, grads, ops = _run(case, True, monkeypatch)
    outs_op, grads_op, ops_op = _run(case, False, monkeypatch)
    # The two runs did take different routes: only the second one dispatched our ops.
    assert ops == [] and ops_op, (ops, ops_op)
    for a, b in zip(outs + list(grads), outs_op + list(grads_op)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def _native_calls():
    """Float32 calls whose PyTorch path is one torch op, which runtime.torch_native lets them call."""
    x, b, y, z, w = _leaf(6, 17), _leaf(17), _leaf(6, 17), _leaf(5, 12), _leaf(17)
    q, k, v = _leaf(2, 9, 4, 16), _leaf(2, 9, 2, 16), _leaf(2, 9, 2, 16)
    qc, kc, vc = _leaf(2, 5, 2, 8), _leaf(2, 7, 2, 8), _leaf(2, 7, 2, 8)
    right_padded = torch.arange(9) < torch.tensor([[9], [4]])
    some_keys = torch.tensor([[False, True, False, True, True, False, False]] * 2)
    wide = _leaf(2, 9, 2, 32)  # views with a stride in the head dim (the CPU flash kernel reads it without one)
    return (x, b, y, z, w, q, k, v, qc, kc, vc, wide), lambda: (
        kernels.flash_attn_func(wide[..., ::2], wide.flip(1)[..., 1::2], wide[..., :16], causal=True),
        kernels.layer_norm(x, w, b), kernels.rms_norm(y, w, b, eps=1e-3),
        kernels.gelu(x, b), kernels.gelu(y, approximate="tanh"), kernels.swiglu(x, y), kernels.geglu(z),
        kernels.flash_attn_func(q, k, v), kernels.flash_attn_func(q, k, v, causal=True, softmax_scale=0.3),
        kernels.attention(q, k, v), kernels.flash_attn_func(qc, kc, vc),  # 5 queries over 7 keys
        kernels.attention(q, k, v, causal=True, key_padding_mask=right_padded),
        kernels.attention(qc, kc, vc, key_padding_mask=some_keys))


def _not_native_calls():
    """Calls the op's own path must serve: other dtypes, outputs or semantics than torch's op has."""
    x, r, w = _leaf(6, 17), _leaf(6, 17), _leaf(17)
    q, k, v = _leaf(2, 5, 4, 16), _leaf(2, 9, 2, 16), _leaf(2, 9, 2, 16)
    qs, ks, vs = _leaf(2, 9, 4, 16), _leaf(2, 9, 2, 16), _leaf(2, 9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    return {
        # A query without a key: torch's softmax gives NaN there, the op 0.
        "causal_left_padded": lambda: kernels.attention(qs, ks, vs, causal=True,
                                                        key_padding_mask=torch.arange(9) >= torch.tensor([[0], [3]])),
        "no_key": lambda: kernels.attention(q, k, v, key_padding_mask=torch.tensor([[True] * 9, [False] * 9])),
        "alibi": lambda: kernels.flash_attn_func(q, k, v, alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
        "window": lambda: kernels.flash_attn_func(qs, ks, vs, window_size=(2, 1)),
        "packed": lambda: kernels.flash_attn_varlen_func(qs[0], ks[0], vs[0], cu, cu, 5, 5),
        "add_layer_norm": lambda: kernels.add_layer_norm(x, r, w)[1],  # the sum requires grad from no input
        "bf16": lambda: kernels.layer_norm(x.bfloat16(), w),
        "hidden_1": lambda: kernels.layer_norm(x[:, :1], w[:1]),
        "gelu_bf16": lambda: kernels.gelu(x.bfloat16()),
        "lse": lambda: kernels.attention(q, k, v, return_lse=True)[1],
        "probs": lambda: kernels.flash_attn_func(q, k, v, return_attn_probs=True)[1],
        "bottom_right": lambda: kernels.flash_attn_func(q, k, v, causal=True),  # 5 queries, 9 keys
        "probs_dropout": lambda: kernels.flash_attn_func(q, k, v, dropout_p=0.2, return_attn_probs=True)[0],
        "softcap": lambda: kernels.flash_attn_func(q, k, v, softcap=3.0),
    }


def _direct_bodies(monkeypatch):
    """Records the op bodies that run (every eager call of an op on the PyTorch path goes through run_direct)."""
    ran, real = [], runtime.run_direct
    monkeypatch.setattr(runtime, "run_direct", lambda body, *a: ran.append(body.__name__) or real(body, *a))
    return ran


def test_torch_native_calls_match_the_ops_own_pytorch_path(monkeypatch):
    """With torch_native, these calls run torch's ops (no op body) and give the op's values and
    gradients; reference_only(native=False) runs the bodies. (The float64 oracles of
    test_ops_norms / test_ops_activations / test_flash_attn check the native calls too: they
    run under reference_only.)"""
    ran = _direct_bodies(monkeypatch)
    results = []
    for native in (True, False):
        torch.manual_seed(0)
        leaves, fn = _native_calls()
        ran.clear()
        with kernels.reference_only(native=native):
            outs = fn()
            loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
            grads = torch.autograd.grad(loss, leaves)
        assert (ran == []) == native, ran
        results.append(outs + grads)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(_not_native_calls()))
def test_torch_native_leaves_other_calls_to_the_op(case, monkeypatch):
    ran = _direct_bodies(monkeypatch)
    with kernels.reference_only():
        out = _not_native_calls()[case]()
    assert ran, f"{case}: no op body ran"
    assert out.requires_grad


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "key_padding"])
def test_torch_native_attention_dropout_is_torchs(masked):
    """Dropout on the native path is torch's SDPA's: for one seed, the same elements dropped as
    torch's own function drops (the op's path draws the kernels' Philox stream instead)."""
    q, k, v = _leaf(3, 11, 2, 8), _leaf(3, 11, 2, 8), _leaf(3, 11, 2, 8)
    keep = torch.arange(11) < torch.tensor([[11], [6], [1]]) if masked else None
    torch.manual_seed(5)
    with kernels.reference_only():
        out = kernels.attention(q, k, v, key_padding_mask=keep, dropout_p=0.4)
    torch.manual_seed(5)
    mask = keep[:, None, None, :] if masked else None
    ref = runtime.torch_sdpa(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, dropout_p=0.4).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(grads, torch.autograd.grad(ref, (q, k, v), dout), rtol=0, atol=0)
    # Some elements dropped, not all: 40% of 11 keys leaves outputs that differ from no dropout.
    with kernels.reference_only():
        assert not torch.allclose(out, kernels.attention(q, k, v, key_padding_mask=keep))


def test_torch_native_needs_the_pytorch_path_and_a_plain_tensor():
    x = torch.randn(3, 4)
    with kernels.reference_only():
        assert runtime.torch_native(x)
        # CPU tensors only: a tensor elsewhere (meta here; CUDA alike) keeps the op's path,
        # whose body reads no index values on the host.
        assert not runtime.torch_native(torch.empty(3, 4, device="meta"))
        with kernels.reference_only(native=False):
            assert not runtime.torch_native(x)
            with kernels.reference_only():  # an inner block keeps the outer one's native=False
                assert not runtime.torch_native(x)
        assert runtime.torch_native(x)
    assert runtime.torch_native(x) == (not kernels.INTERPRET)  # the interpreter: the Triton path
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    with kernels.reference_only():
        assert not runtime.torch_native(fake)


def test_kvcache_decoding_without_grad_skips_dispatch(monkeypatch):
    def decode(eager):
        torch.manual_seed(0)
        k_cache, v_cache = torch.randn(3, 16, 2, 8), torch.randn(3, 16, 2, 8)
        q, k, v = torch.randn(3, 1, 4, 8), torch.randn(3, 1, 2, 8), torch.randn(3, 1, 2, 8)
        lens = torch.tensor([0, 5, 15], dtype=torch.int32)
        cos, sin = torch.randn(16, 2), torch.randn(16, 2)
        with monkeypatch.context() as m:
            if not eager:
                m.setattr(runtime, "eager_path", lambda t: False)
            log = _OpLog()
            with kernels.reference_only(), torch.no_grad(), log:
                out, lse = kernels.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=lens,
                                                           causal=True, return_softmax_lse=True)
        return (out, lse, k_cache, v_cache), log.tritonzoo()

    got, ops = decode(True)
    want, ops_op = decode(False)
    assert ops == [] and ops_op == ["tritonzoo.kvcache_attention.default"]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not kernels.INTERPRET, reason="the Triton path on CPU needs the interpreter")
def test_kvcache_direct_launch_bumps_the_cache_versions_as_the_op_does(monkeypatch):
    """The kernel writes the caches in place: autograd's version counters must see that
    (a cache saved for a backward and then written would otherwise go unnoticed)."""
    def decode(eager):
        torch.manual_seed(0)
        k_cache, v_cache = torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
        q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
        versions = k_cache._version, v_cache._version
        with monkeypatch.context() as m:
            if not eager:
                m.setattr(runtime, "eager_path", lambda t: False)
            with torch.no_grad():
                out = kernels.flash_attn_with_kvcache(q, k_cache, v_cache, k, v,
                                                      cache_seqlens=torch.tensor([3, 9], dtype=torch.int32))
        return (out, k_cache, v_cache), (k_cache._version - versions[0], v_cache._version - versions[1])

    got, bumps = decode(True)
    want, bumps_op = decode(False)
    assert bumps == bumps_op and min(bumps) >= 1, (bumps, bumps_op)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_no_shortcut_under_torch_compile():
    """Dynamo sees torch.compiler.is_compiling() and keeps the ops in the graph."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    x, w = torch.randn(2, 6, 4, 16), torch.randn(16)
    cos, sin = torch.randn(6, 4), torch.randn(6, 4)

    def f(x):
        y = kernels.rms_norm(x, w)
        y = kernels.apply_rotary_emb(y, cos, sin)
        return kernels.gelu(kernels.flash_attn_func(y, y, y, causal=True))

    with kernels.reference_only():
        compiled = torch.compile(f, backend=backend, fullgraph=True)(x)
        eager = f(x)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"tritonzoo.norm_fwd.default", "tritonzoo.rotary.default", "tritonzoo.attention_fwd.default",
            "tritonzoo.gelu_fwd.default"} <= targets, targets
    torch.testing.assert_close(compiled, eager)


def test_when_the_shortcut_applies():
    x = torch.randn(3, 4)
    with kernels.reference_only():
        assert runtime.eager_path(x) and runtime.eager_path(torch.nn.Parameter(x))
    # A tensor subclass (here a fake tensor) always takes the op, which knows how to handle it.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    with kernels.reference_only():
        assert not runtime.eager_path(fake)
    assert runtime.eager_path(x)
    # Under a dispatch mode (make_fx, FlopCounterMode) Triton launches take the op, which such a
    # mode can see; the PyTorch path's body is made of aten ops it sees anyway.
    with _OpLog():
        assert runtime.eager_path(x) == (not kernels.INTERPRET)
        with kernels.reference_only():
            assert runtime.eager_path(x)


@pytest.mark.parametrize("jit", [pytest.param(False, id="stubbed"),
                                 pytest.param(True, id="jit", marks=pytest.mark.slow)])
def test_host_overhead_tool_times_every_workload(jit, tmp_path):
    """tasks.host_overhead prints a time for each call, in each autotuner mode: with the launches
    stubbed, and with --jit, Triton's JIT run for real up to a no-op launcher (each kernel
    compiled for sm_90a first; no GPU either way)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "tasks.host_overhead", "--calls", "3"] + (["--jit"] if jit else [])
    out = subprocess.run(command, capture_output=True,
                         text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ") and "us," not in line]
    assert len(rows) == 12, out.stdout  # tasks.host_overhead.workloads()
    assert all(len(r) == 6 and all(float(x) > 0 for x in r[2:5]) for r in rows), out.stdout


@pytest.mark.slow
def test_host_overhead_tool_times_model_steps(tmp_path):
    """tasks.host_overhead --models: host ms per training step of a narrowed ViT-B beside timm's,
    on both backends and with every op on the kernels (Triton's JIT for real, no GPU)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "tasks.host_overhead", "--models", "vit_base_patch16_224",
                          "--calls", "2"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| vit")]
    assert [r[1].strip() for r in rows] == ["ours, triton", "ours, sdpa", "ours, triton, every op on the kernels",
                                            "timm VisionTransformer"], out.stdout
    assert all(float(r[2]) > 0 for r in rows)


@pytest.mark.parametrize("argv, says", [(["--models", "vit_bse"], "unknown preset(s) vit_bse; the presets:"),
                                        (["--calls", "0"], "--calls must be at least 1, got 0")])
def test_host_overhead_tool_refuses_bad_arguments(argv, says):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "tasks.host_overhead", *argv], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]


def test_host_profile_tool_writes_each_model_shape(tmp_path):
    """tasks.host_profile (host against kernel time at the models' attention shapes; on a CPU
    cut-down shapes and host time only) runs and writes its JSON and table."""
    import json
    import os
    import subprocess
    import sys

    from tasks.bench_attention import MODEL_SHAPES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "tasks.host_profile", "--device", "cpu", "--calls", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "host_profile.json").read_text())
    assert [r["label"].split(" (")[0] for r in report["results"]] == [m[0] for m in MODEL_SHAPES]
    assert all(r["host_fwd_us"] > 0 and r["host_fwd_bwd_us"] > 0 for r in report["results"])
    assert (tmp_path / "host_profile.md").read_text().count("\n| ") == len(MODEL_SHAPES) + 1


def test_ops_run_on_their_tensors_device(monkeypatch):
    """A body runs with the current CUDA device switched to its first tensor's when they differ
    (as FlashAttention-2's CUDAGuard), and untouched when they agree. Triton launches on the
    current device: without the switch, a kernel on cuda:0 would read cuda:1's memory.

    Without a second GPU here, the device calls are recorded: torch.cuda.device's __enter__ /
    __exit__ are what switch the device, so they stand for it.
    """
    log = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            log.append(("enter", self.index))

        def __exit__(self, *exc):
            log.append(("exit", self.index))

    class OnCuda:  # what on_device reads of a tensor
        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(runtime, "concrete", lambda t: True)
    body = runtime.on_device(lambda t, n: log.append(("body", n)) or n + 1)
    assert body(OnCuda(1), 5) == 6
    assert log == [("enter", 1), ("body", 5), ("exit", 1)]
    log.clear()
    assert body(OnCuda(0), 7) == 8 and log == [("body", 7)]
    log.clear()
    monkeypatch.setattr(runtime, "concrete", lambda t: False)  # while tracing: no switch
    assert body(OnCuda(1), 1) == 2 and log == [("body", 1)]
    # Every op's body is guarded, and its schema is the body's own (strings evaluated where it lives).
    for op in (kernels.norms.norm_fwd, kernels.attention_op.attention_bwd, kernels.decoding.kvcache_attention):
        assert "Tensor" in str(op._opoverload._schema)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_match_the_first():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 130, 4, 64, dtype=torch.bfloat16) for _ in range(3))
    x, w = torch.randn(64, 4096, dtype=torch.bfloat16), torch.randn(4096, dtype=torch.bfloat16)
    results = []
    for index in (0, 1):
        with torch.cuda.device(0):  # cuda:0 current either way
            qd, kd, vd = (t.to(f"cuda:{index}").requires_grad_() for t in (q, k, v))
            out = kernels.flash_attn_func(qd, kd, vd, causal=True)
            grads = torch.autograd.grad(out.float().square().sum(), (qd, kd, vd))
            y = kernels.rms_norm(x.to(f"cuda:{index}"), w.to(f"cuda:{index}"))
        torch.cuda.synchronize(index)
        results.append([t.cpu() for t in (out, *grads, y)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
