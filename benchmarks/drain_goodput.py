"""Drain goodput: how much of the forwarder's bandwidth cap carries queued requests to the cloud.

A real `cloud-gateway` sits behind the fault proxy, which throttles the link to `link` bytes per
second each way and adds `rtt/2` of delay each way. N held-out digits are queued on disk while
the link is down (the way an outage leaves them); then a Router opens with
`bandwidth_cap_bytes_per_s = cap` and its forwarder drains them. The window runs from the moment
the link is seen up to the last delivery (as a watcher hears of it), so the first probe and the
wait for the last answer (about one call, 0.2-0.5 s) count against the figures.

What counts as payload. Each queued item is its own HTTP request (its own Idempotency-Key, so
the cloud runs it once whatever happens), and a request cannot reach the cloud without its
request line and headers: for a 64-pixel digit those are about as large as the gzip body. So:

- `cap used %`: bytes of the requests that delivered items (request line + headers + gzip body,
  each delivered item counted once), less the bucket's initial burst (it starts full, and that
  allowance is not pacing) / (cap x window). This is what the forwarder controls: idle gaps,
  waits, retries and probes all lower it. Target >= 90 %.
- `body share %`: the gzip bodies alone / (cap x window): the part that is the items' data,
  for a reader who counts headers as overhead; with bodies this small it is about half.
- `link up %` / `link down %`: everything the proxy carried to / from the cloud (probes and
  responses included) / (link x window).

    .venv/bin/python benchmarks/drain_goodput.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import print_table, until_delivered  # beside this script

from model_runtime.demo import HELDOUT
from model_runtime.v2_json import encode_infer_request
from router import DurableQueue, LinkState, MonitorConfig, Router, RouterConfig
from router.cloud_client import encode_body
from router.config import QUEUE_FILE
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.fault_proxy import FaultProxy

CLOUD_MODEL = "digits-large"


@dataclass(frozen=True)
class Case:
    link: int
    """Bytes per second each way, as the proxy lets them through."""
    cap: int
    """The forwarder's bandwidth cap, bytes per second."""
    rtt_s: float
    concurrency: int
    seconds: float
    """Roughly how long the drain should take: sets the number of items."""


async def queue_items(path: Path, rows: np.ndarray) -> int:
    """Queue one request per row, as the router would; the total of their gzip bodies."""
    queue = await DurableQueue.open(path)
    body_bytes = 0
    try:
        for row in rows:
            ticket = str(uuid.uuid4())
            body = encode_body(encode_infer_request({"X": row[None, :]}, request_id=ticket))
            body_bytes += len(gzip.compress(body, mtime=0))
            await queue.enqueue(ticket, CLOUD_MODEL, body, ttl_s=3600)
    finally:
        await queue.close()
    return body_bytes


async def drain(case: Case, gateway: Gateway, rows: np.ndarray, state: Path) -> dict[str, float]:
    body_bytes = await queue_items(state / QUEUE_FILE, rows)
    with FaultProxy("127.0.0.1", gateway.daemon.ports["http"]) as proxy:
        proxy.throttle(case.link)
        proxy.delay(case.rtt_s / 2)
        config = RouterConfig(
            cloud_url=proxy.url,
            device_key=gateway.key,
            state_dir=state,
            bandwidth_cap_bytes_per_s=case.cap,
            drain_concurrency=case.concurrency,
            # One request per item, as the figures in BENCHMARKS.md were measured; groups are
            # benchmarks/metered_link.py's.
            drain_group_items=1,
            monitor=MonitorConfig(probe_interval_s=30.0),
        )
        registry = CollectorRegistry()
        router = await Router.open(config, registry)
        try:
            assert router.monitor is not None
            up_at: list[float] = []
            router.monitor.add_listener(
                lambda s: up_at.append(time.monotonic()) if s is not LinkState.DOWN else None
            )
            await until_delivered(router, len(rows))
            end = time.monotonic()
            window = end - up_at[0]
            sent = registry.get_sample_value(
                "edge_agent_router_cloud_sent_bytes_total", {"path": "drain"}
            )
            attempts = registry.get_sample_value(
                "edge_agent_router_cloud_attempts_total", {"path": "drain", "outcome": "ok"}
            )
        finally:
            await router.close()
        up, down = proxy.bytes_to_target, proxy.bytes_to_client
    assert sent is not None
    burst = case.cap * config.bandwidth_burst_s
    assert attempts == len(rows), "every attempt should have delivered an item"
    return {
        "items": float(len(rows)),
        "link B/s": float(case.link),
        "cap B/s": float(case.cap),
        "RTT ms": case.rtt_s * 1000,
        "calls": float(case.concurrency),
        "seconds": window,
        "request B": sent / len(rows),
        "body B": body_bytes / len(rows),
        "cap used %": 100 * (sent - burst) / (case.cap * window),
        "body share %": 100 * body_bytes / (case.cap * window),
        "link up %": 100 * up / (case.link * window),
        "link down %": 100 * down / (case.link * window),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="target drain time per case")
    args = parser.parse_args()
    cases = [
        # a 2G-class link (80 kbit/s), a fifth of it kept free for live escalations
        Case(link=10_000, cap=8_000, rtt_s=0.1, concurrency=8, seconds=args.seconds),
        # a faster link with a longer round trip: the calls in flight must cover the cap times
        # a call's duration (20 kB/s x ~0.45 s / 577 B = 16 requests), with room for jitter
        Case(link=25_000, cap=20_000, rtt_s=0.3, concurrency=32, seconds=args.seconds),
    ]
    x = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        gateway = start_gateway(
            Path(tmp) / "gateway", env={"CLOUD_GATEWAY_RATE_LIMIT_PER_S": "10000"}
        )
        try:
            for i, case in enumerate(cases):
                n = int(case.cap * case.seconds / 650)  # ~650 bytes per request
                figures = asyncio.run(drain(case, gateway, x[:n], Path(tmp) / f"edge-{i}"))
                name = f"cap {case.cap // 1000} kB/s, link {case.link // 1000} kB/s, {case.concurrency} calls"
                rows.append((name, figures))
        finally:
            gateway.daemon.stop()
    print_table("Drain goodput under a bandwidth cap (payload = delivered requests)", rows)


if __name__ == "__main__":
    main()
