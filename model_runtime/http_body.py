"""Reading a v2 REST request body within limits: its size on the wire and after gzip, and its JSON.

Shared by the cloud gateway and the edge agent's REST API. Bodies are read chunk by chunk and
refused the moment they pass the limit, so an oversized upload costs at most the limit; gzip is
inflated with a cap on its output, so a zip bomb costs at most the decompressed limit.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from model_runtime import json_codec
from model_runtime.errors import InvalidInput, RequestTooLarge, UnsupportedEncoding

__all__ = ["BodyLimits", "parse_json_body", "read_body"]


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_body_bytes: int
    max_decompressed_bytes: int


async def read_body(
    chunks: AsyncIterator[bytes],
    *,
    content_length: str | None,
    content_encoding: str | None,
    limits: BodyLimits,
) -> tuple[bytes, int]:
    """(decompressed body, bytes on the wire). Raises RequestTooLarge as soon as it knows."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise UnsupportedEncoding(encoding)
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidInput("Content-Length", "is not an integer") from None
        if declared > limits.max_body_bytes:
            # Refuse before reading a byte of it.
            raise RequestTooLarge(declared, limits.max_body_bytes)
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if encoding != "identity" else None
    parts: list[bytes] = []
    wire = 0
    size = 0
    async for chunk in chunks:
        wire += len(chunk)
        if wire > limits.max_body_bytes:
            raise RequestTooLarge(wire, limits.max_body_bytes)
        if inflater is None:
            parts.append(chunk)
            size = wire
            if size > limits.max_decompressed_bytes:  # the limit on what is parsed, for all
                raise RequestTooLarge(size, limits.max_decompressed_bytes)
        else:
            size = _inflate(inflater, chunk, parts, size, limits.max_decompressed_bytes)
    if inflater is not None:
        size = _inflate(inflater, b"", parts, size, limits.max_decompressed_bytes)
        if not inflater.eof:
            raise InvalidInput("body", "gzip stream is truncated")
    return b"".join(parts), wire


def _inflate(
    inflater: zlib._Decompress, data: bytes, parts: list[bytes], size: int, limit: int
) -> int:
    # Never ask zlib for more than one byte past the limit: that byte proves the overflow
    # without inflating the rest of a bomb.
    try:
        while True:
            out = inflater.decompress(data, limit - size + 1)
            size += len(out)
            if size > limit:
                raise RequestTooLarge(size, limit)
            parts.append(out)
            data = inflater.unconsumed_tail
            if not data or inflater.eof:
                break
    except zlib.error as exc:
        raise InvalidInput("body", f"is not valid gzip: {exc}") from None
    if inflater.eof and inflater.unused_data:
        raise InvalidInput("body", "has bytes after the end of the gzip stream")
    return size


def parse_json_body(body: bytes) -> Any:
    """The parsed JSON of a request body; InvalidInput naming `body` when it is not JSON."""
    try:
        return json_codec.loads(body)
    except json_codec.JsonTooComplex as exc:
        raise InvalidInput("body", exc.msg) from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            "body", f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise InvalidInput("body", "is not UTF-8 text") from None
