"""The gateway's worker health check: a live worker gets the whole timeout, a dead one or a
signal to the supervisor ends it early; and the uvicorn internals it relies on are still there."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.supervisors import multiprocess

from cloud_gateway.supervisor import GatewaySupervisor, WorkerProcess


@dataclass
class FakeProcess:
    alive: bool = True

    def is_alive(self) -> bool:
        return self.alive


@dataclass
class FakeSupervisor:
    signal_queue: list[int] = field(default_factory=list)
    should_exit: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def worker() -> Iterator[WorkerProcess]:
    # A real worker's pipe, its process (never started) replaced by one the test rules.
    w = WorkerProcess(uvicorn.Config(app=None), [])
    w.process = FakeProcess()  # type: ignore[assignment]
    yield w
    w.parent_conn.close()
    w.child_conn.close()
    WorkerProcess.supervisor = None


def answer(worker: WorkerProcess, started: bool) -> threading.Thread:
    """The worker's side: receive one ping, answer it."""

    def pong() -> None:
        worker.child_conn.recv()
        worker.child_conn.send(started)

    thread = threading.Thread(target=pong)
    thread.start()
    return thread


def test_the_answer_is_whether_the_server_has_started(worker: WorkerProcess) -> None:
    answer(worker, False).join(0)
    assert worker._healthcheck(30) is False
    answer(worker, True).join(0)
    assert worker.is_ready(30)


def test_a_live_worker_that_does_not_answer_gets_the_whole_timeout(worker: WorkerProcess) -> None:
    started = time.monotonic()
    assert worker._healthcheck(0.7) is None
    assert time.monotonic() - started >= 0.7


def test_a_worker_that_dies_while_it_is_asked_ends_the_check(worker: WorkerProcess) -> None:
    def die() -> None:
        assert worker.child_conn.poll(30)  # the ping is out: the check is waiting
        worker.process.alive = False  # type: ignore[attr-defined]

    thread = threading.Thread(target=die)
    thread.start()
    started = time.monotonic()
    assert worker._healthcheck(30) is None
    assert time.monotonic() - started < 10  # not the 30 s a live worker would get
    thread.join()


def test_a_signal_to_the_supervisor_ends_the_check_and_the_worker_is_kept(
    worker: WorkerProcess,
) -> None:
    supervisor = FakeSupervisor(signal_queue=[signal.SIGTERM])
    WorkerProcess.supervisor = supervisor  # type: ignore[assignment]
    started = time.monotonic()
    assert worker.ping(30)  # alive as far as anyone knows: not replaced
    assert time.monotonic() - started < 10
    # The late answer answers the next check, which sends no second ping.
    assert worker.child_conn.recv() == b"ping"
    worker.child_conn.send(True)
    supervisor.signal_queue.clear()
    assert worker._healthcheck(30) is True
    assert not worker.child_conn.poll(0)


def test_every_worker_the_supervisor_makes_is_a_worker_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pins the uvicorn internals cloud_gateway.supervisor relies on (uvicorn 0.55): the
    # method it overrides, and Multiprocess making workers through the module's name Process.
    assert "_healthcheck" in vars(multiprocess.Process)
    for name in ("start", "terminate", "join"):
        monkeypatch.setattr(WorkerProcess, name, lambda self: None)
    handlers = {sig: signal.getsignal(sig) for sig in multiprocess.SIGNALS}
    try:
        supervisor = GatewaySupervisor(uvicorn.Config(app=None, workers=2), [], CollectorRegistry())
        supervisor.should_exit.set()  # run makes the workers, then stops at once
        supervisor.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert [type(p) for p in supervisor.processes] == [WorkerProcess, WorkerProcess]
    assert multiprocess.Process is not WorkerProcess  # put back after the run
    assert WorkerProcess.supervisor is None
