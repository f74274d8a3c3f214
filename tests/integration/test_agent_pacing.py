"""A 200-row batch with escalation=always against a gateway with a low rate limit: the agent paces
its calls (its own rate, halved by a 429, and the gateway's Retry-After) instead of sending a
storm of them, and queues an item only when the caller's deadline forbids waiting for its turn.
Real agent and gateway processes, tritonclient."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from model_runtime.demo import HELDOUT
from tests.integration.conftest import agent_metric, start_agent, write_device_key
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.processes import Daemon, wait_until

pytestmark = pytest.mark.integration

ROWS = 200
GATEWAY_RATE = 25  # per second, bursts of as many: below the agent's default of 40
MAX_REFUSALS = GATEWAY_RATE  # 429s a paced batch may meet; unpaced, it met 117


@pytest.fixture(scope="module")
def limited_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("limited"),
        env={
            "CLOUD_GATEWAY_RATE_LIMIT_PER_S": str(GATEWAY_RATE),
            "CLOUD_GATEWAY_RATE_LIMIT_BURST": str(GATEWAY_RATE),
            # the rate is the limit under test, not the calls a device has in flight
            "CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "64",
        },
    )
    yield gw
    gw.daemon.stop()


def agent_for(gateway: Gateway, workdir: Path, live_timeout_s: float) -> Daemon:
    """An agent escalating straight to `gateway`, with connections enough that no live call
    waits for one, however slow this machine: what holds calls back is the pace alone."""
    key_file = write_device_key(workdir, gateway)
    return start_agent(
        workdir,
        "--cloud-url",
        gateway.url,
        "--device-key-file",
        str(key_file),
        "--live-timeout-seconds",
        str(live_timeout_s),
        "--cloud-max-connections",
        "32",
        env={"EDGE_AGENT_PROBE_INTERVAL_SECONDS": "0.5"},
    )


def batch(agent: Daemon, timeout_s: float) -> tuple[list[str], list[str]]:
    """Send the 200-row batch with escalation=always; each row's route and reason."""
    x = np.asarray(np.load(HELDOUT)["X"][:ROWS], dtype=np.float32)
    inp = triton.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [triton.InferRequestedOutput(n) for n in ("routing.route", "routing.reason")]
    result = triton.InferenceServerClient(agent.address("grpc")).infer(
        "digits",
        [inp],
        outputs=outputs,
        parameters={"escalation": "always"},
        client_timeout=timeout_s,
    )
    decode = np.vectorize(lambda b: b.decode())
    return list(decode(result.as_numpy("routing.route"))), list(
        decode(result.as_numpy("routing.reason"))
    )


def refusals(gateway: Gateway) -> float:
    return gateway.metric("cloud_gateway_rate_limited_total")


def test_a_large_batch_is_paced_live_when_the_deadline_allows(
    limited_gateway: Gateway, tmp_path: Path
) -> None:
    agent = agent_for(limited_gateway, tmp_path, live_timeout_s=60)
    try:
        before = refusals(limited_gateway)
        routes, reasons = batch(agent, timeout_s=90)
        assert set(routes) == {"cloud"}, set(reasons)  # none had to wait for the queue
        assert set(reasons) == {"escalation_always"}
        storm = refusals(limited_gateway) - before
        # 200 calls at once were refused 117 times. Paced, only the calls already on their way
        # when the first 429 came back find the limit: how many depends on how fast this machine
        # reacts (2-12 seen), so the bound is one second of the gateway's allowance.
        assert storm <= MAX_REFUSALS, storm
        assert agent_metric(agent, "edge_agent_router_cloud_paced_calls_total", path="live") > 0
    finally:
        agent.stop()


def test_rows_whose_turn_comes_after_the_deadline_are_queued_then_delivered_paced(
    limited_gateway: Gateway, tmp_path: Path
) -> None:
    agent = agent_for(limited_gateway, tmp_path, live_timeout_s=4)
    try:
        before = refusals(limited_gateway)
        routes, reasons = batch(agent, timeout_s=30)
        # Never cloud_failed: those that could not go in time waited in the queue instead.
        assert set(reasons) <= {"escalation_always", "rate_limited"}
        live = routes.count("cloud")
        assert live >= 10  # the agent's burst at least went live
        assert routes.count("queue") == reasons.count("rate_limited") == ROWS - live > 0
        wait_until(
            lambda: (
                agent_metric(agent, "edge_agent_router_queue_ended_items_total", state="delivered")
                == ROWS - live
            ),
            timeout=120,
            what="the queued rows to be delivered",
        )
        storm = refusals(limited_gateway) - before
        assert storm <= MAX_REFUSALS, storm
        assert agent_metric(agent, "edge_agent_router_cloud_paced_calls_total", path="drain") > 0
    finally:
        agent.stop()
