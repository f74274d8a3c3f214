"""`edge-agent demo`: a cloud gateway and an edge agent on free local ports, the held-out set
replayed through the agent with the cloud gone for part of the run, and what happened.

The outage is real: the gateway process is stopped, then started again on the same port.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime import ModelRepository
from model_runtime.demo import CLOUD_REPOSITORY, EDGE_REPOSITORY, HELDOUT

__all__ = ["DemoPair", "run_demo", "start_pair"]

BIN = Path(sys.executable).parent
OUTAGE = (0.35, 0.65)  # the share of the run during which the cloud is gone
PACE_S = 0.008  # between requests, so the outage lasts long enough to be seen


@dataclass
class Tally:
    answers: list[int] = field(default_factory=list)  # the label the app ends up with
    routes: list[str] = field(default_factory=list)
    tickets: dict[int, str] = field(default_factory=dict)  # item -> ticket


class _Process:
    """A daemon of ours started with --port-file, stopped with SIGTERM."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.port_file = workdir / f"{args[0]}.ports.json"
        self.port_file.unlink(missing_ok=True)
        log = (workdir / f"{args[0]}.log").open("a")
        self.process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:], "--port-file", str(self.port_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start; see {workdir / (args[0] + '.log')}")
            time.sleep(0.02)
        self.ports: dict[str, int] = json.loads(self.port_file.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(30)


def _request(x: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="digits",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])],
        raw_input_contents=[x.tobytes()],
    )


def _label(outputs: list[tuple[str, bytes]]) -> int:
    return int(np.frombuffer(dict(outputs)["label"], dtype=np.int64)[0])


def _sent_bytes(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("edge_agent_router_cloud_sent_bytes_total")
    )


@dataclass
class DemoPair:
    """A gateway with a key for one device, and an agent escalating to it, on free ports."""

    work: Path
    gateway_args: list[str]
    gateway: _Process
    agent: _Process

    @property
    def cloud_port(self) -> int:
        return self.gateway.ports["http"]

    def stop_cloud(self) -> None:
        self.gateway.stop()

    def start_cloud(self) -> None:
        """On the port it had, so the agent finds it again."""
        self.gateway = _Process([*self.gateway_args, "--port", str(self.cloud_port)], self.work)

    def stop(self) -> None:
        self.agent.stop()
        self.gateway.stop()


def start_pair() -> DemoPair:
    work = Path(tempfile.mkdtemp(prefix="edge-cloud-router-demo-"))
    gw_state = work / "gateway"
    key = subprocess.run(
        [str(BIN / "cloud-gateway"), "keys", "add", "demo-device", "--state-dir", str(gw_state)],
        capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    key_file = work / "device.key"
    key_file.write_text(key)
    gateway_args = ["cloud-gateway", "serve", "--metrics-port", "0", "--state-dir", str(gw_state)]
    gateway = _Process([*gateway_args, "--port", "0"], work)
    cloud_port = gateway.ports["http"]
    try:
        agent = _Process(
            ["edge-agent", "serve", "--port", "0", "--metrics-port", "0", "--rest-port", "0",
             "--state-dir", str(work / "agent"), "--cloud-url", f"http://127.0.0.1:{cloud_port}",
             "--device-key-file", str(key_file), "--log-level", "WARNING"],
            work,
            env={"EDGE_AGENT_PROBE_INTERVAL_SECONDS": "0.5", "EDGE_AGENT_PROBE_TIMEOUT_SECONDS": "0.5"},
        )  # fmt: skip
    except BaseException:
        gateway.stop()
        raise
    return DemoPair(work, gateway_args, gateway, agent)


class _Ticker:
    """Progress as plain lines on stderr, one every few seconds, for a log or a pipe: rich's
    bar shows only on a terminal."""

    def __init__(self, *, enabled: bool, every_s: float = 3.0) -> None:
        self.enabled = enabled
        self.every_s = every_s
        self._last = -math.inf

    def __call__(self, what: str, done: int, total: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self._last >= self.every_s):
            print(f"demo: {what}: {done} of {total}", file=sys.stderr, flush=True)
            self._last = now


def run_demo(console: Console) -> int:
    data = np.load(HELDOUT)
    X, y = data["X"], data["y"]
    pair = start_pair()
    agent = pair.agent
    channel = grpc.insecure_channel(f"127.0.0.1:{agent.ports['grpc']}")
    v2, tickets_api = pb_grpc.GRPCInferenceServiceStub(channel), rpb_grpc.RouterServiceStub(channel)
    tally = Tally()
    cut_at, back_at = int(OUTAGE[0] * len(X)), int(OUTAGE[1] * len(X))
    try:
        ticker = _Ticker(enabled=not console.is_terminal)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("replaying the held-out set", total=len(X))
            ticker("replaying the held-out set", 0, len(X), force=True)
            for i in range(len(X)):
                if i == cut_at:
                    progress.update(task, description="the cloud is gone")
                    ticker("the cloud is gone", i, len(X), force=True)
                    pair.stop_cloud()
                elif i == back_at:
                    progress.update(task, description="the cloud is back")
                    ticker("the cloud is back", i, len(X), force=True)
                    pair.start_cloud()
                response = v2.ModelInfer(_request(X[i : i + 1]), timeout=30)
                params = response.parameters
                tally.routes.append(params["route"].string_param)
                tally.answers.append(
                    _label(
                        [
                            (o.name, raw)
                            for o, raw in zip(
                                response.outputs, response.raw_output_contents, strict=True
                            )
                        ]
                    )
                )
                if "ticket" in params:
                    tally.tickets[i] = params["ticket"].string_param
                progress.advance(task)
                ticker("replayed", i + 1, len(X), force=i + 1 == len(X))
                time.sleep(PACE_S)

            task = progress.add_task("waiting for queued requests", total=len(tally.tickets))
            pending = dict(tally.tickets)
            waiting = len(pending)
            ticker("waiting for queued requests to be delivered", 0, waiting, force=True)
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for i, ticket in list(pending.items()):
                    result = tickets_api.GetResult(rpb.GetResultRequest(ticket=ticket), timeout=5)
                    if result.state == rpb.TicketResult.DELIVERED:
                        tally.answers[i] = _label(
                            [(t.name, t.raw_contents) for t in result.outputs]
                        )
                        del pending[i]
                        progress.advance(task)
                ticker("delivered", waiting - len(pending), waiting, force=not pending)
                time.sleep(0.2)
        sent = _sent_bytes(agent.ports["metrics"])
    finally:
        channel.close()
        pair.stop()

    edge = ModelRepository.load(EDGE_REPOSITORY).get("digits").predict({"X": X}).outputs["label"]
    cloud = (
        ModelRepository.load(CLOUD_REPOSITORY)
        .get("digits-large")
        .predict({"X": X})
        .outputs["label"]
    )
    table = Table(
        title=f"edge-cloud-router demo: {len(X)} held-out digits, cloud gone for items {cut_at}-{back_at - 1}"
    )
    table.add_column("what")
    table.add_column("value", justify="right")
    n = len(X)
    delivered = len(tally.tickets) - len(pending)
    for what, value in [
        ("requests", f"{n}"),
        (
            "answered at the edge",
            f"{tally.routes.count('edge')} ({tally.routes.count('edge') / n:.1%})",
        ),
        ("escalated to the cloud, live", f"{tally.routes.count('cloud')}"),
        ("queued (provisional answer + ticket)", f"{len(tally.tickets)}"),
        ("delivered later", f"{delivered}"),
        ("accuracy, edge only", f"{(edge == y).mean():.4f}"),
        (
            "accuracy, hybrid (what the app ends with)",
            f"{(np.array(tally.answers) == y).mean():.4f}",
        ),
        ("accuracy, cloud only", f"{(cloud == y).mean():.4f}"),
        ("bytes sent to the cloud", f"{sent:,.0f}"),
    ]:
        table.add_row(what, value)
    console.print(table)
    if pending:
        console.print(f"[red]{len(pending)} queued requests were not delivered in time[/red]")
        return 1
    return 0
