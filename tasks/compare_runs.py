"""Logged training runs for `zoo compare --runs`: the quality metric against steps and wall time.

A run is a folder runs/<name>/version_<n>/ written by `zoo fit` (tasks.lightning_cli):
metrics.csv from Lightning's CSVLogger, config.yaml, TensorBoard events. The quality
metric is the one the run's checkpoint callback monitors, i.e. the task class's
`monitor` (val/acc, val/loss, val/exact_match, val/cer), found through config.yaml's
model.class_path; without it, the first of PREFERRED_METRICS the CSV holds.

Wall time comes from ThroughputMonitor's train/time column: seconds of training since
fit started, validation excluded (Lightning shifts its clock past each validation), logged
every log_every_n_steps; the metric's steps are placed on it by linear interpolation.
Runs without that column fall back to the TensorBoard events' wall-clock stamps of the
metric (seconds since the run's first event, validation included), then to none.
"""

from __future__ import annotations

import csv
import glob
import importlib
import math
from pathlib import Path
from typing import Optional

import numpy as np

PREFERRED_METRICS = ("val/acc", "val/exact_match", "val/cer", "val/wer", "val/loss")
TIME_COLUMN = "train/time"  # ThroughputMonitor's elapsed training seconds


def find_metrics_files(patterns) -> list[Path]:
    """metrics.csv files named by folders, files or glob patterns: a run version folder, a
    run-name folder (all its version_* folders), or metrics.csv itself.

    `zoo validate|test` log into version folders of the same run name; a run-name folder or a
    glob keeps only the training logs among them (is_training_log). Raises FileNotFoundError
    naming a pattern that matches no metrics.csv, or only logs of evaluations."""
    found: list[Path] = []
    for pattern in patterns:
        expanded = glob.has_magic(pattern)
        paths = sorted(glob.glob(pattern)) if expanded else [pattern]
        hits, skipped = [], []
        for path in map(Path, paths):
            if path.is_file() and path.name == "metrics.csv":
                files = [path]
            elif (path / "metrics.csv").is_file():
                files = [path / "metrics.csv"]
            elif path.is_dir():
                files = sorted(path.glob("version_*/metrics.csv"), key=lambda p: _version_number(p.parent))
                expanded = True
            else:
                files = []
            for file in files:
                (hits if not expanded or is_training_log(file) else skipped).append(file)
        if not hits:
            what = (f"only logs of `zoo validate/test` (no train/ column): {', '.join(map(str, skipped))}"
                    if skipped else "no metrics.csv there")
            raise FileNotFoundError(f"--runs {pattern!r}: {what} (expected a training run's folder "
                                    f"runs/<name>/version_<n>, its parent, or a glob of them)")
        found += [h for h in hits if h not in found]
    return found


def is_training_log(metrics_csv) -> bool:
    """Whether a metrics.csv is a training run's: its header has a train/ column (`zoo fit` logs
    train/loss at every log_every_n_steps; `zoo validate|test` log only val/ or test/ metrics)."""
    with Path(metrics_csv).open(newline="") as f:
        header = next(csv.reader(f), [])
    return any(column.startswith("train/") for column in header)


def _version_number(folder: Path) -> int:
    tail = folder.name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else -1


def monitored_metric(run_dir: Path) -> Optional[tuple[str, str]]:
    """(metric, "max"|"min") the run's task monitors, from config.yaml's model.class_path; None if unknown."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        class_path = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("class_path")
        module, _, name = class_path.rpartition(".")
        monitor = getattr(importlib.import_module(module), name).monitor
    except (AttributeError, ImportError, ValueError, TypeError, yaml.YAMLError):
        return None
    return tuple(monitor) if isinstance(monitor, (tuple, list)) and len(monitor) == 2 else None


def _float(text: Optional[str]) -> Optional[float]:
    if text is None or not text.strip():
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _tensorboard_seconds(run_dir: Path, metric: str) -> dict[int, float]:
    """step -> seconds since the run's first event, from the TensorBoard event files (or {})."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    stamps: dict[int, float] = {}
    first = math.inf
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                first = min(first, event.wall_time)
                if tag == metric:
                    stamps[event.step] = event.wall_time
    return {step: t - first for step, t in stamps.items()}


def read_run(metrics_csv, metric: Optional[str] = None) -> dict:
    """One run's quality curve from its metrics.csv.

    Returns {"run", "path", "metric", "mode", "steps", "values", "seconds", "time_source"}:
    the metric's logged values in step order (steps: optimizer steps done when logged), and
    their training seconds (None each when no time could be derived). metric: a column to
    use instead of the monitored one.
    Raises ValueError when the CSV has no step column or no usable metric.
    """
    path = Path(metrics_csv)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if "step" not in columns:
        raise ValueError(f"{path}: no 'step' column (not a Lightning CSVLogger metrics.csv?)")
    mode = None
    if metric is None:
        monitored = monitored_metric(path.parent)
        if monitored is not None and monitored[0] in columns:
            metric, mode = monitored
        else:
            metric = next((m for m in PREFERRED_METRICS if m in columns), None)
    if not any(c.startswith("train/") for c in columns):
        raise ValueError(f"{path}: not a training run's log (no train/ column; `zoo validate|test` write "
                         f"such folders): give the run's `zoo fit` version folder")
    if metric is None or metric not in columns:
        raise ValueError(f"{path}: no quality metric column ({metric or ', '.join(PREFERRED_METRICS)}); "
                         f"columns: {', '.join(sorted(columns))}")
    if mode is None:
        mode = "min" if metric.endswith(("loss", "cer", "wer", "ppl", "bpc", "bpb")) else "max"
    # Lightning logs a training-time row (validation included) at the 0-based index of the last
    # optimizer step: + 1 is the number of steps done, what `best (step)` and `steps` report.
    points = sorted((int(float(r["step"])) + 1, v) for r in rows if (v := _float(r.get(metric))) is not None)
    if not points:
        raise ValueError(f"{path}: column {metric!r} holds no values")
    steps = [s for s, _ in points]
    clock = sorted((int(float(r["step"])) + 1, t) for r in rows if (t := _float(r.get(TIME_COLUMN))) is not None)
    seconds: list[Optional[float]] = [None] * len(steps)
    source = "none"
    if len(clock) >= 2:
        xs, ts = zip(*clock)
        # np.interp holds the end values flat; past the ends the training rate of the nearest
        # two logged points extends the line instead (validation at the last step is common).
        slope_lo = (ts[1] - ts[0]) / max(xs[1] - xs[0], 1)
        slope_hi = (ts[-1] - ts[-2]) / max(xs[-1] - xs[-2], 1)
        seconds = [float(np.interp(s, xs, ts)) if xs[0] <= s <= xs[-1] else
                   ts[0] + (s - xs[0]) * slope_lo if s < xs[0] else ts[-1] + (s - xs[-1]) * slope_hi for s in steps]
        source = f"{TIME_COLUMN} (ThroughputMonitor: training seconds, validation excluded), interpolated"
    else:
        stamps = _tensorboard_seconds(path.parent, metric)  # by the logged (0-based) step
        if stamps and all(s - 1 in stamps for s in steps):
            seconds, source = [stamps[s - 1] for s in steps], "TensorBoard event wall-clock (validation included)"
    run = f"{path.parent.parent.name}/{path.parent.name}"
    return {"run": run, "path": str(path), "metric": metric, "mode": mode, "steps": steps,
            "values": [v for _, v in points], "seconds": seconds, "time_source": source}


def best(run: dict) -> tuple[float, int]:
    """(best value, its step) of a run's curve, by its mode."""
    pick = max if run["mode"] == "max" else min
    value = pick(run["values"])
    return value, run["steps"][run["values"].index(value)]


def markdown(runs: list[dict]) -> str:
    """A table of the runs: metric, final and best value, steps and training time."""
    lines = ["| run | metric | final | best (step) | steps | training time | time from |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        value, step = best(r)
        last_s = r["seconds"][-1]
        lines.append(f"| {r['run']} | {r['metric']} ({r['mode']}) | {r['values'][-1]:.4g} | {value:.4g} ({step}) "
                     f"| {r['steps'][-1]} | {'n/a' if last_s is None else f'{last_s:.1f} s'} | {r['time_source']} |")
    return "\n".join(lines)


def plot(runs: list[dict], path, title: str) -> None:
    """Metric vs step and vs training seconds, one line per run, one pair of panels per metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = sorted({r["metric"] for r in runs})
    fig = Figure(figsize=(11, 3.4 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    for metric, (by_step, by_time) in zip(metrics, axes):
        for r in (r for r in runs if r["metric"] == metric):
            by_step.plot(r["steps"], r["values"], marker="o", markersize=3, label=r["run"])
            timed = [(t, v) for t, v in zip(r["seconds"], r["values"]) if t is not None]
            if timed:
                by_time.plot(*zip(*timed), marker="o", markersize=3, label=r["run"])
        for ax, xlabel in ((by_step, "step"), (by_time, "training time (s)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)
