"""JSON bodies of the v2 REST protocol, in and out: orjson, with the standard library's rules kept
for every document that orjson alone would treat differently.

orjson parses and writes a v2 body several times faster than `json`, which matters to the gateway
at thousands of requests per second and to the router, which encodes every item it queues. Where
the two disagree, the standard library decides, so a body reads and writes exactly as with `json`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson

__all__ = ["JsonTooComplex", "dumps", "loads"]

# Digits to "0", every other byte to " ": a run of 19 zeros is then a run of 19 digits.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


class JsonTooComplex(json.JSONDecodeError):
    """Valid JSON that no v2 body needs and no parser should chase: nesting deeper than
    orjson's 1,024 levels, or an integer longer than Python converts (4,300 digits).

    A JSONDecodeError, so callers that refuse broken JSON refuse this too; `msg` is one line.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem, "", 0)


def loads(body: bytes) -> Any:
    """Parse a v2 body; raises what `json.loads` raises for input it refuses, and
    JsonTooComplex (never RecursionError or the digit-limit ValueError) for the two above."""
    if _LONG_RUN in body.translate(_DIGITS):
        # Perhaps an integer beyond 64 bits, which orjson reads as a float without a word
        # (an INT64 tensor would then hold garbage instead of getting a 400). Shortest float
        # texts have at most 17 digits, so real bodies rarely come this way.
        return _standard_loads(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _DEPTH_LIMIT in str(exc):
            # The standard parser would recurse until Python's own limit and fail with a
            # RecursionError (a 500 with a traceback); no v2 body nests this deep.
            raise JsonTooComplex(_TOO_DEEP) from None
        # orjson refuses some text `json` takes: NaN, Infinity, 1e400, lone surrogates, UTF-16.
        # The standard parser decides: such a body then meets the tensor checks that name the
        # field, as before, and truly broken JSON gets the familiar error.
        return _standard_loads(body)


_DEPTH_LIMIT = "depth limit exceeded"  # orjson's message past 1,024 levels
_TOO_DEEP = "is nested more than 1024 levels deep"


def _standard_loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise JsonTooComplex(_TOO_DEEP) from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        if "digits" not in str(exc):  # int_max_str_digits: CPython's guard against slow parses
            raise
        raise JsonTooComplex(
            f"holds an integer of more than {sys.get_int_max_str_digits()} digits"
        ) from None


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
