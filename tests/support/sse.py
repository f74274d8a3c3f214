"""A Server-Sent Events client for tests: reads a stream in a thread into a queue, as a
browser's EventSource would parse it (https://html.spec.whatwg.org/#event-stream-interpretation).
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from dataclasses import dataclass
from types import TracebackType

import httpx

__all__ = ["Event", "EventStream"]


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    data: str
    id: str | None


class EventStream:
    """GET `url` as an event stream; `events` fills as they arrive. Close it (or use `with`)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.comments = 0
        self._client = httpx.Client(timeout=httpx.Timeout(10.0, read=None))
        request = self._client.build_request("GET", url, headers=headers)
        self.response = self._client.send(request, stream=True)
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind, data, last_id = "message", [], None
        try:
            for line in self.response.iter_lines():
                if not line:
                    if data:
                        self.events.put(Event(kind, "\n".join(data), last_id))
                    kind, data = "message", []
                elif line.startswith(":"):
                    self.comments += 1
                else:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "event":
                        kind = value
                    elif field == "data":
                        data.append(value)
                    elif field == "id":
                        last_id = value
        except httpx.HTTPError:  # closed by the test, or the server went away
            pass
        finally:
            self.ended.set()

    def close(self) -> None:
        """Hang up at once, as a browser closing the page does. Closing the socket alone would
        not: while the reading thread waits in recv() on it, Linux keeps the connection open
        (no FIN) until that recv returns, i.e. until the server's next heartbeat."""
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # the server hung up first
                sock.shutdown(socket.SHUT_RDWR)
        self.ended.wait(timeout=10)
        self.response.close()
        self._client.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
