"""The infer_group extension on a real gateway: each item run once per key whichever group (or
single request) brings it, answers per item, a bad item failing alone, the request limits
holding for the group as a whole; and a request's tensors as bytes (the v2 binary tensor
extension), which is the same request as its JSON."""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from model_runtime import json_codec
from model_runtime.infer_group import (
    GROUP_EXTENSION,
    HEADER_LENGTH,
    GroupItem,
    decode_group_answer,
    encode_group_request,
)
from model_runtime.v2_binary import BINARY_EXTENSION, json_to_binary
from model_runtime.v2_json import encode_infer_request
from tests.integration.gateway.helpers import UNLIMITED_RATE, Gateway, infer_body, module_gateway

pytestmark = pytest.mark.integration

MODEL = "digits-large"
GROUP = f"/v2/models/{MODEL}/{GROUP_EXTENSION}"
INFER = f"/v2/models/{MODEL}/infer"
MAX_ITEMS = 8


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {**UNLIMITED_RATE, "CLOUD_GATEWAY_MAX_ITEMS_PER_REQUEST": str(MAX_ITEMS)}
    yield from module_gateway(tmp_path_factory, "gateway", env=env)


def item(x: np.ndarray, key: str | None = None) -> GroupItem:
    """One digit's request as the agent queues it (compact JSON: the JSON the binary
    extension's bytes read back as)."""
    key = key or str(uuid.uuid4())
    return GroupItem(key, json_codec.dumps(encode_infer_request({"X": x[None, :]}, request_id=key)))


def post_group(gw: Gateway, items: list[GroupItem], **headers: str) -> httpx.Response:
    body, header_length = encode_group_request(items)
    with gw.client() as c:
        return c.post(
            GROUP,
            content=gzip.compress(body),
            headers={
                "Content-Encoding": "gzip",
                HEADER_LENGTH: str(header_length),
                **headers,
            },
        )


def answers(response: httpx.Response, items: list[GroupItem]) -> list[Any]:
    assert response.status_code == 200, response.text
    return decode_group_answer(response.json(), [i.key for i in items])


def replayed(answer: Any) -> bool:
    return bool(answer.response.get("parameters", {}).get("idempotent_replay"))


def runs(gw: Gateway) -> float:
    return gw.metric("cloud_gateway_model_runs_total", model=MODEL, outcome="ok")


def test_server_metadata_names_the_extension_and_its_limits(gateway: Gateway) -> None:
    with gateway.client() as c:
        meta = c.get("/v2").json()
    assert GROUP_EXTENSION in meta["extensions"]
    assert meta[GROUP_EXTENSION]["max_items"] == MAX_ITEMS
    assert meta[GROUP_EXTENSION]["max_body_bytes"] > 0


def test_each_item_answers_as_its_single_request_would(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0]
    items = [item(x[i]) for i in range(4)]
    got = answers(post_group(gateway, items), items)
    with gateway.client() as c:
        for one, answer in zip(items, got, strict=True):
            alone = c.post(INFER, content=infer_body(x[items.index(one)][None, :]))
            assert answer.status == 200
            assert answer.response is not None
            assert answer.response["id"] == one.key
            assert answer.response["outputs"] == alone.json()["outputs"]


def test_a_retried_group_of_another_composition_runs_each_item_once(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0]
    a, b, c, d, e, f = (item(x[10 + i]) for i in range(6))
    before = runs(gateway)
    first = answers(post_group(gateway, [a, b, c, d]), [a, b, c, d])
    assert runs(gateway) - before == 4
    # The same items again, some of them, with new ones, in another order.
    second = answers(post_group(gateway, [c, e, a, f]), [c, e, a, f])
    assert runs(gateway) - before == 6  # e and f only
    assert [replayed(s) for s in second] == [True, False, True, False]
    for old, new in ((first[2], second[0]), (first[0], second[2])):
        assert old.response["outputs"] == new.response["outputs"]  # type: ignore[index]
    # And alone, under the same key: replayed too.
    with gateway.client() as client:
        alone = client.post(INFER, content=b.body, headers={"Idempotency-Key": b.key})
    assert alone.headers["Idempotency-Replayed"] == "true"
    assert alone.json()["outputs"] == first[1].response["outputs"]  # type: ignore[index]
    assert runs(gateway) - before == 6


def test_an_item_first_sent_alone_is_replayed_in_a_group(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0]
    a, b = item(x[20]), item(x[21])
    with gateway.client() as client:
        first = client.post(INFER, content=a.body, headers={"Idempotency-Key": a.key})
    before = runs(gateway)
    got = answers(post_group(gateway, [a, b]), [a, b])
    assert runs(gateway) - before == 1
    assert got[0].response["outputs"] == first.json()["outputs"]  # type: ignore[index]
    assert got[0].response["parameters"]["idempotent_replay"] is True  # type: ignore[index]


def test_concurrent_groups_sharing_items_run_each_once(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0]
    shared = [item(x[30 + i]) for i in range(3)]
    groups = [[*shared, item(x[40 + g])] for g in range(4)]
    before = runs(gateway)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda g: post_group(gateway, g), groups))
    for g, r in zip(groups, responses, strict=True):
        assert all(a.status == 200 for a in answers(r, g))
    assert runs(gateway) - before == 3 + 4


def test_a_bad_item_fails_alone(gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    x = heldout[0]
    good = [item(x[50]), item(x[51])]
    wrong_shape = GroupItem(str(uuid.uuid4()), infer_body(x[52][None, :60]))
    not_json = GroupItem(str(uuid.uuid4()), b"{not json")
    reused = GroupItem(good[0].key, infer_body(x[53][None, :]))  # its key, another body
    answers(post_group(gateway, [good[0]]), [good[0]])
    before = runs(gateway)
    items = [wrong_shape, good[1], not_json]
    got = answers(post_group(gateway, items), items)
    assert [a.status for a in got] == [400, 200, 400]
    assert "X: shape [1, 60]" in got[0].error
    assert "not valid JSON" in got[2].error
    assert runs(gateway) - before == 1
    got = answers(post_group(gateway, [reused]), [reused])
    assert got[0].status == 422
    assert gateway.metric("cloud_gateway_group_items_total", code="400") >= 2
    assert gateway.metric("cloud_gateway_group_items_total", code="422") >= 1


def test_the_group_is_limited_as_the_batch_of_its_items(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0]
    refused = gateway.metric("cloud_gateway_limit_refusals_total", limit="items_per_request")
    too_many = [item(x[60 + i]) for i in range(MAX_ITEMS + 1)]
    before = runs(gateway)
    response = post_group(gateway, too_many)
    assert response.status_code == 413
    assert f"over the limit of {MAX_ITEMS}" in response.json()["error"]
    # Items of several rows each: the rows add up.
    batch = [GroupItem(str(uuid.uuid4()), infer_body(x[70 + 3 * i : 73 + 3 * i])) for i in range(3)]
    response = post_group(gateway, batch)
    assert response.status_code == 413
    assert "9 items" in response.json()["error"]
    assert runs(gateway) == before
    assert (
        gateway.metric("cloud_gateway_limit_refusals_total", limit="items_per_request")
        == refused + 2
    )


@pytest.mark.parametrize(
    ("header", "body", "field"),
    [
        (None, b'{"items":[]}', HEADER_LENGTH),
        ("12", b'{"items":[]}', "items"),
        ("33", b'{"items":[{"key":"k","bytes":5}]}12345678', "body"),
        ("33", b'{"items":[{"key":"k","bytes":9}]}12345', "items[0].bytes"),
    ],
)
def test_a_malformed_group_is_refused_whole_naming_the_field(
    gateway: Gateway, header: str | None, body: bytes, field: str
) -> None:
    headers = {} if header is None else {HEADER_LENGTH: header}
    with gateway.client() as c:
        response = c.post(GROUP, content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{field}:"), response.text


def test_a_group_answer_is_json_with_one_entry_per_item(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    items = [item(heldout[0][90 + i]) for i in range(2)]
    response = post_group(gateway, items)
    document = json_codec.loads(response.content)
    assert [e["key"] for e in document["items"]] == [i.key for i in items]


# -- the binary tensor extension ---------------------------------------------------------------


def test_a_request_as_bytes_or_as_json_is_one_request(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    x = heldout[0]
    with gateway.client() as c:
        assert BINARY_EXTENSION in c.get("/v2").json()["extensions"]
    a, b = item(x[100]), item(x[101])
    binary, header_length = json_to_binary(a.body)
    before = runs(gateway)
    with gateway.client() as c:
        as_json = c.post(INFER, content=a.body, headers={"Idempotency-Key": a.key})
        as_bytes = c.post(
            INFER,
            content=binary,
            headers={"Idempotency-Key": a.key, HEADER_LENGTH: str(header_length)},
        )
    assert as_bytes.status_code == 200, as_bytes.text
    assert as_bytes.headers["Idempotency-Replayed"] == "true"  # not 422: the same request
    assert as_bytes.json()["outputs"] == as_json.json()["outputs"]
    # In a group, as bytes first; then alone as JSON: replayed.
    got = answers(post_group(gateway, [GroupItem(b.key, *json_to_binary(b.body))]), [b])
    with gateway.client() as c:
        again = c.post(INFER, content=b.body, headers={"Idempotency-Key": b.key})
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["outputs"] == got[0].response["outputs"]  # type: ignore[index]
    assert runs(gateway) - before == 2


def test_bytes_that_do_not_add_up_get_400_naming_the_field(
    gateway: Gateway, heldout: tuple[np.ndarray, np.ndarray]
) -> None:
    binary, header_length = json_to_binary(item(heldout[0][102]).body)
    with gateway.client() as c:
        short = c.post(INFER, content=binary[:-4], headers={HEADER_LENGTH: str(header_length)})
    assert short.status_code == 400
    assert short.json()["error"].startswith("X.parameters.binary_data_size:")
