"""Where the model-shape attention time goes: host vs kernel, and each autotune candidate's time."""
import time, torch, triton
from torch.profiler import profile, ProfilerActivity
from kernels import flash_attn_func
from kernels import flash_attention as fa

SHAPES = [("vit", 128, 197, 12, 64, False), ("bert", 32, 512, 12, 64, False),
          ("gpt2", 16, 1024, 12, 64, True), ("sweep512", 32, 512, 32, 64, False),
          ("sweep1024c", 16, 1024, 32, 64, True)]
TUNED = {"fwd": fa._attn_fwd_tuned, "dkdv": fa._attn_bwd_dkdv_tuned, "dq": fa._attn_bwd_dq_tuned}
for name, B, S, H, D, causal in SHAPES:
    q, k, v, do = [torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    for t in (q, k, v):
        t.requires_grad_()
    out = flash_attn_func(q, k, v, causal=causal)
    torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    for kn, tuned in TUNED.items():
        timings = getattr(tuned, "configs_timings", None) or {}
        print(name, kn, "candidates:", "; ".join(f"{c}: {t[0]*1e3:.0f}us" for c, t in timings.items()))
    for _ in range(5):
        torch.autograd.grad(flash_attn_func(q, k, v, causal=causal), (q, k, v), do)
    torch.cuda.synchronize()
    n = 30
    t0 = time.perf_counter()
    for _ in range(n):
        flash_attn_func(q, k, v, causal=causal)
    host_fwd = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        torch.autograd.grad(flash_attn_func(q, k, v, causal=causal), (q, k, v), do)
    host_fb = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    wall_fb = (time.perf_counter() - t0) / n * 1e6
    fwd_ms = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, causal=causal), return_mode="median")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            torch.autograd.grad(flash_attn_func(q, k, v, causal=causal), (q, k, v), do)
        torch.cuda.synchronize()
    print(f"{name}: B{B} S{S} H{H} D{D} causal={causal}: host fwd {host_fwd:.0f} us/call, host fwd+bwd "
          f"{host_fb:.0f} us/call (wall incl. sync {wall_fb:.0f}), do_bench fwd {fwd_ms*1e3:.0f} us")
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:8]:
        print(f"   gpu {e.key[:60]:60s} calls {e.count:4d}  {e.self_device_time_total / max(e.count,1):8.1f} us/call")
