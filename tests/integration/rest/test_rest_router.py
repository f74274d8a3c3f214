"""Tickets over HTTP with a real cloud gateway behind the fault proxy: a page's provisional
answer, its ticket's state, the results stream (SSE) that resumes from a cursor, the router's
status, and the deadline header, each mirroring the gRPC side (tests/integration/test_agent_router.py).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from model_runtime.demo import CLOUD_REPOSITORY, EDGE_REPOSITORY
from model_runtime.model_config import load_model_config
from tests.integration.conftest import LINK_WORKS, start_agent, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.integration.rest.helpers import X, body
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, wait_until
from tests.support.sse import Event, EventStream

THRESHOLD = load_model_config("digits", EDGE_REPOSITORY / "digits" / "config.toml").threshold
_edge = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
_cloud = ort.InferenceSession(str(CLOUD_REPOSITORY / "digits-large" / "1" / "model.onnx"))
UNSURE = np.flatnonzero(_edge.run(["probabilities"], {"X": X})[0].max(axis=1) < THRESHOLD)
CLOUD_LABELS = _cloud.run(["label"], {"X": X})[0]


@pytest.fixture
def agent(tmp_path: Path, gateway: Gateway, proxy: FaultProxy) -> Iterator[Daemon]:
    daemon = start_agent_with_cloud(tmp_path, gateway, proxy)
    yield daemon
    daemon.stop()


def status(rest: httpx.Client) -> dict[str, Any]:
    answer = rest.get("/router/v1/status")
    assert answer.status_code == 200
    return dict(answer.json())


def ask(rest: httpx.Client, i: int, headers: dict[str, str] | None = None, **wishes: object) -> Any:
    answer = rest.post(
        "/v2/models/digits/infer",
        json=body(X[i : i + 1], parameters=wishes or None) if wishes else body(X[i : i + 1]),
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def label_of(ticket: dict[str, Any]) -> int:
    return int(next(o for o in ticket["outputs"] if o["name"] == "label")["data"][0])


def queued_while_cut(rest: httpx.Client, proxy: FaultProxy, items: list[int]) -> list[str]:
    proxy.cut()
    wait_until(lambda: status(rest)["link_state"] == "down", timeout=30, what="the link down")
    tickets = []
    for i in items:
        facts = ask(rest, i, escalation="always")["parameters"]
        assert (facts["route"], facts["provisional"]) == ("queue", True)
        tickets.append(str(facts["ticket"]))
    return tickets


def next_result(stream: EventStream) -> tuple[Event, dict[str, Any]]:
    event = stream.events.get(timeout=30)
    assert event.event == "result"
    return event, json.loads(event.data)


def test_a_provisional_answer_and_its_ticket_resolve_over_http(
    rest: httpx.Client, proxy: FaultProxy
) -> None:
    i = int(UNSURE[0])
    (ticket,) = queued_while_cut(rest, proxy, [i])
    pending = rest.get(f"/router/v1/tickets/{ticket}").json()
    assert (pending["state"], pending["cursor"], pending["outputs"]) == ("pending", 0, [])

    with EventStream(f"{rest.base_url}/router/v1/results?ticket={ticket}") as stream:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        proxy.restore()
        event, delivered = next_result(stream)
    assert delivered["ticket"] == ticket
    assert delivered["state"] == "delivered"
    assert label_of(delivered) == CLOUD_LABELS[i]
    assert event.id == str(delivered["cursor"])
    final = rest.get(f"/router/v1/tickets/{ticket}").json()
    assert final == delivered


def test_the_stream_resumes_after_the_last_event_seen(
    rest: httpx.Client, proxy: FaultProxy
) -> None:
    first, second = queued_while_cut(rest, proxy, [int(UNSURE[1]), int(UNSURE[2])])
    proxy.restore()
    with EventStream(f"{rest.base_url}/router/v1/results") as stream:
        seen = [next_result(stream) for _ in range(2)]
    assert {r["ticket"] for _, r in seen} == {first, second}
    (earlier, _), (later, later_result) = sorted(seen, key=lambda s: int(s[0].id or 0))

    # A browser reconnecting sends the last id it saw; it wins over the query's cursor.
    resumed = EventStream(
        f"{rest.base_url}/router/v1/results?after_cursor=0", {"Last-Event-ID": str(earlier.id)}
    )
    from_query = EventStream(f"{rest.base_url}/router/v1/results?after_cursor={earlier.id}")
    with resumed, from_query:
        for stream in (resumed, from_query):
            event, result = next_result(stream)
            assert (event.id, result["ticket"]) == (later.id, later_result["ticket"])


def test_status_reports_link_queue_and_budget(rest: httpx.Client, proxy: FaultProxy) -> None:
    proxy.cut()
    wait_until(lambda: status(rest)["link_state"] == "down", timeout=30, what="the link down")
    for i in UNSURE[:3]:
        ask(rest, int(i), escalation="always", priority=7)
    now = status(rest)
    assert now["cloud_configured"] is True
    assert now["queue_depth_by_priority"]["7"] == 3
    assert now["queue_bytes"] > 0
    assert now["oldest_item_age_seconds"] >= 0
    # No limit set; what the probes spent is counted all the same.
    budget = now["day_budget"]
    assert (budget["limit_bytes"], budget["left_bytes"]) == (None, None)
    assert budget["used_bytes"] >= 0


def test_the_deadline_header_is_the_callers_latency_budget(rest: httpx.Client) -> None:
    wait_until(
        lambda: status(rest)["link_state"] in LINK_WORKS, timeout=30, what="the link to work"
    )
    i = int(UNSURE[3])
    live = ask(rest, i, {"Request-Timeout": "30"})["parameters"]
    assert (live["route"], live["reason"]) == ("cloud", "unsure")
    # No live escalation fits in a millisecond: the local answer now, the cloud's later.
    hurried = ask(rest, i, {"Request-Timeout": "0.001"})["parameters"]
    assert (hurried["route"], hurried["reason"]) == ("queue", "deadline_too_short")
    assert hurried["provisional"] is True


def test_unknown_tickets_and_bad_cursors_are_refused(rest: httpx.Client) -> None:
    unknown = rest.get("/router/v1/tickets/no-such-ticket")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "ticket 'no-such-ticket' is unknown or past its retention"}
    for query, headers, words in [
        ("?after_cursor=-1", {}, "after_cursor: must be an integer >= 0, got '-1'"),
        ("", {"Last-Event-ID": "x7"}, "Last-Event-ID: must be an integer >= 0, got 'x7'"),
    ]:
        refused = rest.get(f"/router/v1/results{query}", headers=headers)
        assert (refused.status_code, refused.json()) == (400, {"error": words})


def test_open_streams_end_at_once_when_the_agent_stops(tmp_path: Path) -> None:
    # A grace period far longer than the waits below: a stream that held the stop up for it
    # would fail them.
    agent = start_agent(tmp_path, "--grace-seconds", "300")
    try:
        with EventStream(f"http://{agent.address('rest')}/router/v1/results") as stream:
            agent.process.send_signal(signal.SIGTERM)
            assert stream.ended.wait(60), "the stream outlived the agent's stop"
        assert agent.process.wait(60) == 0
    finally:
        agent.stop()
