"""TLS on the agent's cloud link: a private CA and a client certificate (mTLS), against the real
gateway behind a TLS terminator that requires a client certificate; certificates made here
with trustme.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.conftest import start_agent, write_device_key
from tests.integration.gateway.helpers import DEVICE, Gateway
from tests.integration.test_agent_router import UNSURE, ask, params, status
from tests.support.processes import wait_until
from tests.support.tls_terminator import TlsTerminator


@pytest.fixture
def cloud_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def terminator(gateway: Gateway, cloud_ca: trustme.CA) -> Iterator[TlsTerminator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cloud_ca.issue_cert("localhost").configure_cert(context)
    cloud_ca.configure_trust(context)  # clients need a certificate of the same CA
    context.verify_mode = ssl.CERT_REQUIRED
    with TlsTerminator(gateway.daemon.ports["http"], context) as t:
        yield t


def write(tmp_path: Path, name: str, blob: trustme.Blob) -> str:
    path = tmp_path / name
    blob.write_to_path(str(path))
    path.chmod(0o600)
    return str(path)


def test_the_agent_escalates_over_mtls_with_a_private_ca(
    tmp_path: Path, gateway: Gateway, cloud_ca: trustme.CA, terminator: TlsTerminator
) -> None:
    device = cloud_ca.issue_cert(f"{DEVICE}.devices", common_name=DEVICE)
    key_file = write_device_key(tmp_path, gateway)
    agent = start_agent(
        tmp_path,
        "--cloud-url", terminator.url,
        "--device-key-file", str(key_file),
        "--cloud-ca-file", write(tmp_path, "ca.pem", cloud_ca.cert_pem),
        "--cloud-client-cert", write(tmp_path, "device.pem", device.cert_chain_pems[0]),
        "--cloud-client-key", write(tmp_path, "device-key.pem", device.private_key_pem),
        # A handshake on a busy machine may take longer than the 2 s live and 5 s probe limits.
        "--live-timeout-seconds", "60",
        env={"EDGE_AGENT_PROBE_TIMEOUT_SECONDS": "60"},
    )  # fmt: skip
    try:
        # The start-up probe is the first handshake: the link is up once it passed.
        wait_until(
            lambda: status(agent).link_state == "up", timeout=120, what="the link to come up"
        )
        p = params(ask(agent, int(UNSURE[0]), escalation="always"))
        assert (p["route"], p["reason"]) == ("cloud", "escalation_always")
    finally:
        agent.stop()
    assert DEVICE in terminator.client_names  # the device showed its certificate


def test_without_the_private_ca_the_cloud_is_not_trusted(
    tmp_path: Path, gateway: Gateway, terminator: TlsTerminator
) -> None:
    key_file = write_device_key(tmp_path, gateway)
    agent = start_agent(tmp_path, "--cloud-url", terminator.url, "--device-key-file", str(key_file))
    try:
        p = params(ask(agent, int(UNSURE[0]), escalation="always"))
    finally:
        agent.stop()
    # The system's CAs do not know the terminator's: no answer from it (the first call or the
    # first probe, whichever came first, failed its handshake), so the request waits.
    assert p["route"] == "queue"
    assert p["reason"] in ("cloud_failed", "link_down")
    assert terminator.client_names == []  # no connection got past the handshake
