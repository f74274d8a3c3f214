"""Router without a cloud, on real SQLite files: everything answers at the edge and says why, the
queue file is quarantined when corrupt, status and metrics tell the operator, config is checked."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from router import (
    CallerWishes,
    Escalation,
    FullPolicy,
    LocalAnswer,
    Reason,
    Route,
    Router,
    RouterConfig,
    TicketNotFound,
)


def local(confidence: list[float]) -> LocalAnswer:
    n = len(confidence)
    return LocalAnswer(
        outputs={"probabilities": np.full((n, 10), 0.1, dtype=np.float32)},
        confidence=np.asarray(confidence),
        threshold=0.5,
        cloud_model="digits-large",
    )


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[Router]:
    r = await Router.open(RouterConfig(state_dir=tmp_path / "state"), CollectorRegistry())
    yield r
    await r.close()


async def test_without_a_cloud_every_item_answers_at_the_edge_and_says_why(router: Router) -> None:
    x = np.zeros((4, 64), dtype=np.float32)
    answer = await router.route(
        model="digits",
        inputs={"X": x},
        local=local([0.9, 0.1, 0.2, 0.99]),
        wishes=CallerWishes(),
        time_left_s=None,
        request_id="r1",
    )
    assert [(i.route, i.reason) for i in answer.items] == [
        (Route.EDGE, Reason.CONFIDENT),
        (Route.EDGE, Reason.NO_CLOUD_CONFIGURED),
        (Route.EDGE, Reason.NO_CLOUD_CONFIGURED),
        (Route.EDGE, Reason.CONFIDENT),
    ]
    assert all(not i.provisional and i.ticket is None for i in answer.items)
    assert {i.answered_by for i in answer.items} == {"edge"}
    assert answer.outputs["probabilities"] is not None
    never = await router.route(
        model="digits",
        inputs={"X": x[:1]},
        local=local([0.1]),
        wishes=CallerWishes(escalation=Escalation.NEVER),
        time_left_s=None,
        request_id="r2",
    )
    assert never.items[0].reason is Reason.ESCALATION_NEVER
    assert not router.cloud_configured
    text = generate_latest(router.metrics.registry).decode()
    assert 'edge_agent_router_routes_total{reason="no_cloud_configured",route="edge"} 2.0' in text
    assert "edge_agent_router_cloud_configured 0.0" in text


async def test_status_without_a_cloud(router: Router) -> None:
    status = await router.status()
    assert not status.cloud_configured
    assert status.link_state == "down"
    assert status.rtt_s is None
    assert not status.breaker_open
    assert status.depth_by_priority == dict.fromkeys(range(1, 11), 0)
    assert status.oldest_age_s is None
    assert status.queue_bytes == 0
    assert status.queue_cap_bytes == 256 * 2**20
    assert status.budget == {"day": (None, 0, None), "month": (None, 0, None)}


async def test_unknown_tickets_and_watchers_that_end_when_the_router_closes(
    tmp_path: Path,
) -> None:
    router = await Router.open(RouterConfig(state_dir=tmp_path), CollectorRegistry())
    with pytest.raises(TicketNotFound):
        await router.result("never-issued")

    async def watch() -> list[object]:
        return [r async for r in router.watch(0)]

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.05)  # let it start waiting; not a synchronisation
    await router.close()
    assert await asyncio.wait_for(watcher, 5) == []


async def test_a_corrupt_queue_file_is_quarantined_reported_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    junk = b"this is not an SQLite database, whatever it once was " * 200
    (state / "queue.sqlite").write_bytes(junk)
    with caplog.at_level(logging.ERROR, logger="router.router"):
        router = await Router.open(RouterConfig(state_dir=state), CollectorRegistry())
    try:
        moved = list(state.glob("queue.sqlite.corrupt-*"))
        assert len(moved) == 1
        assert moved[0].read_bytes() == junk  # kept whole for a post-mortem
        assert any("corrupt" in r.message and str(moved[0]) in r.message for r in caplog.records)
        registry = router.metrics.registry
        assert (
            registry.get_sample_value(
                "edge_agent_router_quarantined_files_total", {"file": "queue"}
            )
            == 1
        )
        status = await router.status()  # a fresh queue, working
        assert status.queue_bytes == 0
    finally:
        await router.close()


async def test_rows_that_do_not_match_the_confidences_are_a_programming_error(
    router: Router,
) -> None:
    with pytest.raises(ValueError, match=r"inputs\.X"):
        await router.route(
            model="digits",
            inputs={"X": np.zeros((3, 64), dtype=np.float32)},
            local=local([0.1, 0.2]),
            wishes=CallerWishes(),
            time_left_s=None,
            request_id="",
        )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cloud_url": "http://cloud"}, "device_key"),
        ({"cloud_url": "ftp://cloud", "device_key": "k"}, "cloud_url"),
        ({"default_ttl_s": 10.0, "max_ttl_s": 5.0}, "default_ttl_s"),
        ({"drain_concurrency": 0}, "drain_concurrency"),
        ({"queue_cap_bytes": -1}, "queue_cap_bytes"),
        ({"bandwidth_cap_bytes_per_s": 1.5}, "bandwidth_cap_bytes_per_s"),
        ({"live_timeout_s": 0}, "live_timeout_s"),
        ({"full_policy": "evict_everything"}, "evict_everything"),
    ],
)
def test_config_errors_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RouterConfig(**changes)  # type: ignore[arg-type]


def test_config_paths_and_policies() -> None:
    config = RouterConfig(state_dir="/var/x", full_policy="drop_oldest_lowest")  # type: ignore[arg-type]
    assert config.queue_path == Path("/var/x/queue.sqlite")
    assert config.budget_path == Path("/var/x/budget.sqlite")
    assert config.full_policy is FullPolicy.DROP_OLDEST_LOWEST
    assert not config.cloud_configured
