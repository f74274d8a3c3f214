"""The REST results stream (edge_agent.rest.router_routes) on a real TicketStore: its watcher's
place comes back however the response ends, even when the client leaves before the first byte
(the stream's body never starts: only WatchStream.aclose can free the place then)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from edge_agent.rest.router_routes import _ResultEvents, _ResultStream
from router.durable_queue import DurableQueue
from router.tickets import TicketStore
from tests.unit.test_router_tickets import deliver, put

# As uvicorn serves it: a send to a client that left raises OSError.
SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}}


@pytest.fixture
async def tickets(tmp_path: Path) -> AsyncIterator[TicketStore]:
    store = TicketStore(max_watchers=1)
    queue = await DurableQueue.open(tmp_path / "q.sqlite", on_end=store.notify)
    store.attach(queue)
    yield store
    store.close()
    await queue.close()


async def disconnected() -> Message:
    return {"type": "http.disconnect"}


def stream_of(tickets: TicketStore, closing: asyncio.Event | None = None) -> _ResultStream:
    return _ResultStream(_ResultEvents(tickets.watch(0), closing or asyncio.Event(), 15.0))


async def test_a_client_gone_before_the_first_byte_gives_its_place_back(
    tickets: TicketStore,
) -> None:
    async def send(message: Message) -> None:
        raise OSError("the client went away")

    for _ in range(3):
        stream = stream_of(tickets)
        assert tickets.watchers == 1
        with pytest.raises(ClientDisconnect):
            await stream(SCOPE, disconnected, send)
        assert tickets.watchers == 0


async def test_a_client_gone_after_its_first_event_gives_its_place_back(
    tickets: TicketStore,
) -> None:
    await put(tickets, "t1")
    await deliver(tickets, "t1", 3)
    sent: list[bytes] = []

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))
        if b"event: result" in sent[-1]:
            raise OSError("the client went away after reading it")

    stream = stream_of(tickets)
    with pytest.raises(ClientDisconnect):
        await stream(SCOPE, disconnected, send)
    assert b'"ticket":"t1"' in sent[-1]
    assert tickets.watchers == 0


async def test_a_stream_ended_by_the_agent_stopping_gives_its_place_back(
    tickets: TicketStore,
) -> None:
    closing = asyncio.Event()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body", b"").startswith(b"retry:"):
            closing.set()  # the agent stops while the stream waits for its first result

    await stream_of(tickets, closing)(SCOPE, disconnected, send)
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert tickets.watchers == 0
