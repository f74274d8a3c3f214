"""Local path: the edge agent serving the demo model vs a bare gRPC echo server, one run.

Both servers run as separate processes and answer the same v2 ModelInfer request from the
same client; the echo server returns a canned response of the agent's own size. Prints
throughput, p50 and p99 at concurrency 1 and 16 and the agent/echo ratios, and each
server's CPU time per call: client and servers share the cores, so on a busy machine that
column is steadier than req/s.

    .venv/bin/python benchmarks/local_path.py [--requests 6000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Result, print_table, process_cpu_seconds, summarize

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from model_runtime.demo import HELDOUT
from tests.support.processes import Daemon, start_daemon, wait_until


def echo_server(response_file: str, port_file: str) -> None:
    """A bare v2 server: no decoding, no model, the canned response for every call."""
    canned = pb.ModelInferResponse.FromString(Path(response_file).read_bytes())

    class Echo(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> object:
            return canned

    server = grpc.server(futures.ThreadPoolExecutor(16), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(f'{{"grpc": {port}}}')
    server.wait_for_termination()


def measure(
    address: str, request: pb.ModelInferRequest, concurrency: int, calls: int, server_pid: int
) -> Result:
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    for _ in range(300):
        stub.ModelInfer(request)
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = []
        for _ in range(calls // concurrency):
            start = time.perf_counter()
            stub.ModelInfer(request)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu_before = process_cpu_seconds(server_pid)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = process_cpu_seconds(server_pid) - cpu_before
    channel.close()
    return Result(address, len(latencies), elapsed, latencies, cpu)


def _median(results: list[Result]) -> dict[str, float]:
    keys = summarize(results[0]).keys()
    return {k: statistics.median(summarize(r)[k] for r in results) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    X = np.load(HELDOUT)["X"][:1]
    request = pb.ModelInferRequest(
        model_name="digits",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[X.tobytes()],
    )
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))

    def ready(d: Daemon) -> bool:
        with grpc.insecure_channel(d.address("grpc")) as ch:
            return bool(
                pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest()).ready
            )

    agent = start_daemon(
        "edge-agent",
        ["serve", "--port", "0", "--metrics-port", "0", "--log-level", "WARNING"],
        work,
        ready=ready,
    )
    with grpc.insecure_channel(agent.address("grpc")) as ch:
        response = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
    (work / "response.bin").write_bytes(response.SerializeToString())
    echo_ports = work / "echo.json"
    echo = subprocess.Popen(
        [sys.executable, __file__, "--echo", str(work / "response.bin"), str(echo_ports)]
    )
    wait_until(echo_ports.exists, what="echo server")
    echo_address = "127.0.0.1:" + echo_ports.read_text().split(":")[1].strip(" }")

    rows = []
    try:
        for concurrency in (1, 16):
            runs: dict[str, list[Result]] = {"echo": [], "agent": []}
            for _ in range(args.rounds):  # alternate, so drift in the machine hits both alike
                runs["echo"].append(
                    measure(echo_address, request, concurrency, args.requests, echo.pid)
                )
                runs["agent"].append(
                    measure(
                        agent.address("grpc"),
                        request,
                        concurrency,
                        args.requests,
                        agent.process.pid,
                    )
                )
            echo_fig, agent_fig = _median(runs["echo"]), _median(runs["agent"])
            rows.append((f"bare gRPC echo, concurrency {concurrency}", echo_fig))
            rows.append((f"edge agent, concurrency {concurrency}", agent_fig))
            rows.append(
                (
                    f"agent / echo, concurrency {concurrency}",
                    {k: agent_fig[k] / echo_fig[k] for k in echo_fig},
                )
            )
    finally:
        echo.terminate()
        agent.stop()
    print_table(
        f"Local path: {args.requests} calls x {args.rounds} rounds per row (medians of rounds); "
        f"response {response.ByteSize()} bytes",
        rows,
    )
    print("targets: throughput ratio at concurrency 16 >= 0.8; p50 ratio at concurrency 1 <= 1.25")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--echo":
        echo_server(sys.argv[2], sys.argv[3])
    else:
        main()
