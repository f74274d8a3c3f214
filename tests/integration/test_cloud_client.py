"""CloudClient against a real HTTP server on a real socket, directly and through the fault proxy.

The server is a small scripted v2 endpoint (starlette + uvicorn in a thread) that answers 429,
503, 400, 500, slowly or chunked on demand and records what it received: fault injection, not
a mock. The client's bytes against the data budget are counted as the proxy carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from model_runtime.demo import HELDOUT
from model_runtime.v2_json import encode_infer_request
from router import cloud_client
from router.breaker import CircuitBreaker
from router.budget import BudgetPeriod, DataBudget
from router.clock import SystemClock
from router.cloud_client import AttemptRecord, CloudClient, infer_request
from router.connectivity import ConnectivityMonitor
from router.errors import BudgetExhausted, CircuitOpen, CloudRejected, CloudUnavailable
from router.pacing import RequestPacer
from router.retrying import RetryPolicy
from tests.integration.router.helpers import until
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, Daemon, start_daemon, wait_until

pytestmark = pytest.mark.integration

KEY = "dev-key-0123456789"
BODY = encode_infer_request({"pixels": np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)})


@dataclass
class Action:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    floats: int = 300
    """Values in the answer's one output."""
    chunked: bool = False
    """Stream the answer in pieces (Transfer-Encoding: chunked) rather than with a length."""


@dataclass
class Seen:
    headers: dict[str, str]
    raw: bytes
    body: Any


class ScriptedCloud:
    """A v2 REST server that plays `script` (one Action per inference request, then 200s)."""

    def __init__(self) -> None:
        self.script: list[Action] = []
        self.seen: list[Seen] = []
        self.ready = True
        self.received = threading.Event()
        self._release: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/v2/health/ready", self._ready),
                Route("/v2/models/{name}/infer", self._infer, methods=["POST"]),
            ],
            middleware=[Middleware(GZipMiddleware, minimum_size=200)],
        )
        config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", http="h11")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ScriptedCloud:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, what="scripted server to start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)  # end scripted delays
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    async def _pause(self, seconds: float) -> None:
        if self._release is None:
            self._release, self._loop = asyncio.Event(), asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release.wait(), seconds)

    async def _ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.ready else 503)

    async def _infer(self, request: Request) -> Response:
        raw = await request.body()
        decoded = gzip.decompress(raw) if request.headers.get("content-encoding") == "gzip" else raw
        self.seen.append(Seen(dict(request.headers), raw, json.loads(decoded)))
        self.received.set()
        action = self.script.pop(0) if self.script else Action()
        if action.delay:
            await self._pause(action.delay)
        if action.status != 200:
            error = {"error": f"scripted {action.status}"}
            return JSONResponse(error, status_code=action.status, headers=action.headers)
        n = action.floats
        data = [(i * 7919 % 1000) / 1000 for i in range(n)]  # gzip shrinks it, not to nothing
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [1, n], "data": data}]
        answer = {"model_name": request.path_params["name"], "outputs": outputs}
        if not action.chunked:
            return JSONResponse(answer, headers=action.headers)
        text = json.dumps(answer).encode()

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(text), 700):
                yield text[start : start + 700]

        return StreamingResponse(pieces(), media_type="application/json", headers=action.headers)


@pytest.fixture
def cloud() -> Iterator[ScriptedCloud]:
    with ScriptedCloud() as server:
        yield server


@pytest.fixture
def proxy(cloud: ScriptedCloud) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", cloud.port) as proxy:
        yield proxy


class Attempts(list[AttemptRecord]):
    @property
    def outcomes(self) -> list[str]:
        """Of the inference attempts."""
        return [a.outcome for a in self if not a.probe]

    @property
    def probes(self) -> list[str]:
        return [a.outcome for a in self if a.probe]


@pytest.fixture
def attempts() -> Attempts:
    return Attempts()


def client_for(url: str, attempts: Attempts, **retry: float) -> CloudClient:
    policy = RetryPolicy(**{"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **retry})  # type: ignore[arg-type]
    return CloudClient(url, KEY, retry=policy, on_attempt=attempts.append, probe_timeout_s=1.0)


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds


async def test_sends_auth_idempotency_key_and_gzip_and_reads_the_answer(
    cloud: ScriptedCloud, attempts: Attempts
) -> None:
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        answer = await client.infer(
            "digits-large", BODY, idempotency_key="t-1", deadline=deadline_in(5)
        )
    (seen,) = cloud.seen
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["idempotency-key"] == "t-1"
    assert seen.headers["content-encoding"] == "gzip"
    assert "gzip" in seen.headers["accept-encoding"]
    assert seen.body == BODY
    assert answer.status == 200
    assert not answer.replayed
    assert answer.attempts == 1
    response = answer.response()
    assert response.model_name == "digits-large"
    assert response.outputs["probabilities"].shape == (1, 300)
    assert answer.bytes_sent > len(seen.raw)  # body plus request line and headers
    # the answer came gzip-compressed: fewer bytes on the wire than its JSON
    assert answer.bytes_received < len(json.dumps(answer.body))
    assert attempts.outcomes == ["ok"]
    assert attempts[0].bytes_sent == answer.bytes_sent


async def test_429_with_retry_after_is_honoured_with_the_same_key(
    cloud: ScriptedCloud, attempts: Attempts
) -> None:
    cloud.script = [Action(429, {"Retry-After": "1"})]
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        start = time.monotonic()
        answer = await client.infer("m", BODY, idempotency_key="t-429", deadline=deadline_in(5))
        waited = time.monotonic() - start
        again = await client.infer("m", BODY, idempotency_key="t-429")  # a redelivery
    assert waited >= 1.0
    assert answer.attempts == 2
    assert again.attempts == 1
    assert attempts.outcomes == ["rate_limited", "ok", "ok"]
    assert {s.headers["idempotency-key"] for s in cloud.seen} == {"t-429"}
    assert len({s.raw for s in cloud.seen}) == 1  # byte-identical bodies on every attempt


async def test_a_call_waiting_for_its_turn_keeps_its_whole_attempt_timeout(
    cloud: ScriptedCloud, attempts: Attempts
) -> None:
    # One call a second, attempts of 0.5 s: the second call's turn comes after a wait longer
    # than an attempt. It waits for it within its deadline, then gets its whole attempt (it
    # used to be refused at once as rate limited, since the wait was taken out of the attempt).
    async with client_for(
        f"http://127.0.0.1:{cloud.port}", attempts, attempt_timeout_s=0.5
    ) as client:
        client.pacer = RequestPacer(1.0, 1, SystemClock())
        start = time.monotonic()
        first, second = await asyncio.gather(
            *(
                client.infer("m", BODY, idempotency_key=f"t-turn-{i}", deadline=deadline_in(10))
                for i in range(2)
            )
        )
        waited = time.monotonic() - start
    assert first.status == second.status == 200
    assert waited >= 0.9  # the second call waited for its turn
    assert "rate_limited" not in attempts.outcomes


async def test_502_and_503_are_retried(cloud: ScriptedCloud, attempts: Attempts) -> None:
    cloud.script = [Action(503), Action(502), Action(504)]
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        answer = await client.infer("m", BODY, idempotency_key="t-5xx", deadline=deadline_in(5))
    assert answer.attempts == 4
    assert attempts.outcomes == ["unavailable"] * 3 + ["ok"]


async def test_a_request_built_ahead_goes_as_it_is_and_its_answer_is_read_by_the_reader(
    cloud: ScriptedCloud, attempts: Attempts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwarder builds a drain call's bytes and reads its answer on a thread of its own:
    the client sends those bytes unchanged on every attempt, counts them as `infer` would,
    and parses each answer on the `reader` it is given, not on the event loop."""
    cloud.script = [Action(503)]
    readers: list[str] = []
    read = cloud_client.read_answer

    def reading(*args: Any) -> Any:
        readers.append(threading.current_thread().name)
        return read(*args)

    monkeypatch.setattr(cloud_client, "read_answer", reading)
    reader = ThreadPoolExecutor(1, thread_name_prefix="reader")
    try:
        async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
            request = infer_request("m", BODY, idempotency_key="t-built", compress=client.compress)
            answer = await client.send(request, deadline=deadline_in(5), reader=reader)
            live = await client.infer("m", BODY, idempotency_key="t-built")
    finally:
        reader.shutdown()
    assert [s.raw for s in cloud.seen] == [request.payload] * 3  # both attempts, and `infer`
    assert attempts.outcomes == ["unavailable", "ok", "ok"]
    assert answer.attempts == 2
    assert answer.response().outputs["probabilities"].shape == (1, 300)
    assert answer.bytes_sent == 2 * live.bytes_sent  # the same bytes as `infer` sends, twice
    assert [name.startswith("reader") for name in readers] == [True, True, False]


async def test_400_is_rejected_at_once(cloud: ScriptedCloud, attempts: Attempts) -> None:
    cloud.script = [Action(400)]
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        with pytest.raises(CloudRejected, match="scripted 400") as raised:
            await client.infer("m", BODY, idempotency_key="t-400", deadline=deadline_in(5))
    assert raised.value.status == 400
    assert len(cloud.seen) == 1
    assert attempts.outcomes == ["rejected"]


async def test_500_is_not_retried(cloud: ScriptedCloud, attempts: Attempts) -> None:
    cloud.script = [Action(500)]
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        with pytest.raises(CloudUnavailable) as raised:
            await client.infer("m", BODY, idempotency_key="t-500", deadline=deadline_in(5))
    assert raised.value.status == 500
    assert len(cloud.seen) == 1


async def test_retry_after_beyond_the_deadline_gives_up_at_once(
    cloud: ScriptedCloud, attempts: Attempts
) -> None:
    cloud.script = [Action(429, {"Retry-After": "30"})]
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        start = time.monotonic()
        with pytest.raises(CloudUnavailable) as raised:
            await client.infer("m", BODY, idempotency_key="t-ra", deadline=deadline_in(20))
    assert time.monotonic() - start < 10  # neither the Retry-After (30 s) nor the deadline
    assert raised.value.retry_after == 30.0
    assert len(cloud.seen) == 1


async def test_slow_cloud_times_out_at_the_deadline(
    cloud: ScriptedCloud, attempts: Attempts
) -> None:
    cloud.script = [Action(delay=30.0)] * 5
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        start = time.monotonic()
        with pytest.raises(CloudUnavailable):
            await client.infer("m", BODY, idempotency_key="t-slow", deadline=deadline_in(0.5))
    # the deadline, far from the cloud's 30 s, however busy the machine
    assert 0.4 <= time.monotonic() - start < 10
    assert attempts.outcomes == ["timeout"]


async def test_cut_link_fails_fast_within_the_deadline(
    proxy: FaultProxy, attempts: Attempts
) -> None:
    proxy.cut()
    async with client_for(proxy.url, attempts) as client:
        start = time.monotonic()
        with pytest.raises(CloudUnavailable) as raised:
            await client.infer("m", BODY, idempotency_key="t-cut", deadline=deadline_in(60))
        assert not await client.ready()
    assert time.monotonic() - start < 20  # four attempts and their backoff, not the deadline
    assert isinstance(raised.value.__cause__, CloudUnavailable)
    assert attempts.outcomes == ["network_error"] * 4
    assert attempts.probes == ["network_error"]


async def test_black_hole_gives_up_at_the_deadline_and_never_hangs(
    proxy: FaultProxy, attempts: Attempts
) -> None:
    proxy.black_hole()
    async with client_for(proxy.url, attempts) as client:
        start = time.monotonic()
        with pytest.raises(CloudUnavailable):
            await client.infer("m", BODY, idempotency_key="t-hole", deadline=deadline_in(1.0))
        elapsed = time.monotonic() - start
        assert not await client.ready()  # the probe has its own short timeout
    assert 0.9 <= elapsed < 10  # the deadline; a hang would last until the test's timeout
    assert set(attempts.outcomes) == {"timeout"}
    assert attempts.probes == ["timeout"]
    assert proxy.bytes_to_target == 0


async def test_reset_mid_call_is_retried_with_the_same_key(
    cloud: ScriptedCloud, proxy: FaultProxy, attempts: Attempts
) -> None:
    cloud.script = [Action(delay=10.0)]
    async with client_for(proxy.url, attempts) as client:
        call = asyncio.ensure_future(
            client.infer("m", BODY, idempotency_key="t-reset", deadline=deadline_in(8))
        )
        assert await asyncio.to_thread(cloud.received.wait, 5)
        proxy.reset()
        answer = await asyncio.wait_for(call, 8)
    assert attempts.outcomes == ["network_error", "ok"]
    assert answer.attempts == 2
    assert [s.headers["idempotency-key"] for s in cloud.seen] == ["t-reset", "t-reset"]


async def test_calls_share_one_kept_alive_connection(proxy: FaultProxy, attempts: Attempts) -> None:
    async with client_for(proxy.url, attempts) as client:
        for i in range(5):
            await client.infer("m", BODY, idempotency_key=f"t-{i}")
        assert await client.ready()
    assert proxy.connections_accepted == 1


async def test_ready_reflects_the_server(cloud: ScriptedCloud, attempts: Attempts) -> None:
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        assert await client.ready()
        cloud.ready = False
        assert not await client.ready()


async def test_breaker_stops_calls_and_a_probe_reopens_the_link(
    cloud: ScriptedCloud, proxy: FaultProxy, attempts: Attempts
) -> None:
    clock = SystemClock()
    client = client_for(proxy.url, attempts, max_attempts=1)
    breaker = CircuitBreaker(clock, failure_threshold=3, cooldown=lambda n: 0.2)
    monitor = ConnectivityMonitor(client.ready, clock=clock, breaker=breaker)
    client.observer = monitor
    async with client:
        await client.infer("m", BODY, idempotency_key="t-0")
        assert monitor.snapshot().expected_latency_s is not None
        proxy.cut()
        for i in range(3):
            with pytest.raises(CloudUnavailable):
                await client.infer("m", BODY, idempotency_key=f"t-cut-{i}")
        accepted = proxy.connections_accepted
        with pytest.raises(CircuitOpen):
            await client.infer("m", BODY, idempotency_key="t-held")
        assert proxy.connections_accepted == accepted  # nothing went out
        assert monitor.snapshot().breaker_open
        proxy.restore()
        await asyncio.sleep(breaker.retry_in())  # the cool-down itself, not a synchronisation
        assert await monitor.probe()
        answer = await client.infer("m", BODY, idempotency_key="t-back")
    assert answer.status == 200
    assert attempts.outcomes == ["ok"] + ["network_error"] * 3 + ["breaker_open", "ok"]
    assert attempts.probes == ["ok"]
    snap = monitor.snapshot()
    assert not snap.breaker_open
    assert snap.goodput_bytes_per_s is not None
    assert snap.goodput_bytes_per_s > 0


async def test_bad_arguments_name_the_field(cloud: ScriptedCloud, attempts: Attempts) -> None:
    with pytest.raises(ValueError, match="base_url"):
        CloudClient("ftp://x", KEY)
    with pytest.raises(ValueError, match="device_key"):
        CloudClient("http://x", "two words")
    async with client_for(f"http://127.0.0.1:{cloud.port}", attempts) as client:
        with pytest.raises(ValueError, match="idempotency_key"):
            await client.infer("m", BODY, idempotency_key="has space")
        with pytest.raises(ValueError, match="model"):
            await client.infer("", BODY, idempotency_key="k")
    assert cloud.seen == []


# --- against the real cloud gateway -------------------------------------------------------


def _gateway_ready(daemon: Daemon) -> bool:
    return (
        httpx.get(f"http://{daemon.address('http')}/v2/health/ready", timeout=2).status_code == 200
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str]]:
    """A real `cloud-gateway serve` on ephemeral ports, and a device key made with `keys add`."""
    workdir = tmp_path_factory.mktemp("gateway")
    state = str(workdir / "state")
    added = subprocess.run(
        [str(BIN / "cloud-gateway"), "keys", "add", "edge-test", "--state-dir", state],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = added.stdout.split()[0]
    daemon = start_daemon(
        "cloud-gateway",
        ["serve", "--port", "0", "--metrics-port", "0", "--state-dir", state],
        workdir,
        ready=_gateway_ready,
    )
    yield daemon, key
    daemon.stop()


def _model_runs(daemon: Daemon) -> float:
    text = httpx.get(f"http://{daemon.address('metrics')}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "cloud_gateway_model_runs_total"
        and sample.labels.get("model") == "digits-large"
    )


async def test_real_gateway_runs_once_and_replays_through_a_flaky_link(
    gateway: tuple[Daemon, str], attempts: Attempts
) -> None:
    daemon, key = gateway
    pixels = np.load(HELDOUT)["X"][:2]
    body = encode_infer_request({"X": pixels})
    runs_before = _model_runs(daemon)
    with FaultProxy("127.0.0.1", daemon.ports["http"]) as proxy:
        policy = RetryPolicy(backoff_initial_s=0.05, backoff_max_s=0.2)
        async with CloudClient(proxy.url, key, retry=policy, on_attempt=attempts.append) as client:
            assert await client.ready()
            first = await client.infer(
                "digits-large", body, idempotency_key="gw-1", deadline=deadline_in(10)
            )
            proxy.cut()
            with pytest.raises(CloudUnavailable):
                await client.infer(
                    "digits-large", body, idempotency_key="gw-1", deadline=deadline_in(2)
                )
            proxy.restore()
            again = await client.infer(
                "digits-large", body, idempotency_key="gw-1", deadline=deadline_in(10)
            )
        async with CloudClient(proxy.url, "cgk_not.a-real-key", retry=policy) as stranger:
            with pytest.raises(CloudRejected) as refused:
                await stranger.infer("digits-large", body, idempotency_key="gw-2")
    assert not first.replayed
    assert again.replayed
    probabilities = first.response().outputs["probabilities"]
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(again.response().outputs["probabilities"], probabilities)
    assert refused.value.status == 401
    assert _model_runs(daemon) - runs_before == 1  # three deliveries of gw-1, one model run


# --- the data budget: bytes counted to the byte, reserved before sending ---------------------


async def open_budget(tmp_path: Path, limit: int | None) -> DataBudget:
    return await DataBudget.open(tmp_path / "budget.sqlite", daily_bytes=limit)


@pytest.fixture
async def budget(tmp_path: Path) -> AsyncIterator[DataBudget]:
    opened = await open_budget(tmp_path, None)
    yield opened
    await opened.close()


def budgeted_client(url: str, budget: DataBudget, attempts: Attempts) -> CloudClient:
    return CloudClient(
        url,
        KEY,
        retry=RetryPolicy(max_attempts=1),
        on_attempt=attempts.append,
        budget=budget,
        probe_timeout_s=2.0,
    )


def used(budget: DataBudget) -> int:
    return budget.usage()[0].used_bytes


async def test_every_byte_each_way_is_counted_as_the_proxy_carried_it(
    cloud: ScriptedCloud, proxy: FaultProxy, budget: DataBudget
) -> None:
    attempts = Attempts()
    cloud.script = [
        Action(),
        Action(chunked=True, floats=2_000),  # gzip, streamed: chunk framing counts too
        Action(status=429, headers={"Retry-After": "1"}),
        Action(status=400),
        Action(chunked=True, floats=5),
    ]
    async with budgeted_client(proxy.url, budget, attempts) as c:
        assert await c.ready()
        await c.infer("m", BODY, idempotency_key="k-1")
        proxy.slice(97)  # chunks arrive split across reads, as on a slow link
        await c.infer("m", BODY, idempotency_key="k-2")
        proxy.restore()
        with pytest.raises(CloudUnavailable):
            await c.infer("m", BODY, idempotency_key="k-3")
        with pytest.raises(CloudRejected):
            await c.infer("m", BODY, idempotency_key="k-4")
        await c.infer("m", BODY, idempotency_key="k-5")
        cloud.ready = False
        assert not await c.ready()
    assert [a.outcome for a in attempts] == [
        "ok", "ok", "ok", "rate_limited", "rejected", "ok", "unavailable"
    ]  # fmt: skip
    sent = sum(a.bytes_sent for a in attempts)
    received = sum(a.bytes_received for a in attempts)
    try:
        await until(
            lambda: (proxy.bytes_to_target, proxy.bytes_to_client) == (sent, received),
            what=f"the proxy to have passed on {sent} bytes up and {received} down",
        )
    except TimeoutError as exc:  # say what it did pass on, and over how many connections
        raise AssertionError(
            f"{exc}; it passed on {proxy.bytes_to_target} up and {proxy.bytes_to_client} down "
            f"over {proxy.connections_accepted} connection(s)"
        ) from None
    assert used(budget) == sent + received
    assert budget.reserved_bytes == 0


async def test_calls_in_flight_together_never_overspend_the_budget(
    cloud: ScriptedCloud, proxy: FaultProxy, tmp_path: Path
) -> None:
    attempts = Attempts()
    limit = 0
    budget = await open_budget(tmp_path, None)
    try:
        async with budgeted_client(proxy.url, budget, attempts) as c:
            await c.infer("m", BODY, idempotency_key="k-99")  # what one exchange takes
            one = used(budget)
            limit = 5 * one + one // 2
            budget.limits[BudgetPeriod.DAY] = limit + one
            attempts.clear()
            # Twenty at once: each reserves its bytes before its first wait, so all twenty
            # have reserved or been refused before any is answered.
            results = await asyncio.gather(
                *(c.infer("m", BODY, idempotency_key=f"k-{i:02d}") for i in range(20)),
                return_exceptions=True,
            )
        answered = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BudgetExhausted)]
        assert (len(answered), len(refused)) == (5, 15)
        assert len(cloud.seen) == 1 + 5  # the refused ones were never sent
        assert used(budget) == one + 5 * one <= one + limit
        await until(
            lambda: proxy.bytes_to_target + proxy.bytes_to_client == 6 * one,
            what="the proxy to have passed on six exchanges",
        )
        assert [a.outcome for a in attempts].count("budget") == 15
    finally:
        await budget.close()


async def test_an_answer_too_large_for_what_is_left_is_left_unread(
    cloud: ScriptedCloud, proxy: FaultProxy, tmp_path: Path
) -> None:
    attempts = Attempts()
    budget = await open_budget(tmp_path, 4_000)
    try:
        cloud.script = [Action(floats=3), Action(floats=20_000)]
        async with budgeted_client(proxy.url, budget, attempts) as c:
            await c.infer("m", BODY, idempotency_key="small")
            with pytest.raises(BudgetExhausted, match="day data budget spent"):
                await c.infer("m", BODY, idempotency_key="large")
            assert budget.reserved_bytes == 0
        assert [a.outcome for a in attempts] == ["ok", "budget"]
        assert used(budget) <= 4_000
        assert used(budget) == sum(a.bytes_sent + a.bytes_received for a in attempts)
        # Its status line and headers were read and counted, its body (larger than what was
        # left, by its Content-Length) was not: the connection was closed instead.
        assert 0 < attempts[1].bytes_received < 500
    finally:
        await budget.close()
