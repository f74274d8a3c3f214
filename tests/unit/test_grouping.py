"""GroupPlanner: which queued items travel together, within the agent's and the cloud's bounds,
and the infer_group wire format both sides share."""

from __future__ import annotations

import pytest

from model_runtime import InvalidInput, LimitExceeded, json_codec
from model_runtime.infer_group import (
    GroupItem,
    decode_group_answer,
    encode_group_answer_item,
    encode_group_request,
    join_group_answer,
    split_group_request,
)
from router.clock import FakeClock
from router.grouping import GroupPlanner
from router.queue_schema import QueuedItem

GATEWAY = {"extensions": ["infer_group"], "infer_group": {"max_items": 6, "max_body_bytes": 4096}}


def items(n: int, *, model: str = "m", size: int = 100) -> list[QueuedItem]:
    return [QueuedItem(f"{model}-{i:03d}", model, b"x" * size, 5, 0.0, 1e9, 0) for i in range(n)]


def planner(max_items: int = 64, max_bytes: int = 65536) -> tuple[GroupPlanner, FakeClock]:
    clock = FakeClock()
    return GroupPlanner(max_items, max_bytes, clock), clock


def sizes(groups: list[list[QueuedItem]]) -> list[int]:
    return [len(g) for g in groups]


def test_one_item_per_request_until_the_cloud_says_it_takes_groups() -> None:
    plan, _ = planner()
    assert plan.needs_check()
    assert sizes(plan.plan(items(3))) == [1, 1, 1]
    plan.learn({"name": "triton", "extensions": ["binary_tensor_data"]})
    assert not plan.needs_check()
    assert sizes(plan.plan(items(3))) == [1, 1, 1]
    plan.learn(GATEWAY)
    assert sizes(plan.plan(items(14))) == [6, 6, 2]  # the cloud's max_items


def test_groups_keep_to_the_smaller_of_both_sides_bounds() -> None:
    plan, _ = planner(max_items=4)
    plan.learn(GATEWAY)
    assert sizes(plan.plan(items(9))) == [4, 4, 1]
    plan, _ = planner(max_bytes=1000)  # 100-byte bodies, 5-byte keys, 40 bytes of header each
    plan.learn(GATEWAY)
    assert sizes(plan.plan(items(14))) == [6, 6, 2]
    plan, _ = planner(max_bytes=500)
    plan.learn(GATEWAY)
    assert sizes(plan.plan(items(7))) == [3, 3, 1]
    # An item larger than the bound goes alone.
    big = items(1, size=5000)
    assert sizes(plan.plan([*items(2), *big, *items(2)])) == [2, 1, 2]


def test_each_group_holds_one_model_in_claim_order() -> None:
    plan, _ = planner()
    plan.learn(GATEWAY)
    mixed = [*items(2, model="a"), *items(3, model="b"), *items(2, model="a")]
    groups = plan.plan(mixed)
    assert [[i.model for i in g] for g in groups] == [["a"] * 4, ["b"] * 3]
    assert [i.ticket for i in groups[0]] == ["a-000", "a-001", "a-000", "a-001"]


def test_a_refused_size_halves_the_groups_and_a_refused_group_asks_again() -> None:
    plan, _clock = planner()
    plan.learn(GATEWAY)
    plan.shrink(6)
    assert plan.items_per_group == 3
    plan.shrink(6)  # two groups of 6 refused at once: still 3
    assert plan.items_per_group == 3
    plan.forget()
    assert plan.needs_check()
    assert plan.items_per_group == 1


def test_the_question_is_asked_again_later() -> None:
    plan, clock = planner()
    plan.learn(None)  # could not ask
    assert not plan.needs_check()
    clock.advance(61)
    assert plan.needs_check()
    plan.learn(GATEWAY)
    clock.advance(3599)
    assert not plan.needs_check()
    clock.advance(2)
    assert plan.needs_check()


def test_a_setting_of_one_never_asks() -> None:
    plan, _ = planner(max_items=1)
    assert not plan.needs_check()
    assert sizes(plan.plan(items(3))) == [1, 1, 1]


def test_the_wire_format_round_trips() -> None:
    group = [GroupItem("k1", b'{"a":1}'), GroupItem("k2", b"{}")]
    body, header = encode_group_request(group)
    assert split_group_request(body, str(header), 10) == group
    with pytest.raises(LimitExceeded):
        split_group_request(body, str(header), 1)
    # "²" (a latin-1 header byte) is a digit to str.isdigit but not to int(): 400, not 500
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        split_group_request(body, "\xb2", 10)
    twice = encode_group_request([group[0], GroupItem("k1", b"{}")])
    with pytest.raises(InvalidInput, match=r"items\[1\]\.key: is given twice"):
        split_group_request(twice[0], str(twice[1]), 10)
    answer = join_group_answer(
        [
            encode_group_answer_item("k1", 200, b'{"model_name":"m","outputs":[]}'),
            encode_group_answer_item("k2", 503, error="store full", retry_after=2.5),
        ]
    )
    decoded = decode_group_answer(json_codec.loads(answer), ["k1", "k2"])
    assert decoded[0].response == {"model_name": "m", "outputs": []}
    assert (decoded[1].status, decoded[1].error, decoded[1].retry_after) == (503, "store full", 2.5)
    with pytest.raises(InvalidInput, match=r"items\[0\]\.key"):
        decode_group_answer(json_codec.loads(answer), ["k2", "k1"])
