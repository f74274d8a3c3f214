"""Why the cloud cannot be reached, in a word an operator acts on, and a step-by-step check of
the link (`edge-agent config check --probe-cloud`): resolve, connect, authenticate.

Causes: `dns` (the host name does not resolve), `refused` (nothing listens there), `timeout`,
`tls` (handshake or certificate), `reset` (the connection was cut), `http <status>` (the cloud
answered, with an error: 401 and 403 mean the device key is refused), `error` (anything else).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from router.errors import CloudError

__all__ = ["LinkStep", "check_link", "failure_cause"]


def failure_cause(error: BaseException) -> str:
    """The cause of a failed probe or call, from the error and the errors it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CloudError) and current.status is not None:
            return f"http {current.status}"
        if isinstance(current, socket.gaierror):
            return "dns"
        if isinstance(current, ssl.SSLError):
            return "tls"
        if isinstance(current, ConnectionRefusedError):
            return "refused"
        if isinstance(current, ConnectionResetError | BrokenPipeError):
            return "reset"
        if isinstance(current, TimeoutError | httpx.TimeoutException):
            return "timeout"
        text = str(current)
        # httpcore keeps the resolver's words but not always the gaierror itself.
        if "Name or service not known" in text or "name resolution" in text:
            return "dns"
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
            return "tls"
        current = current.__cause__ or current.__context__
    return "error"


@dataclass(frozen=True, slots=True)
class LinkStep:
    """One step of reaching the cloud: what was tried, whether it worked, and what was seen."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}: {self.detail}"


async def check_link(url: str, device_key: str | None, *, timeout_s: float) -> list[LinkStep]:
    """Resolve the host of `url`, connect (TLS too for https) and ask for readiness, then ask
    with the device key; stops at the first step that fails."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    steps: list[LinkStep] = []
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
            timeout_s,
        )
    except (OSError, TimeoutError) as exc:
        steps.append(LinkStep("resolve", False, f"{host}: {_words(exc)}"))
        return steps
    addresses = sorted({str(info[4][0]) for info in infos})
    steps.append(LinkStep("resolve", True, f"{host} is {', '.join(addresses)}"))

    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout_s) as http:
        started = time.monotonic()
        try:
            ready = await http.get("/v2/health/ready")
        except httpx.HTTPError as exc:
            steps.append(LinkStep("connect", False, f"{host}:{port}: {_words(exc)}"))
            return steps
        ms = (time.monotonic() - started) * 1000
        ok = ready.status_code == 200
        said = "ready" if ok else f"answered {ready.status_code}"
        steps.append(LinkStep("connect", ok, f"{host}:{port} {said} in {ms:.0f} ms"))
        if not ok:
            return steps
        if device_key is None:
            steps.append(LinkStep("authenticate", False, "no device key (device_key_file)"))
            return steps
        try:
            answer = await http.get("/v2", headers={"Authorization": f"Bearer {device_key}"})
        except httpx.HTTPError as exc:
            steps.append(LinkStep("authenticate", False, _words(exc)))
            return steps
        if answer.status_code == 200:
            steps.append(LinkStep("authenticate", True, "the device key is accepted"))
        elif answer.status_code in (401, 403):
            steps.append(
                LinkStep(
                    "authenticate",
                    False,
                    f"the cloud refuses the device key ({answer.status_code}): "
                    "check device_key_file, or issue a new key (cloud-gateway keys add)",
                )
            )
        else:
            steps.append(LinkStep("authenticate", False, f"answered {answer.status_code}"))
    return steps


_WORDS = {
    "dns": "the name does not resolve",
    "refused": "connection refused (nothing listens there)",
    "timeout": "no answer in time",
    "tls": "TLS handshake or certificate failed",
    "reset": "the connection was reset",
}


def _words(error: BaseException) -> str:
    cause = failure_cause(error)
    return _WORDS.get(cause, f"{type(error).__name__}: {error}")
