"""Audit sampling on real SQLite files: which confident items are drawn (seeded), what keeps an
audit out (budget, queue cap, backlog), how agreement is counted, and that it survives a restart."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge_agent.settings import SettingsError, load_settings
from model_runtime.v2_json import encode_infer_response
from router.audit import Auditor, AuditSampler, class_of
from router.budget import DataBudget
from router.clock import FakeClock
from router.config import RouterConfig
from router.decision import PRIORITY_LEVELS, CallerWishes, Reason
from router.durable_queue import DurableQueue, FullPolicy, ItemStatus
from router.local_model import LocalAnswer
from router.router import Router
from router.tickets import TicketStore, encode_result

CONFIDENT, UNSURE, NEVER = Reason.CONFIDENT, Reason.UNSURE, Reason.ESCALATION_NEVER


def one_hot(classes: Sequence[int]) -> dict[str, np.ndarray]:
    """A classifier's outputs that give item i the class classes[i]."""
    probabilities = np.full((len(classes), 10), 0.01, dtype=np.float32)
    probabilities[np.arange(len(classes)), classes] = 0.91
    return {"probabilities": probabilities, "label": np.asarray(classes, dtype=np.int64)}


def cloud_answer(label: int) -> bytes:
    return encode_result(encode_infer_response("digits-large", one_hot([label])))


@dataclass
class Parts:
    queue: DurableQueue
    budget: DataBudget
    auditor: Auditor
    registry: CollectorRegistry
    clock: FakeClock

    def samples(self, outcome: str, model: str = "digits") -> float:
        labels = {"model": model, "outcome": outcome}
        value = self.registry.get_sample_value("edge_agent_router_audit_samples_total", labels)
        return value or 0.0

    def results(self, result: str, model: str = "digits") -> float:
        labels = {"model": model, "result": result}
        return self.registry.get_sample_value("edge_agent_router_audits_total", labels) or 0.0

    async def audit(self, classes: Sequence[int], reasons: Sequence[Reason] | None = None) -> None:
        x = np.arange(len(classes) * 4, dtype=np.float32).reshape(len(classes), 4) / 7
        reasons = reasons or [CONFIDENT] * len(classes)
        self.auditor.consider("digits", "digits-large", {"X": x}, one_hot(classes), reasons)
        await self.auditor.drain()

    async def deliver(self, labels: dict[str, int]) -> None:
        claimed = await self.queue.claim_batch(100, 1 << 20)
        for item in claimed:
            if item.ticket in labels:
                assert await self.queue.mark_delivered(
                    item.ticket, cloud_answer(labels[item.ticket])
                )
            else:
                await self.queue.release(item.ticket, "not now")
        await self.auditor.drain()

    async def close(self) -> None:
        await self.auditor.aclose()
        await self.queue.close()
        await self.budget.close()


async def open_parts(
    state: Path,
    *,
    share: float = 1.0,
    cap: int | None = None,
    policy: FullPolicy = FullPolicy.REFUSE,
    daily: int | None = None,
    max_waiting: int = 100,
    clock: FakeClock | None = None,
) -> Parts:
    clock = clock or FakeClock(1_700_000_000.0)
    registry = CollectorRegistry()
    ends: list[Auditor] = []

    def on_end(ended: Sequence[ItemStatus]) -> None:
        for auditor in ends:
            auditor.on_end(ended)

    queue = await DurableQueue.open(
        state / "queue.sqlite", clock=clock, cap_bytes=cap, full_policy=policy, on_end=on_end
    )
    budget = await DataBudget.open(state / "budget.sqlite", daily_bytes=daily, clock=clock)
    auditor = await Auditor.open(
        state / "audit.sqlite",
        queue,
        budget,
        registry,
        sampler=AuditSampler(share, random.Random(0)),
        max_waiting=max_waiting,
        ttl_s=3600.0,
        clock=clock,
    )
    ends.append(auditor)
    return Parts(queue, budget, auditor, registry, clock)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    p = await open_parts(tmp_path)
    yield p
    await p.close()


# -- which items are drawn ----------------------------------------------------------------------


def test_share_zero_never_audits_and_share_one_audits_every_confident_item() -> None:
    reasons = [CONFIDENT, UNSURE, NEVER, CONFIDENT, Reason.NO_CLOUD_CONFIGURED] * 200
    assert AuditSampler(0.0, random.Random(1)).pick(reasons) == []
    picked = AuditSampler(1.0, random.Random(1)).pick(reasons)
    # never an item the caller asked not to escalate, nor one that was escalated anyway
    assert picked == [i for i, r in enumerate(reasons) if r is CONFIDENT]


def test_a_seeded_sampler_draws_about_its_share_and_repeats_itself() -> None:
    reasons = [CONFIDENT] * 10_000
    first = AuditSampler(0.1, random.Random(42)).pick(reasons)
    assert 850 <= len(first) <= 1150  # 10,000 x 0.1 within 5 standard deviations (30 each)
    assert AuditSampler(0.1, random.Random(42)).pick(reasons) == first
    assert AuditSampler(0.1, random.Random(43)).pick(reasons) != first


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), "0.1"])
def test_a_share_outside_zero_to_one_is_refused_by_name(share: object) -> None:
    with pytest.raises(ValueError, match="share"):
        AuditSampler(share)  # type: ignore[arg-type]


def test_class_of_reads_scores_first_then_the_label() -> None:
    scores = np.asarray([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=np.float32)
    assert [
        class_of({"label": np.asarray([2, 2]), "probabilities": scores}, i) for i in (0, 1)
    ] == [
        1,
        0,
    ]
    assert class_of({"logits": np.log(scores)}, 0) == 1
    # a float output of another shape is no class score
    assert (
        class_of({"embedding": np.zeros((2, 1), np.float32), "label": np.asarray([4, 5])}, 1) == 5
    )
    assert class_of({"label": np.asarray([b"cat"], dtype=np.object_)}) == "cat"
    assert class_of({"label": np.asarray([3.0])}) == 3
    assert class_of({"boxes": np.zeros((1, 4, 4), np.float32)}) is None


# -- queueing an audit --------------------------------------------------------------------------


async def test_an_audit_is_queued_after_the_answer_at_the_lowest_priority(parts: Parts) -> None:
    x = np.asarray([[0.25, 0.5, 0.125, 1.0]], dtype=np.float32)
    parts.auditor.consider("digits", "digits-large", {"X": x}, one_hot([3]), [CONFIDENT])
    # consider() only drew it: nothing is stored until the background task runs
    assert (await parts.queue.stats()).depth_by_priority[PRIORITY_LEVELS] == 0
    await parts.auditor.drain()
    (item,) = await parts.queue.claim_batch(10, 1 << 20)
    assert item.ticket.startswith("audit-")
    assert item.priority == PRIORITY_LEVELS == 10  # Triton's order: the least urgent level
    assert item.model == "digits-large"
    body = json.loads(item.payload)
    assert body["id"] == item.ticket
    assert body["inputs"][0]["name"] == "X"
    np.testing.assert_array_equal(np.asarray(body["inputs"][0]["data"], np.float32), x[0])
    assert parts.samples("queued") == 1
    assert parts.auditor.waiting == 1


async def test_no_audit_when_the_budget_would_not_allow_it(tmp_path: Path) -> None:
    parts = await open_parts(tmp_path, daily=1_000)
    try:
        await parts.budget.record(900)
        await parts.audit([3])
        assert parts.samples("budget") == 1
        assert parts.samples("queued") == 0
        assert await parts.queue.claim_batch(10, 1 << 20) == []
    finally:
        await parts.close()


@pytest.mark.parametrize("policy", list(FullPolicy))
async def test_an_audit_never_pushes_a_request_out_of_the_queue(
    tmp_path: Path, policy: FullPolicy
) -> None:
    parts = await open_parts(tmp_path, cap=4_000, policy=policy)
    try:
        # real requests at the least urgent level nearly fill the cap: an audit would not fit,
        # so the drop policy would drop the oldest of them to make room (refuse: refuse it)
        for i in range(5):
            await parts.queue.enqueue(
                f"real-{i}", "digits-large", b"x" * 500, priority=PRIORITY_LEVELS, ttl_s=60
            )
        assert parts.queue.used_bytes > 4_000 - 300
        await parts.audit([3, 4])
        assert parts.samples("queue_full") == 2
        assert parts.samples("queued") == 0
        stats = await parts.queue.stats()
        assert stats.depth_by_priority[PRIORITY_LEVELS] == 5
        assert stats.ended["dropped"] == 0
        assert parts.auditor.waiting == 0
    finally:
        await parts.close()


async def test_audits_beyond_the_backlog_limit_are_skipped(tmp_path: Path) -> None:
    parts = await open_parts(tmp_path, max_waiting=2)
    try:
        await parts.audit([1, 2, 3])
        assert (parts.samples("queued"), parts.samples("backlog")) == (2, 1)
        assert (await parts.queue.stats()).depth_by_priority[PRIORITY_LEVELS] == 2
    finally:
        await parts.close()


async def test_an_answer_without_a_class_is_not_audited(parts: Parts) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    outputs = {"boxes": np.zeros((1, 4, 4), dtype=np.float32)}
    parts.auditor.consider("detector", "detector-large", {"X": x}, outputs, [CONFIDENT])
    await parts.auditor.drain()
    assert parts.samples("no_class", model="detector") == 1
    assert await parts.queue.claim_batch(10, 1 << 20) == []


# -- comparing with the cloud's answer ----------------------------------------------------------


async def test_agreement_is_counted_per_model_when_the_cloud_answers(parts: Parts) -> None:
    await parts.audit([3, 5, 7, 9])
    claimed = await parts.queue.claim_batch(10, 1 << 20)
    # row i's first input is 4i/7: it tells which audit is which
    row_of = {
        c.ticket: round(json.loads(c.payload)["inputs"][0]["data"][0] * 7 / 4) for c in claimed
    }
    ticket = {row: t for t, row in row_of.items()}
    for c in claimed:
        await parts.queue.release(c.ticket, "later")
    # the cloud agrees on rows 0 and 2, not on row 1; row 3 expires unanswered
    await parts.deliver({ticket[0]: 3, ticket[1]: 4, ticket[2]: 7})
    parts.clock.advance(3601)
    assert await parts.queue.expire_due() == [ticket[3]]
    await parts.auditor.drain()
    counts = [parts.results(r) for r in ("agree", "disagree", "expired", "incomparable")]
    assert counts == [2, 1, 1, 0]
    assert parts.results("agree", model="other") == 0
    assert parts.auditor.waiting == 0


async def test_an_answer_the_class_cannot_be_read_from_is_incomparable(parts: Parts) -> None:
    await parts.audit([1])
    (item,) = await parts.queue.claim_batch(10, 1 << 20)
    boxes = {"boxes": np.zeros((1, 4, 4), dtype=np.float32)}
    await parts.queue.mark_delivered(item.ticket, encode_result(encode_infer_response("m", boxes)))
    await parts.auditor.drain()
    assert parts.results("incomparable") == 1


async def test_the_edges_answer_survives_a_restart(tmp_path: Path) -> None:
    parts = await open_parts(tmp_path)
    await parts.audit([6])
    (item,) = await parts.queue.claim_batch(10, 1 << 20)
    await parts.auditor.aclose()  # the agent stops; the answer arrives while nobody listens
    assert await parts.queue.mark_delivered(item.ticket, cloud_answer(6))
    await parts.queue.close()
    await parts.budget.close()

    again = await open_parts(tmp_path, share=0.0)
    try:
        assert again.auditor.waiting == 1
        await again.auditor.settle_left_over()
        assert again.results("agree") == 1
        assert again.auditor.waiting == 0
        await again.auditor.settle_left_over()  # nothing is counted twice
        assert again.results("agree") == 1
    finally:
        await again.close()


async def test_an_audit_whose_queue_item_vanished_is_counted_lost(tmp_path: Path) -> None:
    parts = await open_parts(tmp_path / "a")
    await parts.audit([2])
    await parts.close()
    # the same audit file beside a queue that never held the item
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "audit.sqlite").rename(tmp_path / "b" / "audit.sqlite")
    again = await open_parts(tmp_path / "b")
    try:
        await again.auditor.settle_left_over()
        assert again.results("lost") == 1
        assert again.auditor.waiting == 0
    finally:
        await again.close()


async def test_an_audit_is_queued_while_the_queue_is_under_half_its_cap(tmp_path: Path) -> None:
    parts = await open_parts(tmp_path, cap=4_000)
    try:
        await parts.queue.enqueue("real", "digits-large", b"x" * 500, priority=5, ttl_s=60)
        await parts.audit([3])
        assert parts.samples("queued") == 1
    finally:
        await parts.close()


# -- what the rest of the router makes of audits ------------------------------------------------


async def test_watchers_never_see_audit_items(tmp_path: Path) -> None:
    store = TicketStore()
    queue = await DurableQueue.open(tmp_path / "queue.sqlite", on_end=store.notify)
    store.attach(queue)
    try:
        for ticket in ("audit-1", "t1", "audit-2", "t2"):
            await queue.enqueue(ticket, "digits-large", b"{}", ttl_s=60)
        for item in await queue.claim_batch(10, 1 << 20):
            await queue.mark_delivered(item.ticket, cloud_answer(1))
        seen = []
        async with asyncio.timeout(5):
            async for result in store.watch(0):
                seen.append(result)
                if len(seen) == 2:
                    break
        assert [r.ticket for r in seen] == ["t1", "t2"]
        assert seen[-1].cursor == 4  # the cursor moved past the audits
    finally:
        store.close()
        await queue.close()


async def test_items_are_counted_by_model_and_route_and_no_audit_without_a_cloud(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    router = await Router.open(RouterConfig(state_dir=tmp_path, audit_share=1.0), registry)
    try:
        assert router.audit is None  # nothing to compare with
        local = LocalAnswer(one_hot([1, 2, 3]), np.asarray([0.9, 0.1, 0.95]), 0.5, "digits-large")
        x = np.zeros((3, 4), dtype=np.float32)
        await router.route(
            model="digits", inputs={"X": x}, local=local, wishes=CallerWishes(),
            time_left_s=None, request_id="r",
        )  # fmt: skip
        value = registry.get_sample_value(
            "edge_agent_router_model_routes_total", {"model": "digits", "route": "edge"}
        )
        assert value == 3
        assert not (tmp_path / "audit.sqlite").exists()
    finally:
        await router.close()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"audit_share": 1.5}, "audit_share"),
        ({"audit_share": -0.01}, "audit_share"),
        ({"audit_max_waiting": 0}, "audit_max_waiting"),
        ({"hard_examples_retention_s": -1.0}, "hard_examples_retention_s"),
        ({"hard_examples_retention_s": float("inf")}, "hard_examples_retention_s"),
        ({"hard_examples_cap_bytes": -1}, "hard_examples_cap_bytes"),
    ],
)
def test_config_errors_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RouterConfig(**changes)  # type: ignore[arg-type]


def test_agent_settings_are_off_by_default_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    # (their way into RouterConfig is shown end to end by the integration tests, which set them
    # in the environment of a real agent; edge_agent.app is not imported here, as its gRPC stubs
    # clash with tritonclient's in one process)
    defaults = load_settings()
    assert (defaults.audit_share, defaults.hard_examples_retention_days) == (0.0, 0.0)
    monkeypatch.setenv("EDGE_AGENT_AUDIT_SHARE", "0.05")
    monkeypatch.setenv("EDGE_AGENT_HARD_EXAMPLES_RETENTION_DAYS", "2")
    settings = load_settings()
    assert (settings.audit_share, settings.hard_examples_retention_days) == (0.05, 2.0)
    with pytest.raises(SettingsError, match="audit_share"):
        load_settings(audit_share=1.5)
    with pytest.raises(SettingsError, match="hard_examples_retention_days"):
        load_settings(hard_examples_retention_days=-1)
