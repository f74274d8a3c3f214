"""Power cuts: SIGKILL the agent again and again while it queues and drains.

Every request acknowledged as queued must be delivered in the end, and the cloud model must
run exactly once per request however often a delivery was cut off half-way.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import model_runs, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until

X = np.load(HELDOUT)["X"]
CUTS = 20
# Requests per life of the agent: the kill then lands mid-enqueue in some lives and mid-drain in
# the others, and the run's length does not grow with the agent's speed.
PER_LIFE = 50


def start(workdir: Path, gateway: Gateway, proxy: FaultProxy) -> Daemon:
    # Store-and-forward only: a live escalation could never fit in a millisecond, so every
    # unsure request is queued, and the count of model runs has one meaning.
    return start_agent_with_cloud(
        workdir, gateway, proxy, env={"EDGE_AGENT_LIVE_TIMEOUT_SECONDS": "0.001"}
    )


def enqueue_until_stopped(
    agent: Daemon, stop: threading.Event, acked: list[str], rng: np.random.Generator
) -> None:
    """Up to PER_LIFE escalations, one at a time, until the power goes; the ticket of each
    acknowledged one goes to `acked`."""
    client = triton.InferenceServerClient(agent.address("grpc"))
    for _ in range(PER_LIFE):
        if stop.is_set():
            return
        i = int(rng.integers(len(X)))
        inp = triton.InferInput("X", [1, 64], "FP32")
        inp.set_data_from_numpy(X[i : i + 1])
        try:
            result = client.infer(
                "digits", [inp], parameters={"escalation": "always"}, client_timeout=10
            )
        except InferenceServerException:
            return  # the power went while we asked: not acknowledged, so not counted
        ticket = result.get_response().parameters["ticket"].string_param
        acked.append(ticket)


# Twenty agent start-ups (each imports onnxruntime and loads the models): 65 s on a machine
# with a CPU burner per core, 109 s with other work beside it, near the suite's 120 s limit.
@pytest.mark.timeout(600)
def test_acknowledged_requests_survive_power_cuts_and_run_once(
    tmp_path: Path, gateway: Gateway
) -> None:
    rng = np.random.default_rng(7)
    acked: list[str] = []
    runs_before = model_runs(gateway)
    with FaultProxy("127.0.0.1", gateway.daemon.ports["http"]) as proxy:
        for cut in range(CUTS):
            agent = start(tmp_path, gateway, proxy)
            stop = threading.Event()
            sender = threading.Thread(target=enqueue_until_stopped, args=(agent, stop, acked, rng))
            sender.start()
            # The schedule of the cut is the fault under test, not a stand-in for waiting:
            # anywhere from mid-start-up to mid-drain.
            stop.wait(float(rng.uniform(0.05, 1.2)))
            agent.kill()
            stop.set()
            sender.join()
            if cut % 4 == 3:
                proxy.cut()  # some restarts find the link down, then up again
            else:
                proxy.restore()
        proxy.restore()

        agent = start(tmp_path, gateway, proxy)
        try:
            with grpc.insecure_channel(agent.address("grpc")) as channel:
                stub = rpb_grpc.RouterServiceStub(channel)

                def all_delivered() -> bool:
                    states = [
                        stub.GetResult(rpb.GetResultRequest(ticket=t), timeout=5).state
                        for t in acked
                    ]
                    return all(s == rpb.TicketResult.DELIVERED for s in states)

                wait_until(
                    all_delivered,
                    timeout=90,
                    interval=0.2,
                    what=f"{len(acked)} tickets to be delivered",
                )
        finally:
            agent.stop()

    assert len(acked) >= CUTS  # the run did acknowledge requests to lose
    assert len(set(acked)) == len(acked)
    # A request committed just before a cut, whose answer never reached the app, is in the
    # queue too and is delivered like the rest: the distinct requests are the queue's tickets.
    with sqlite3.connect(tmp_path / "state" / "queue.sqlite") as db:
        stored = dict(db.execute("SELECT ticket, state FROM items").fetchall())
    assert set(acked) <= set(stored)
    assert set(stored.values()) == {"delivered"}
    assert model_runs(gateway) - runs_before == len(stored)
