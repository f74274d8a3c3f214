"""The cloud requests the forwarder builds on its worker thread: the very bytes the client
sends (binary tensors, group framing, gzip), and a group's answer read for storage."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from model_runtime import json_codec
from model_runtime.errors import InvalidInput
from model_runtime.infer_group import GROUP_CONTENT_TYPE, HEADER_LENGTH, split_group_request
from model_runtime.v2_binary import binary_to_json
from model_runtime.v2_json import encode_infer_request, encode_infer_response
from router.cloud_client import encode_body
from router.forwarder import request_for, stored_group
from router.queue_schema import QueuedItem
from router.tickets import decode_result


def item(ticket: str, seed: int) -> QueuedItem:
    pixels = np.random.default_rng(seed).random((1, 64), dtype=np.float32)
    payload = encode_body(encode_infer_request({"X": pixels}, request_id=ticket))
    return QueuedItem(ticket, "digits", payload, 5, 0.0, 100.0, 1)


def test_one_item_is_its_own_infer_call_gzipped_with_its_key() -> None:
    one = item("t-1", 1)
    request = request_for([one], binary=False, compress=True)
    assert (request.method, request.path) == ("POST", "/v2/models/digits/infer")
    assert request.headers["Idempotency-Key"] == "t-1"
    assert request.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(request.payload) == one.payload
    # The same body twice is the same bytes: every attempt and redelivery sends equal bodies.
    assert request_for([one], binary=False, compress=True).payload == request.payload


def test_a_group_is_one_infer_group_call_whose_items_are_binary_when_asked() -> None:
    group = [item(f"t-{i}", i) for i in range(3)]
    request = request_for(group, binary=True, compress=False)
    assert request.path == "/v2/models/digits/infer_group"
    assert request.headers["Content-Type"] == GROUP_CONTENT_TYPE
    assert "Content-Encoding" not in request.headers
    items = split_group_request(request.payload, request.headers[HEADER_LENGTH], 10)
    assert [i.key for i in items] == ["t-0", "t-1", "t-2"]
    for sent, queued in zip(items, group, strict=True):
        assert sent.header_bytes is not None  # tensors as bytes, not JSON numbers
        as_json = json_codec.loads(binary_to_json(sent.body, sent.header_bytes))
        expected = json.loads(queued.payload)
        np.testing.assert_allclose(as_json["inputs"][0]["data"], expected["inputs"][0]["data"])
    # Gzipped, the size the forwarder pays for is the very body that goes out.
    packed = request_for(group, binary=True, compress=True)
    assert gzip.decompress(packed.payload) == request.payload


def test_a_bad_key_is_refused_before_anything_is_built() -> None:
    bad = QueuedItem("has space", "digits", item("x", 0).payload, 5, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="idempotency_key"):
        request_for([item("t-0", 0), bad], binary=False, compress=True)


def test_a_groups_answer_is_read_and_each_item_stored_or_not() -> None:
    good = encode_infer_response("digits", {"label": np.array([3], dtype=np.int64)})
    answer = {
        "items": [
            {"key": "a", "status": 200, "response": good},
            {"key": "b", "status": 503, "error": "busy"},
        ]
    }
    answers, stored = stored_group(answer, ["a", "b"])
    assert [a.status for a in answers] == [200, 503]
    assert isinstance(stored[0], bytes)
    np.testing.assert_array_equal(decode_result(stored[0])[0]["label"], [3])
    assert stored[1] is None
    with pytest.raises(InvalidInput, match=r"items\[1\]\.key"):
        stored_group(answer, ["a", "c"])
