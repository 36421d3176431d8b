"""The one benchmark harness: timing with medians over repeats, a machine description, JSON output,
a PNG bar plot, and a row appended to ``benchmarks/results/results.md`` (the table the README shows).

Every benchmark measures its baseline in the same run and reports ``ratio = baseline_s / ours_s``
(> 1 means ours is faster) or the analogous throughput ratio.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, memory, torch version, GPU if any."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mem_gb": mem_gb,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None
            ) -> dict[str, float]:
    """Median / min / max wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def plot_bars(path: str | Path, labels: list[str], values: list[float], *, ylabel: str, title: str) -> Path:
    """A simple labelled bar chart saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 2), 3.5))
    bars = ax.bar(labels, values, color=["#2b7bba" if i % 2 == 0 else "#f28e2b" for i in range(len(values))])
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def append_result_row(benchmark: str, case: str, ours: str, baseline: str, ratio: float | None, machine: dict) -> None:
    """Append one row to the results table (markdown) that the README links to; a missing or NaN
    ratio (no baseline in this case) is written as n/a."""
    import math
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    table = RESULTS_DIR / "results.md"
    if not table.exists():
        table.write_text("| date | benchmark | case | ours | baseline | ratio | machine |\n"
                         "|---|---|---|---|---|---|---|\n")
    date = _dt.date.today().isoformat()
    mach = f"{machine.get('cpu', '?')} x{machine.get('cores', '?')}" + (f", {machine['gpu']}" if "gpu" in machine else "")
    with table.open("a") as fh:
        shown = "n/a" if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)) else f"{ratio:.2f}"
        fh.write(f"| {date} | {benchmark} | {case} | {ours} | {baseline} | {shown} | {mach} |\n")


def plot_stacked(path: str | Path, labels: list[str], parts: dict[str, list[float]], *, ylabel: str, title: str
                 ) -> Path:
    """A stacked bar chart (one bar per label, one segment per key of ``parts``) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(labels) + 3), 4.0))
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_grouped(path: str | Path, labels: list[str], series: dict[str, list[float]], *, ylabel: str, title: str,
                 log_y: bool = False) -> Path:
    """Grouped bars (one group per label, one bar per key of ``series``) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max(1, len(series))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) * k / 2 + 3), 4.0))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width=width, label=name)
    ax.set_xticks(range(len(labels)), labels)
    if log_y:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
