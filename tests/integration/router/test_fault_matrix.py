"""The network fault matrix: every fault of the link between the router and a real gateway,
starting as a connection opens, halfway through a request or halfway into its response, with
seeded requests in each cell. What must hold whatever the machine's speed:

- nothing is lost: every call is answered, every queued ticket is delivered once the link is
  back, with the cloud model's answer, and the cloud model ran exactly once per item;
- live attempts per item stay within the retry policy's bound, and none starts after the call's
  deadline; deliveries tried per ticket are what its `attempts` says;
- the breaker opens when every call fails, and closes once the link is back;
- a request cut after the gateway ran it is answered from the gateway's store (a replay).

FAULT_MATRIX_REQUESTS (default 20) requests per cell. With FAULT_MATRIX_REPORT=<file> each
cell's figures (attempts, replays, the local answers' p50 against its control's) are written
there as JSON lines, for RELIABILITY.md (scripts/fault_matrix_table.py prints them). For that
figure a cell also streams confident requests through its fault, and runs the same traffic
without a fault before and after it (its control); the proxy runs in a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router import CallerWishes, LinkState, RetryPolicy, Route, Router, TicketResult
from tests.integration.gateway.helpers import Gateway
from tests.integration.router.conftest import RouterFactory
from tests.integration.router.helpers import (
    CLOUD_MODEL,
    cloud_model_answers,
    link_is,
    local_answer,
    until,
)
from tests.support.fault_proxy import ConnectionFault, Phase
from tests.support.fault_proxy_process import FaultProxyProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REQUESTS = int(os.environ.get("FAULT_MATRIX_REQUESTS", "20"))
REPORT = os.environ.get("FAULT_MATRIX_REPORT")
TIME_LEFT_S = 3.0  # each caller's deadline
LIVE = RetryPolicy(max_attempts=3, attempt_timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.2)
LIVE_TIMEOUT_S = 0.8
# How late, after a call's deadline, the proxy may read an attempt the router began in time.
READ_LAG_S = 0.5
# The local answers' figure (with REPORT only: the default suite keeps its time): a confident
# request every STREAM_INTERVAL_S beside each round's seeded ones, and a control round (the same
# traffic, no fault) of at most CONTROL_MAX_S before and after the cell's.
STREAM_INTERVAL_S = 0.005
CONTROL_MAX_S = 5.0

# Link faults, as FaultProxy.at() takes them; connection faults, as FaultProxy.on() takes them.
LINK_FAULTS = {
    "down": "cut",
    "latency 2 s": "delay:2",
    "2 KB/s": "throttle:2048",
    "1-byte slices": "slice:1",
    "black hole": "black_hole",
    "flapping 1 s/1 s": "flap:1",
}
CONNECTION_FAULTS = {
    "reset": ConnectionFault.RESET,
    "cut upstream": ConnectionFault.CUT_UPSTREAM,
    "cut downstream": ConnectionFault.CUT_DOWNSTREAM,
    "slow close": ConnectionFault.SLOW_CLOSE,
}
# Under these every cloud call fails, however fast the machine: the breaker must open.
ALL_FAIL = {"down", "latency 2 s", "black hole", *CONNECTION_FAULTS}
CELLS = [("none", Phase.CONNECT)] + [
    (fault, phase) for fault in [*LINK_FAULTS, *CONNECTION_FAULTS] for phase in Phase
]


@dataclass
class Sent:
    unsure: bool
    row: int
    seconds: float = 0.0
    route: Route | None = None
    ticket: str | None = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


@pytest.fixture(scope="module")
def proxy_process(gateway: Gateway) -> Iterator[FaultProxyProcess]:
    with FaultProxyProcess("127.0.0.1", gateway.daemon.ports["http"]) as p:
        yield p


@pytest.fixture
def proxy(proxy_process: FaultProxyProcess) -> Iterator[FaultProxyProcess]:
    """The link of one cell: the module's proxy process, with no fault and empty logs.

    In its own process, the proxy's slicing, throttling and delays take no time from the
    Router measured here (a FaultProxy thread would hold this process's GIL while it works).
    """
    proxy_process.restore()
    proxy_process.forget()
    yield proxy_process
    proxy_process.restore()


def plan_of(
    rng: random.Random, spacing_s: float, pixels: np.ndarray
) -> tuple[list[Sent], list[float]]:
    """REQUESTS seeded items, half unsure, and when each leaves (exponential gaps)."""
    plan = [
        Sent(unsure=rng.random() < 0.5, row=rng.randrange(len(pixels))) for _ in range(REQUESTS)
    ]
    offsets = np.cumsum([rng.expovariate(1 / spacing_s) for _ in plan])
    return plan, [float(d) for d in offsets]


class Meter:
    """How long a round lasted and the CPU time used in it by the test's process (the Router
    and the stream), the gateway and the proxy: where a slower local answer may come from."""

    def __init__(self, gateway: Gateway, proxy: FaultProxyProcess) -> None:
        self._sources = {
            "seconds": time.monotonic,
            "router_cpu_s": time.process_time,
            "gateway_cpu_s": gateway.daemon.cpu_seconds,
            "proxy_cpu_s": proxy.cpu_seconds,
        }
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def __enter__(self) -> Meter:
        self._start = {name: read() for name, read in self._sources.items()}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.used = {name: read() - self._start[name] for name, read in self._sources.items()}


def config() -> dict[str, Any]:
    return {
        "live_retry": LIVE,
        "live_timeout_s": LIVE_TIMEOUT_S,
        "drain_retry": RetryPolicy(max_attempts=1, attempt_timeout_s=2.0),
        "breaker_failures": 3,
        "link_backoff_s": 0.1,
        "link_backoff_cap_s": 0.5,
    }


def arm(proxy: FaultProxyProcess, fault: str, phase: Phase) -> None:
    proxy.close_delay_s = 0.5
    if fault in LINK_FAULTS:
        proxy.at(phase, LINK_FAULTS[fault])
    elif fault in CONNECTION_FAULTS:
        proxy.on(CONNECTION_FAULTS[fault], phase)


async def send(router: Router, pixels: np.ndarray, sent: Sent, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    start = time.monotonic()
    answer = await router.route(
        model="digits",
        inputs={"X": pixels[sent.row : sent.row + 1]},
        local=local_answer([0.1 if sent.unsure else 0.99]),
        wishes=CallerWishes(),
        time_left_s=TIME_LEFT_S,
        request_id=f"row-{sent.row}",
    )
    sent.seconds = time.monotonic() - start
    (item,) = answer.items
    sent.route, sent.ticket = item.route, item.ticket
    sent.outputs = {k: v[0] for k, v in answer.outputs.items()}


def stream(
    router: Router, loop: asyncio.AbstractEventLoop, pixels: np.ndarray, stop: threading.Event
) -> list[tuple[float, float]]:
    """Confident requests one after another, from this thread onto the router's loop, until
    `stop`: how long each took from its submission to its local answer, and of that, how long
    `Router.route` took.

    As an agent's transport hands a request to its loop, the time it waits for the loop (busy
    with the cell's retries, probes and deliveries) is counted with the answer's own."""
    seconds = []
    row = 0
    while not stop.is_set():
        sent = Sent(unsure=False, row=row % len(pixels))
        start = time.monotonic()
        asyncio.run_coroutine_threadsafe(send(router, pixels, sent, 0.0), loop).result(TIME_LEFT_S)
        seconds.append((time.monotonic() - start, sent.seconds))
        assert sent.route is Route.EDGE
        row += 1
        stop.wait(STREAM_INTERVAL_S)
    return seconds


class Streaming:
    """`stream` on a thread of its own for as long as the `async with` block lasts."""

    def __init__(self, router: Router, pixels: np.ndarray) -> None:
        self._args = (router, pixels)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream")
        self._future: asyncio.Future[list[tuple[float, float]]] | None = None
        self.seconds: list[float] = []
        """From each request's submission to its answer."""
        self.in_router: list[float] = []
        """Of that, in `Router.route`."""

    async def __aenter__(self) -> Streaming:
        router, pixels = self._args
        loop = asyncio.get_running_loop()
        self._future = loop.run_in_executor(self._pool, stream, router, loop, pixels, self._stop)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._future is not None
        try:
            timed = await self._future
            self.seconds, self.in_router = [t for t, _ in timed], [r for _, r in timed]
        finally:
            self._pool.shutdown()


async def all_ended(router: Router, tickets: set[str], within_s: float) -> dict[str, TicketResult]:
    """Each ticket's result once none is pending; fails after `within_s`."""
    results: dict[str, TicketResult] = {}
    deadline = time.monotonic() + within_s
    while True:
        for t in tickets - set(results):
            r = await router.result(t)
            if r.state != "pending":
                results[t] = r
        if len(results) == len(tickets):
            return results
        assert time.monotonic() < deadline, f"not delivered: {tickets - set(results)}"
        await asyncio.sleep(0.05)


async def control(
    router: Router,
    gateway: Gateway,
    proxy: FaultProxyProcess,
    pixels: np.ndarray,
    seed: str,
    spacing_s: float,
    for_s: float,
) -> tuple[Streaming, dict[str, float]]:
    """The same traffic as a cell's, for `for_s`, with no fault: its local answers' times
    (Streaming), and what the round used (Meter).

    What it sends is over (answered, delivered, counted by the gateway) when it returns, so the
    cell's own counts start from zero."""
    plan, offsets = plan_of(random.Random(zlib.crc32(seed.encode())), spacing_s, pixels)
    kept = [(s, d) for s, d in zip(plan, offsets, strict=True) if d < for_s]
    runs = gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL)
    with Meter(gateway, proxy) as meter:
        async with Streaming(router, pixels) as streaming:
            started = time.monotonic()
            await asyncio.gather(*(send(router, pixels, s, d) for s, d in kept))
            await asyncio.sleep(max(0.0, for_s - (time.monotonic() - started)))
    await all_ended(router, {s.ticket for s, _ in kept if s.ticket is not None}, 30)
    unsure = sum(s.unsure for s, _ in kept)
    await until(
        lambda: (
            gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL) - runs >= unsure
        ),
        10,
        "the gateway's metrics",
    )
    return streaming, meter.used


@pytest.mark.parametrize(("fault", "phase"), CELLS, ids=[f"{f}@{p}" for f, p in CELLS])
async def test_fault_cell(
    fault: str,
    phase: Phase,
    make_router: RouterFactory,
    gateway: Gateway,
    proxy: FaultProxyProcess,
    pixels: np.ndarray,
) -> None:
    router = await make_router(**config())
    await link_is(router, LinkState.UP, LinkState.DEGRADED)
    states: list[LinkState] = []
    assert router.monitor is not None
    monitor = router.monitor
    monitor.add_listener(states.append)
    rng = random.Random(zlib.crc32(f"{fault}@{phase}".encode()))
    spacing = 0.15 if fault.startswith("flapping") else 0.03
    plan, offsets = plan_of(rng, spacing, pixels)
    # Let a flapping link go through a few flaps, and every failing fault open the breaker.
    least_s = 3.0 if fault.startswith("flapping") else 0.5
    control_s = min(CONTROL_MAX_S, max(offsets[-1], least_s))  # as long as the fault round
    controls = []
    if REPORT:
        controls.append(
            await control(
                router, gateway, proxy, pixels, f"{fault}@{phase}/before", spacing, control_s
            )
        )
        proxy.forget()
    runs = gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL)

    arm(proxy, fault, phase)
    meter = Meter(gateway, proxy)
    async with contextlib.AsyncExitStack() as round_:
        round_.enter_context(meter)
        local = await round_.enter_async_context(Streaming(router, pixels)) if REPORT else None
        started = time.monotonic()
        await asyncio.gather(
            *(send(router, pixels, s, d) for s, d in zip(plan, offsets, strict=True))
        )
        hold = least_s - (time.monotonic() - started)
        if fault in ALL_FAIL:
            await link_is(router, LinkState.DOWN, within_s=15)
        await asyncio.sleep(max(0.0, hold))
    proxy.restore()

    # -- nothing lost: answered, delivered once the link is back, the cloud model's answer -----
    tickets = {s.ticket for s in plan if s.ticket is not None}
    results = await all_ended(router, tickets, 30)
    await link_is(router, LinkState.UP, LinkState.DEGRADED, within_s=15)  # the breaker closed

    unsure = [s for s in plan if s.unsure]
    expected = cloud_model_answers(pixels[[s.row for s in unsure]])["probabilities"]
    for s, want in zip(unsure, expected, strict=True):
        assert s.route in (Route.CLOUD, Route.QUEUE)
        if s.route is Route.CLOUD:
            np.testing.assert_allclose(s.outputs["probabilities"], want, rtol=1e-6)
        else:
            assert s.ticket is not None
            result = results[s.ticket]
            assert result.state == "delivered", (result.state, result.error)
            np.testing.assert_allclose(result.outputs["probabilities"][0], want, rtol=1e-6)
    for s in plan:
        assert s.seconds < TIME_LEFT_S  # every caller answered within its deadline
        if not s.unsure:
            assert s.route is Route.EDGE
    await until(
        lambda: (
            gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL) - runs
            >= len(unsure)
        ),
        10,
        "the gateway's metrics",
    )
    assert gateway.metric("cloud_gateway_model_runs_total", model=CLOUD_MODEL) - runs == len(unsure)

    # -- attempts within their bounds, none past a deadline ------------------------------------
    arrivals: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    for seen in proxy.requests:
        if seen.key is not None:
            arrivals.setdefault(seen.key, []).append(seen.monotonic)
            walls.setdefault(seen.key, []).append(seen.wall)
    assert len(arrivals) <= len(unsure)
    live_attempts, drain_attempts = [], []
    for key, times in arrivals.items():
        result = results.get(key)
        live = [
            t
            for t, w in zip(times, walls[key], strict=True)
            if result is None or w < result.enqueued_at
        ]
        live_attempts.append(len(live))
        assert len(live) <= LIVE.max_attempts, (key, len(live))
        if live:
            assert live[-1] - live[0] <= LIVE_TIMEOUT_S + READ_LAG_S, (key, live)
        if result is not None:  # deliveries tried: its failed ones (`attempts`) and the last
            drain_attempts.append(len(times) - len(live))
            assert len(times) <= LIVE.max_attempts + result.attempts + 1, (key, result.attempts)

    # -- a request cut after the gateway ran it is answered from its store ---------------------
    replayed = [r for r in results.values() if r.parameters.get("idempotent_replay") is True]
    if fault in ("cut upstream", "cut downstream") and phase is Phase.RESPONSE:
        cut_after_run = {key for _, p, key in proxy.hits if p is Phase.RESPONSE and key in results}
        assert cut_after_run <= {r.ticket for r in replayed}
    if fault in ALL_FAIL:
        assert LinkState.DOWN in states  # the breaker opened ...
    # ... and closed: link_is(UP) above

    if local is None:  # no report asked for
        return
    assert REPORT is not None
    controls.append(
        await control(router, gateway, proxy, pixels, f"{fault}@{phase}/after", spacing, control_s)
    )
    record = {
        "fault": fault,
        "phase": phase.value,
        "requests": len(plan),
        "unsure": len(unsure),
        "queued": len(tickets),
        "local_answers": len(local.seconds),
        "local_p50_ms": statistics.median(local.seconds) * 1000,
        "local_in_router_p50_ms": statistics.median(local.in_router) * 1000,
        "control_answers": sum(len(c.seconds) for c, _ in controls),
        "control_p50_ms": statistics.median([t for c, _ in controls for t in c.seconds]) * 1000,
        "control_p50s_ms": [statistics.median(c.seconds) * 1000 for c, _ in controls],
        "control_in_router_p50_ms": (
            statistics.median([t for c, _ in controls for t in c.in_router]) * 1000
        ),
        "max_live_attempts": max(live_attempts, default=0),
        "max_drain_attempts": max(drain_attempts, default=0),
        "replays": len(replayed),
        "breaker_opened": LinkState.DOWN in states,
        "model_runs": len(unsure),
        "used": meter.used,
        "control_used": [used for _, used in controls],
    }
    await asyncio.to_thread(_append, Path(REPORT), json.dumps(record))


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")
