"""Shared by the benchmark scripts: latency percentiles, ratios to a baseline, a printed table."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from router import Router

__all__ = [
    "Result",
    "http_load",
    "print_table",
    "process_cpu_seconds",
    "read_port_file",
    "rss_mb",
    "serving",
    "summarize",
    "until_delivered",
]


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


def process_cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (or of one of its threads) so far, from /proc (Linux)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serving(
    command: list[str], ready: Callable[[], bool], **popen: object
) -> Iterator[tuple[int, float]]:
    """Run a server until the block ends; yields (its pid, seconds from start until `ready()`
    first held). Stopped with SIGINT, which stops KServe and MLServer at once (KServe waits out
    a long grace period on SIGTERM), then SIGKILL."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **popen,  # type: ignore[call-overload]
    )
    try:
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited with {process.returncode}")
            if time.perf_counter() - started > 120:
                raise TimeoutError(f"{command[:3]} did not become ready in 120 s")
            time.sleep(0.01)
        yield process.pid, time.perf_counter() - started
    finally:
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
            if process.poll() is None:
                process.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(15)


def read_port_file(
    path: Path, process: subprocess.Popen[bytes], name: str, timeout_s: float = 120
) -> dict[str, int]:
    """The ports a server wrote to `path` once it listened; RuntimeError if it exits or takes
    longer than `timeout_s` first."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.05)
    ports: dict[str, int] = json.loads(path.read_text())
    return ports


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    pids = [pid]
    for child in subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True
    ).stdout.split():
        pids.append(int(child))
    total_kb = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


async def until_delivered(router: Router, count: int) -> None:
    """Return once a watcher of `router` has heard of `count` ended tickets, every one of them
    delivered (AssertionError on any other end): a drained backlog, as its owner would see it."""
    delivered = 0
    async for result in router.watch(0):
        assert result.state == "delivered", result
        delivered += 1
        if delivered == count:
            return


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")


async def http_load(
    port: int,
    path: str,
    body: bytes,
    headers: Callable[[int], dict[str, str]],
    total: int,
    concurrency: int,
) -> Result:
    """`total` POSTs of `body` to `path` over `concurrency` keep-alive connections.

    A minimal HTTP/1.1 client on asyncio streams: on a 2-core machine a full client such as
    httpx costs as much CPU per request as the server under test, and would measure itself.
    Answers must carry a Content-Length (no chunked bodies).
    """
    latencies: list[float] = []
    counter = iter(range(total))

    def request(i: int) -> bytes:
        lines = [
            f"POST {path} HTTP/1.1",
            "Host: 127.0.0.1",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers(i).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                raw = request(i)
                start = time.perf_counter()
                await _one(reader, writer, raw)
                latencies.append(time.perf_counter() - start)
        finally:
            writer.close()
            await writer.wait_closed()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result("", total, time.perf_counter() - start, latencies)


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
