"""Gateway workers held in their start-up (the fault point gateway.worker_start): one killed
there is replaced at once, and a SIGTERM to the supervisor then stops the gateway at once."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

WORKERS = 2
BOUND_S = 15.0
"""Well under the supervisor's health-check timeout (60 s), which bounded both before."""


@contextlib.contextmanager
def held_gateway(tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    """A gateway whose every worker holds in its start-up until the file yielded exists; the
    supervisor and every worker are stopped afterwards, whatever the test did."""
    release = tmp_path / "release"
    env = {
        "CLOUD_GATEWAY_FAULTS": "gateway.worker_start:1:hold",
        "CLOUD_GATEWAY_FAULTS_RELEASE": str(release),
    }
    # Ready once its ports are reported: no worker can answer before the release.
    gw = start_gateway(tmp_path, "--workers", str(WORKERS), env=env, ready=lambda d: True)
    try:
        yield gw, release
    finally:
        release.touch()
        process = gw.daemon.process
        if process.poll() is None:
            # Stopped first, so that it starts no worker after the list is read.
            process.send_signal(signal.SIGSTOP)
            for pid in gw.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            gw.daemon.kill()


def holding(gw: Gateway) -> set[int]:
    """The supervisor's live workers whose start-up holds (each says so in the log)."""
    held = {int(pid) for pid in re.findall(r"process (\d+) holding until", gw.daemon.log())}
    return held & set(gw.worker_pids())


def in_health_check(gw: Gateway) -> bool:
    # The supervisor's main thread waits in poll(2) only for a worker's answer to a health
    # check; between checks it sleeps on a futex (threading.Event.wait).
    pid = gw.daemon.process.pid
    return "poll" in Path(f"/proc/{pid}/task/{pid}/wchan").read_text()


def held_and_pinged(gw: Gateway) -> set[int]:
    wait_until(
        lambda: len(holding(gw)) == WORKERS and in_health_check(gw),
        30.0,
        what="every worker holding and the supervisor waiting on a health check",
    )
    return holding(gw)


def test_a_worker_killed_while_starting_is_replaced_at_once(tmp_path: Path) -> None:
    with held_gateway(tmp_path) as (gw, release):
        victims = held_and_pinged(gw)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        try:
            wait_until(
                lambda: len(set(gw.worker_pids()) - victims) == WORKERS,
                BOUND_S,
                what="new workers in place of the killed ones",
            )
        except TimeoutError:
            raise AssertionError(gw.daemon.log()[-4000:]) from None
        release.touch()
        wait_until(
            lambda: httpx.get(gw.url + "/v2/health/ready").status_code == 200,
            30.0,
            what="the new workers to serve",
        )
        assert len(gw.worker_pids()) == WORKERS
        assert gw.metric("cloud_gateway_worker_replacements_total") == WORKERS
        assert gw.daemon.stop() == 0, gw.daemon.log()[-4000:]


def test_sigterm_while_workers_start_stops_the_gateway_at_once(tmp_path: Path) -> None:
    with held_gateway(tmp_path) as (gw, _):
        workers = held_and_pinged(gw)
        gw.daemon.process.send_signal(signal.SIGTERM)
        assert gw.daemon.process.wait(BOUND_S) == 0, gw.daemon.log()[-4000:]
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
