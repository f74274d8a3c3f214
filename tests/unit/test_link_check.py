"""Why the cloud cannot be reached, in a word, and one log line per change of link state."""

from __future__ import annotations

import logging
import socket
import ssl

import httpx
import pytest

from router.clock import FakeClock
from router.connectivity import ConnectivityMonitor
from router.errors import CloudUnavailable
from router.link_check import failure_cause


def raised_from(error: BaseException) -> CloudUnavailable:
    """As the cloud client raises it: its own error, caused by httpx's, caused by the OS's."""
    try:
        try:
            raise httpx.ConnectError(str(error)) from error
        except httpx.ConnectError as outer:
            raise CloudUnavailable("probe failed") from outer
    except CloudUnavailable as ours:
        return ours


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (socket.gaierror(-2, "Name or service not known"), "dns"),
        (ConnectionRefusedError(111, "Connection refused"), "refused"),
        (ssl.SSLCertVerificationError("certificate verify failed"), "tls"),
        (ConnectionResetError(104, "Connection reset by peer"), "reset"),
        (TimeoutError(), "timeout"),
        (OSError("something else"), "error"),
    ],
)
def test_the_cause_is_found_under_the_wrappers(error: BaseException, cause: str) -> None:
    assert failure_cause(raised_from(error)) == cause


def test_an_answer_with_an_error_status_is_its_status() -> None:
    assert failure_cause(CloudUnavailable("not ready", status=503)) == "http 503"


def test_httpx_keeps_only_the_resolvers_words_sometimes() -> None:
    assert failure_cause(httpx.ConnectError("[Errno -2] Name or service not known")) == "dns"


async def test_one_line_per_change_of_link_state_with_its_cause_or_round_trip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    answers: list[BaseException | None] = [
        raised_from(socket.gaierror(-2, "Name or service not known")),
        raised_from(socket.gaierror(-2, "Name or service not known")),
        None,
        None,
        raised_from(ConnectionRefusedError(111, "refused")),
    ]

    async def probe() -> bool:
        error = answers.pop(0)
        if error is not None:
            raise error
        await clock.sleep(0.004)
        return True

    monitor = ConnectivityMonitor(probe, clock=clock)
    caplog.set_level(logging.INFO, logger="router.connectivity")
    while answers:  # down from the start (said once, with its cause), up twice, then down
        await monitor.probe()
        clock.advance(3600)  # past any cool-down, and out of the recent window
    refused = [raised_from(ConnectionRefusedError(111, "refused"))] * 2
    answers.extend(refused)
    await monitor.probe()  # within the window of the last failure: degraded, then down
    await monitor.probe()
    lines = [r.getMessage() for r in caplog.records if r.name == "router.connectivity"]
    assert lines == [
        "cloud link is down: dns",
        "cloud link is up, round trip 4 ms",
        "cloud link is degraded: a recent failure (refused), round trip 4 ms",
        "cloud link is down: refused",
    ]
