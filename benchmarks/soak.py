"""Soak: an edge agent and a cloud gateway under steady mixed load for an hour, the link flapping.

Samples, every --sample-s seconds, each daemon's resident memory, open file descriptors and
threads, the agent's state dir bytes (and its WAL files), the queue's accounted bytes, and the
latency of the answers in that window. At the end it checks, after the warm-up:
resources grow by under 5 % (the mean of the last quarter of samples against the first),
no error-level log line was written, every answer came back, the local answers' p99 of each
5-minute window (over every local answer in it) stays within 1.5x the median window's, and
every queued ticket ended. It reports each window's p99 per route too: local (`edge`),
answered by the cloud (`cloud`), queued (`queue`, the provisional local answer). It writes the samples as CSV,
a PNG plot and a JSON summary beside them, prints a Markdown table, and exits 1 if a check failed.

    .venv/bin/python benchmarks/soak.py [--minutes 60] [--warmup-minutes 10] [--rate 20]
        [--out benchmarks/results/soak]

Not a test: it runs for an hour. RELIABILITY.md has the figures of a run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import write_device_key
from tests.integration.gateway.helpers import start_gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, start_daemon, wait_until

GROWTH_LIMIT = 0.05
P99_SPREAD_LIMIT = 1.5
"""Each window's local p99 against the median window's: 5 minutes hold ten flaps and some
6,000 local answers, so a window's p99 is its 60 slowest, not one unlucky burst."""
WINDOW_S = 300.0
ROUTES = ("edge", "cloud", "queue")


@dataclass
class Sample:
    t_s: float
    agent_rss_bytes: int
    agent_fds: int
    agent_threads: int
    gateway_rss_bytes: int
    gateway_fds: int
    gateway_threads: int
    state_dir_bytes: int
    wal_bytes: int
    queue_bytes: int
    queue_depth: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    link_state: str


@dataclass
class Load:
    """What the clients did; appended to from their threads under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    answers: list[tuple[float, str, float]] = field(default_factory=list)
    """(when sent on time.monotonic(), route, seconds taken) of every answer of the run."""
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    tickets: list[str] = field(default_factory=list)
    routes: dict[str, int] = field(default_factory=dict)

    def window(self) -> tuple[int, list[float]]:
        with self.lock:
            latencies, self.latencies = self.latencies, []
            return self.requests, latencies


def proc_figures(pids: list[int]) -> tuple[int, int, int]:
    """Resident bytes, open fds and threads, summed over `pids` (Linux /proc)."""
    rss = fds = threads = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads += int(line.split()[1])
    return rss, fds, threads


def dir_bytes(path: Path) -> tuple[int, int]:
    """All bytes under `path`, and those of its SQLite WAL files."""
    total = wal = 0
    for f in path.rglob("*"):
        if f.is_file():
            size = f.stat().st_size
            total += size
            wal += size if f.name.endswith("-wal") else 0
    return total, wal


def make_request(x: np.ndarray, rng: random.Random) -> pb.ModelInferRequest:
    """Mixed: most calls leave escalation to the policy, some ask for the cloud, some forbid it;
    priorities and TTLs vary (a short TTL lets some items expire while the link is down)."""
    params = {}
    kind = rng.random()
    if kind < 0.2:
        params["escalation"] = pb.InferParameter(string_param="always")
    elif kind < 0.3:
        params["escalation"] = pb.InferParameter(string_param="never")
    params["priority"] = pb.InferParameter(int64_param=rng.randint(1, 9))
    if rng.random() < 0.1:
        params["ttl_seconds"] = pb.InferParameter(int64_param=rng.choice((5, 30)))
    return pb.ModelInferRequest(
        model_name="digits",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[x.astype(np.float32).tobytes()],
        parameters=params,
    )


def drive(
    address: str, load: Load, rate: float, stop: threading.Event, seed: int, clients: int = 4
) -> None:
    """Send `rate` requests per second, paced, from `clients` threads, until `stop`."""
    images = np.load(HELDOUT)["X"]
    channel = grpc.insecure_channel(address)
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    tickets = rpb_grpc.RouterServiceStub(channel)
    rng = random.Random(seed)

    def one(request: pb.ModelInferRequest) -> None:
        start_mono, start = time.monotonic(), time.perf_counter()
        try:
            response = infer.ModelInfer(request, timeout=5.0)
        except grpc.RpcError as exc:
            with load.lock:
                load.errors.append(f"{exc.code().name}: {exc.details()}")
            return
        elapsed = time.perf_counter() - start
        route = response.parameters["route"].string_param
        ticket = (
            response.parameters["ticket"].string_param if "ticket" in response.parameters else ""
        )
        with load.lock:
            load.latencies.append(elapsed)
            load.answers.append((start_mono, route, elapsed))
            load.routes[route] = load.routes.get(route, 0) + 1
            if ticket:
                load.tickets.append(ticket)
        if ticket and rng.random() < 0.1:
            tickets.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5.0)

    with ThreadPoolExecutor(clients) as pool:
        next_at = time.monotonic()
        while not stop.is_set():
            request = make_request(images[rng.randrange(len(images))], rng)
            with load.lock:
                load.requests += 1
            pool.submit(one, request)
            next_at += 1.0 / rate
            stop.wait(max(0.0, next_at - time.monotonic()))
    channel.close()


def flap(proxy: FaultProxy, up_s: float, down_s: float, stop: threading.Event) -> None:
    while not stop.wait(up_s):
        proxy.cut()
        if stop.wait(down_s):
            break
        proxy.restore()
    proxy.restore()


def ready(d: Daemon) -> bool:
    with grpc.insecure_channel(d.address("grpc")) as ch:
        return bool(pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest()).ready)


def start_agent(
    work: Path, proxy: FaultProxy, key_file: Path, probe_interval_s: float, *flags: str
) -> Daemon:
    """`edge-agent serve` on ports 0, state in `work`/agent/state, its cloud the gateway behind
    `proxy`, probing the link every `probe_interval_s` (a probe times out after 1 s)."""
    return start_daemon(
        "edge-agent",
        ["serve", "--port", "0", "--metrics-port", "0", "--state-dir", str(work / "agent" / "state"),
         "--cloud-url", proxy.url, "--device-key-file", str(key_file), *flags],
        work / "agent",
        ready=ready,
        env={"EDGE_AGENT_PROBE_INTERVAL_SECONDS": str(probe_interval_s),
             "EDGE_AGENT_PROBE_TIMEOUT_SECONDS": "1"},
    )  # fmt: skip


def status(agent: Daemon) -> rpb.StatusResponse:
    with grpc.insecure_channel(agent.address("grpc")) as ch:
        return rpb_grpc.RouterServiceStub(ch).Status(rpb.StatusRequest(), timeout=5.0)


def error_lines(*logs: str) -> list[str]:
    """Log lines at error level or above (JSON lines of either daemon, or a traceback)."""
    found = []
    for text in logs:
        for line in text.splitlines():
            try:
                level = str(json.loads(line).get("level", "")).lower()
            except (ValueError, AttributeError):
                level = "error" if line.startswith("Traceback") else ""
            if level in ("error", "critical"):
                found.append(line[:300])
    return found


def window_p99s(
    answers: list[tuple[float, str, float]], start: float, end: float, window_s: float = WINDOW_S
) -> dict[str, list[float | None]]:
    """Per route, the p99 in ms of the answers sent in each `window_s` window from `start` to
    `end` (None where the route had none); a last window shorter than half joins the one
    before it."""
    count = max(1, int((end - start) // window_s))
    if (end - start) - count * window_s >= window_s / 2:
        count += 1
    by_window: dict[str, list[list[float]]] = {r: [[] for _ in range(count)] for r in ROUTES}
    for sent, route, seconds in answers:
        if start <= sent < end and route in by_window:
            by_window[route][min(count - 1, int((sent - start) // window_s))].append(seconds)
    return {
        route: [float(np.percentile(w, 99)) * 1000 if w else None for w in windows]
        for route, windows in by_window.items()
    }


def growth(samples: list[Sample], name: str) -> float:
    """The mean of the last quarter of `samples` against the first quarter's: each quarter spans
    many flaps, so connections opened and closed with the link do not count as growth."""
    values = [float(getattr(s, name)) for s in samples]
    quarter = max(1, len(values) // 4)
    first, last = statistics.mean(values[:quarter]), statistics.mean(values[-quarter:])
    return (last - first) / first if first else 0.0


def plot(samples: list[Sample], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t_s / 60 for s in samples]
    panels: list[tuple[str, list[tuple[str, Callable[[Sample], float]]]]] = [
        ("resident memory (MiB)", [
            ("agent", lambda s: s.agent_rss_bytes / 2**20),
            ("gateway (all processes)", lambda s: s.gateway_rss_bytes / 2**20),
        ]),
        ("open fds / threads", [
            ("agent fds", lambda s: s.agent_fds), ("agent threads", lambda s: s.agent_threads),
            ("gateway fds", lambda s: s.gateway_fds),
            ("gateway threads", lambda s: s.gateway_threads),
        ]),
        ("agent state dir (MiB)", [
            ("all files", lambda s: s.state_dir_bytes / 2**20),
            ("WAL files", lambda s: s.wal_bytes / 2**20),
            ("queue accounted", lambda s: s.queue_bytes / 2**20),
        ]),
        ("answer latency per sample, all routes (ms)", [("p50", lambda s: s.p50_ms), ("p99", lambda s: s.p99_ms)]),
    ]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 11), sharex=True)
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for label, value in lines:
            ax.plot(minutes, [value(s) for s in samples], label=label)
        ax.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
        ax.set_title(title)
        ax.legend(fontsize="small", loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--warmup-minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--flap-up-s", type=float, default=20.0)
    parser.add_argument("--flap-down-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    gateway = start_gateway(work / "gateway", "--workers", "2")
    wait_until(lambda: len(gateway.worker_pids()) == 2, 30.0, what="gateway workers")
    proxy = FaultProxy("127.0.0.1", gateway.daemon.ports["http"]).start()
    key_file = write_device_key(work, gateway)
    state = work / "agent" / "state"
    try:  # a gateway left running when the agent cannot start would outlive the script
        agent = start_agent(work, proxy, key_file, 2, "--rest-port", "0")
    except BaseException:
        proxy.close()
        gateway.daemon.stop()
        raise
    load, stop = Load(), threading.Event()
    threads = [
        threading.Thread(target=drive, args=(agent.address("grpc"), load, args.rate, stop, args.seed)),
        threading.Thread(target=flap, args=(proxy, args.flap_up_s, args.flap_down_s, stop)),
    ]  # fmt: skip
    samples: list[Sample] = []
    start = time.monotonic()
    try:
        for t in threads:
            t.start()
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            time.sleep(max(0.0, args.sample_s * (len(samples) + 1) - elapsed))
            requests, latencies = load.window()
            st = status(agent)
            total, wal = dir_bytes(state)
            a = proc_figures([agent.process.pid])
            g = proc_figures([gateway.daemon.process.pid, *gateway.worker_pids()])
            ms = np.asarray(latencies or [0.0]) * 1000
            samples.append(
                Sample(
                    time.monotonic() - start,
                    *a,
                    *g,
                    total,
                    wal,
                    st.queue_bytes,
                    sum(st.queue_depth_by_priority.values()),
                    requests,
                    len(load.errors),
                    float(np.percentile(ms, 50)),
                    float(np.percentile(ms, 99)),
                    st.link_state,
                )
            )
            s = samples[-1]
            print(
                f"{s.t_s / 60:6.1f} min  agent {s.agent_rss_bytes / 2**20:6.1f} MiB "
                f"{s.agent_fds} fds {s.agent_threads} thr  gateway {s.gateway_rss_bytes / 2**20:6.1f} MiB  "
                f"state {s.state_dir_bytes / 2**20:6.2f} MiB  p99 {s.p99_ms:6.1f} ms  "
                f"depth {s.queue_depth}  link {s.link_state}",
                flush=True,
            )
        stop.set()
        for t in threads:
            t.join(30)
        proxy.restore()
        # Every queued ticket ends: delivered, or expired if its TTL passed while the link was down.
        wait_until(
            lambda: sum(status(agent).queue_depth_by_priority.values()) == 0, 300.0,
            what="the queue to drain",
        )  # fmt: skip
        with grpc.insecure_channel(agent.address("grpc")) as ch:
            stub = rpb_grpc.RouterServiceStub(ch)
            ends: dict[str, int] = {}
            for ticket in load.tickets:
                state_name = rpb.TicketResult.State.Name(
                    stub.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5.0).state
                )
                ends[state_name] = ends.get(state_name, 0) + 1
    finally:
        stop.set()
        agent.stop()
        proxy.close()
        gateway.daemon.stop()
    p99s = window_p99s(load.answers, start + args.warmup_minutes * 60, start + args.minutes * 60)
    return report(args, samples, load, ends, p99s, error_lines(agent.log(), gateway.daemon.log()))


def report(
    args: argparse.Namespace,
    samples: list[Sample],
    load: Load,
    ends: dict[str, int],
    p99s: dict[str, list[float | None]],
    errors_logged: list[str],
) -> int:
    warmup_s = args.warmup_minutes * 60
    steady = [s for s in samples if s.t_s >= warmup_s]
    with (args.out / "samples.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    plot(samples, warmup_s, args.out / "soak.png")
    # What a kiosk waits for: the local answers' p99, window by window, after the warm-up.
    local_p99s = [p for p in p99s["edge"] if p is not None]
    median_p99 = statistics.median(local_p99s) if local_p99s else 0.0
    # Bytes of the state dir per byte the queue accounts for (payloads and kept answers): the
    # answers are kept for results_retention (7 days), so the files grow with them by design.
    per_accounted = [s.state_dir_bytes / max(1, s.queue_bytes) for s in steady]
    figures = {
        name: growth(steady, name)
        for name in ("agent_rss_bytes", "agent_fds", "agent_threads", "gateway_rss_bytes",
                     "gateway_fds", "gateway_threads")
    }  # fmt: skip
    quarter = max(1, len(per_accounted) // 4)
    figures["state_dir_bytes_per_accounted_byte"] = (
        statistics.mean(per_accounted[-quarter:]) - statistics.mean(per_accounted[:quarter])
    ) / statistics.mean(per_accounted[:quarter])
    checks = {
        **{f"{k} growth < 5 %": v < GROWTH_LIMIT for k, v in figures.items()},
        "no error-level log line": not errors_logged,
        "every request answered": not load.errors,
        f"each 5-min window's local p99 <= {P99_SPREAD_LIMIT} x the median window's": bool(
            local_p99s
        )
        and max(local_p99s) <= P99_SPREAD_LIMIT * median_p99,
        "every ticket ended": "PENDING" not in ends,
    }
    summary = {
        "command": " ".join(sys.argv),
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "rate_per_s": args.rate,
        "flap": f"{args.flap_up_s:g} s up / {args.flap_down_s:g} s down",
        "requests": load.requests,
        "routes": load.routes,
        "tickets": len(load.tickets),
        "ticket_ends": ends,
        "request_errors": load.errors[:20],
        "error_log_lines": errors_logged[:20],
        "growth_after_warmup": figures,
        "p99_ms_per_5min_window_by_route": p99s,
        "max_wal_bytes": max(s.wal_bytes for s in samples),
        "checks": checks,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n### Soak: {args.minutes:g} min at {args.rate:g} req/s, link {summary['flap']}\n")
    print("| figure | value |\n|---|---|")
    for name, value in figures.items():
        print(f"| growth of {name} after warm-up | {value * 100:+.1f} % |")
    for route, label in (("edge", "local (edge)"), ("cloud", "cloud"), ("queue", "queued")):
        figures_ms = ", ".join("-" if p is None else f"{p:.1f}" for p in p99s[route])
        print(f"| p99 of {label} answers per 5-min window (ms) | {figures_ms} |")
    print(f"| requests, errors | {load.requests}, {len(load.errors)} |")
    print(f"| routes | {load.routes} |")
    print(f"| tickets and how they ended | {len(load.tickets)}: {ends} |")
    print(f"| error-level log lines | {len(errors_logged)} |")
    print(f"| largest WAL files seen | {summary['max_wal_bytes'] / 2**20:.2f} MiB |")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
