"""The fault proxy in a process of its own, driven from the test's process through a socket.

`FaultProxy` runs on a thread of the process that starts it, and holds that process's GIL while
it slices, throttles and delays; here that work cannot slow what the test measures beside it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Self

from tests.support.fault_proxy import ConnectionFault, FaultProxy, Phase, ProxyEnds, SeenRequest
from tests.support.processes import process_cpu_seconds

__all__ = ["FaultProxyProcess"]

_STOP = "stop"
_ROOT = Path(__file__).resolve().parents[2]


class FaultProxyProcess(ProxyEnds):
    """A `FaultProxy` in a child process, with the methods the fault matrix uses.

    Each call is sent over a socket pair and waited for (a fraction of a millisecond), as a call
    into `FaultProxy`'s own thread is; its logs (`requests`, `hits`) are copied back when read.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: Connection | None = None
        self._lock = threading.Lock()

    def start(self) -> Self:
        ours, theirs = socket.socketpair()
        # A plain child (python -m), not multiprocessing: no resource tracker outlives the tests.
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), *map(str, self.target)],
            cwd=_ROOT,
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self._pipe = Connection(ours.detach())
        if not self._pipe.poll(30):
            self.close()
            raise TimeoutError("the fault proxy's process did not start within 30 s")
        self.port = self._pipe.recv()
        return self

    def close(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            with contextlib.suppress(OSError, EOFError, TimeoutError):
                self._call(_STOP)
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        if self._pipe is not None:
            self._pipe.close()
        self._process = None

    def cpu_seconds(self) -> float:
        """The CPU time (user and system) the proxy's process has used so far."""
        assert self._process is not None, "not started"
        return process_cpu_seconds(self._process.pid)

    # --- what the fault matrix calls --------------------------------------------------------

    def at(self, phase: Phase | str, change: str) -> None:
        self._call("at", Phase(phase), change)

    def on(self, fault: ConnectionFault | str, phase: Phase | str) -> None:
        self._call("on", ConnectionFault(fault), Phase(phase))

    def restore(self) -> None:
        self._call("restore")

    def forget(self) -> None:
        """Empty the logs (`requests`, `hits`), so that a proxy can serve another test."""
        self._call("forget")

    @property
    def close_delay_s(self) -> float:
        value: float = self._call("get", "close_delay_s")
        return value

    @close_delay_s.setter
    def close_delay_s(self, seconds: float) -> None:
        self._call("set", "close_delay_s", seconds)

    @property
    def requests(self) -> list[SeenRequest]:
        seen: list[SeenRequest] = self._call("get", "requests")
        return seen

    @property
    def hits(self) -> list[tuple[str, Phase, str | None]]:
        hits: list[tuple[str, Phase, str | None]] = self._call("get", "hits")
        return hits

    def _call(self, name: str, *args: Any) -> Any:
        assert self._pipe is not None, "not started"
        with self._lock:
            self._pipe.send((name, args))
            if not self._pipe.poll(15):
                raise TimeoutError(f"the fault proxy's process did not answer {name!r} in 15 s")
            failed, value = self._pipe.recv()
        if failed:
            raise value
        return value


def _serve(pipe: Connection, target_host: str, target_port: int) -> None:
    """The child process: a FaultProxy, and the calls from the socket applied to it in turn."""
    with FaultProxy(target_host, target_port) as proxy:
        pipe.send(proxy.port)
        while True:
            try:
                name, args = pipe.recv()
            except EOFError:  # the test's process is gone
                return
            if name == _STOP:
                pipe.send((False, None))
                return
            try:
                value = _apply(proxy, name, args)
            except Exception as error:  # handed back to the caller, raised there
                pipe.send((True, error))
            else:
                pipe.send((False, value))


def _apply(proxy: FaultProxy, name: str, args: tuple[Any, ...]) -> Any:
    if name == "get":
        value = getattr(proxy, args[0])
        # a copy taken at once: the proxy's thread may append to its logs while they pickle
        return list(value) if isinstance(value, list) else value
    if name == "set":
        setattr(proxy, args[0], args[1])
        return None
    if name == "forget":
        proxy.requests.clear()
        proxy.hits.clear()
        return None
    return getattr(proxy, name)(*args)


if __name__ == "__main__":
    fd, host, port = sys.argv[1:]
    _serve(Connection(int(fd)), host, int(port))
