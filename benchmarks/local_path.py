"""Local path: the edge agent serving the demo model vs a bare gRPC echo server, one run.

Both servers run as separate processes and answer the same v2 ModelInfer request from the
same client; the echo server returns a canned response of the agent's own size. A third
server, the echo plus one onnxruntime run of the demo model on the request's tensor, is the
floor for anything that answers with the model. Prints throughput, p50 and p99 at concurrency
1 and 16, the ratios to the echo, and each server's CPU time per call: client and servers
share the cores, so on a busy machine that column is steadier than req/s.

    .venv/bin/python benchmarks/local_path.py [--requests 6000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
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
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Result, print_table, process_cpu_seconds, summarize

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from tests.support.processes import Daemon, start_daemon, wait_until

FLOORS = (
    ("echo-model", "echo + one model run, thread pool"),
    ("echo-model-aio", "echo + one model run, grpc.aio"),
)


def echo_server(kind: str, response_file: str, port_file: str, model_file: str = "") -> None:
    """A bare v2 server: no checks, the canned response for every call. `echo-model` and
    `echo-model-aio` first run the model (default: the demo model) once on the request's raw
    FP32 tensor, in a session made as the agent makes it (one thread, no spinning): on a
    thread-pool server, or on the event loop's thread of a grpc.aio server, as the agent itself
    runs small batches."""
    canned = pb.ModelInferResponse.FromString(Path(response_file).read_bytes())
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        model_file or str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"), options,
        providers=["CPUExecutionProvider"],
    )  # fmt: skip
    input_name = session.get_inputs()[0].name

    def answer(request: pb.ModelInferRequest) -> object:
        if kind != "echo":
            x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
            session.run(None, {input_name: x.reshape(request.inputs[0].shape)})
        return canned

    class Echo(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> object:
            return answer(request)

    class AsyncEcho(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
        async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> object:
            return answer(request)

    grpc_options = [("grpc.so_reuseport", 0)]
    if kind != "echo-model-aio":
        server = grpc.server(futures.ThreadPoolExecutor(16), options=grpc_options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        Path(port_file).write_text(f'{{"grpc": {port}}}')
        server.wait_for_termination()
        return

    async def serve() -> None:
        server = grpc.aio.server(options=grpc_options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(AsyncEcho(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(f'{{"grpc": {port}}}')  # noqa: ASYNC240 (once, at start)
        await server.wait_for_termination()

    asyncio.run(serve())


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

    serve = ["serve", "--port", "0", "--metrics-port", "0", "--rest-port", "0"]
    serve += ["--log-level", "WARNING"]
    agent = start_daemon(
        "edge-agent",
        [*serve, "--state-dir", str(work / "state")],
        work,
        ready=ready,
    )
    with grpc.insecure_channel(agent.address("grpc")) as ch:
        response = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
    (work / "response.bin").write_bytes(response.SerializeToString())
    servers = {"agent": (agent.address("grpc"), agent.process.pid)}
    echoes = []
    for name in ("echo", "echo-model", "echo-model-aio"):
        ports = work / f"{name}.json"
        echo = subprocess.Popen(
            [sys.executable, __file__, f"--{name}", str(work / "response.bin"), str(ports)]
        )
        echoes.append(echo)
        wait_until(ports.exists, what=name)
        servers[name] = ("127.0.0.1:" + ports.read_text().split(":")[1].strip(" }"), echo.pid)

    rows = []
    try:
        for concurrency in (1, 16):
            runs: dict[str, list[Result]] = {name: [] for name in servers}
            for _ in range(args.rounds):  # alternate, so drift in the machine hits all alike
                for name, (address, pid) in servers.items():
                    runs[name].append(measure(address, request, concurrency, args.requests, pid))
            figures = {name: _median(results) for name, results in runs.items()}
            echo_fig = figures["echo"]
            rows.append((f"bare gRPC echo, concurrency {concurrency}", echo_fig))
            others = (*FLOORS, ("agent", "edge agent"))
            for name, label in others:
                rows.append((f"{label}, concurrency {concurrency}", figures[name]))
            for name, label in others:
                ratio = {k: figures[name][k] / echo_fig[k] for k in echo_fig}
                rows.append((f"{label} / echo, concurrency {concurrency}", ratio))
    finally:
        for echo in echoes:
            echo.terminate()
        agent.stop()
    print_table(
        f"Local path: {args.requests} calls x {args.rounds} rounds per row (medians of rounds); "
        f"response {response.ByteSize()} bytes",
        rows,
    )
    print("targets: throughput ratio at concurrency 16 >= 0.8; p50 ratio at concurrency 1 <= 1.25")


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] in ("--echo", "--echo-model", "--echo-model-aio"):
        echo_server(sys.argv[1][2:], *sys.argv[2:])
    else:
        main()
