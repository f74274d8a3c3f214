"""The `infer_group` extension of v2 REST: several inference requests, each under its own
Idempotency-Key, in one HTTP request to `POST /v2/models/{name}[/versions/{v}]/infer_group`.

Why: on a metered link a queued 64-pixel digit costs ~190 bytes of gzip body and ~380 bytes of
request line and headers; sent one per request, headers are two thirds of the bill. A group pays
for one set of headers and gzips its items together, so what they share compresses away.

Request body (before Content-Encoding), as the v2 binary tensor extension frames a body: a JSON
header of `Inference-Header-Content-Length` bytes, then each item's body back to back:

    {"items":[{"key":"<Idempotency-Key>","bytes":<n>}, ...]}<item 1: n bytes><item 2>...

Each item body is byte for byte the body its single request would carry (a v2 JSON inference
request, or one in the binary tensor extension, whose JSON header's length the entry gives as
`header_bytes`), so the server fingerprints and runs it exactly as if it had come alone: once
per key, whichever group, or none, brings it again.

Answer (200 whenever the group itself could be read; a group-wide problem gets the usual v2
error body and status), one entry per item, in order:

    {"items":[{"key":"k1","status":200,"response":{...v2 response...}},
              {"key":"k2","status":400,"error":"X: ...","retry_after":1.5}, ...]}

An item's `status` is what its single request would have got (a replayed answer is 200 with the
response parameter `idempotent_replay`); `retry_after`, in seconds, comes with 409 and 503.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model_runtime import json_codec
from model_runtime.errors import InvalidInput, LimitExceeded

__all__ = [
    "GROUP_CONTENT_TYPE",
    "GROUP_EXTENSION",
    "HEADER_LENGTH",
    "GroupItem",
    "GroupItemAnswer",
    "decode_group_answer",
    "encode_group_answer_item",
    "encode_group_request",
    "join_group_answer",
    "split_group_request",
]

GROUP_EXTENSION = "infer_group"
"""Listed in the server metadata's `extensions` by servers that take groups."""
HEADER_LENGTH = "Inference-Header-Content-Length"
GROUP_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class GroupItem:
    """One request of a group: its Idempotency-Key and its v2 JSON body."""

    key: str
    body: bytes
    header_bytes: int | None = None
    """For a body in the binary tensor extension: its JSON header's length."""


@dataclass(frozen=True, slots=True)
class GroupItemAnswer:
    """What the server answered for one item: `response` (a parsed v2 response) for a 200,
    else `error`, and `retry_after` seconds when it asks for a later retry."""

    key: str
    status: int
    response: dict[str, Any] | None = None
    error: str = ""
    retry_after: float | None = None


def encode_group_request(items: Sequence[GroupItem]) -> tuple[bytes, int]:
    """The group's body and its JSON header's length (`Inference-Header-Content-Length`)."""
    entries = [
        {"key": i.key, "bytes": len(i.body)}
        if i.header_bytes is None
        else {"key": i.key, "bytes": len(i.body), "header_bytes": i.header_bytes}
        for i in items
    ]
    header = json_codec.dumps({"items": entries})
    return header + b"".join(i.body for i in items), len(header)


def split_group_request(body: bytes, header_length: str | None, max_items: int) -> list[GroupItem]:
    """The items of a group body; InvalidInput naming the header or `items[i]` when it is not
    one, and when it holds more than `max_items` items (checked before any item is read)."""
    if (
        header_length is None
        or not (header_length.isascii() and header_length.isdigit())
        or int(header_length) > len(body)
    ):
        raise InvalidInput(
            HEADER_LENGTH, f"must be the length of the group's JSON header, at most {len(body)}"
        )
    size = int(header_length)
    try:
        header = json_codec.loads(body[:size])
    except ValueError as exc:
        raise InvalidInput("header", f"is not JSON: {exc}") from None
    entries = header.get("items") if isinstance(header, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("items", "must be a non-empty JSON array of {key, bytes}")
    if len(entries) > max_items:
        raise LimitExceeded(
            "items",
            f"{len(entries)} items, over the limit of {max_items} per request",
            "items_per_request",
        )
    items: list[GroupItem] = []
    keys: set[str] = set()
    offset = size
    for i, entry in enumerate(entries):
        key = entry.get("key") if isinstance(entry, dict) else None
        n = entry.get("bytes") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"items[{i}].key", "must be a non-empty string")
        if key in keys:
            raise InvalidInput(f"items[{i}].key", "is given twice in the group")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1 or offset + n > len(body):
            raise InvalidInput(
                f"items[{i}].bytes", f"must be a length >= 1 within the body's {len(body)} bytes"
            )
        header_bytes = entry.get("header_bytes")
        if header_bytes is not None and (
            not isinstance(header_bytes, int)
            or isinstance(header_bytes, bool)
            or not 0 < header_bytes <= n
        ):
            raise InvalidInput(
                f"items[{i}].header_bytes", f"must be a length within the item's {n} bytes"
            )
        keys.add(key)
        items.append(GroupItem(key, body[offset : offset + n], header_bytes))
        offset += n
    if offset != len(body):
        raise InvalidInput("body", f"holds {len(body) - offset} bytes after the last item")
    return items


def encode_group_answer_item(
    key: str,
    status: int,
    response: bytes | None = None,
    error: str = "",
    retry_after: float | None = None,
) -> bytes:
    """One entry of the answer's `items`; `response` is the item's v2 JSON answer, spliced in
    as it is (an answer replayed from the store is not parsed again)."""
    if response is not None:
        return b'{"key":' + json_codec.dumps(key) + b',"status":200,"response":' + response + b"}"
    entry: dict[str, Any] = {"key": key, "status": status, "error": error}
    if retry_after is not None:
        entry["retry_after"] = retry_after
    return json_codec.dumps(entry)


def join_group_answer(entries: Sequence[bytes]) -> bytes:
    return b'{"items":[' + b",".join(entries) + b"]}"


def decode_group_answer(answer: Mapping[str, Any], keys: Sequence[str]) -> list[GroupItemAnswer]:
    """The per-item answers of a parsed group answer, checked against the `keys` sent, in
    order; InvalidInput if the answer is not one for them."""
    entries = answer.get("items")
    if not isinstance(entries, list) or len(entries) != len(keys):
        raise InvalidInput("items", f"must be an array of {len(keys)} answers, one per item")
    out: list[GroupItemAnswer] = []
    for i, (entry, key) in enumerate(zip(entries, keys, strict=True)):
        if not isinstance(entry, dict) or entry.get("key") != key:
            raise InvalidInput(f"items[{i}].key", f"must be the key sent in that place, {key!r}")
        status = entry.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise InvalidInput(f"items[{i}].status", "must be an HTTP status code")
        response = entry.get("response")
        if status == 200 and not isinstance(response, dict):
            raise InvalidInput(f"items[{i}].response", "must be a v2 response object")
        retry_after = entry.get("retry_after")
        out.append(
            GroupItemAnswer(
                key,
                status,
                response if status == 200 else None,
                str(entry.get("error", "")),
                float(retry_after) if isinstance(retry_after, int | float) else None,
            )
        )
    return out
