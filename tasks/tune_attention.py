"""Times launch configurations of one attention kernel at one shape, beside SDPA's flash backend.

    PYTHONPATH=. python -m tasks.tune_attention --kernel dkdv --head-dim 128 --seqlen 4096
    PYTHONPATH=. python -m tasks.tune_attention --kernel dkdv --head-dim 128 --seqlen 4096 \\
        --configs 16,128,8,3 64,64,8,2 64,64,8,2,160 128,64,8,2,255 --out tune_out

A config is BLOCK_M,BLOCK_N,num_warps,num_stages[,maxnreg]: the tile (queries x keys for every
kernel, as the candidate tables in kernels/flash_attention.py write them) and Triton's
launch options. Without --configs, the kernel's candidate row for the shape's head dim. Each
config is forced for that kernel alone (kernels.flash_attention.forced_config; the other
kernels keep the autotuner's pick) and the step that runs it is timed: the forward for
"fwd", the whole backward (preprocess, dK/dV, dQ) for "dkdv" and "dq". Each config's outputs
are checked against SDPA's flash backend on the same inputs (relative error of out, or of
dq, dk and dv; "WRONG" above 1e-2), so a tile that miscompiles shows as such, not as fast.

Shapes as `zoo bench attention`: B * S = 16384 tokens and H * D = 2048 unless --batch /
--heads say otherwise; bf16. On a machine without a GPU it runs in the Triton interpreter
(TRITON_INTERPRET=1 set before anything imports triton) at a small shape: a check that
each config computes the right thing, with no meaningful times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

KERNELS = ("fwd", "dkdv", "dq")
#: Relative error (Frobenius) of a config's result against SDPA flash above which it is WRONG.
WRONG_ABOVE = 1e-2


def parse_config(text: str) -> dict:
    """'BM,BN,W,S[,R]' -> the launch kwargs forced_config takes; ValueError naming the text."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (4, 5) or min(values) < 1:
        raise ValueError(f"a config is BLOCK_M,BLOCK_N,num_warps,num_stages[,maxnreg] of positive integers, "
                         f"got {text!r}")
    config = dict(BLOCK_M=values[0], BLOCK_N=values[1], num_warps=values[2], num_stages=values[3])
    if len(values) == 5:
        config["maxnreg"] = values[4]
    return config


def describe(config: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg")
    return ",".join(str(config[k]) for k in keys if k in config)


def table_configs(kernel: str, head_dim: int) -> list[dict]:
    """The candidate table's row for ``kernel`` at ``head_dim`` (bf16), as configs."""
    from kernels import autotune, flash_attention
    table = {"fwd": flash_attention._FWD_CANDIDATES, "dkdv": flash_attention._DKDV_CANDIDATES,
             "dq": flash_attention._DQ_CANDIDATES}[kernel]
    row = table[autotune.table_key(False, max(16, 1 << (head_dim - 1).bit_length()))]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in row]


def _relative_error(ours, ref) -> float:
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run(kernel: str, batch: int, seqlen: int, heads: int, head_dim: int, causal: bool,
        configs: Sequence[dict], device: str, warmup: float = 25, rep: float = 100) -> dict:
    """Times and checks each config; returns {"shape", "sdpa_flash", "rows"} (see the module docstring)."""
    import torch

    from kernels import flash_attention, flash_attn_func
    from tasks.bench_attention import Shape, _sdpa, attention_flops, make_inputs, time_ms

    dtype = "bfloat16" if device == "cuda" else "float32"
    shape = Shape(batch, seqlen, heads, head_dim, causal, dtype)
    q, k, v, dout = make_inputs(shape, device)
    flops_fwd, flops_bwd = attention_flops(shape)
    flops = flops_fwd if kernel == "fwd" else flops_bwd

    def step_of(attend):
        """(timed callable, results) of the step that runs ``kernel``."""
        out = attend(q, k, v, causal)
        if kernel == "fwd":
            return (lambda: attend(q, k, v, causal)), (out.detach(),)
        grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return (lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)), grads

    sdpa = _sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION if device == "cuda" else None)
    peer_step, peer_results = step_of(sdpa)
    peer_ms = time_ms(peer_step, device, warmup, rep)
    report = {"kernel": kernel, "shape": shape.__dict__, "device": device,
              "sdpa_flash": {"ms": peer_ms, "tflops": flops / peer_ms * 1e-9}, "rows": []}
    for config in configs:
        row = {"config": describe(config)}
        try:
            with flash_attention.forced_config(kernel, config):
                step, results = step_of(lambda *a: flash_attn_func(*a[:3], causal=a[3]))
                errors = [_relative_error(r, p) for r, p in zip(results, peer_results)]
                ms = time_ms(step, device, warmup, rep)
        except Exception as exc:  # a config that does not compile or launch (shared memory, registers)
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            row.update(ms=ms, tflops=flops / ms * 1e-9, vs_sdpa_flash=peer_ms / ms, rel_error=max(errors),
                       ok=max(errors) <= WRONG_ABOVE)
        report["rows"].append(row)
        print(format_row(row), file=sys.stderr, flush=True)
    return report


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['config']} | failed: {row['error']} | | | |"
    verdict = "ok" if row["ok"] else "WRONG"
    return (f"| {row['config']} | {row['ms']:.3f} | {row['tflops']:.1f} | {row['vs_sdpa_flash']:.2f} | "
            f"{row['rel_error']:.1e} {verdict} |")


def format_table(report: dict) -> str:
    s = report["shape"]
    peer = report["sdpa_flash"]
    step = "forward" if report["kernel"] == "fwd" else "backward"
    lines = [f"{report['kernel']} configs at B={s['batch']} S={s['seqlen']} H={s['nheads']} D={s['head_dim']} "
             f"{'causal' if s['causal'] else 'non-causal'} {s['dtype']} on {report['device']}; timed: the {step}; "
             f"SDPA flash {peer['ms']:.3f} ms ({peer['tflops']:.1f} TFLOP/s)", "",
             "| BLOCK_M,BLOCK_N,warps,stages[,maxnreg] | ms | TFLOP/s | vs SDPA flash | rel. error vs SDPA |",
             "|---|---|---|---|---|"]
    lines += [format_row(row) for row in report["rows"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--kernel", choices=KERNELS, required=True)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=None, help="default: 4096 on a GPU, 64 in the interpreter")
    parser.add_argument("--batch", type=int, default=None, help="default: 16384 // seqlen (1 in the interpreter)")
    parser.add_argument("--heads", type=int, default=None, help="default: 2048 // head-dim (2 in the interpreter)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--configs", nargs="+", default=None, metavar="BM,BN,W,S[,R]")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write tune_<kernel>_<shape>.json/.md here")
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs] if args.configs else None
    except ValueError as error:
        parser.error(str(error))
    from kernels.flash_attn_interface import MAX_HEAD_DIM
    if not 1 <= args.head_dim <= MAX_HEAD_DIM:
        parser.error(f"--head-dim must be 1 to {MAX_HEAD_DIM}, got {args.head_dim}")
    for name in ("seqlen", "batch", "heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("no GPU: set TRITON_INTERPRET=1 to check the configs in the Triton interpreter")
    gpu = device == "cuda"
    seqlen = args.seqlen or (4096 if gpu else 64)
    batch = args.batch or (max(1, 16384 // seqlen) if gpu else 1)
    heads = args.heads or (max(1, 2048 // args.head_dim) if gpu else 2)
    configs = configs or table_configs(args.kernel, args.head_dim)
    report = run(args.kernel, batch, seqlen, heads, args.head_dim, args.causal, configs, device)
    table = format_table(report)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"tune_{args.kernel}_d{args.head_dim}_s{seqlen}" + ("_causal" if args.causal else "")
        stem = os.path.join(args.out, name)
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table + "\n")
    return 0 if all(row.get("ok", True) for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
