"""The REST transport's pure rules: its one status table, and which hosts and origins the
settings and the browser guard accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.access import AccessDenied
from edge_agent.inference import ServiceStopping
from edge_agent.rest.browser import _host_name
from edge_agent.rest.errors import (
    ForbiddenHost,
    ForbiddenOrigin,
    UnsupportedMediaType,
    http_error,
)
from edge_agent.rest.server import certificate_name
from edge_agent.settings import SettingsError, is_loopback, load_settings
from model_runtime import (
    InvalidInput,
    LimitExceeded,
    ModelNotFound,
    RequestTooLarge,
    UnsupportedEncoding,
)
from router.errors import QueueFull, TicketNotFound, TooManyWatchers


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
        (TooManyWatchers(1024), 503),
        (AccessDenied("missing", "this agent needs credentials"), 401),
        (LimitExceeded("X", "too many items", "items_per_request"), 413),
        (QueueFull(100, 100), 507),
    ],
)
def test_each_error_has_its_status_and_says_what_is_wrong(exc: Exception, status: int) -> None:
    error = http_error(exc)
    assert (error.status, error.message) == (status, str(exc))


def test_refusals_say_when_to_come_back_and_how_to_authenticate() -> None:
    assert http_error(ServiceStopping()).headers == {"Retry-After": "1"}
    assert http_error(TooManyWatchers(1)).headers == {"Retry-After": "5"}
    assert http_error(InvalidInput("X", "bad")).headers == {}
    missing = http_error(AccessDenied("missing", "needs credentials")).headers
    assert missing == {"WWW-Authenticate": 'Bearer realm="edge-agent"'}
    unknown = http_error(AccessDenied("unknown", "unknown token")).headers
    assert unknown == {"WWW-Authenticate": 'Bearer realm="edge-agent", error="invalid_token"'}


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
        (problem,) = caught.value.problems
        assert problem.startswith(
            f"rest_cors_origins: {bad!r} is not an origin: give scheme://host[:port] with no "
            'path, such as "https://kiosk.example.org", or "*"'
        )


def test_rest_beyond_loopback_needs_tokens_or_insecure(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(rest_host="0.0.0.0")
    assert caught.value.problems[0].startswith("rest_host: 0.0.0.0 is beyond loopback")
    tokens = tmp_path / "tokens"
    assert load_settings(rest_host="0.0.0.0", token_file=tokens).rest_host == "0.0.0.0"
    assert load_settings(rest_host="0.0.0.0", insecure=True).rest_host == "0.0.0.0"
    assert load_settings(rest_host="0.0.0.0", rest_enabled=False).rest_host == "0.0.0.0"
    tls = {f"tls_{k}": tmp_path / k for k in ("cert_file", "key_file", "client_ca_file")}
    assert load_settings(rest_host="0.0.0.0", **tls).rest_host == "0.0.0.0"


def test_the_name_in_a_client_certificate() -> None:
    subject = ((("countryName", "KE"),), (("commonName", "kiosk-1"),))
    assert certificate_name({"subject": subject}) == "kiosk-1"
    alternative = {
        "subject": ((("organizationName", "Clinic"),),),
        "subjectAltName": (("DNS", "k.clinic"),),
    }
    assert certificate_name(alternative) == "k.clinic"
    assert certificate_name({}) is None
    assert certificate_name(None) is None
