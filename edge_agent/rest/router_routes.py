"""Tickets over HTTP, mirroring RouterService: a ticket's state and answer (GetResult), a
Server-Sent Events stream of results from a cursor (WatchResults), and the router's Status.

The stream's event ids are the cursors, so a browser's EventSource resumes where it left off
by itself: on reconnecting it sends the last id as `Last-Event-ID`, which wins over the
`after_cursor` query parameter. A caller sees only its own results: those it queued (with the
same `client_id` query parameter as the request's `client_id` parameter, if it gave one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edge_agent.access import CLIENT_ID_PARAMETER, check_client_id
from edge_agent.rest.auth import caller_of
from edge_agent.rest.convert import encode_status, encode_ticket_result
from edge_agent.rest.errors import error_response
from model_runtime import InvalidInput, json_codec
from router import Router, TicketResult, WatchStream

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
            result = await self.router.result(request.path_params["ticket"], owner=_owner(request))
        except Exception as exc:
            return error_response(exc)
        return Response(
            json_codec.dumps(encode_ticket_result(result)), media_type="application/json"
        )

    async def status(self, request: Request) -> Response:
        return JSONResponse(encode_status(await self.router.status()))

    async def results(self, request: Request) -> Response:
        try:
            tickets = tuple(request.query_params.getlist("ticket"))
            # Refused here, before the first byte, when over the cap of watchers.
            watch = self.router.watch(_cursor(request), tickets, owner=_owner(request))
        except Exception as exc:
            return error_response(exc)
        return _ResultStream(_ResultEvents(watch, self._closing, self.heartbeat_s))


class _ResultEvents:
    """One stream's events: the router's watch, read one result ahead, with heartbeats."""

    def __init__(self, watch: WatchStream, closing: asyncio.Event, heartbeat_s: float) -> None:
        self._watch = watch
        self._next: asyncio.Task[TicketResult] | None = None
        self._closing = closing
        self._heartbeat_s = heartbeat_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while True:
                if self._next is None:
                    self._next = asyncio.ensure_future(anext(self._watch))
                done, _ = await asyncio.wait(
                    {self._next, closing},
                    timeout=self._heartbeat_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if self._next in done:
                    read, self._next = self._next, None
                    try:
                        result = read.result()
                    except StopAsyncIteration:  # the router closed
                        return
                    yield _event(result)
                elif closing in done:
                    return
                else:
                    yield b": keep-alive\n\n"
        finally:
            closing.cancel()

    async def close(self) -> None:
        """Stop the read ahead and give the watcher's place back, whether or not the stream
        ever began (WatchStream.aclose frees it either way)."""
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
        await self._watch.aclose()


class _ResultStream(StreamingResponse):
    """A results stream whose watcher is released however the response ends: sent whole,
    cut by the client (as it hangs up: under uvicorn's ASGI 2.3, StreamingResponse listens
    for `http.disconnect`), or never begun."""

    def __init__(self, events: _ResultEvents) -> None:
        # Every event matters and none may wait in a buffer on the way.
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.close()


def _event(result: TicketResult) -> bytes:
    data = json_codec.dumps(encode_ticket_result(result))
    return b"id: %d\nevent: result\ndata: %s\n\n" % (result.cursor, data)


def _owner(request: Request) -> str:
    client_id = check_client_id(request.query_params.get(CLIENT_ID_PARAMETER))
    return caller_of(request).owner(client_id)


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
