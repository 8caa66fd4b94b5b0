"""kernels.launcher.bind_once: a remembered argument pattern launches exactly what Triton's
own JITFunction.run launches for it: the same compiled kernel, grid, stream and arguments;
for the autotuned kernels too, whose remembered launches skip the autotuner's own key.

Without a GPU: Triton's JIT runs for real against a stand-in H100 driver (kernels compile
for sm_90a; tasks.host_overhead) whose launcher records each launch instead of making it.
Each op runs three times on the same inputs; the first call binds through Triton's run, the
next two take the direct path, and all three must record the same launches. A misaligned
input (an address 2 bytes past a multiple of 16) must take Triton's run once and then be
remembered separately: it selects another compiled kernel (Triton's alignment specialization).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os
os.environ["TRITONZOO_AUTOTUNE"] = "first"
import torch
import triton.runtime.jit as jit
from triton.runtime.driver import driver
from tasks import host_overhead
import kernels
from kernels import launcher

launches = []


class Recorder:
    def __init__(self, name):
        self.name = name

    def __call__(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        def describe(a):
            if isinstance(a, torch.Tensor):
                return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
            return [type(a).__name__, a if isinstance(a, (int, float, bool, type(None))) else repr(a)]
        launches.append([self.name, id(self), g0, g1, g2, stream, repr(packed), launch_metadata is None,
                         [describe(a) for a in args]])


class RecordingDriver(host_overhead._StandInDriver):
    def launcher_cls(self, src, metadata):
        return Recorder(src.fn.__name__)


driver.set_active(RecordingDriver())
os.environ.setdefault("TRITONZOO_AUTOTUNE", "first")
host_overhead._triton_path_on_cpu_tensors()
triton_runs = []
real_run = jit.JITFunction.run


def counting_run(self, *args, **kwargs):
    triton_runs.append(self.fn.__name__)
    return real_run(self, *args, **kwargs)


jit.JITFunction.run = counting_run
torch.manual_seed(0)
bf16 = torch.bfloat16


def misaligned(shape, dtype=bf16):
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1, dtype=dtype)[1:].view(shape)  # 2 bytes past the allocation


q, k, v = (torch.randn(2, 24, 4, 64, dtype=bf16, requires_grad=True) for _ in range(3))
k_cache, v_cache = torch.zeros(2, 64, 2, 64, dtype=bf16), torch.zeros(2, 64, 2, 64, dtype=bf16)
q1, k_new = torch.randn(2, 1, 4, 64, dtype=bf16), torch.randn(2, 1, 2, 64, dtype=bf16)
lens = torch.tensor([5, 40], dtype=torch.int32)
x = torch.randn(6, 96, dtype=bf16, requires_grad=True)
x_odd = misaligned((6, 96)).requires_grad_()
w = torch.rand(96, dtype=bf16, requires_grad=True)
logits = torch.randn(5, 333, dtype=bf16, requires_grad=True)
labels = torch.tensor([1, -100, 7, 332, 0])
cos, sin = torch.rand(24, 16), torch.rand(24, 16)
ones = torch.ones(2, 24, 4, 64, dtype=bf16)

ops = {
    "attention forward + backward": lambda: torch.autograd.grad(kernels.flash_attn_func(q, k, v, causal=True),
                                                                (q, k, v), ones),
    "decoding with append": lambda: kernels.flash_attn_with_kvcache(q1, k_cache, v_cache, k=k_new, v=k_new,
                                                                    cache_seqlens=lens, causal=True),
    "rms_norm forward + backward": lambda: torch.autograd.grad(kernels.rms_norm(x, w), (x, w), x.detach()),
    "rms_norm, misaligned x": lambda: torch.autograd.grad(kernels.rms_norm(x_odd, w), (x_odd, w), x.detach()),
    "layer_norm forward": lambda: kernels.layer_norm(x.detach(), w.detach(), w.detach()),
    "gelu with bias forward + backward": lambda: torch.autograd.grad(kernels.gelu(x, w), (x, w), x.detach()),
    "swiglu forward": lambda: kernels.swiglu(x.detach(), x.detach()),
    "rotary": lambda: kernels.apply_rotary_emb(q.detach(), cos, sin),
    "cross_entropy forward + backward": lambda: torch.autograd.grad(
        kernels.cross_entropy(logits, labels, label_smoothing=0.1), logits),
}
report = {}
for name, op in ops.items():
    calls = []
    for _ in range(3):
        before_launches, before_runs = len(launches), len(triton_runs)
        op()
        calls.append({"launches": launches[before_launches:], "triton_runs": triton_runs[before_runs:]})
    report[name] = calls
# Aligned again after the misaligned pattern: still its own binding.
before = len(launches)
ops["rms_norm forward + backward"]()
report["rms_norm after the misaligned one"] = launches[before:]
report["bindings"] = {name: len(value.run.bindings) for name, value in
                      (("rms fwd", kernels.norms._fwd_fused), ("attn fwd", kernels.flash_attention._attn_fwd))}
report["autotuner direct"] = {name: len(tuner._direct) for name, tuner in
                              (("attn fwd", kernels.flash_attention._attn_fwd_tuned),
                               ("attn dq", kernels.flash_attention._attn_bwd_dq_tuned),
                               ("decoding", kernels.decoding._kvcache_attn_tuned))}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_direct_launches_equal_tritons(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITONZOO_BIND_ONCE")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    names = [n for n in report if n not in ("rms_norm after the misaligned one", "bindings", "autotuner direct")]
    assert len(names) == 9
    for name in names:
        first, second, third = report[name]
        assert first["launches"], name
        assert len(first["triton_runs"]) == len(first["launches"]), name  # each launch bound by Triton's run
        assert second["triton_runs"] == [] and third["triton_runs"] == [], f"{name}: a remembered pattern re-bound"
        assert second["launches"] == first["launches"] and third["launches"] == first["launches"], name
    aligned, odd = report["rms_norm forward + backward"][0], report["rms_norm, misaligned x"][0]
    # The forward launched another compiled kernel for the misaligned x (its own launcher).
    assert odd["launches"][0][0] == aligned["launches"][0][0] == "_fwd_fused"
    assert odd["launches"][0][1] != aligned["launches"][0][1]
    assert odd["launches"][0][8][0][4] == 2 and aligned["launches"][0][8][0][4] == 0
    assert report["rms_norm after the misaligned one"] == aligned["launches"]
    # The norms' forward kernel: rms_norm aligned, misaligned, and layer_norm (other constexprs).
    assert report["bindings"]["rms fwd"] == 3 and report["bindings"]["attn fwd"] == 1
    # The autotuned kernels' remembered launches go straight from the launch key to the kernel.
    assert report["autotuner direct"] == {"attn fwd": 1, "attn dq": 1, "decoding": 1}


def test_bind_once_leaves_other_objects_alone(monkeypatch):
    from kernels import launcher

    class NotAKernel:
        run = "unchanged"

    thing = NotAKernel()
    assert launcher.bind_once(thing) is thing and thing.run == "unchanged"
    assert launcher.bind_once(None) is None


def _fake_bound_run(monkeypatch):
    """A _BoundRun over a stand-in kernel whose Triton run returns a new do-nothing compiled
    kernel each time, with a stand-in driver: the table alone, without Triton."""
    from kernels import launcher

    class FakeKernel:  # what _BoundRun reads of a compiled kernel
        function = packed_metadata = None

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            pass

    class FakeFn:
        pre_run_hooks = []
        params = []

    bound = launcher._BoundRun.__new__(launcher._BoundRun)
    bound.fn, bound.params, bound.bindings = FakeFn(), [], {}
    monkeypatch.setattr(launcher._BoundRun, "triton_run", lambda self, *a, **k: FakeKernel())
    device = type("D", (), {"get_current_device": lambda self: 0, "get_current_stream": lambda self, d: 0})()
    monkeypatch.setattr(launcher, "driver", type("Driver", (), {"active": device})())
    return bound


def test_bindings_stay_bounded(monkeypatch):
    """The table drops its oldest pattern past MAX_BINDINGS (checked on the table alone)."""
    from kernels import launcher

    monkeypatch.setattr(launcher, "MAX_BINDINGS", 3)
    bound = _fake_bound_run(monkeypatch)
    for n in range(5):
        bound(n, grid=(1,), warmup=False)
    assert len(bound.bindings) == 3 and [key[-1] for key in bound.bindings] == [(2,), (3,), (4,)]


def test_equal_values_of_other_types_get_their_own_binding(monkeypatch):
    """1, 1.0 and True are equal and hash alike, but Triton compiles a kernel for each (an int
    of 1 is a constant, a float an fp32 argument, a bool an i1): each gets its own binding, as
    each gets its own key in the autotuner's tables."""
    from kernels import autotune

    bound = _fake_bound_run(monkeypatch)
    for value in (1, 1.0, True, 1, 1.0, True):
        bound(value, grid=(1,), warmup=False)
        bound(x=value, grid=(1,), warmup=False)
    assert len(bound.bindings) == 6
    assert len({autotune._plain(value) for value in (1, 1.0, True)}) == 3
    assert len({autotune._plain(value) for value in (0, 0.0, False, None)}) == 4


@pytest.mark.parametrize("value, expected", [(None, True), ("", True), ("1", True), (" 0 ", False)])
def test_bind_once_variable(value, expected, monkeypatch):
    from kernels import launcher

    if value is None:
        monkeypatch.delenv(launcher.VARIABLE, raising=False)
    else:
        monkeypatch.setenv(launcher.VARIABLE, value)
    assert launcher.enabled_by_environment() is expected


@pytest.mark.parametrize("value", ["yes", "off", "2", "false"])
def test_bad_bind_once_variable_is_refused(value, monkeypatch):
    from kernels import launcher

    monkeypatch.setenv(launcher.VARIABLE, value)
    with pytest.raises(ValueError, match=f"TRITONZOO_BIND_ONCE='{value}': expected 0 or 1"):
        launcher.enabled_by_environment()
