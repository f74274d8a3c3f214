"""I/O errors and a full disk (issue 13, item 4): the k-th write of a store fails, once or for
good; each failure gives the caller an error, never an acknowledgement that is then lost; the
answers acknowledged before survive; the daemons carry on when the disk works again.

Two kinds of fault, said so in each test's name:
- a real full disk: a 2 MiB tmpfs mounted as the state dir and filled (needs root and mount;
  skipped, with the reason, otherwise);
- an injected one: the fault switch (EDGE_AGENT_FAULTS, CLOUD_GATEWAY_FAULTS) makes the k-th
  commit of a store raise what SQLite raises on a failing (EIO) or full (ENOSPC) disk.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import agent_metric, cloud_agent_command
from tests.integration.gateway.helpers import Gateway, infer_body
from tests.support.counting_upstream import MODEL, digest
from tests.support.ledger import Ledger
from tests.support.processes import Daemon, spawn_daemon, wait_until
from tests.support.reliability import Rig, queue_settled, send_escalations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture
def cloud(rig: Rig, tmp_path: Path) -> Rig:
    """The rig with a gateway in front of its counting upstream, for agents to escalate to."""
    rig.start_gateway(tmp_path)
    return rig


def link_down(agent: Daemon) -> bool:
    return agent_metric(agent, "edge_agent_router_link_state", state="down") == 1


def queue_while_offline(rig: Rig, agent: Daemon, ledger: Ledger, n: int) -> list[str]:
    """Send `n` escalations with the link cut (each one is one commit of the queue, so the k-th
    request meets the k-th commit); the status codes of those refused, in order."""
    assert rig.proxy is not None
    rig.proxy.cut()
    wait_until(lambda: link_down(agent), 30, what="the agent to see the link down")
    errors: list[Exception] = []
    send_escalations(agent, ledger, n, errors=errors)
    refused = [e for e in errors if isinstance(e, InferenceServerException)]
    assert refused == errors
    for e in refused:  # the message names the file and what went wrong, never a traceback
        assert "queue file could not be written" in str(e.message())
    return [str(e.status()).removeprefix("StatusCode.") for e in refused]


def deliver_and_account(rig: Rig, agent_dir: Path, ledger: Ledger, *, restart: bool) -> None:
    """Restore the link (after a restart without the fault, if asked), wait for the queue to
    drain, and check that every acknowledged request was delivered, once."""
    assert rig.proxy is not None
    rig.proxy.restore()
    agent = rig.start_agent(agent_dir) if restart else None
    try:
        wait_until(queue_settled(agent_dir / "agent" / "state"), 60, what="the queue to drain")
    finally:
        if agent is not None:
            agent.stop()
    accounting = ledger.account(
        agent_dir / "agent" / "state" / "queue.sqlite", rig.upstream.counts()
    )
    assert accounting.problems() == []
    assert accounting.duplicates == 0
    assert set(accounting.end_states) == {"delivered"}


# -- injected faults of the agent's queue ------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "refused"),
    [
        # Transient and persistent, EIO and ENOSPC, crosswise: a full disk that has room again is
        # the real tmpfs's test below.
        ("queue.commit:3:eio", ["UNAVAILABLE"]),  # one failing write
        ("queue.commit:3+:enospc", ["RESOURCE_EXHAUSTED"] * 3),  # a disk that stays full
    ],
)
def test_injected_queue_write_failures_refuse_the_request_and_lose_nothing(
    cloud: Rig, tmp_path: Path, fault: str, refused: list[str]
) -> None:
    ledger = Ledger()
    agent = cloud.start_agent(tmp_path, fault)
    try:
        assert queue_while_offline(cloud, agent, ledger, 5) == refused
        kinds = {"UNAVAILABLE": "io_error", "RESOURCE_EXHAUSTED": "disk_full"}
        failed = agent_metric(
            agent, "edge_agent_router_storage_errors_total", store="queue", kind=kinds[refused[0]]
        )
        assert failed == len(refused)
        assert len(ledger.acked_tickets()) == 5 - len(refused)
    finally:
        agent.kill()  # the power goes too: what was acknowledged must be on disk
    deliver_and_account(cloud, tmp_path, ledger, restart=True)


def test_injected_failures_to_store_the_cloud_answer_are_retried_without_resending(
    cloud: Rig, tmp_path: Path
) -> None:
    # Commits 1-2 queue two requests; 3 claims them; 4 and 5 would store the cloud's answers.
    ledger = Ledger()
    agent = cloud.start_agent(tmp_path, "queue.commit:4-5:eio")
    try:
        assert queue_while_offline(cloud, agent, ledger, 2) == []
        deliver_and_account(cloud, tmp_path, ledger, restart=False)
        assert agent_metric(agent, "edge_agent_router_storage_errors_total", store="queue") == 2
        for ticket in ledger.acked_tickets():
            # sent once: the answer in hand was stored again, not fetched again
            assert agent_attempts(agent, ticket) == 1
    finally:
        agent.stop()


def agent_attempts(agent: Daemon, ticket: str) -> int:
    import grpc

    from edge_agent.grpc._generated import router_service_pb2 as rpb
    from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc

    with grpc.insecure_channel(agent.address("grpc")) as channel:
        result = rpb_grpc.RouterServiceStub(channel).GetResult(
            rpb.GetResultRequest(ticket=ticket), timeout=5
        )
    assert result.state == rpb.TicketResult.DELIVERED
    return int(result.attempts)


def test_injected_failures_of_side_stores_never_hold_up_requests(
    cloud: Rig, tmp_path: Path
) -> None:
    ledger = Ledger()
    agent = cloud.start_agent(
        tmp_path,
        "hard_examples.commit:1+:eio,budget.commit:1+:eio",
        hard_examples_retention_days="1",
    )
    try:
        assert queue_while_offline(cloud, agent, ledger, 3) == []
        deliver_and_account(cloud, tmp_path, ledger, restart=False)
        for store in ("hard_examples", "budget"):
            failed = agent_metric(agent, "edge_agent_router_storage_errors_total", store=store)
            assert failed >= 1, store
        errors = agent_metric(agent, "edge_agent_router_hard_examples_total", outcome="error")
        assert errors >= 1
    finally:
        agent.stop()


# -- injected faults of the gateway's idempotency store ----------------------------------------


def faulty_gateway(
    rig: Rig, tmp_path: Path, fault: str, key: str
) -> tuple[Gateway, npt.NDArray[np.float32], dict[str, str]]:
    """A gateway with `fault`, a fresh input and the headers of a request of it under `key`."""
    gateway = rig.start_gateway(tmp_path / "faulty", fault)
    x = Ledger().new_input()[1]
    return gateway, x, {"Idempotency-Key": key, "Content-Type": "application/json"}


def test_injected_failure_of_a_claim_is_a_503_before_any_run(rig: Rig, tmp_path: Path) -> None:
    gateway, x, headers = faulty_gateway(rig, tmp_path, "idempotency.commit:1:eio", "clinic-1/io/1")
    with gateway.client() as client:
        refused = client.post(INFER, content=infer_body(x), headers=headers)
        assert (refused.status_code, "Retry-After" in refused.headers) == (503, True)
        assert "disk I/O error" in refused.json()["error"]
        assert rig.upstream.counts()[digest(x)] == 0
        retried = client.post(INFER, content=infer_body(x), headers=headers)
    assert retried.status_code == 200
    assert rig.upstream.counts()[digest(x)] == 1


def test_injected_failure_to_store_an_answer_still_answers(rig: Rig, tmp_path: Path) -> None:
    # Commit 1 claims the key, commit 2 would store the answer.
    gateway, x, headers = faulty_gateway(rig, tmp_path, "idempotency.commit:2:eio", "clinic-1/io/2")
    with gateway.client() as client:
        answered = client.post(INFER, content=infer_body(x), headers=headers)
        assert answered.status_code == 200
        assert gateway.metric("cloud_gateway_idempotency_unstored_answers_total") == 1
        # Its mark was released, not left to lapse: a repeat (the device lost the answer) runs
        # at once, and this time its answer is kept.
        again = client.post(INFER, content=infer_body(x), headers=headers)
    assert again.status_code == 200
    assert again.headers.get("Idempotency-Replayed") is None
    assert rig.upstream.counts()[digest(x)] == 2


# -- a real full disk --------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (created), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of `directory`'s file system with one file; its path."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
        _write_forever(f)
    return filler


def _write_forever(f: BinaryIO) -> None:
    while True:
        f.write(b"\0" * 4096)


def test_a_real_full_disk_refuses_requests_then_the_agent_recovers(
    cloud: Rig, tmp_path: Path
) -> None:
    state = small_disk(tmp_path / "agent" / "state")
    with state:
        ledger = Ledger()
        agent = cloud.start_agent(tmp_path)
        try:
            assert queue_while_offline(cloud, agent, ledger, 3) == []
            filler = fill(tmp_path / "agent" / "state")
            refused = queue_while_offline(cloud, agent, ledger, 60)
            # Each request either was acknowledged (the WAL still had room) or refused as a full
            # disk; it came to refusals.
            assert refused
            assert set(refused) == {"RESOURCE_EXHAUSTED"}
            assert agent_metric(
                agent, "edge_agent_router_storage_errors_total", store="queue", kind="disk_full"
            ) >= len(refused)
            filler.unlink()  # room again: the same agent takes requests, no restart
            assert queue_while_offline(cloud, agent, ledger, 3) == []
        finally:
            agent.kill()
        deliver_and_account(cloud, tmp_path, ledger, restart=True)


def test_a_real_full_disk_refuses_new_gateway_keys_before_any_run(rig: Rig, tmp_path: Path) -> None:
    state = small_disk(tmp_path / "full" / "gateway" / "state")
    with state:
        gateway = rig.start_gateway(tmp_path / "full")
        filler = fill(tmp_path / "full" / "gateway" / "state")
        ledger = Ledger()
        with gateway.client() as client:
            for i in range(100):  # until the WAL needs a page the disk no longer has
                x = ledger.new_input()[1]
                headers = {"Idempotency-Key": f"clinic-1/full/{i}"}
                answer = client.post(INFER, content=infer_body(x), headers=headers)
                if answer.status_code != 200:
                    break
            assert (answer.status_code, "Retry-After" in answer.headers) == (503, True)
            assert "database or disk is full" in answer.json()["error"]
            assert rig.upstream.counts()[digest(x)] == 0  # refused before the run
            filler.unlink()  # room again: the same gateway runs it, no restart
            again = client.post(INFER, content=infer_body(x), headers=headers)
            assert again.status_code == 200
            assert rig.upstream.counts()[digest(x)] == 1
        gateway.daemon.stop()


def test_an_agent_starting_on_a_real_full_disk_exits_1_to_be_restarted(
    cloud: Rig, tmp_path: Path
) -> None:
    with small_disk(tmp_path / "agent" / "state"):
        fill(tmp_path / "agent" / "state")
        assert cloud.gateway is not None
        assert cloud.proxy is not None
        args, env = cloud_agent_command(tmp_path / "agent", cloud.gateway, cloud.proxy)
        agent = spawn_daemon("edge-agent", args, tmp_path / "agent", env=env)
        try:
            code = agent.process.wait(60)
        finally:
            agent.kill()
        lines = agent.log().strip().splitlines()
        # Not 2 ("the settings are wrong: do not restart"): the disk may have room later.
        assert code == 1, agent.log()
        assert lines[-1].startswith("edge-agent: cannot start: ")
        assert "full" in lines[-1] or "No space left" in lines[-1]


def test_injected_queue_write_failures_over_rest_are_503_and_507(
    cloud: Rig, tmp_path: Path
) -> None:
    agent = cloud.start_agent(tmp_path, "queue.commit:1:eio,queue.commit:2:enospc")
    try:
        assert cloud.proxy is not None
        cloud.proxy.cut()
        wait_until(lambda: link_down(agent), 30, what="the agent to see the link down")
        ledger = Ledger()
        answers = []
        with httpx.Client(base_url=f"http://{agent.address('rest')}", timeout=30) as rest:
            for _ in range(3):
                x = ledger.new_input()[1]
                body = {
                    "parameters": {"escalation": "always"},
                    "inputs": [
                        {
                            "name": "X",
                            "datatype": "FP32",
                            "shape": [1, 64],
                            "data": x.ravel().tolist(),
                        }
                    ],
                }
                answers.append(rest.post("/v2/models/digits/infer", json=body))
    finally:
        agent.stop()
    failing, full, stored = answers
    assert (failing.status_code, failing.headers.get("Retry-After")) == (503, "5")
    assert "disk I/O error" in failing.json()["error"]
    assert full.status_code == 507
    assert "database or disk is full" in full.json()["error"]
    assert stored.status_code == 200
    assert stored.json()["parameters"]["ticket"]
