"""A dead cloud must not slow the local answer: p50/p99 of the edge agent with its cloud
black-holed (connections accepted, nothing ever answered) vs the same agent with no cloud.

Both agents run at once, answer the same held-out items (confident and unsure alike) from the
same client, alternating, in one run.

    .venv/bin/python benchmarks/black_hole.py [--requests 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _harness import Result, print_table, summarize

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime import ModelRepository
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from tests.integration.gateway.helpers import start_gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, start_daemon, wait_until


def _ready(d: Daemon) -> bool:
    with grpc.insecure_channel(d.address("grpc")) as ch:
        return bool(pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest()).ready)


def _agent(work: Path, *args: str) -> Daemon:
    return start_daemon(
        "edge-agent",
        [
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--rest-port",
            "0",
            "--state-dir",
            str(work / "state"),
            "--log-level",
            "WARNING",
            *args,
        ],
        work,
        ready=_ready,
        env={"EDGE_AGENT_PROBE_INTERVAL_SECONDS": "0.5", "EDGE_AGENT_PROBE_TIMEOUT_SECONDS": "0.5"},
    )


def _measure(address: str, requests: list[pb.ModelInferRequest]) -> list[float]:
    """Each request's latency, in order."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for r in requests[:100]:
            stub.ModelInfer(r)
        latencies = []
        for r in requests:
            t = time.perf_counter()
            stub.ModelInfer(r)
            latencies.append(time.perf_counter() - t)
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-black-hole-"))
    X = np.load(HELDOUT)["X"]
    requests = [
        pb.ModelInferRequest(
            model_name="digits",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])
            ],
            raw_input_contents=[X[i % len(X)].tobytes()],
        )
        for i in range(args.requests)
    ]
    edge = ModelRepository.load(EDGE_REPOSITORY).get("digits")
    scores = edge.predict({"X": X}).confidence
    # The items both agents answer at once; the black-holed agent commits the others to its
    # queue (durably) before it answers them.
    confident = [bool(scores[i % len(X)] >= edge.config.threshold) for i in range(args.requests)]
    gateway = start_gateway(work / "gateway")
    proxy = FaultProxy("127.0.0.1", gateway.daemon.ports["http"]).__enter__()
    key_file = work / "device.key"
    key_file.write_text(gateway.key)
    plain = _agent(work / "no-cloud")
    routed = _agent(
        work / "black-hole", "--cloud-url", proxy.url, "--device-key-file", str(key_file)
    )
    try:
        proxy.black_hole()

        def link_down() -> bool:
            with grpc.insecure_channel(routed.address("grpc")) as ch:
                return (
                    rpb_grpc.RouterServiceStub(ch).Status(rpb.StatusRequest()).link_state == "down"
                )

        wait_until(link_down, timeout=60, what="the agent to see its cloud down")
        runs: dict[str, list[Result]] = {}
        for _ in range(args.rounds):
            for name, agent in (("no cloud", plain), ("cloud black-holed", routed)):
                latencies = _measure(agent.address("grpc"), requests)
                by_group = {
                    "all items": latencies,
                    "confident items": [t for t, c in zip(latencies, confident, strict=True) if c],
                    "unsure items": [t for t, c in zip(latencies, confident, strict=True) if not c],
                }
                for group, values in by_group.items():
                    runs.setdefault(f"{name}, {group}", []).append(
                        Result(name, len(values), sum(values), values)
                    )
    finally:
        plain.stop()
        routed.stop()
        proxy.__exit__(None, None, None)
        gateway.daemon.stop()
    figures = {
        name: {
            k: statistics.median(summarize(r)[k] for r in results)
            for k in ("req/s", "p50 ms", "p99 ms")
        }
        for name, results in runs.items()
    }
    rows = []
    for group in ("all items", "confident items", "unsure items"):
        base, hole = figures[f"no cloud, {group}"], figures[f"cloud black-holed, {group}"]
        rows += [
            (f"no cloud, {group}", base),
            (f"cloud black-holed, {group}", hole),
            (f"black-holed / no cloud, {group}", {k: hole[k] / base[k] for k in base}),
        ]
    print_table(
        f"Local answers with a black-holed cloud: {args.requests} held-out items x {args.rounds} "
        "rounds, concurrency 1 (medians of rounds)",
        rows,
    )
    print("target: p50 ratio <= 1.1")


if __name__ == "__main__":
    main()
