"""What the reliability tests share (crash points, I/O faults, the kill campaign): the rig of a
counting upstream, a gateway in front of it and a fault proxy before that; sending escalations
through an agent into a ledger; waiting for its queue to settle.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import agent_ready, cloud_agent_command
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.counting_upstream import CountingUpstream
from tests.support.fault_proxy import FaultProxy
from tests.support.ledger import Ledger
from tests.support.processes import Daemon, start_daemon

__all__ = ["Rig", "queue_settled", "send_escalations"]


class Rig:
    """A counting upstream, a single-worker gateway in front of it (so that its crash is the
    gateway's) and a fault proxy before that, for agents to escalate to. Close with `close()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.upstream = CountingUpstream()
        self.gateway: Gateway | None = None
        """The gateway started last: the one the proxy forwards to."""
        self.proxy: FaultProxy | None = None
        self._gateways: list[Gateway] = []

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for gateway in self._gateways:
            gateway.daemon.kill()
        self.upstream.close()

    def start_gateway(self, workdir: Path, faults: str = "", **env: str) -> Gateway:
        """A gateway with `workdir`/gateway as its state (its files kept across restarts); the
        proxy forwards to it from then on."""
        variables = {f"CLOUD_GATEWAY_{k.upper()}": v for k, v in env.items()}
        if faults:
            variables["CLOUD_GATEWAY_FAULTS"] = faults
        self.gateway = start_gateway(
            workdir / "gateway", "--upstream", self.upstream.url, env=variables
        )
        self._gateways.append(self.gateway)
        port = self.gateway.daemon.ports["http"]
        if self.proxy is None:
            self.proxy = FaultProxy("127.0.0.1", port).start()
        else:  # the agent keeps its address; new connections reach the new gateway
            self.proxy.target = ("127.0.0.1", port)
        return self.gateway

    def start_agent(self, workdir: Path, faults: str = "", **env: str) -> Daemon:
        """An agent with `workdir`/agent/state as its state dir, escalating through the proxy."""
        assert self.gateway is not None
        assert self.proxy is not None
        variables = {f"EDGE_AGENT_{k.upper()}": v for k, v in env.items()}
        if faults:
            variables["EDGE_AGENT_FAULTS"] = faults
        args, variables = cloud_agent_command(
            workdir / "agent", self.gateway, self.proxy, env=variables
        )
        return start_daemon("edge-agent", args, workdir / "agent", ready=agent_ready, env=variables)


def send_escalations(
    agent: Daemon,
    ledger: Ledger,
    n: int,
    *,
    stop: threading.Event | None = None,
    busy: threading.Event | None = None,
    errors: list[Exception] | None = None,
) -> None:
    """Up to `n` escalations one at a time, each recorded in `ledger` once acknowledged. A call
    that fails is not acknowledged: it goes to `errors`, and ends the sending when `stop` is
    given (the power went)."""
    with triton.InferenceServerClient(agent.address("grpc")) as client:
        for _ in range(n):
            if stop is not None and stop.is_set():
                return
            seq, x = ledger.new_input()
            inp = triton.InferInput("X", [1, 64], "FP32")
            inp.set_data_from_numpy(x)
            if busy is not None:
                busy.set()
            try:
                result = client.infer(
                    "digits", [inp], parameters={"escalation": "always"}, client_timeout=20
                )
            except InferenceServerException as exc:
                if errors is not None:
                    errors.append(exc)
                if stop is not None:
                    return
                continue
            finally:
                if busy is not None:
                    busy.clear()
            params = result.get_response().parameters
            outputs = {name: result.as_numpy(name) for name in ("label", "probabilities")}
            ticket = params["ticket"].string_param or None
            ledger.acknowledged(seq, params["route"].string_param, ticket, outputs)


def queue_settled(state_dir: Path) -> Callable[[], bool]:
    """A condition: no item of the agent's queue waits or is in flight (read beside it)."""

    def settled() -> bool:
        queue = state_dir / "queue.sqlite"
        with sqlite3.connect(f"{queue.resolve().as_uri()}?mode=ro", uri=True) as db:
            (waiting,) = db.execute(
                "SELECT COUNT(*) FROM items WHERE state IN ('pending', 'in_flight')"
            ).fetchone()
        return int(waiting) == 0

    return settled
