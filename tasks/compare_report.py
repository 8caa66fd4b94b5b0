"""`zoo compare`'s outputs from its report dict: Markdown, CSV, JSON and PNG plots.

Needs neither CUDA nor the models: any saved compare.json can be re-rendered with
write(json.load(open(path)), out_dir).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from tasks import compare_runs

CSV_COLUMNS = ("model", "implementation", "input", "batch", "params", "fwd_gflops_analytic", "fwd_gflops_counter",
               "counter_over_analytic", "train_step_ms", "train_samples_per_s", "train_tokens_per_s",
               "train_audio_s_per_s", "train_peak_mib", "mfu", "infer_step_ms", "infer_samples_per_s",
               "infer_tokens_per_s", "infer_audio_s_per_s", "infer_peak_mib", "speedup_vs_reference_train",
               "speedup_vs_reference_infer", "error")


def _num(x: Optional[float], digits: int = 3) -> str:
    """A number for a table: 3 significant digits, thousands separated; n/a for None."""
    if x is None:
        return "n/a"
    if abs(float(f"{x:.{digits}g}")) >= 1000:  # rounding first: 999.7 is 1,000, not 1e+03
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _ours(entry: dict) -> list[str]:
    return [k for k in entry["results"] if k.startswith("ours-")]


def speedup(entry: dict, impl: str, phase: str) -> Optional[float]:
    """samples/s of `impl` over the reference's, in `phase` ("train" or "infer"); None if either is missing."""
    ref = entry["results"].get("reference", {}).get(phase, {}).get("samples_per_s")
    ours = entry["results"].get(impl, {}).get(phase, {}).get("samples_per_s")
    return ours / ref if ours and ref else None


def _rate(result: dict, key: str = "samples_per_s") -> str:
    return "failed" if "error" in result else _num(result.get(key))


def _reference_cell(entry: dict) -> str:
    ref = entry.get("reference") or {}
    if ref.get("name") and not ref.get("why_none"):
        return ref["name"]
    return "—"


def _mb(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def markdown(report: dict) -> str:
    """The whole comparison as Markdown: metadata, then one table per question, then notes."""
    meta, models = report["metadata"], report["models"]
    lines = ["## zoo compare", "",
             f"- command: `{meta['command']}`", f"- device: {meta['device']}",
             f"- versions: torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}, "
             f"transformers {meta['transformers']}, Python {meta['python']}",
             f"- date: {meta['date']}", f"- precision: {meta['precision']}; {meta['timing']}",
             f"- FLOPs: {meta['flops']}", f"- MFU peak: {meta['peak_note']}"]
    if "kernel_ops" in meta:  # reports written before 2026-11-25 lack it
        lines.append(f"- our ops: {meta['kernel_ops']}")
    lines.append("")
    lines += ["### Models", "", "| model | input | parameters | reference | reference parameters | fwd GFLOPs / sample "
              "(analytic) | flop_counter | counter / analytic |", "|---|---|---|---|---|---|---|---|"]
    for e in models:
        ref, f = e.get("reference") or {}, e["flops"]
        lines.append(f"| {e['model']} | {e['input']} | {e['params']:,} | {_reference_cell(e)} | "
                     f"{format(ref['params'], ',') if ref.get('params') is not None else '—'} | "
                     f"{_num(f['forward_analytic'] / 1e9, 4)} | {_num(f['forward_counter'] / 1e9, 4)} | "
                     f"{f['counter_over_analytic']:.4f} |")
    lines += ["", "### Training step (forward + backward + AdamW)", "",
              "| model | implementation | step ms | samples/s | tokens/s | audio-s/s | vs reference | MFU "
              "| peak memory |", "|---|---|---|---|---|---|---|---|---|"]
    for e in models:
        for impl, res in e["results"].items():
            t = res["train"]
            s = speedup(e, impl, "train")
            audio = _num(t.get("audio_s_per_s")) if "audio_s_per_s" in t else "—"
            lines.append(f"| {e['model']} | {_impl_name(e, impl)} | {_rate(t, 'step_ms')} | {_rate(t)} | "
                         f"{_rate(t, 'tokens_per_s')} | {audio} | {_vs(s, impl)} | {_pct(t.get('mfu'))} | "
                         f"{_mb(t.get('peak_mib'))} |")
    lines += ["", "### Inference (no-grad forward, eval mode)", "",
              "| model | implementation | step ms | samples/s | tokens/s | vs reference | peak memory |",
              "|---|---|---|---|---|---|---|"]
    for e in models:
        for impl, res in e["results"].items():
            t = res["infer"]
            s = speedup(e, impl, "infer")
            lines.append(f"| {e['model']} | {_impl_name(e, impl)} | {_rate(t, 'step_ms')} | {_rate(t)} | "
                         f"{_rate(t, 'tokens_per_s')} | {_vs(s, impl)} | {_mb(t.get('peak_mib'))} |")
    lines += ["", "### Summary", ""] + summary(report)
    notes = []
    for e in models:
        ref = e.get("reference") or {}
        if ref.get("why_none"):
            notes.append(f"- {e['model']}: no reference: {ref['why_none']}")
        if ref.get("param_note") and not ref.get("why_none"):
            notes.append(f"- {e['model']}: parameters differ by design: {ref['param_note']}")
        for impl, res in e["results"].items():
            for phase in ("train", "infer"):
                if "error" in res[phase]:
                    notes.append(f"- {e['model']}, {_impl_name(e, impl)}, {phase}: {res[phase]['error']}")
    if notes:
        lines += ["", "### Notes", ""] + notes
    if report.get("runs"):
        lines += ["", "### Logged runs", "", compare_runs.markdown(report["runs"])]
    return "\n".join(lines) + "\n"


def _impl_name(entry: dict, impl: str) -> str:
    if impl == "reference":
        return (entry.get("reference") or {}).get("name") or "reference"
    return f"ours ({impl[len('ours-'):]})"


def summary(report: dict) -> list[str]:
    """One line per model: our headline backend's training throughput as a multiple of the reference's."""
    out = []
    for e in report["models"]:
        ours = _ours(e)
        if not ours:
            continue
        head = ours[0]
        s = speedup(e, head, "train")
        if s is None:
            why = (e.get("reference") or {}).get("why_none") or "a measurement failed"
            out.append(f"- {e['model']}: no training ratio against a reference ({why}).")
            continue
        ahead = f"{100 * (s - 1):.0f}% ahead of" if s >= 1 else f"{100 * (1 - s):.0f}% behind"
        out.append(f"- {e['model']}: {_impl_name(e, head)} trains at {s:.2f}x the samples/s of "
                   f"{e['reference']['name']} ({ahead} it); inference {_x(speedup(e, head, 'infer'))}.")
    return out


def _vs(s: Optional[float], impl: str) -> str:
    return "—" if s is None or impl == "reference" else f"{s:.2f}x"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _x(s: Optional[float]) -> str:
    return "n/a" if s is None else f"{s:.2f}x"


def csv_rows(report: dict) -> list[dict]:
    """One row per (model, implementation), with the columns of CSV_COLUMNS."""
    rows = []
    for e in report["models"]:
        f = e["flops"]
        for impl, res in e["results"].items():
            t, i = res["train"], res["infer"]
            params = e["params"] if impl != "reference" else e["reference"]["params"]
            rows.append({
                "model": e["model"], "implementation": _impl_name(e, impl), "input": e["input"], "batch": e["batch"],
                "params": params, "fwd_gflops_analytic": f["forward_analytic"] / 1e9,
                "fwd_gflops_counter": f["forward_counter"] / 1e9, "counter_over_analytic": f["counter_over_analytic"],
                "train_step_ms": t.get("step_ms"), "train_samples_per_s": t.get("samples_per_s"),
                "train_tokens_per_s": t.get("tokens_per_s"), "train_audio_s_per_s": t.get("audio_s_per_s"),
                "train_peak_mib": t.get("peak_mib"), "mfu": t.get("mfu"), "infer_step_ms": i.get("step_ms"),
                "infer_samples_per_s": i.get("samples_per_s"), "infer_tokens_per_s": i.get("tokens_per_s"),
                "infer_audio_s_per_s": i.get("audio_s_per_s"), "infer_peak_mib": i.get("peak_mib"),
                "speedup_vs_reference_train": speedup(e, impl, "train") if impl != "reference" else None,
                "speedup_vs_reference_infer": speedup(e, impl, "infer") if impl != "reference" else None,
                "error": "; ".join(f"{p}: {res[p]['error']}" for p in ("train", "infer") if "error" in res[p]),
            })
    return rows


def plot_throughput(report: dict, path) -> None:
    """One panel per model: training and inference samples/s of each of our backends and the reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = report["models"]
    cols = min(3, max(1, len(models)))
    rows = (len(models) + cols - 1) // cols
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, e in zip(axes, models):
        impls = list(e["results"])
        names = [f"ours\n{k[len('ours-'):]}" if k.startswith("ours-") else _impl_name(e, k).replace(" ", "\n", 1)
                 for k in impls]
        for offset, phase, color in ((-0.2, "train", "tab:blue"), (0.2, "infer", "tab:orange")):
            values = [e["results"][k][phase].get("samples_per_s") or 0.0 for k in impls]
            bars = ax.bar([i + offset for i in range(len(impls))], values, width=0.4, color=color,
                          label="training" if phase == "train" else "inference")
            ax.bar_label(bars, labels=[_num(v) if v else "failed" for v in values], fontsize="x-small")
        ax.set_xticks(range(len(impls)), names, fontsize="small")
        ax.set_title(f"{e['model']}\n{e['input']}", fontsize="small")
        ax.set_ylabel("samples/s")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="x-small")
    for ax in axes[len(models):]:
        ax.set_visible(False)
    meta = report["metadata"]
    fig.suptitle(f"zoo compare: {meta['device']}\ntorch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['precision']}, {meta['date'][:10]}", fontsize="medium")
    fig.savefig(path, dpi=110)


def write_partial(report: dict, out_dir) -> None:
    """compare.md, compare.json and compare.csv with what is measured so far, and no plots (those
    of an earlier run in out_dir are removed: they would disagree with the tables); ``write``
    replaces the tables and draws the plots at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown(report))
    (out / "compare.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(report))
    for plot in ("compare_throughput.png", "compare_quality.png"):
        (out / plot).unlink(missing_ok=True)


def write(report: dict, out_dir) -> list[Path]:
    """Writes compare.md, compare.csv, compare.json, compare_throughput.png and, with runs,
    compare_quality.png to out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.md", out / "compare.csv", out / "compare.json", out / "compare_throughput.png"]
    write_partial(report, out)
    plot_throughput(report, paths[3])
    if report.get("runs"):
        paths.append(out / "compare_quality.png")
        meta = report["metadata"]
        compare_runs.plot(report["runs"], paths[-1], f"logged runs (read {meta['date'][:10]})")
    return paths
