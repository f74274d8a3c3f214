"""The slow link of tests/support/slow_link.py: it carries no more than its rate, it goes away
afterwards, and a real agent drains a backlog through it to a real gateway, in groups.

The agent runs in the edge namespace on its own loopback; the gateway in the cloud namespace,
bound to the link's address. Between two hosts the agent's plain http:// is allowed explicitly
(`allow_plain_http`, as an operator would for a gateway behind a private link): TLS is beside the
point here, and what the data budget counts (HTTP messages) is the same with or without it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model_runtime.demo import HELDOUT
from router.config import QUEUE_FILE
from tests.integration.conftest import start_agent, write_device_key
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.integration.router.helpers import queue_backlog
from tests.support.processes import Daemon, wait_until
from tests.support.slow_link import (
    CLOUD_ADDRESS,
    SlowLink,
    SlowLinkError,
    open_slow_link,
    unavailable,
)

pytestmark = pytest.mark.integration

RATE_BIT_S = 256_000


def make_link(rate_bit_s: int) -> SlowLink:
    why = unavailable()
    if why is not None:
        pytest.skip(why)
    try:
        return open_slow_link(rate_bit_s)
    except SlowLinkError as exc:
        pytest.skip(f"this machine cannot make a slow link: {exc}")


@pytest.fixture(scope="module")
def link() -> Iterator[SlowLink]:
    made = make_link(RATE_BIT_S)
    yield made
    made.close()


RECEIVER = """
import socket, sys, time
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen()
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
got, first = 0, None
while data := conn.recv(65536):
    first = first or time.monotonic()
    got += len(data)
print(got, time.monotonic() - first, flush=True)
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as s:
    s.sendall(b"x" * int(sys.argv[3]))
"""


def test_the_link_carries_no_more_than_its_rate(link: SlowLink) -> None:
    n = 96_000  # 3 s at 256 kbit/s
    receiver = subprocess.Popen(
        link.command("cloud", [sys.executable, "-c", RECEIVER, CLOUD_ADDRESS]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        port = receiver.stdout.readline().strip()
        link.run("edge", [sys.executable, "-c", SENDER, CLOUD_ADDRESS, port, str(n)])
        got, seconds = receiver.stdout.readline().split()
    finally:
        receiver.kill()
        receiver.wait()
        if receiver.stdout is not None:
            receiver.stdout.close()
    assert int(got) == n
    # From the first byte to the last: never faster than the rate allows (the shaper's burst
    # and one packet in flight aside); slower only by TCP/IP headers and a busy machine.
    assert float(seconds) >= (n - 3000 - 1500) / link.rate_bytes_s


def test_the_namespaces_go_away_afterwards() -> None:
    made = make_link(64_000)
    names = (made.edge, made.cloud)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(name in listed for name in names)
    made.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)


def metrics(link: SlowLink, side: str, daemon: Daemon) -> dict[tuple[str, str], float]:
    """`name` and its labels as JSON -> value, read from inside the daemon's namespace."""
    text = link.fetch(side, f"http://127.0.0.1:{daemon.ports['metrics']}/metrics")
    return {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(values: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    return sum(
        value
        for (n, found), value in values.items()
        if n == name and labels.items() <= json.loads(found).items()
    )


def delivered(state: Path) -> int:
    # Read-only beside the running agent, as `edge-agent queue status` reads it.
    with sqlite3.connect(f"file:{state / QUEUE_FILE}?mode=ro", uri=True) as db:
        (n,) = db.execute("SELECT count(*) FROM items WHERE state = 'delivered'").fetchone()
    return int(n)


@pytest.fixture
def cloud(link: SlowLink, tmp_path: Path) -> Iterator[Gateway]:
    gateway = start_gateway(
        tmp_path / "cloud",
        "--host",
        CLOUD_ADDRESS,
        prefix=link.command("cloud", []),
        ready=lambda d: (
            "live"
            in link.fetch("cloud", f"http://{CLOUD_ADDRESS}:{d.ports['http']}/v2/health/live")
        ),
    )
    yield gateway
    gateway.daemon.stop()


async def test_an_agent_drains_a_backlog_through_the_link_in_groups(
    link: SlowLink, cloud: Gateway, tmp_path: Path
) -> None:
    workdir = tmp_path / "edge"
    pixels = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
    tickets = await queue_backlog(workdir / "state", pixels[:200])
    key_file = write_device_key(workdir, cloud)
    started = time.monotonic()
    agent = start_agent(
        workdir,
        "--cloud-url", f"http://{CLOUD_ADDRESS}:{cloud.daemon.ports['http']}",
        "--device-key-file", str(key_file),
        env={"EDGE_AGENT_ALLOW_PLAIN_HTTP": "true"},
        ready=None,
        prefix=link.command("edge", []),
    )  # fmt: skip
    try:
        wait_until(lambda: delivered(workdir / "state") == len(tickets), 60, what="the backlog")
        seconds = time.monotonic() - started
        edge = metrics(link, "edge", agent)
        gateway = metrics(link, "cloud", cloud.daemon)
    finally:
        agent.stop()
    # Every item once, in groups of up to 64 (drain_group_items): 4 requests where one per item
    # would have been 200.
    assert total(gateway, "cloud_gateway_model_runs_total", outcome="ok") == len(tickets)
    assert total(gateway, "cloud_gateway_requests_total", endpoint="infer_group") <= 8
    assert total(gateway, "cloud_gateway_requests_total", endpoint="infer") == 0
    sent = total(edge, "edge_agent_router_cloud_sent_bytes_total", path="drain")
    assert sent / len(tickets) < 0.4 * 577  # issue 15: 577 bytes per item, one per request
    # 200 items in one request each would have taken 200 x 577 bytes / 32 kB/s = 3.6 s on the
    # wire alone; the whole run (start-up included) is a bound, not a measure.
    assert seconds > sent / link.rate_bytes_s
