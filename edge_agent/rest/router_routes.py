"""Tickets over HTTP, mirroring RouterService: a ticket's state and answer (GetResult), a
Server-Sent Events stream of results from a cursor (WatchResults), and the router's Status.

The stream's event ids are the cursors, so a browser's EventSource resumes where it left off
by itself: on reconnecting it sends the last id as `Last-Event-ID`, which wins over the
`after_cursor` query parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_agent.rest.convert import encode_status, encode_ticket_result
from edge_agent.rest.errors import error_response
from model_runtime import InvalidInput, json_codec
from router import Router, TicketResult

__all__ = ["RouterRoutes"]

# A comment line this often keeps proxies from closing an idle stream, and lets the agent
# notice a client that went away without a word.
HEARTBEAT_S = 15.0
# How soon a browser's EventSource reconnects after the stream ends (the agent restarting).
RECONNECT_MS = 1000


class RouterRoutes:
    def __init__(self, router: Router, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.router = router
        self.heartbeat_s = heartbeat_s
        self._closing = asyncio.Event()

    def routes(self) -> list[Route]:
        return [
            Route("/router/v1/tickets/{ticket}", self.result, name="ticket"),
            Route("/router/v1/results", self.results, name="results"),
            Route("/router/v1/status", self.status, name="status"),
        ]

    def close_streams(self) -> None:
        """End every result stream now (the agent is stopping); clients reconnect later."""
        self._closing.set()

    async def result(self, request: Request) -> Response:
        try:
            result = await self.router.result(request.path_params["ticket"])
        except Exception as exc:
            return error_response(exc)
        return Response(
            json_codec.dumps(encode_ticket_result(result)), media_type="application/json"
        )

    async def status(self, request: Request) -> Response:
        return JSONResponse(encode_status(await self.router.status()))

    async def results(self, request: Request) -> Response:
        try:
            cursor = _cursor(request)
        except InvalidInput as exc:
            return error_response(exc)
        watch = self.router.watch(cursor, tuple(request.query_params.getlist("ticket")))
        return StreamingResponse(
            self._events(watch),
            media_type="text/event-stream",
            # Every event matters and none may wait in a buffer on the way.
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _events(self, watch: AsyncIterator[TicketResult]) -> AsyncIterator[bytes]:
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        closing = asyncio.ensure_future(self._closing.wait())
        ended = asyncio.ensure_future(anext(watch))
        try:
            while True:
                done, _ = await asyncio.wait(
                    {ended, closing}, timeout=self.heartbeat_s, return_when=asyncio.FIRST_COMPLETED
                )
                if ended in done:
                    try:
                        result = ended.result()
                    except StopAsyncIteration:  # the router closed
                        return
                    yield _event(result)
                    ended = asyncio.ensure_future(anext(watch))
                elif closing in done:
                    return
                else:
                    yield b": keep-alive\n\n"
        finally:
            closing.cancel()
            ended.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await ended
            await watch.aclose()  # type: ignore[attr-defined]


def _event(result: TicketResult) -> bytes:
    data = json_codec.dumps(encode_ticket_result(result))
    return b"id: %d\nevent: result\ndata: %s\n\n" % (result.cursor, data)


def _cursor(request: Request) -> int:
    """Where the stream starts: after the last event the client saw, or `after_cursor`."""
    last_seen = request.headers.get("last-event-id")
    field, value = (
        ("Last-Event-ID", last_seen)
        if last_seen is not None
        else ("after_cursor", request.query_params.get("after_cursor", "0"))
    )
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise InvalidInput(field, f"must be an integer >= 0, got {value!r}")
    return int(value)
