"""Secrets never reach a log, at DEBUG, whichever logger writes the line: the agent's device key
(its own lines, httpx's and httpcore's; a password in its --cloud-url is refused, unshown) and a
password in the gateway's Redis URL (its own lines, uvicorn's, redis-py's)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import start_agent, write_device_key
from tests.integration.gateway.helpers import Gateway, infer_body, start_gateway
from tests.integration.test_audit_agent import UNSURE, X, ask
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, wait_until

pytestmark = pytest.mark.integration

SECRET = "S3cr3t-pw-4242"


def test_a_password_in_the_cloud_url_stops_the_start_without_being_shown(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    key_file = write_device_key(tmp_path, gateway)
    url = proxy.url.replace("http://", f"http://ops:{SECRET}@")
    done = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--rest-port", "0",
         "--metrics-port", "0", "--state-dir", str(tmp_path / "s"), "--log-level", "DEBUG",
         "--cloud-url", url, "--device-key-file", str(key_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cloud_url: must not carry a user name or password" in done.stderr
    assert SECRET not in done.stderr + done.stdout


def test_the_device_key_never_reaches_the_agents_log_at_debug(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    key_file = write_device_key(tmp_path, gateway)
    agent = start_agent(
        tmp_path, "--log-level", "DEBUG", "--cloud-url", proxy.url, "--device-key-file",
        str(key_file),
    )  # fmt: skip
    try:
        ask(agent, int(UNSURE[0]), escalation="always")  # a live call, then probes
        wait_until(lambda: '"logger": "httpx"' in agent.log(), what="httpx to log a request")
    finally:
        agent.stop()
    assert gateway.key not in agent.log()


def _redis_with_password(tmp_path: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it as root)")
    socket_path = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--save", "",
         "--appendonly", "no", "--requirepass", SECRET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(socket_path.exists, 10.0, what="redis-server's socket")
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return process


def test_a_redis_password_never_reaches_the_gateways_log(tmp_path: Path) -> None:
    redis = _redis_with_password(tmp_path)
    url = f"unix://:{SECRET}@{tmp_path / 'redis.sock'}"
    gw: Gateway | None = None
    try:
        gw = start_gateway(
            tmp_path / "gw", "--log-level", "debug", "--access-log", "--idempotency-store", url
        )
        with gw.client() as client:
            for i in range(3):  # answered, replayed, and one that finds Redis gone
                if i == 2:
                    redis.terminate()
                    redis.wait(10)
                response = client.post(
                    "/v2/models/digits-large/infer",
                    content=infer_body(X[:1].astype(np.float32)),
                    headers={"Idempotency-Key": "k-1", "Content-Type": "application/json"},
                )
                assert response.status_code == (200 if i < 2 else 503)
        wait_until(lambda: "ConnectionError" in gw.daemon.log() or "Redis" in gw.daemon.log())
    finally:
        if gw is not None:
            gw.daemon.stop()
        if redis.poll() is None:
            redis.terminate()
            redis.wait(10)
    log = gw.daemon.log()
    assert SECRET not in log
    assert gw.key not in log
    assert "/v2/models/digits-large/infer" in log  # uvicorn's access lines are there
    assert "idempotency store at unix://:***@" in log  # the URL was logged, masked
