"""uvicorn's multi-worker supervisor with a health check that ends when its worker dies or the
supervisor is asked to exit, rather than only when the worker answers or the timeout passes.
It counts the workers it replaces."""

from __future__ import annotations

import pickle
import time
from socket import socket
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter
from uvicorn.config import Config
from uvicorn.supervisors import Multiprocess, multiprocess

__all__ = ["GatewaySupervisor", "WorkerProcess", "worker_replacements"]

SLICE_S = 0.2
"""How often a health check still waiting looks whether its worker died or a signal came."""


def worker_replacements(registry: CollectorRegistry) -> Counter:
    """`cloud_gateway_worker_replacements_total` in `registry`: its own function so the alert
    rules' checks see the name the supervisor exports."""
    return Counter(
        "cloud_gateway_worker_replacements",
        "Workers the supervisor replaced because they died or stopped answering its health "
        "check (not those a SIGHUP restarts).",
        registry=registry,
    )


class WorkerProcess(multiprocess.Process):
    """A worker whose health check waits in slices, so that a dead worker or a signal to the
    supervisor ends it; a live worker that is slow to start still gets the whole timeout."""

    supervisor: ClassVar[Multiprocess | None] = None
    """The one supervisor of this process while it runs (a class attribute, as uvicorn makes
    the workers; not pickled with a worker, which has no use for it)."""
    _ping_unanswered = False

    def interrupted(self) -> bool:
        """Whether the supervisor has a signal to handle or is exiting."""
        supervisor = self.supervisor
        return supervisor is not None and (
            bool(supervisor.signal_queue) or supervisor.should_exit.is_set()
        )

    def _healthcheck(self, timeout: float) -> bool | None:
        # uvicorn 0.55's own check sends a ping, then waits for the answer for the whole
        # timeout on a pipe whose other end the supervisor also holds: a worker that dies
        # before its answering thread starts (during its imports) goes unnoticed for that long,
        # and the supervisor neither replaces workers nor handles signals meanwhile. The
        # signature and return values are uvicorn's: None (no answer, the worker is replaced),
        # else whether its server has started.
        deadline = time.monotonic() + timeout
        try:
            if not self._ping_unanswered:
                # One ping at a time: an answer that comes after an interrupted wait answers it.
                self.parent_conn.send(b"ping")
                self._ping_unanswered = True
            while True:
                remaining = deadline - time.monotonic()
                if self.parent_conn.poll(max(0.0, min(SLICE_S, remaining))):
                    self._ping_unanswered = False
                    started: bool = self.parent_conn.recv()
                    return started
                if not self.process.is_alive() or remaining <= 0:
                    return None
                if self.interrupted():
                    # Alive as far as anyone knows: the supervisor's loop handles the signal
                    # and asks again later (or exits).
                    return False
        except (OSError, EOFError, pickle.UnpicklingError):
            return None


class GatewaySupervisor(Multiprocess):
    """uvicorn's Multiprocess, its workers WorkerProcess; the workers it replaces are counted
    on `registry` (the supervisor's own, beside the workers' multiprocess files)."""

    def __init__(self, config: Config, sockets: list[socket], registry: CollectorRegistry) -> None:
        super().__init__(config, sockets)
        self.replacements = worker_replacements(registry)

    def keep_subprocess_alive(self) -> None:
        before = list(self.processes)
        super().keep_subprocess_alive()
        self.replacements.inc(
            sum(old is not new for old, new in zip(before, self.processes, strict=True))
        )

    def run(self) -> None:
        # Multiprocess makes its workers through the module's name `Process` (in
        # init_processes, restart_all, keep_subprocess_alive and handle_ttin, uvicorn 0.55):
        # pointing that name at WorkerProcess for this run reaches all four without copying
        # them. tests/unit/test_gateway_supervisor.py fails if uvicorn stops doing so.
        original = multiprocess.Process
        multiprocess.Process = WorkerProcess  # type: ignore[misc]
        WorkerProcess.supervisor = self
        try:
            super().run()
        finally:
            multiprocess.Process = original  # type: ignore[misc]
            WorkerProcess.supervisor = None
