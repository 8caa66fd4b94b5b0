"""Generation benchmark (`zoo bench generate`): a zoo decoder's generate() on the triton and sdpa
backends beside Hugging Face's.

One model's weights, three ways to generate greedily from the same left-padded prompts:

- ``zoo-triton``: zoo's GPT on the "triton" backend: flash-attention prefill, then one
  ``kernels.flash_attn_with_kvcache`` call per layer and step over the preallocated cache;
- ``zoo-sdpa``: the same model and cache on the "sdpa" backend (append by slice, torch SDPA
  with the padding as a mask): what the decoding kernel is worth inside the same model;
- ``hf``: Hugging Face's ``GPT2LMHeadModel.generate`` with its default cache and "sdpa"
  attention, on the weights zoo.from_hf read from it (``pip install transformers``).

Each generates exactly N new tokens per row (no stop token). Reported per (batch, prompt,
N): wall-clock seconds per generate (median of repeats, CUDA synchronized), tokens/s =
batch * N / time, the prefill alone (N = 1) and the decoding rate batch * (N - 1) /
(time(N) - time(1)), and on CUDA the peak memory a call adds to what was allocated before it
(every model's weights stay resident, so they are left out). Before timing, a teacher-forced check
feeds the same tokens through the cached steps of both zoo backends and holds their logits
to FlashAttention-2's rule against a float32 full pass: the error of zoo-triton is at most
twice that of zoo-sdpa plus 1e-3. On the GPU: gpt2 (124M) in bf16; on a CPU, a smoke run
of a tiny GPT-2 in fp32 through the kernels' PyTorch path, to exercise the harness.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

import zoo
from kernels import reference_only
from tasks.bench_attention import check_out_dir, progress, run_metadata, write_outputs
from tasks.compare_measure import median_step_ms

GPU_TITLE = "Greedy generation: zoo GPT-2 (triton / sdpa backends) vs Hugging Face generate, same weights"
CPU_TITLE = "CPU smoke run of the generation benchmark (tiny GPT-2, PyTorch paths); not a GPU benchmark"
IMPLEMENTATIONS = ("zoo-triton", "zoo-sdpa", "hf")
CHECK_STEPS = 16


class AccuracyError(RuntimeError):
    """zoo-triton's cached-step logits break FlashAttention-2's rule against the float32 full pass."""


@dataclass(frozen=True)
class Workload:
    """batch rows of left-padded prompts (lengths from prompt_len * 3/4 to prompt_len), new_tokens each."""

    batch: int
    prompt_len: int
    new_tokens: int


def gpu_workloads(quick: bool = False) -> list[Workload]:
    """Batch 1, 8, 32 with 512-token prompts and 256 new tokens (quick: batch 1 and 32, 64 new)."""
    if quick:
        return [Workload(b, 512, 64) for b in (1, 32)]
    return [Workload(b, 512, 256) for b in (1, 8, 32)]


def cpu_workloads() -> list[Workload]:
    return [Workload(b, 16, 8) for b in (1, 2)]


def gpu_model_config() -> dict:
    """gpt2 (124M) as zoo's preset: the model the benchmark generates with."""
    return dict(preset="gpt2", overrides=dict(dropout=0.0, attn_dropout=0.0))


def cpu_model_config() -> dict:
    return dict(preset="gpt2", overrides=dict(dim=64, depth=2, heads=4, vocab_size=256, max_seq_len=64,
                                              dropout=0.0, attn_dropout=0.0))


def build_models(model_config: dict, device: str, dtype: torch.dtype):
    """(hf model or None, why not, {name: zoo GPT}) with one set of weights, eval mode, on device."""
    from tasks.compare_reference import reference_for

    template = zoo.create_model(model_config["preset"], **model_config["overrides"])
    try:
        hf = reference_for(template).build().eval()
        # GPT-2's config names token 50256 as bos/eos: generate would stop there (or index past a
        # small vocabulary). Every row generates exactly N tokens instead; from_hf reads the
        # generation config, so the zoo model has no stop token either.
        hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
        ours = zoo.from_hf(hf).eval()
        hf_missing = None
    except ImportError as exc:  # transformers is optional: then zoo's two backends only
        hf, ours, hf_missing = None, template.eval(), f"transformers is not installed ({exc})"
    zoo_models = {}
    for backend in ("triton", "sdpa"):
        model = copy.deepcopy(ours)
        model.set_attn_backend(backend)
        zoo_models[f"zoo-{backend}"] = model.to(device=device, dtype=dtype)
    if hf is not None:
        hf = hf.to(device=device, dtype=dtype)
    return hf, hf_missing, zoo_models, ours


def make_prompts(w: Workload, vocab: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, P) and the mask (1 = real), rows left-padded to lengths in [3P/4, P]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3 * w.prompt_len // 4, w.prompt_len + 1, (w.batch,), generator=gen)
    lengths[0] = w.prompt_len
    ids = torch.randint(1, vocab, (w.batch, w.prompt_len), generator=gen)
    mask = (torch.arange(w.prompt_len) >= w.prompt_len - lengths[:, None]).long()
    return ids.to(device), mask.to(device)


def generators(zoo_models: dict, hf) -> dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]]:
    """Name -> generate(ids, mask, n) returning (B, P + n) greedy ids, exactly n new per row."""
    def exactly_n(name, generate):
        def run(ids, mask, n):
            out = generate(ids, mask, n)
            if out.shape != (ids.shape[0], ids.shape[1] + n):  # tokens/s counts n per row
                raise RuntimeError(f"{name} returned {tuple(out.shape)} ids, not the prompts + {n} new tokens "
                                   f"{(ids.shape[0], ids.shape[1] + n)}: did it stop at an end-of-sequence token?")
            return out
        return run

    def zoo_generate(model):
        return lambda ids, mask, n: model.generate(ids, attention_mask=mask, max_new_tokens=n)

    fns = {name: exactly_n(name, zoo_generate(model)) for name, model in zoo_models.items()}
    if hf is not None:
        def hf_generate(ids, mask, n):
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                               pad_token_id=0)
        fns["hf"] = exactly_n("hf", hf_generate)
    return fns


def measure(generate: Callable, ids: torch.Tensor, mask: torch.Tensor, w: Workload, device: str,
            repeats: int) -> dict:
    """Seconds for N and for 1 new token, tokens/s, the decoding rate and the peak memory the
    calls add on CUDA (MiB above what was allocated before them); {"error"} on failure."""
    try:
        with torch.no_grad():
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            total = median_step_ms(lambda: generate(ids, mask, w.new_tokens), device, repeats, warmup=1) / 1e3
            peak = (torch.cuda.max_memory_allocated() - resident) / 2**20 if device != "cpu" else None
            prefill = median_step_ms(lambda: generate(ids, mask, 1), device, repeats, warmup=1) / 1e3
    except Exception as exc:  # a peer that fails on a shape is recorded, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"[:600]}
    decode_s = total - prefill
    return {"seconds": total, "tokens_per_s": w.batch * w.new_tokens / total, "prefill_seconds": prefill,
            "decode_tokens_per_s": w.batch * (w.new_tokens - 1) / decode_s if decode_s > 0 else None,
            "extra_peak_mib": peak}


def _cached_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Logits (B, steps + 1, V): the prompt's last position, then each teacher-forced cached step."""
    P = ids.shape[1]
    cache = model.new_cache(capacity=P + steps.shape[1], leftpad=P - mask.sum(1))
    out = [model(ids, cache=cache)[:, -1]]
    for t in range(steps.shape[1]):
        out.append(model(steps[:, t:t + 1], cache=cache)[:, -1])
    return torch.stack(out, dim=1).float()


def check(zoo_models: dict, fp32_model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """FlashAttention-2's rule on teacher-forced cached logits: |triton - fp32| <= 2 |sdpa - fp32| + 1e-3."""
    vocab = fp32_model.cfg.vocab_size
    steps = torch.randint(1, vocab, (ids.shape[0], CHECK_STEPS), generator=torch.Generator().manual_seed(1))
    steps = steps.to(ids.device)
    full_ids = torch.cat([ids, steps], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        reference = fp32_model(full_ids, attention_mask=full_mask, position_ids=positions)[:, ids.shape[1] - 1:]
        errors = {name: (_cached_logits(model, ids, mask, steps) - reference.float()).abs().max().item()
                  for name, model in zoo_models.items()}
    bound = 2 * errors["zoo-sdpa"] + 1e-3
    if not errors["zoo-triton"] <= bound:  # also catches NaN
        raise AccuracyError(f"zoo-triton's cached logits are {errors['zoo-triton']:.3g} from the float32 pass, "
                            f"more than 2 x zoo-sdpa's {errors['zoo-sdpa']:.3g} + 1e-3")
    return {"steps": CHECK_STEPS, "max_abs_logit_error": errors, "bound": bound}


def agreement(outputs: dict[str, torch.Tensor], prompt_len: int) -> dict[str, float]:
    """Fraction of new tokens equal to hf's (or zoo-sdpa's), per implementation."""
    base = "hf" if "hf" in outputs else "zoo-sdpa"
    ref = outputs[base][:, prompt_len:]
    return {f"{name} vs {base}": (out[:, prompt_len:] == ref).float().mean().item()
            for name, out in outputs.items() if name != base}


def run(device: Optional[str] = None, quick: bool = False, out_dir: Optional[str] = "bench_out",
        workloads: Optional[list[Workload]] = None, repeats: int = 3, command: Optional[str] = None) -> dict:
    """Runs the benchmark, prints its table, writes generate.json and generate.md to out_dir.

    device: "cuda" or "cpu" (default: cuda when available); on CPU only quick mode runs (a
    smoke run; ValueError otherwise). Returns {"metadata", "model", "results"}. Raises
    AccuracyError when zoo-triton's cached logits fail the check.
    """
    check_out_dir(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not quick:
        raise ValueError("the generation benchmark needs a CUDA GPU; on CPU use quick mode (--quick), a smoke run")
    gpu = device != "cpu"
    model_config = gpu_model_config() if gpu else cpu_model_config()
    dtype = torch.bfloat16 if gpu else torch.float32
    workloads = workloads if workloads is not None else gpu_workloads(quick) if gpu else cpu_workloads()
    with reference_only() if not gpu else contextlib.nullcontext():
        hf, hf_missing, zoo_models, fp32_model = build_models(model_config, device, dtype)
        fp32_model = fp32_model.to(device)
        fp32_model.set_attn_backend("eager")
        fns = generators(zoo_models, hf)
        meta = run_metadata(device, quick, command, GPU_TITLE if gpu else CPU_TITLE)
        meta.update(dtype=str(dtype).replace("torch.", ""), repeats=repeats,
                    timing="median wall clock of generate() after one warm-up call"
                           + (", CUDA synchronized" if device.startswith("cuda") else ""),
                    hf=hf_missing or "GPT2LMHeadModel.generate, default cache, attn_implementation='sdpa'")
        report = {"metadata": meta, "model": model_config, "implementations": list(fns), "results": []}
        for w in workloads:
            ids, mask = make_prompts(w, fp32_model.cfg.vocab_size, device)
            row = {**asdict(w), "check": check(zoo_models, fp32_model, ids, mask)}
            with torch.no_grad():
                outputs = {name: fn(ids, mask, w.new_tokens) for name, fn in fns.items()}
            row["token_agreement"] = agreement(outputs, w.prompt_len)
            row["timings"] = {name: measure(fn, ids, mask, w, device, repeats) for name, fn in fns.items()}
            report["results"].append(row)
            progress(report, out_dir, "generate", f"B={w.batch} P={w.prompt_len} N={w.new_tokens}")
    table = format_table(report)
    print(table)
    write_outputs(report, out_dir, "generate", table)
    return report


def _fmt(x: Optional[float], digits: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, digits) if x >= 100 else f"{x:.3g}"


def format_table(report: dict) -> str:
    """Markdown: per workload and implementation, tokens/s, the decoding rate, prefill ms, extra peak MiB,
    the speedup of zoo-triton's tokens/s over each peer, and token agreement."""
    meta = report["metadata"]
    lines = [f"### {meta['title']}", "",
             f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}; {meta['date']}; "
             f"`{meta['command']}`", "", f"Model: {report['model']}. Timing: {meta['timing']}. HF: {meta['hf']}.", "",
             "| B | prompt | new | implementation | tokens/s | decode tokens/s | prefill ms | extra peak MiB | "
             "zoo-triton speedup | token agreement |", "|" + "---|" * 10]
    failures = []
    for row in report["results"]:
        ours = row["timings"].get("zoo-triton", {}).get("tokens_per_s")
        for name, t in row["timings"].items():
            if "error" in t:
                failures.append(f"- {name}, B={row['batch']}: {t['error']}")
                t = {}
            speed = t.get("tokens_per_s")
            speedup = f"{ours / speed:.2f}x" if ours and speed and name != "zoo-triton" else ""
            agree = next((f"{v:.0%}" for k, v in row["token_agreement"].items() if k.startswith(name + " ")), "")
            prefill = t.get("prefill_seconds")
            lines.append(f"| {row['batch']} | {row['prompt_len']} | {row['new_tokens']} | {name} | {_fmt(speed)} | "
                         f"{_fmt(t.get('decode_tokens_per_s'))} | {_fmt(prefill * 1e3 if prefill else None)} | "
                         f"{_fmt(t.get('extra_peak_mib'))} | {speedup} | {agree} |")
    checks = "; ".join(f"B={r['batch']}: triton {r['check']['max_abs_logit_error']['zoo-triton']:.2g}, "
                       f"sdpa {r['check']['max_abs_logit_error']['zoo-sdpa']:.2g}" for r in report["results"])
    lines += ["", f"Check (max abs logit error of {CHECK_STEPS} teacher-forced cached steps vs a float32 eager "
                  f"pass): {checks}."]
    if failures:
        lines += ["", "Unavailable:"] + failures
    return "\n".join(lines) + "\n"
