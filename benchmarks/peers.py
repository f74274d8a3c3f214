"""The edge agent against the v2 gRPC servers users would otherwise pick, in one run.

Every server is its own process, serving the same ONNX file through onnxruntime with one
thread and no spinning, and answering the same v2 ModelInfer requests from the same probe
client (grpc's sync stub, one thread per concurrent caller; local_path.measure). Rounds
alternate between the servers, so drift on a shared machine hits all alike; figures are
medians of the rounds, with each server's CPU time per request from /proc (steadier than
req/s when client and servers share the cores). Besides speed: conformance to the v2 error
rules (benchmarks/conformance.py, 17 checks), resident memory after the rounds, and the time
from start to ModelReady.

The servers: a bare gRPC echo (the ratio's base) and the floor (the echo plus one model run,
on a thread pool and on grpc.aio; local_path.py); the agent over loopback TCP and over its Unix
socket (the same process), a second agent with dynamic batching on, a third on asyncio's own
event loop instead of uvloop and, for the CNN, a fourth that runs the model on the event loop's
thread (inline_run_budget_us = 20000); KServe 0.21's
ModelServer (logging at WARNING, latency logging off) and MLServer 1.7.1 in one process, each
in its own venv (benchmarks/peers/setup.sh). Two models: the bundled `digits` (64 floats in)
and, with --cnn, a small convolutional network on a 3x224x224 image made here with fixed
weights, where decoding, copies and onnxruntime's own time weigh more than per-call work.

    benchmarks/peers/setup.sh
    .venv/bin/python benchmarks/peers.py [--requests 3000] [--rounds 5] [--cnn]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Result, print_table, read_port_file, rss_mb, serving, summarize
from conformance import CHECKS, run_checks
from local_path import measure

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
LOCAL_PATH = Path(__file__).resolve().parent / "local_path.py"
PEER_NAMES = ("KServe 0.21", "MLServer 1.7.1")
FLOOR_NAMES = ("floor, thread pool", "floor, grpc.aio")
INLINE = "agent, runs on the loop"
"""The agent with inline_run_budget_us = 20000: a run of a few milliseconds stays on the event
loop's thread, as the floors and KServe run it, instead of going to a worker thread."""


@dataclass(frozen=True)
class Model:
    name: str
    input_name: str
    x: np.ndarray
    """One item, shape [1, ...], FP32."""
    repository: Path
    """An agent model repository holding it (as <name>/1/model.onnx with its config.toml)."""

    @property
    def onnx(self) -> Path:
        return self.repository / self.name / "1" / "model.onnx"

    def request(self) -> pb.ModelInferRequest:
        tensor = pb.ModelInferRequest.InferInputTensor(
            name=self.input_name, datatype="FP32", shape=list(self.x.shape)
        )
        return pb.ModelInferRequest(
            model_name=self.name, inputs=[tensor], raw_input_contents=[self.x.tobytes()]
        )


@dataclass
class Server:
    name: str
    address: str
    pid: int
    ready_s: float | None = None
    """Seconds from start to the first ModelReady = true (None: not measured)."""


def _free_port() -> int:
    # For servers that take a fixed port from their settings.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model_ready(address: str, model: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return bool(stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=0.5).ready)
        except grpc.RpcError:
            return False


def running(
    command: list[str], address: str, model: str, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[tuple[int, float]]:
    """Run a server until the block ends; yields (pid, seconds from start to ModelReady)."""
    return serving(command, lambda: _model_ready(address, model), env=env)


def start_agents(stack: ExitStack, work: Path, model: Model, batching: bool) -> list[Server]:
    """The agent on TCP and, in the same process, on its Unix socket; with `batching`, a
    second agent whose copy of the model has [batching] on; a third on asyncio's own event
    loop instead of uvloop (benchmarks/peers/agent_asyncio.py)."""
    edge_agent = [str(ROOT / ".venv" / "bin" / "edge-agent")]
    on_asyncio = [sys.executable, str(PEERS / "agent_asyncio.py")]
    servers = []
    variants = [("agent", model.repository, True, edge_agent)]
    if batching:
        variants.append(("agent, batching", _batching_repository(work, model), False, edge_agent))
    variants.append(("agent, asyncio loop", model.repository, False, on_asyncio))
    if model.name != "digits":  # the demo model's runs are on the loop's thread anyway
        variants.append((INLINE, model.repository, False, edge_agent))
    for name, repository, uds, launcher in variants:
        port = _free_port()
        state = work / name.replace(", ", "-").replace(" ", "-")
        command = [*launcher, "serve", "--port", str(port), "--metrics-port", "0"]
        env = {**os.environ, "EDGE_AGENT_INLINE_RUN_BUDGET_US": "20000"} if name == INLINE else None
        command += ["--rest-port", "0", "--log-level", "WARNING", "--state-dir", str(state)]
        command += ["--model-repository", str(repository)]
        socket_path = work / f"{state.name}.sock"
        if uds:
            command += ["--uds", str(socket_path)]
        address = f"127.0.0.1:{port}"
        pid, ready_s = stack.enter_context(running(command, address, model.name, env))
        servers.append(Server(name, address, pid, ready_s))
        if uds:
            servers.append(Server(f"{name}, Unix socket", f"unix:{socket_path}", pid))
    return servers


def _batching_repository(work: Path, model: Model) -> Path:
    repository = work / "batching-models"
    (repository / model.name / "1").mkdir(parents=True)
    (repository / model.name / "1" / "model.onnx").write_bytes(model.onnx.read_bytes())
    config = (model.repository / model.name / "config.toml").read_text()
    config += "\n[batching]\nmax_batch_size = 16\nmax_queue_delay_us = 500\n"
    (repository / model.name / "config.toml").write_text(config)
    return repository


def start_floors(stack: ExitStack, work: Path, model: Model, agent: Server) -> list[Server]:
    """The bare echo and the two floors, answering with the agent's own response."""
    with grpc.insecure_channel(agent.address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(model.request())
    canned = work / f"{model.name}.response.bin"
    canned.write_bytes(response.SerializeToString())
    servers = []
    kinds = ("echo", "echo-model", "echo-model-aio")
    for name, kind in zip(("echo", *FLOOR_NAMES), kinds, strict=True):
        ports = work / f"{model.name}-{kind}.json"
        process = subprocess.Popen(
            [sys.executable, str(LOCAL_PATH), f"--{kind}", str(canned), str(ports), str(model.onnx)]
        )
        stack.callback(process.wait)
        stack.callback(process.terminate)
        port = read_port_file(ports, process, name, timeout_s=60)["grpc"]
        servers.append(Server(name, f"127.0.0.1:{port}", process.pid))
    return servers


def start_peers(stack: ExitStack, work: Path, model: Model) -> list[Server]:
    servers = []
    kserve = ROOT / ".venv-kserve" / "bin" / "python"
    if kserve.exists():
        port = _free_port()
        command = [str(kserve), str(PEERS / "kserve_onnx.py"), str(model.onnx), model.name]
        command += [str(_free_port()), str(port)]
        pid, ready_s = stack.enter_context(running(command, f"127.0.0.1:{port}", model.name))
        servers.append(Server(PEER_NAMES[0], f"127.0.0.1:{port}", pid, ready_s))
    else:
        print(f"skipping KServe: {kserve} is missing (benchmarks/peers/setup.sh)")
    mlserver = ROOT / ".venv-bench-mlserver" / "bin" / "mlserver"
    if mlserver.exists():
        port = _free_port()
        models = work / f"mlserver-{model.name}"
        (models / model.name).mkdir(parents=True)
        settings = {"name": model.name, "implementation": "mlserver_onnx.OnnxRuntime"}
        (models / model.name / "model-settings.json").write_text(
            json.dumps({**settings, "parameters": {"uri": str(model.onnx)}})
        )
        ports = {"grpc_port": port, "http_port": _free_port(), "metrics_port": _free_port()}
        server = {"host": "127.0.0.1", **ports, "parallel_workers": 0, "debug": False}
        (models / "settings.json").write_text(json.dumps(server))
        env = {**os.environ, "PYTHONPATH": str(PEERS)}
        command = [str(mlserver), "start", str(models)]
        pid, ready_s = stack.enter_context(
            running(command, f"127.0.0.1:{port}", model.name, env=env)
        )
        servers.append(Server(PEER_NAMES[1], f"127.0.0.1:{port}", pid, ready_s))
    else:
        print(f"skipping MLServer: {mlserver} is missing (benchmarks/peers/setup.sh)")
    return servers


def make_cnn(work: Path) -> Model:
    """A small convolutional classifier on a 3x224x224 image (three strided 3x3 convolutions,
    32-64-128 channels, global average pooling, 10 classes, softmax), with fixed weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []
    channels, previous = (3, 32, 64, 128), "image"
    for i in range(3):
        w = rng.normal(0, 0.2, (channels[i + 1], channels[i], 3, 3)).astype(np.float32)
        b = np.zeros(channels[i + 1], dtype=np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(
            helper.make_node(
                "Conv",
                [previous, f"w{i}", f"b{i}"],
                [f"c{i}"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        previous = f"r{i}"
    fc = rng.normal(0, 0.3, (128, 10)).astype(np.float32)
    weights += [numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(10, np.float32), "fcb")]  # fmt: skip
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        weights,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8  # what the peers' onnxruntime builds read
    repository = work / "cnn-models"
    (repository / "cnn" / "1").mkdir(parents=True)
    onnx.save(proto, repository / "cnn" / "1" / "model.onnx")
    (repository / "cnn" / "config.toml").write_text(
        'output = "probabilities"\noutput_kind = "probabilities"\nthreshold = 0.0\n'
    )
    x = rng.random((1, 3, 224, 224), dtype=np.float32)
    return Model("cnn", "image", x, repository)


def _median(results: list[Result]) -> dict[str, float]:
    keys = summarize(results[0]).keys()
    return {k: statistics.median(summarize(r)[k] for r in results) for k in keys}


def bench(model: Model, args: argparse.Namespace, requests: int, work: Path) -> list[str]:
    """Run every server on `model`; returns the printed tables."""
    tables = []
    with ExitStack() as stack:
        agents = start_agents(stack, work, model, args.batching)
        servers = [*start_floors(stack, work, model, agents[0]), *agents]
        servers += start_peers(stack, work, model)
        request = model.request()
        for server in servers:  # warm up, and check every server answers
            measure(server.address, request, 1, 50, server.pid)
        figures: dict[tuple[str, int], dict[str, float]] = {}
        for concurrency in (1, 16):
            runs: dict[str, list[Result]] = {s.name: [] for s in servers}
            for _ in range(args.rounds):  # alternate, so drift in the machine hits all alike
                for s in servers:
                    runs[s.name].append(measure(s.address, request, concurrency, requests, s.pid))
            for name, results in runs.items():
                figures[name, concurrency] = _median(results)
        memory = {s.name: rss_mb(s.pid) for s in servers}
        passed = {}
        if model.name == "digits":
            for s in servers:
                if s.name not in ("echo", *FLOOR_NAMES):
                    passed[s.name] = run_checks(s.address, model.name, model.input_name, model.x)

    rows = []
    for concurrency in (1, 16):
        echo = figures["echo", concurrency]
        for s in servers:
            rows.append((f"{s.name}, c{concurrency}", figures[s.name, concurrency]))
        for s in servers[1:]:
            mine = figures[s.name, concurrency]
            rows.append((f"{s.name} / echo, c{concurrency}", {k: mine[k] / echo[k] for k in echo}))
    title = f"{model.name}: {requests} requests x {args.rounds} rounds per row (medians)"
    tables.append(print_table(title, rows))

    summary = []
    for s in servers[1:]:
        row = {
            "req/s c16 ÷ echo": figures[s.name, 16]["req/s"] / figures["echo", 16]["req/s"],
            "p50 c1 ÷ echo": figures[s.name, 1]["p50 ms"] / figures["echo", 1]["p50 ms"],
            "CPU µs/req c16": figures[s.name, 16]["server CPU µs/req"],
            "RSS MB": memory[s.name],
            "start to ready s": s.ready_s if s.ready_s is not None else float("nan"),
        }
        if passed:
            row["v2 rules passed"] = (
                sum(passed[s.name].values()) if s.name in passed else float("nan")
            )
        summary.append((s.name, row))
    tables.append(print_table(f"{model.name}: summary", summary))

    peers = [n for n in PEER_NAMES if (n, 16) in figures]
    if peers:
        best_c16 = max(peers, key=lambda n: figures[n, 16]["req/s"])
        best_c1 = min(peers, key=lambda n: figures[n, 1]["p50 ms"])
        floor_c16 = max(FLOOR_NAMES, key=lambda n: figures[n, 16]["req/s"])
        floor_c1 = min(FLOOR_NAMES, key=lambda n: figures[n, 1]["p50 ms"])
        agent16, agent1 = figures["agent", 16], figures["agent", 1]
        targets = [
            (f"agent req/s c16 ÷ best peer ({best_c16})", agent16["req/s"] / figures[best_c16, 16]["req/s"]),
            (f"agent p50 c1 ÷ best peer ({best_c1})", agent1["p50 ms"] / figures[best_c1, 1]["p50 ms"]),
            (f"agent req/s c16 ÷ best floor ({floor_c16})", agent16["req/s"] / figures[floor_c16, 16]["req/s"]),
            (f"agent p50 c1 ÷ best floor ({floor_c1})", agent1["p50 ms"] / figures[floor_c1, 1]["p50 ms"]),
        ]  # fmt: skip
        tables.append(print_table(f"{model.name}: ratios", [(n, {"ratio": v}) for n, v in targets]))
    if passed:
        names = [s.name for s in servers if s.name in passed]
        lines = ["| check | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for check in CHECKS:
            marks = ["pass" if passed[n][check.name] else "**fail**" for n in names]
            lines.append(f"| {check.name} ({check.expected.name}) | " + " | ".join(marks) + " |")
        text = "### v2 error rules (benchmarks/conformance.py)\n\n" + "\n".join(lines) + "\n"
        print(text, flush=True)
        tables.append(text)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cnn", action="store_true", help="also the 3x224x224 CNN")
    parser.add_argument("--cnn-requests", type=int, default=300)
    parser.add_argument(
        "--no-batching", dest="batching", action="store_false", help="no batching agent"
    )
    parser.add_argument("--only-cnn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    print("load average:", " ".join(f"{v:.1f}" for v in os.getloadavg()))
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    digits = Model(
        "digits", "X", np.asarray(np.load(HELDOUT)["X"][:1], np.float32), EDGE_REPOSITORY
    )
    if not args.only_cnn:
        bench(digits, args, args.requests, work / "digits")
    if args.cnn or args.only_cnn:
        cnn = make_cnn(work)
        bench(cnn, args, args.cnn_requests, work / "cnn")
    print("load average:", " ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
