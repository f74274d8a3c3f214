"""Local answers while the queue drains: does delivering a backlog slow the answers the edge gives alone?

An agent and a gateway, the link through the fault proxy. Steady local requests
(escalation=never, --rate per second) and a ServerLive probe (--probe-rate per second) run all
along. Each round cuts the link, waits until the agent sees it down, queues --items requests
(escalation=always) or none, restores the link and measures until the queue is empty (the
round without items: as long as the last round with them). Rounds alternate, so both kinds
see the same machine. Reported per kind: the local answers' p50/p99/max, and the slowest
ServerLive: a call that does nothing but pass through the agent's event loop, so its worst case
is about the longest the loop was held, a figure that does not depend on the load beside it
as much as the latencies do.

    .venv/bin/python benchmarks/drain_interference.py [--rounds 6] [--items 80] [--rate 50]

Not a test: its figures depend on the machine. BENCHMARKS.md has a run's table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._harness import print_table, process_cpu_seconds
from benchmarks.soak import start_agent
from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import write_device_key
from tests.integration.gateway.helpers import start_gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import wait_until


@dataclass
class Timeline:
    """(when sent, seconds taken) of every call of one kind, appended from one thread."""

    calls: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0

    def between(self, start: float, end: float) -> list[float]:
        return [took for sent, took in list(self.calls) if start <= sent < end]


def request(x: np.ndarray, escalation: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="digits",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[x.astype(np.float32).tobytes()],
        parameters={"escalation": pb.InferParameter(string_param=escalation)},
    )


def paced(rate: float, stop: threading.Event, call: Callable[[], None], line: Timeline) -> None:
    """`call()` `rate` times a second until `stop`, recording when each was sent and took."""
    next_at = time.monotonic()
    while not stop.is_set():
        sent = time.monotonic()
        try:
            call()
        except grpc.RpcError:
            line.errors += 1
        else:
            line.calls.append((sent, time.monotonic() - sent))
        next_at += 1.0 / rate
        stop.wait(max(0.0, next_at - time.monotonic()))


def status(stub: rpb_grpc.RouterServiceStub) -> rpb.StatusResponse:
    return stub.Status(rpb.StatusRequest(), timeout=5.0)


def loop_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (its event loop's) so far, from /proc (Linux)."""
    return process_cpu_seconds(pid, thread=pid)


def figures(
    local: list[float], live: list[float], seconds: float, loop_s: float
) -> dict[str, float]:
    ms = np.asarray(local or [0.0]) * 1000
    return {
        "local answers": len(local),
        "local p50 ms": float(np.percentile(ms, 50)),
        "local p99 ms": float(np.percentile(ms, 99)),
        "local max ms": float(ms.max()),
        "slowest ServerLive ms": max(live or [0.0]) * 1000,
        "event-loop CPU ms": loop_s * 1000,
        "window s": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each kind")
    parser.add_argument("--items", type=int, default=80, help="requests queued per drain round")
    parser.add_argument("--rate", type=float, default=50.0, help="local requests per second")
    parser.add_argument("--probe-rate", type=float, default=50.0, help="ServerLive per second")
    parser.add_argument("--agent-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drain-interference-"))
    gateway = start_gateway(work / "gateway")
    proxy = FaultProxy("127.0.0.1", gateway.daemon.ports["http"]).start()
    key_file = write_device_key(work, gateway)
    try:
        agent = start_agent(work, proxy, key_file, 0.5, *args.agent_arg)
    except BaseException:
        proxy.close()
        gateway.daemon.stop()
        raise
    images = np.load(HELDOUT)["X"]
    stop = threading.Event()
    local, live = Timeline(), Timeline()
    rows: dict[str, list[tuple[list[float], list[float], float, float]]] = {
        "drain": [],
        "no drain": [],
    }
    channel = grpc.insecure_channel(agent.address("grpc"))
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    router = rpb_grpc.RouterServiceStub(channel)
    never = request(images[0], "never")
    threads = [
        threading.Thread(
            target=paced,
            args=(args.rate, stop, lambda: infer.ModelInfer(never, timeout=10.0), local),
        ),
        threading.Thread(
            target=paced,
            args=(args.probe_rate, stop, lambda: infer.ServerLive(pb.ServerLiveRequest(), timeout=10.0), live),
        ),
    ]  # fmt: skip
    try:
        for t in threads:
            t.start()
        drain_s = 5.0
        for i in range(2 * args.rounds):
            kind = "drain" if i % 2 == 0 else "no drain"
            proxy.cut()
            wait_until(lambda: status(router).link_state == "down", 30.0, what="link down")
            n = args.items if kind == "drain" else 0
            for j in range(n):
                answer = infer.ModelInfer(request(images[j % len(images)], "always"), timeout=10.0)
                assert answer.parameters["route"].string_param == "queue", answer.parameters
            start, cpu = time.monotonic(), loop_cpu_s(agent.process.pid)
            proxy.restore()
            if kind == "drain":
                wait_until(
                    lambda: sum(status(router).queue_depth_by_priority.values()) == 0, 120.0,
                    what="the queue to drain",
                )  # fmt: skip
                drain_s = time.monotonic() - start
            else:
                wait_until(lambda: status(router).link_state != "down", 30.0, what="link back")
                time.sleep(max(0.0, drain_s - (time.monotonic() - start)))
            end, cpu = time.monotonic(), loop_cpu_s(agent.process.pid) - cpu
            rows[kind].append(
                (local.between(start, end), live.between(start, end), end - start, cpu)
            )
            print(f"round {i + 1}: {kind}, {end - start:.2f} s", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        channel.close()
        agent.stop()
        proxy.close()
        gateway.daemon.stop()
    table = []
    for kind, rounds in rows.items():
        local_all = [x for r in rounds for x in r[0]]
        live_all = [x for r in rounds for x in r[1]]
        seconds, loop_s = sum(r[2] for r in rounds), sum(r[3] for r in rounds)
        table.append((kind, figures(local_all, live_all, seconds, loop_s)))
    print_table(
        f"Local answers during a drain of {args.items} items, {args.rounds} rounds of each, "
        f"{args.rate:g} local req/s (errors: {local.errors} local, {live.errors} ServerLive)",
        table,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
