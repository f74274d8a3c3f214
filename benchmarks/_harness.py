"""Shared by the benchmark scripts: latency percentiles, ratios to a baseline, a printed table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Result", "print_table", "process_cpu_seconds", "summarize"]


@dataclass(frozen=True)
class Result:
    """One measured configuration: how many calls, how long, and their latencies."""

    name: str
    calls: int
    seconds: float
    latencies_s: Sequence[float]
    server_cpu_s: float | None = None
    """CPU time the server process used meanwhile: steadier than req/s on a shared machine."""

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)


def summarize(r: Result) -> dict[str, float]:
    figures = {"req/s": r.throughput, "p50 ms": r.percentile_ms(50), "p99 ms": r.percentile_ms(99)}
    if r.server_cpu_s is not None:
        figures["server CPU µs/req"] = r.server_cpu_s / r.calls * 1e6
    return figures


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_table(title: str, rows: Sequence[tuple[str, dict[str, float]]]) -> str:
    """Print rows of named figures as a Markdown table (pasteable into BENCHMARKS.md)."""
    columns = list(rows[0][1])
    lines = [
        f"### {title}",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, figures in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(figures[c]) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
