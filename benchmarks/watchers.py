"""What result watchers cost the local answer: edge-only p50/p99 while queued items are being
delivered, on an agent with 1,000 WatchResults streams open vs the same agent with none.

Two agents escalate to one gateway, each through its own proxy. Both queue the same unsure
items while their link is cut; then the links come back and both drain at the same capped rate
(deliveries spread over several seconds), while one client alternates edge-only requests
(escalation=never) between them. Watchers, on the second agent only:

- `others`: 1,000 watchers of other clients (client_id watcher-<i>) and one of the producer's:
  each delivery reaches one stream (kiosks each watching their own results);
- `same`: 1,000 watchers all of the producer's owner: each delivery goes to all of them.

    .venv/bin/python benchmarks/watchers.py [--watchers 1000] [--items 150] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _harness import Result, print_table, process_cpu_seconds, summarize

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime import ModelRepository
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, start_daemon

X = np.load(HELDOUT)["X"].astype(np.float32)
PRODUCER = "kiosk-0"
# ~650 bytes per delivery on the wire: about 20 deliveries a second.
CAP_BYTES_PER_S = 13_000


def _request(i: int, **parameters: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(X[i % len(X)].tobytes())
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


def _ready(d: Daemon) -> bool:
    with grpc.insecure_channel(d.address("grpc")) as ch:
        return bool(pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest()).ready)


def _agent(work: Path, gateway: Gateway, proxy: FaultProxy) -> Daemon:
    key_file = work / "device.key"
    work.mkdir(parents=True)
    key_file.write_text(gateway.key)
    key_file.chmod(0o600)
    return start_daemon(
        "edge-agent",
        ["serve", "--port", "0", "--metrics-port", "0", "--rest-port", "0",
         "--state-dir", str(work / "state"),
         "--log-level", "WARNING", "--cloud-url", proxy.url, "--device-key-file", str(key_file)],
        work,
        ready=_ready,
        env={
            "EDGE_AGENT_PROBE_INTERVAL_SECONDS": "0.3",
            "EDGE_AGENT_PROBE_TIMEOUT_SECONDS": "0.5",
            "EDGE_AGENT_BANDWIDTH_CAP_BYTES_PER_S": str(CAP_BYTES_PER_S),
        },
    )  # fmt: skip


def _depth(agent: Daemon) -> int:
    with grpc.insecure_channel(agent.address("grpc")) as ch:
        status = rpb_grpc.RouterServiceStub(ch).Status(rpb.StatusRequest())
    return sum(status.queue_depth_by_priority.values())


class Watchers:
    """WatchResults streams held open by an event loop of their own, counting what they get."""

    def __init__(self, address: str, client_ids: list[str]) -> None:
        self.received = 0
        self.producer_received = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._channel: grpc.aio.Channel | None = None
        self._tasks = asyncio.run_coroutine_threadsafe(
            self._open(address, client_ids), self._loop
        ).result(60)

    async def _open(self, address: str, client_ids: list[str]) -> list[asyncio.Task[None]]:
        self._channel = grpc.aio.insecure_channel(address)
        stub = rpb_grpc.RouterServiceStub(self._channel)

        async def read(client_id: str) -> None:
            async for _ in stub.WatchResults(rpb.WatchResultsRequest(client_id=client_id)):
                self.received += 1
                if client_id == PRODUCER:
                    self.producer_received += 1

        return [asyncio.ensure_future(read(c)) for c in client_ids]

    def close(self) -> None:
        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._channel is not None:
                await self._channel.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _round(
    agents: dict[str, Daemon], proxies: dict[str, FaultProxy], unsure: list[int], items: int,
    watchers: Watchers | None,
) -> tuple[dict[str, Result], dict[str, float]]:  # fmt: skip
    """Queue `items` unsure requests on each agent during a cut, restore, and measure edge-only
    requests alternating between the agents while both drain."""
    channels = {name: grpc.insecure_channel(a.address("grpc")) for name, a in agents.items()}
    stubs = {name: pb_grpc.GRPCInferenceServiceStub(ch) for name, ch in channels.items()}
    for proxy in proxies.values():
        proxy.cut()
    for name, stub in stubs.items():
        for k in range(items):
            answer = stub.ModelInfer(
                _request(unsure[k % len(unsure)], escalation="always", client_id=PRODUCER)
            )
            assert answer.parameters["route"].string_param == "queue", name
    cpu_before = {name: process_cpu_seconds(a.process.pid) for name, a in agents.items()}
    for proxy in proxies.values():
        proxy.restore()
    started = time.perf_counter()
    latencies: dict[str, list[float]] = {name: [] for name in agents}
    edge = [_request(i, escalation="never") for i in range(200)]
    n = 0
    drained: dict[str, float] = {}
    while len(drained) < len(agents):
        for name, stub in stubs.items():
            t = time.perf_counter()
            stub.ModelInfer(edge[n % len(edge)])
            latencies[name].append(time.perf_counter() - t)
        n += 1
        if n % 50 == 0:
            for name, agent in agents.items():
                if name not in drained and _depth(agent) == 0:
                    drained[name] = time.perf_counter() - started
    results = {
        name: Result(
            name,
            len(values),
            sum(values),
            values,
            server_cpu_s=process_cpu_seconds(agents[name].process.pid) - cpu_before[name],
        )
        for name, values in latencies.items()
    }
    for ch in channels.values():
        ch.close()
    return results, drained


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-watchers-"))
    edge = ModelRepository.load(EDGE_REPOSITORY).get("digits")
    scores = edge.predict({"X": X}).confidence
    unsure = [int(i) for i in np.flatnonzero(scores < edge.config.threshold)]
    gateway = start_gateway(work / "gateway")
    proxies = {
        name: FaultProxy("127.0.0.1", gateway.daemon.ports["http"]).__enter__()
        for name in ("none", "watched")
    }
    agents = {name: _agent(work / name, gateway, proxies[name]) for name in proxies}
    rows = []
    try:
        # "same" first: the watchers of "others" then catch up on 1 stream, not 1,000
        for mode in ("same", "others"):
            ids = (
                [PRODUCER] + [f"watcher-{i}" for i in range(args.watchers)]
                if mode == "others"
                else [PRODUCER] * args.watchers
            )
            watchers = Watchers(agents["watched"].address("grpc"), ids)
            runs: dict[str, list[Result]] = {name: [] for name in agents}
            drains: dict[str, list[float]] = {name: [] for name in agents}
            try:
                for _ in range(args.rounds):
                    results, drained = _round(agents, proxies, unsure, args.items, watchers)
                    for name in agents:
                        runs[name].append(results[name])
                        drains[name].append(drained[name])
                delivered = watchers.producer_received
                total = watchers.received
            finally:
                watchers.close()
            figures = {}
            for name, results in runs.items():
                figures[name] = {
                    k: statistics.median(summarize(r)[k] for r in results)
                    for k in ("p50 ms", "p99 ms")
                }
                figures[name]["drain s"] = statistics.median(drains[name])
                figures[name]["agent CPU s"] = statistics.median(
                    r.server_cpu_s or 0.0 for r in results
                )
            base, watched = figures["none"], figures["watched"]
            label = f"{args.watchers} watchers, {mode}"
            rows += [
                (f"no watchers ({mode} run)", base),
                (label, watched),
                (f"{label} / none", {k: watched[k] / base[k] for k in base}),
            ]
            print(
                f"{mode}: the producer's watcher got {delivered} results, all watchers "
                f"{total} ({args.rounds} rounds x {args.items} deliveries)",
                flush=True,
            )
    finally:
        for agent in agents.values():
            agent.stop()
        for proxy in proxies.values():
            proxy.__exit__(None, None, None)
        gateway.daemon.stop()
    print_table(
        f"Edge-only latency while {args.items} queued items are delivered at "
        f"{CAP_BYTES_PER_S:,} B/s, concurrency 1, medians of {args.rounds} rounds",
        rows,
    )
    print("target: p50 ratio <= 1.2")


if __name__ == "__main__":
    main()
