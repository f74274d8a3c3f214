"""Gzip responses for the clients that ask for them, at no cost to the clients that don't.

Starlette's GZipMiddleware compresses; this layer hands it only the requests whose
`Accept-Encoding` names gzip. The others (most devices: their answers are small) skip its
per-request header parsing, a few percent of a request's CPU at full load, and still get the
`Vary: Accept-Encoding` that GZipMiddleware would have put on a compressible answer.
"""

from __future__ import annotations

from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GzipWhenAsked"]

_VARY = (b"vary", b"Accept-Encoding")


class GzipWhenAsked:
    def __init__(self, app: ASGIApp, *, minimum_size: int, compresslevel: int) -> None:
        self._app = app
        self._minimum_size = minimum_size
        # Only JSON is served: no content types to exclude, none to check per response.
        self._gzip = GZipMiddleware(
            app, minimum_size=minimum_size, compresslevel=compresslevel, exclude_content_types=()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if _accepts_gzip(scope["headers"]):
            await self._gzip(scope, receive, send)
            return
        minimum_size = self._minimum_size

        async def send_plain(message: Message) -> None:
            if message["type"] == "http.response.start":
                length = _content_length(message.get("headers", ()))
                if length is None or length >= minimum_size:
                    # An answer this large would have been compressed for another client.
                    message = {**message, "headers": [*message.get("headers", ()), _VARY]}
            await send(message)

        await self._app(scope, receive, send_plain)


def _accepts_gzip(headers: list[tuple[bytes, bytes]]) -> bool:
    # As GZipMiddleware decides: the first Accept-Encoding, gzip anywhere in it.
    for name, value in headers:
        if name == b"accept-encoding":
            return b"gzip" in value
    return False


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None
