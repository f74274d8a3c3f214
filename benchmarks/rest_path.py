"""REST beside gRPC on the edge agent, and against MLServer's and KServe's REST serving the
very same ONNX file, at concurrency 1 and 16.

Every server is its own process on this machine, one worker each, answering the same one-item
v2 request for the demo model (JSON over REST, raw bytes over gRPC). The agent's REST runs on
uvicorn's h11, as shipped, and in a second agent on httptools (benchmarks/peers/
agent_httptools.py): the measurement behind the choice of HTTP parser. MLServer 1.7.1
runs an onnxruntime runtime in its own process (parallel_workers 0, no access log); KServe 0.21
a kserve.Model with onnxruntime, logging at WARNING; both make their session as the agent does
(one thread, no spinning; benchmarks/peers/). Rounds alternate between the servers, so drift on
a shared machine hits all alike; figures are medians of the rounds, with each server's CPU time
per request (steadier than req/s when client and servers share the cores). REST load comes from
a minimal asyncio HTTP/1.1 client, gRPC load from grpc's own client in threads. Set the peers up
once, then run (about five minutes):

    benchmarks/peers/setup.sh
    .venv/bin/python benchmarks/rest_path.py [--requests 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import (
    Result,
    http_load,
    print_table,
    process_cpu_seconds,
    read_port_file,
    serving,
    summarize,
)
from local_path import measure as grpc_measure

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from model_runtime import json_codec
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from model_runtime.v2_json import encode_infer_request
from tests.support.processes import Daemon

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
MODEL = EDGE_REPOSITORY / "digits" / "1" / "model.onnx"
INFER = "/v2/models/digits/infer"


@dataclass(frozen=True)
class Server:
    name: str
    pid: int
    run: Callable[[int, int], Result]
    """(concurrency, requests) -> the measured result, warm-up excluded."""


def rest_server(
    name: str,
    port: int,
    pid: int,
    body: bytes,
    path: str = INFER,
    headers: Callable[[int], dict[str, str]] | None = None,
) -> Server:
    """POSTs of `body` to `path` with `headers(i)` for the i-th request (none by default)."""

    def run(concurrency: int, total: int) -> Result:
        def no_headers(i: int) -> dict[str, str]:
            return {}

        headers_of = headers or no_headers
        asyncio.run(http_load(port, path, body, headers_of, 300, concurrency))  # warm up
        cpu = process_cpu_seconds(pid)
        result = asyncio.run(http_load(port, path, body, headers_of, total, concurrency))
        cpu = process_cpu_seconds(pid) - cpu
        return Result(name, result.calls, result.seconds, result.latencies_s, cpu)

    return Server(name, pid, run)


def grpc_server(name: str, address: str, pid: int, request: pb.ModelInferRequest) -> Server:
    def run(concurrency: int, total: int) -> Result:
        return grpc_measure(address, request, concurrency, total, pid)

    return Server(name, pid, run)


def _free_port() -> int:
    # Only for the peers, which take fixed ports from their settings and cannot report one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def peer(command: list[str], ready_url: str, **popen: object) -> Iterator[int]:
    """Run a peer server until the block ends; yields its pid once `ready_url` answers 200."""

    def ready() -> bool:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(ready_url, timeout=2).status_code == 200
        return False

    with serving(command, ready, **popen) as (pid, _seconds):
        yield pid


def start_mlserver(
    stack: ExitStack, work: Path, body: bytes, onnx: Path = MODEL, name: str = "digits"
) -> Server | None:
    """MLServer serving the ONNX file `onnx` as model `name`, REST load of `body`."""
    mlserver = ROOT / ".venv-bench-mlserver" / "bin" / "mlserver"
    if not mlserver.exists():
        print(f"skipping MLServer: {mlserver} is missing (benchmarks/peers/setup.sh)")
        return None
    models = work / "mlserver"
    (models / name).mkdir(parents=True)
    model = {"name": name, "implementation": "mlserver_onnx.OnnxRuntime"}
    (models / name / "model-settings.json").write_text(
        json.dumps({**model, "parameters": {"uri": str(onnx)}})
    )
    port = _free_port()
    ports = {"http_port": port, "grpc_port": _free_port(), "metrics_port": _free_port()}
    settings = {"host": "127.0.0.1", **ports, "parallel_workers": 0, "debug": False}
    (models / "settings.json").write_text(json.dumps(settings))
    pid = stack.enter_context(
        peer(
            [str(mlserver), "start", str(models)],
            f"http://127.0.0.1:{port}/v2/models/{name}/ready",
            env={**os.environ, "PYTHONPATH": str(PEERS)},
        )
    )
    return rest_server("MLServer 1.7.1 REST", port, pid, body, f"/v2/models/{name}/infer")


def start_kserve(
    stack: ExitStack, body: bytes, onnx: Path = MODEL, name: str = "digits"
) -> Server | None:
    """KServe serving the ONNX file `onnx` as model `name`, REST load of `body`."""
    python = ROOT / ".venv-kserve" / "bin" / "python"
    if not python.exists():
        print(f"skipping KServe: {python} is missing (benchmarks/peers/setup.sh)")
        return None
    port = _free_port()
    pid = stack.enter_context(
        peer(
            [str(python), str(PEERS / "kserve_onnx.py"), str(onnx), name, str(port)],
            f"http://127.0.0.1:{port}/v2/models/{name}/ready",
        )
    )
    return rest_server("KServe 0.21 REST", port, pid, body, f"/v2/models/{name}/infer")


def start_agent(
    stack: ExitStack, work: Path, name: str, command: list[str] | None = None
) -> Daemon:
    """`edge-agent serve` (or `command serve`) on free ports, stopped when the stack closes."""
    ports = work / f"{name}.ports.json"
    args = ["serve", "--port", "0", "--rest-port", "0", "--metrics-port", "0"]
    args += ["--log-level", "WARNING", "--state-dir", str(work / name), "--port-file", str(ports)]
    process = subprocess.Popen(
        [*(command or [str(ROOT / ".venv" / "bin" / "edge-agent")]), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent = Daemon(process, {}, work / f"{name}.log")
    stack.callback(agent.stop)
    agent.ports = read_port_file(ports, process, name)
    return agent


def _parser_of(pid: int) -> str:
    """Which HTTP parser a process has loaded: httptools' C extension shows in its maps."""
    return "httptools" if "httptools" in Path(f"/proc/{pid}/maps").read_text() else "h11"


def _median(results: list[Result]) -> dict[str, float]:
    keys = summarize(results[0]).keys()
    return {k: statistics.median(summarize(r)[k] for r in results) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    x = np.asarray(np.load(HELDOUT)["X"][:1], dtype=np.float32)
    body = json_codec.dumps(encode_infer_request({"X": x}))
    request = pb.ModelInferRequest(
        model_name="digits",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[x.tobytes()],
    )
    work = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    with ExitStack() as stack:
        agent = start_agent(stack, work, "agent")
        servers = [
            grpc_server("agent gRPC", agent.address("grpc"), agent.process.pid, request),
            rest_server("agent REST", agent.ports["rest"], agent.process.pid, body),
        ]
        if importlib.util.find_spec("httptools") is None:
            print("skipping the httptools agent: httptools is missing (benchmarks/peers/setup.sh)")
        else:
            launcher = [sys.executable, str(PEERS / "agent_httptools.py")]
            other = start_agent(stack, work, "agent-httptools", launcher)
            servers.append(
                rest_server("agent REST, httptools", other.ports["rest"], other.process.pid, body)
            )
        servers += [s for s in (start_mlserver(stack, work, body), start_kserve(stack, body)) if s]
        for server in servers:
            server.run(1, 10)
        print("HTTP parsers:", {s.name: _parser_of(s.pid) for s in servers if "REST" in s.name})

        rows = []
        for concurrency in (1, 16):
            runs: dict[str, list[Result]] = {s.name: [] for s in servers}
            for _ in range(args.rounds):  # alternate, so drift in the machine hits all alike
                for server in servers:
                    runs[server.name].append(server.run(concurrency, args.requests))
            figures = {name: _median(results) for name, results in runs.items()}
            for name, figure in figures.items():
                rows.append((f"{name}, c{concurrency}", figure))
            base = figures["agent REST"]
            for name, figure in figures.items():
                if name != "agent REST":
                    ratio = {k: figure[k] / base[k] for k in base}
                    rows.append((f"{name} / agent REST, c{concurrency}", ratio))
    print_table(
        f"REST and gRPC on the agent, and peers' REST: {args.requests} requests x "
        f"{args.rounds} rounds per row (medians); one item of the demo model",
        rows,
    )


if __name__ == "__main__":
    main()
