"""One device's worst: 20 concurrent maximum-size requests against one gateway worker, while a
load balancer checks `/v2/health/ready` every 10 ms. Issue 12's attack (before: health blocked for
15.8 s, 4.5 GB RSS).

For the SQLite and the Redis store, with the default limits and with every one of the 20 requests
admitted at once (max_in_flight_per_device 32), it prints the health checks' latency (the same
prober against the idle gateway first, as the baseline of the same run), the gateway's RSS before,
at its peak and after, and how the attack's requests were answered. Targets: health p99 < 100 ms
and RSS growth < 300 MB under the attack. A maximum-size request: 1,024 items of 64 values
(max_items_per_request) in their longest float text, 1.3 MB of JSON; a fresh Idempotency-Key each,
so every one is parsed, run, encoded and stored; then the same with one key (replays). About two
minutes:

    .venv/bin/python benchmarks/gateway_attack.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _harness import print_table

from tests.integration.gateway.helpers import Gateway, Redis, start_gateway

INFER = "/v2/models/digits-large/infer"
READY = "/v2/health/ready"
ATTACKERS = 20
ITEMS = 1024
PROBE_INTERVAL_S = 0.01


# -- the prober: its own process, so the attack's client never delays a health check ------------


def probe(port: int, seconds: float) -> None:
    """GET /v2/health/ready every 10 ms on a kept-alive connection; print the latencies (s)."""
    import http.client

    latencies = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            conn.request("GET", READY)
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - start)
        time.sleep(max(0.0, PROBE_INTERVAL_S - (time.perf_counter() - start)))
    print(json.dumps(latencies))


@contextmanager
def prober(port: int, seconds: float) -> Iterator[list[float]]:
    latencies: list[float] = []
    process = subprocess.Popen(
        [sys.executable, __file__, "--probe", str(port), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield latencies
    finally:
        out, _ = process.communicate(timeout=seconds + 60)
        latencies.extend(json.loads(out))


# -- the attacker: a minimal HTTP/1.1 client, cheap beside the gateway ----------------------------


async def attack(port: int, token: str, body: bytes, seconds: float, replay: bool) -> Counter[int]:
    statuses: Counter[int] = Counter()
    end = time.monotonic() + seconds

    def request() -> bytes:
        key = "replay-me" if replay else uuid.uuid4().hex
        head = (
            f"POST {INFER} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
            f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def one_attacker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < end:
                writer.write(request())
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                closing = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"connection" and b"close" in value.lower():
                        closing = True
                await reader.readexactly(length)
                statuses[status] += 1
                if status != 200:
                    await asyncio.sleep(0.05)  # refused: come back a little later, as told
                if closing:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(one_attacker() for _ in range(ATTACKERS)))
    return statuses


# -- processes ------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def gateway(root: Path, store: str, env: dict[str, str]) -> Iterator[Gateway]:
    gw = start_gateway(root / uuid.uuid4().hex, "--idempotency-store", store, env=env)
    try:
        yield gw
    finally:
        gw.daemon.stop()


def measure(
    port: int, pid: int, token: str, body: bytes, seconds: float, replay: bool
) -> tuple[dict[str, float], Counter[int]]:
    with prober(port, seconds / 2) as idle:
        pass
    before = rss_mb(pid)
    peak = before
    with prober(port, seconds) as attacked:

        async def attack_and_watch() -> Counter[int]:
            nonlocal peak
            task = asyncio.ensure_future(attack(port, token, body, seconds, replay))
            while not task.done():
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.05)
            return task.result()

        statuses = asyncio.run(attack_and_watch())
    after = rss_mb(pid)

    def ms(values: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(values), q) * 1000)

    figures = {
        "idle p99 ms": ms(idle, 99),
        "p50 ms": ms(attacked, 50),
        "p99 ms": ms(attacked, 99),
        "max ms": ms(attacked, 100),
        "RSS before MB": before,
        "RSS growth MB": peak - before,
        "RSS after MB": after,
        "200/s": statuses[200] / seconds,
        "refused/s": sum(n for s, n in statuses.items() if s != 200) / seconds,
    }
    return figures, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="of attack per row")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(int(args.probe[0]), float(args.probe[1]))
        return

    # FP32 values in the longest text that still reads as one (17 significant digits, as a
    # float64 prints), for the most JSON per value.
    values = np.random.default_rng(0).random((ITEMS, 64)) / 3
    tensor = {
        "name": "X",
        "datatype": "FP32",
        "shape": [ITEMS, 64],
        "data": values.ravel().tolist(),
    }
    body = json.dumps({"inputs": [tensor]}).encode()
    rows = []
    codes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        redis = Redis(root / "redis.sock")
        redis.start()
        try:
            redis_url = redis.url
            for store, label in (("sqlite", "SQLite"), (redis_url, "Redis")):
                for admitted, env in (
                    ("defaults (8 in flight per device)", {}),
                    ("all 20 admitted", {"CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "32"}),
                ):
                    # The rate limit stays out of the way: the work limits are what is measured.
                    env = {
                        **env,
                        "CLOUD_GATEWAY_RATE_LIMIT_PER_S": "100000",
                        "CLOUD_GATEWAY_RATE_LIMIT_BURST": "100000",
                    }
                    for replay in (False, True):
                        with gateway(root, store, env) as gw:
                            port, pid = gw.daemon.ports["http"], gw.daemon.process.pid
                            figures, statuses = measure(
                                port, pid, gw.key, body, args.seconds, replay
                            )
                        kind = "replays of one answer" if replay else "new requests"
                        name = f"{label}, {admitted}, {kind}"
                        rows.append((name, figures))
                        codes.append(f"{name}: {dict(sorted(statuses.items()))}")
                        print(name, {k: round(v, 1) for k, v in figures.items()}, flush=True)
        finally:
            redis.stop()
    print_table(
        f"/v2/health/ready every 10 ms while {ATTACKERS} connections of one device send "
        f"{ITEMS}x64-value requests ({len(body) / 1e6:.1f} MB of JSON each) for "
        f"{args.seconds:g} s; one worker",
        rows,
    )
    print("status codes of the attack's requests:")
    for line in codes:
        print("  " + line)


if __name__ == "__main__":
    main()
