"""The REST transport's pure rules: its one status table, and which hosts and origins the
settings and the browser guard accept."""

from __future__ import annotations

import pytest

from edge_agent.inference import ServiceStopping
from edge_agent.rest.browser import _host_name
from edge_agent.rest.errors import (
    ForbiddenHost,
    ForbiddenOrigin,
    UnsupportedMediaType,
    http_error,
)
from edge_agent.settings import SettingsError, is_loopback, load_settings
from model_runtime import InvalidInput, ModelNotFound, RequestTooLarge, UnsupportedEncoding
from router.errors import QueueFull, TicketNotFound


class StrangeInput(InvalidInput):
    """A subclass is answered as its nearest listed ancestor."""


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidInput("X", "shape is wrong", "shape"), 400),
        (StrangeInput("X", "odd"), 400),
        (ForbiddenOrigin("https://elsewhere.example"), 403),
        (ForbiddenHost("attacker.example"), 403),
        (ModelNotFound("nope"), 404),
        (TicketNotFound("t-1"), 404),
        (RequestTooLarge(70000, 65536), 413),
        (UnsupportedEncoding("br"), 415),
        (UnsupportedMediaType("binary tensors"), 415),
        (ServiceStopping(), 503),
        (QueueFull(100, 100), 507),
    ],
)
def test_each_error_has_its_status_and_says_what_is_wrong(exc: Exception, status: int) -> None:
    error = http_error(exc)
    assert (error.status, error.message) == (status, str(exc))


def test_a_stopping_agent_says_when_to_come_back() -> None:
    assert http_error(ServiceStopping()).headers == {"Retry-After": "1"}
    assert http_error(InvalidInput("X", "bad")).headers == {}


def test_an_unexpected_error_reveals_nothing(caplog: pytest.LogCaptureFixture) -> None:
    error = http_error(RuntimeError("row 17 of patient 4411 is odd"), "kiosk-1/9")
    assert (error.status, error.message) == (500, "internal error; see the agent's log")
    assert "kiosk-1/9" in caplog.records[0].fields["request_id"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("kiosk.local", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8002", "127.0.0.1"),
        ("localhost", "localhost"),
        ("[::1]:8002", "::1"),
        ("[::1]", "::1"),
        ("attacker.example:80", "attacker.example"),
    ],
)
def test_the_name_in_a_host_header(header: str, name: str) -> None:
    assert _host_name(header) == name


def test_rest_settings_default_to_loopback_port_8002_and_no_origins() -> None:
    settings = load_settings()
    assert (settings.rest_enabled, settings.rest_host, settings.rest_port) == (
        True,
        "127.0.0.1",
        8002,
    )
    assert settings.rest_cors_origins == []


def test_origins_must_be_origins() -> None:
    good = ["https://kiosk.example.org", "http://127.0.0.1:5173", "http://[::1]:3000", "*"]
    assert load_settings(rest_cors_origins=good).rest_cors_origins == good
    for bad in ["https://kiosk.example.org/", "kiosk.example.org", "ftp://x", "null"]:
        with pytest.raises(SettingsError) as caught:
            load_settings(rest_cors_origins=[bad])
        assert caught.value.problems == [
            f"rest_cors_origins: {bad!r} is not an origin: give scheme://host[:port] with no "
            'path, such as "https://kiosk.example.org", or "*"'
        ]


def test_rest_beyond_loopback_is_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(rest_host="0.0.0.0")
    assert caught.value.problems[0].startswith("rest_host: 0.0.0.0 is beyond loopback")
