"""kernels/autotune.py: which candidates the autotuner times (TRITONZOO_AUTOTUNE), and the
parallel compile of a new key's candidates before timing (TRITONZOO_COMPILE_THREADS).

The second runs the real launch path of the attention forward without a GPU: a fresh
process without the interpreter, a stand-in CUDA driver that reports an H100 target, times
every candidate alike and refuses to load a binary, and Triton's real compiler for sm_90a.
What it checks is what the parallel compile must get right: the candidates compile on the
pool's threads, under the very cache keys the timing loop and the final launch look up
(nothing compiles again on the main thread), and the launch is reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton

from kernels import autotune

_SHAPES = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _SHAPES]


def _describe(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def test_pick_keeps_the_wanted_candidates_in_their_order(monkeypatch):
    monkeypatch.delenv(autotune.AUTOTUNE_VARIABLE, raising=False)
    wanted = [(64, 64, 4, 3), (128, 64, 4, 3), (32, 32, 4, 2)]  # the last is not among the configs
    assert [_describe(c) for c in autotune.pick(_CONFIGS, wanted, _describe)] == wanted[:2]
    assert autotune.pick(_CONFIGS, [(1, 1, 1, 1)], _describe) == _CONFIGS[:1]


def test_first_mode_takes_the_first_wanted_candidate(monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_VARIABLE, "first")
    picked = autotune.pick(_CONFIGS, [(128, 128, 8, 3), (128, 64, 4, 3)], _describe)
    assert [_describe(c) for c in picked] == [(128, 128, 8, 3)]


@pytest.mark.parametrize("value", ["fastest", "0", "all"])
def test_unknown_mode_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(autotune.AUTOTUNE_VARIABLE, value)
    with pytest.raises(ValueError, match=rf"TRITONZOO_AUTOTUNE='{value}': expected one of \('full', 'first'\)"):
        autotune.pick(_CONFIGS, [_SHAPES[0]], _describe)


def test_table_key():
    assert [autotune.table_key(False, d) for d in (16, 64, 80, 128, 160, 256)] == [64, 64, 128, 128, 256, 256]
    assert autotune.table_key(True, 128) == "fp32"


def test_compile_threads(monkeypatch):
    monkeypatch.delenv(autotune.THREADS_VARIABLE, raising=False)
    assert autotune.compile_threads(5) == min(5, os.cpu_count())
    assert autotune.compile_threads(1) == 1
    monkeypatch.setenv(autotune.THREADS_VARIABLE, "3")
    assert autotune.compile_threads(5) == 3 and autotune.compile_threads(2) == 2
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv(autotune.THREADS_VARIABLE, bad)
        with pytest.raises(ValueError, match="TRITONZOO_COMPILE_THREADS"):
            autotune.compile_threads(4)


_LAUNCH_WITHOUT_A_GPU = r"""
import json, os, threading
import torch, triton
from triton.runtime.autotuner import Autotuner
from torch._library.triton import set_wrap_triton_enabled
from triton.runtime.driver import driver
from kernels import flash_attention as fa
from tasks.host_overhead import _StandInDriver


class LaunchReached(Exception):
    pass


class StandInDriver(_StandInDriver):
    # An H100 without one (tasks/host_overhead.py), whose launch stops the run here, and
    # whose benchmarker compiles each candidate and times them all alike.
    def get_benchmarker(self):
        def bench(kernel_call, quantiles):
            try:  # compiles the candidate if it is not compiled yet, then stops at the launch
                kernel_call()
            except LaunchReached:
                pass
            return [1.0, 1.0, 1.0]
        return bench

    def launcher_cls(self, src, metadata):
        raise LaunchReached(src.fn.__name__)


driver.set_active(StandInDriver())
tuner = fa._attn_fwd_tuned
compiles = []
real_compile = triton.compile


def counting_compile(*args, **kwargs):
    compiles.append(threading.current_thread().name)
    return real_compile(*args, **kwargs)


tuner.fn.device_caches[0]  # creates the binder, which holds the compile function it calls
tuner.fn.compile = counting_compile
# Spies: calls of Triton's own Autotuner.run (the tuning path), and the tile of every launch
# (timing launches included) with the phase it happened in.
phase = ["first"]
tuning_runs, launches = [], []
real_tuning_run = Autotuner.run


def counting_tuning_run(self, *args, **kwargs):
    tuning_runs.append(phase[0])
    return real_tuning_run(self, *args, **kwargs)


Autotuner.run = counting_tuning_run
real_fn_run = tuner.fn.run


def recording_fn_run(*args, **kwargs):
    if not kwargs.get("warmup"):
        launches.append([phase[0], kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]])
    return real_fn_run(*args, **kwargs)


tuner.fn.run = recording_fn_run
report = {}
calls = [("first", 64, True), ("again", 64, True)]
if os.environ.get("THIRD_CALL"):
    calls.append(("other key", 64, False))  # not causal: another autotune key
if os.environ.get("FORGET"):
    calls.append(("forgotten", 64, True))  # the first key again, after forget(), another candidate forced
for call, head_dim, causal in calls:
    phase[0] = call
    if call == "forgotten":
        forced = fa._FWD_CANDIDATES[64][1]
        fa._FWD_CANDIDATES[64] = [forced]
        tuner.forget()
        report["forced"] = list(forced)
    q, k, v = (torch.randn(2, 80, 4, head_dim, dtype=torch.bfloat16) for _ in range(3))
    before = len(compiles)
    try:  # as the triton_op runs its body in eager mode: kernels launch directly, not through the HOP
        with set_wrap_triton_enabled(False):
            fa.forward(q, k, v, None, None, 80, 80, None, None, None, 0.0, 0.125, 0.0, -1, 0 if causal else -1,
                       True)
        report[call] = "returned"
    except LaunchReached:
        report[call] = "launch reached"
    report[call + " compiles"] = compiles[before:]
    report[call + " tuning runs"] = tuning_runs.count(call)
    report[call + " launches"] = [entry[1:] for entry in launches if entry[0] == call]
    best = tuner.best_config
    report[call + " best"] = [best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages]
report["kernels cached"] = len(tuner.fn.device_caches[0][0])
report["keys tuned"] = len(tuner.cache)
print(json.dumps(report))
"""


def _launch_without_a_gpu(**env_vars) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", autotune.AUTOTUNE_VARIABLE,
                                                           autotune.THREADS_VARIABLE)}
    env.update(env_vars)
    out = subprocess.run([sys.executable, "-c", _LAUNCH_WITHOUT_A_GPU], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_candidates_compile_on_threads_under_the_keys_the_launch_uses(tmp_path):
    from kernels.flash_attention import _FWD_CANDIDATES

    report = _launch_without_a_gpu(TRITONZOO_COMPILE_THREADS="2", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    n = len(_FWD_CANDIDATES[64])
    assert report["first"] == "launch reached"
    first = report["first compiles"]
    assert len(first) == n and all(name.startswith("tritonzoo-compile") for name in first), first
    assert report["again"] == "launch reached" and report["again compiles"] == []
    assert report["kernels cached"] == n and report["keys tuned"] == 1
    _check_fast_path(report, n)


def _check_fast_path(report, n_candidates):
    """The first call tunes through Triton's Autotuner.run (timing launches, then the launch of
    the pick); the second, same key, skips it and launches the pick alone."""
    assert report["first tuning runs"] == 1
    assert len(report["first launches"]) == n_candidates + 1
    assert report["first launches"][-1] == report["first best"]
    assert report["again tuning runs"] == 0, "a tuned key went through Autotuner.run again"
    assert report["again launches"] == [report["first best"]]


@pytest.mark.slow
def test_first_mode_compiles_one_candidate(tmp_path):
    report = _launch_without_a_gpu(TRITONZOO_AUTOTUNE="first", TRITON_CACHE_DIR=str(tmp_path / "cache"),
                                   THIRD_CALL="1")
    assert report["first"] == "launch reached"
    assert report["first compiles"] == ["MainThread"] and report["again compiles"] == []
    _check_fast_path(report, 1)
    # A new key (not causal) is tuned again, by Triton's run, and launches its own pick.
    assert report["other key"] == "launch reached" and report["other key tuning runs"] == 1
    assert report["other key launches"][-1] == report["other key best"]
    assert report["kernels cached"] == 2 and report["keys tuned"] == 2


@pytest.mark.slow
def test_forget_tunes_a_tuned_key_again(tmp_path):
    """After forget(), a key that was tuned (its pick remembered past Triton's cache) is tuned
    again among the current candidates and launches the new pick: how tests/test_gpu.py forces
    each candidate in turn."""
    report = _launch_without_a_gpu(TRITONZOO_AUTOTUNE="first", TRITON_CACHE_DIR=str(tmp_path / "cache"),
                                   FORGET="1")
    assert report["first best"] != report["forced"]
    assert report["forgotten tuning runs"] == 1, "the forgotten key was not tuned again"
    assert report["forgotten launches"][-1] == report["forced"] == report["forgotten best"]
