"""JSON bodies of the v2 REST protocol, in and out: orjson, with the standard library's rules kept
for every document that orjson alone would treat differently.

orjson parses and writes a v2 body several times faster than `json`, which matters to the gateway
at thousands of requests per second and to the router, which encodes every item it queues. Where
the two disagree, the standard library decides, so a body reads and writes exactly as with `json`.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads"]

# Digits to "0", every other byte to " ": a run of 19 zeros is then a run of 19 digits.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def loads(body: bytes) -> Any:
    """Parse a v2 body; raises what `json.loads` raises for input it refuses."""
    if _LONG_RUN in body.translate(_DIGITS):
        # Perhaps an integer beyond 64 bits, which orjson reads as a float without a word
        # (an INT64 tensor would then hold garbage instead of getting a 400). Shortest float
        # texts have at most 17 digits, so real bodies rarely come this way.
        return json.loads(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses some text `json` takes: NaN, Infinity, 1e400, lone surrogates, UTF-16.
        # The standard parser decides: such a body then meets the tensor checks that name the
        # field, as before, and truly broken JSON gets the familiar error.
        return json.loads(body)


def dumps(document: Any) -> bytes:
    """Compact JSON of a v2 body; ValueError for NaN or infinities, which JSON cannot hold."""
    try:
        text = orjson.dumps(document)
    except orjson.JSONEncodeError:
        text = None
    # orjson writes NaN and infinities as null; a v2 body has no null of its own, so a
    # null means the standard library must look (and refuse), or a string happened to hold it.
    if text is None or b"null" in text:
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return text
