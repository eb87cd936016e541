"""Shared pieces of every benchmark under ``bench/``: latency statistics, the printed table, the
JSON result file and the plot. Benchmarks report figures; they assert nothing (tests do that)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def freeze_gc() -> None:
    """Take the load generator's start-up heap out of garbage collection, as the services do
    (``gc_freeze``): its full collections otherwise stall every stream it is timing by ~20 ms,
    whichever side of a comparison they land in."""
    gc.collect()
    gc.freeze()


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of latencies given in milliseconds (numpy's linear interpolation)."""
    if not samples_ms:
        return {"n": 0}
    a = np.asarray(samples_ms, dtype=float)
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (default: this one), in MiB."""
    return round(psutil.Process(pid or os.getpid()).memory_info().rss / 2**20, 1)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """One row per dict; ``columns`` picks and orders the keys (default: the first row's)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(_fmt(row.get(col, "")) for col in columns))
    # Into a log (not a terminal) rich would cut wide tables to 80 columns.
    Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 220).print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (with the machine description) and print its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def plot_latency(name: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str) -> Path:
    """A line plot (PNG, ``bench/results/<name>.png``) of named series of (x, y) points."""
    import matplotlib  # noqa: PLC0415 - only benchmarks that plot need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


class CpuMeter:
    """CPU time (user + system) of named processes over an interval, and how busy the whole
    machine was. A process counts its live children (a Milvus Lite server, a tool sandbox) unless
    it is in ``own_only`` (the load generator: the mesh's processes are its children)."""

    def __init__(self, processes: dict[str, psutil.Process], own_only: set[str]):
        self.processes = processes
        self.own_only = own_only
        self.before: dict[str, float] = {}

    def _cpu(self, name: str) -> float:
        p = self.processes[name]
        total = 0.0
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
            if name in self.own_only:
                return total
            for child in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
        return total

    def start(self) -> None:
        self.before = {name: self._cpu(name) for name in self.processes}
        self.machine_before = psutil.cpu_times()

    def stop(self) -> dict[str, float]:
        """CPU seconds of each process since :meth:`start`; ``busy_pct`` is then the share of
        all the machine's cores in use over the interval (every process, ours or not)."""
        after = psutil.cpu_times()
        busy = (sum(after) - after.idle - after.iowait) - (
            sum(self.machine_before) - self.machine_before.idle - self.machine_before.iowait)
        total = sum(after) - sum(self.machine_before)
        self.busy_pct = round(100 * busy / total, 1) if total > 0 else None
        return {name: round(self._cpu(name) - self.before[name], 3) for name in self.processes}
