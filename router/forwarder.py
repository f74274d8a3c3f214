"""Forwarder: drains the durable queue to the cloud while the link is up, within a bandwidth cap.

Highest priority first (the queue's claim order), in batches, up to `drain_concurrency` calls in
flight, each call paid for in a token bucket *before* it is sent. Each claimed item ends in one
of three ways per attempt: delivered (the answer is stored under its ticket), released for a later
attempt (the cloud or the link failed, or the device's setup is wrong), or rejected (the cloud
refused the request itself). A housekeeping loop expires items past their TTL and purges old ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from model_runtime.errors import InvalidInput
from model_runtime.fault_points import FaultPlan
from model_runtime.infer_group import GroupItem, GroupItemAnswer, decode_group_answer
from model_runtime.v2_json import decode_infer_response
from router.breaker import CircuitBreaker
from router.budget import DataBudget, ProbeBudget
from router.clock import Clock, sleep_or_wake
from router.cloud_client import CloudClient, CloudRequest, group_request, infer_request
from router.config import AFTER_SEND_BEFORE_MARK, RouterConfig
from router.connectivity import ConnectivityMonitor
from router.decision import LinkState
from router.durable_queue import DurableQueue, QueuedItem
from router.errors import (
    BudgetExhausted,
    CircuitOpen,
    CloudError,
    CloudRejected,
    CloudUnavailable,
    StorageError,
)
from router.grouping import GroupPlanner
from router.metrics import CloudMeter, RouterMetrics
from router.pacing import RequestPacer
from router.retrying import LinkBackoff
from router.tickets import encode_result

__all__ = [
    "SETUP_STATUSES",
    "Forwarder",
    "TokenBucket",
    "housekeep",
    "open_cloud",
    "request_for",
    "stored_answer",
    "stored_answers",
    "stored_group",
]

log = logging.getLogger(__name__)
R = TypeVar("R")

SETUP_STATUSES = frozenset({401, 403, 404, 407})
"""The device's key or the model name is wrong: no item's fault, so items wait (released)."""
_LATER_STATUSES = frozenset({408, 409, 425})
"""Timeout, an earlier delivery of the same key still running, too early: try again later."""
# Any other 4xx (400, 413, 415, 422...) refuses the request itself: the item ends rejected.
_HEADER_GUESS = 400  # request line and headers before the first call measured them
_STORAGE_RETRY_CAP_S = 5.0


def open_cloud(
    config: RouterConfig, clock: Clock, meter: CloudMeter, budget: DataBudget, probes: ProbeBudget
) -> tuple[CloudClient, CloudClient, ConnectivityMonitor]:
    """The live and the drain CloudClients (one pool each, so escalations never queue behind
    deliveries; both reserve and settle their bytes in `budget`, and start calls at the pace of
    one RequestPacer) and the monitor both report to, with its breaker, probing as often as
    `probes` lets it."""
    assert config.cloud_url is not None
    assert config.device_key is not None
    tls = config.cloud_tls.context() if config.cloud_tls is not None else None
    pacer = RequestPacer(
        config.cloud_requests_per_s,
        config.cloud_burst,
        clock,
        recovery_s=config.cloud_rate_recovery_s,
        on_wait=meter.on_paced,
    )
    live, drain = (
        CloudClient(
            config.cloud_url,
            config.device_key,
            clock=clock,
            retry=retry,
            on_attempt=meter.on_attempt,
            budget=budget,
            pacer=pacer,
            compress=config.compress,
            probe_timeout_s=config.monitor.probe_timeout_s,
            max_connections=connections,
            tls=tls,
        )
        for retry, connections in (
            (config.live_retry, config.max_connections),
            # a connection per call in flight, or calls would queue in the pool, paid for
            (config.drain_retry, max(config.max_connections, config.drain_concurrency)),
        )
    )
    backoff = LinkBackoff(
        config.link_backoff_s, cap_s=max(config.link_backoff_cap_s, config.link_backoff_s)
    )
    breaker = CircuitBreaker(clock, failure_threshold=config.breaker_failures, cooldown=backoff)
    # Probes go through the live pool, keeping its connection warm for escalations.
    monitor = ConnectivityMonitor(
        live.check_ready,
        clock=clock,
        config=config.monitor,
        breaker=breaker,
        backoff=backoff,
        probe_wait=probes.wait_s,
    )
    live.observer = drain.observer = monitor
    return live, drain, monitor


class TokenBucket:
    """A byte-rate limiter: `rate` bytes per second, at most `burst` saved up; FIFO.

    `take(n)` waits until the bucket holds min(n, burst) tokens and then removes n, so the
    balance may go below zero: a call bigger than the burst is paid for by the wait of the next.
    `settle` corrects an estimate once the real size is known. Over any long run the bytes
    taken stay within rate * seconds + burst.
    """

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate: must be a finite number of bytes per second > 0, got {rate!r}")
        if not (math.isfinite(burst) and burst > 0):
            raise ValueError(f"burst: must be a finite number of bytes > 0, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock.monotonic()
        self._lock = asyncio.Lock()
        self.taken = 0
        """Bytes taken so far (after settling), for tests and benchmarks."""

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    async def take(self, n: int) -> float:
        """Wait for room for `n` bytes, take them; return the seconds waited."""
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        waited = 0.0
        async with self._lock:
            while True:
                self._refill()
                need = min(float(n), self.burst)
                # A byte of slack: clocks far from zero lose sub-microsecond precision.
                if self._tokens >= need - 1.0:
                    self._tokens -= n
                    self.taken += n
                    return waited
                wait = (need - self._tokens) / self.rate
                await self._clock.sleep(wait)
                waited += wait

    def settle(self, estimated: int, actual: int) -> None:
        """The call sent `actual` bytes where `estimated` were taken: charge or refund the gap."""
        self._refill()
        self._tokens = min(self.burst, self._tokens - (actual - estimated))
        self.taken += actual - estimated

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now


class Forwarder:
    """Run `run()` as a task; cancel it to stop (claimed items go back to pending at the next open
    or when their lease ends)."""

    def __init__(
        self,
        queue: DurableQueue,
        client: CloudClient,
        monitor: ConnectivityMonitor,
        budget: DataBudget,
        meter: CloudMeter,
        metrics: RouterMetrics,
        config: RouterConfig,
        clock: Clock,
        *,
        faults: FaultPlan | None = None,
    ) -> None:
        self._queue = queue
        self._faults = faults
        self._client = client
        self._monitor = monitor
        self._budget = budget
        self._meter = meter
        self._metrics = metrics
        self._config = config
        self._clock = clock
        cap = config.bandwidth_cap_bytes_per_s
        self.bucket = (
            TokenBucket(cap, max(cap * config.bandwidth_burst_s, 1.0), clock) if cap else None
        )
        self._slots = asyncio.Semaphore(config.drain_concurrency)
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._hold_until = 0.0
        self._failures = 0
        self._backoff = LinkBackoff(
            initial_s=config.failure_backoff_s,
            cap_s=max(config.failure_backoff_cap_s, config.failure_backoff_s),
        )
        self._overhead = _HEADER_GUESS
        self.groups = GroupPlanner(config.drain_group_items, config.drain_group_bytes, clock)
        self._storage_failures = 0
        self._storage_backoff = LinkBackoff(
            initial_s=config.failure_backoff_s,
            cap_s=max(_STORAGE_RETRY_CAP_S, config.failure_backoff_s),
        )
        # Building a call's request (binary tensors, group framing, gzip) and reading its answer
        # (JSON parse, decode, encoding for storage) is CPU work kept off the event loop, on
        # one thread of its own: a drain uses at most one core for it, and the local model's
        # runs never wait in the default pool behind it.
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="drain-encode")

    def wake(self) -> None:
        """New items were queued: look at once instead of at the next poll."""
        self._wake.set()

    # -- delivery -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await self._wait_ready()
                self._wake.clear()  # before the claim: an enqueue committed after it wakes us
                claim = max(self._config.drain_batch, self.groups.items_per_group)
                try:
                    items = await self._queue.claim_batch(claim, self._claim_bytes())
                except StorageError as error:
                    # A full or failing disk: nothing was claimed; look again after a pause.
                    log.warning("could not claim queued items: %s", error)
                    self._hold(self._storage_pause(), "storage")
                    continue
                self._storage_failures = 0
                if not items:
                    await self._nap(self._config.idle_poll_s)
                    continue
                self._metrics.batches.inc()
                await self._dispatch(items)
        finally:
            for task in list(self._in_flight):
                task.cancel()
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)
            self._encoder.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[[], R]) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._encoder, fn)

    def _claim_bytes(self) -> int:
        """At most what the cap lets out within a quarter of the lease: claimed items waiting
        for the bucket must not outlive their lease and be claimed a second time."""
        limit = self._config.drain_batch_bytes
        if self.bucket is not None:
            limit = min(limit, int(self.bucket.rate * self._config.queue_lease_s / 4))
        return max(1, limit)

    async def _wait_ready(self) -> None:
        while True:
            now = self._clock.monotonic()
            if self._hold_until > now:
                await self._nap(self._hold_until - now)
            elif self._monitor.state is LinkState.DOWN:
                await self._monitor.wait_up()
                if self._monitor.state is LinkState.DOWN:
                    await self._nap(0.1)  # the breaker closed and opened again meanwhile
            elif not self._budget.allows(self._overhead):
                self._hold(self._config.idle_poll_s, "budget")
            else:
                return

    async def _dispatch(self, items: list[QueuedItem]) -> None:
        if len(items) > 1 and self.groups.needs_check():  # nothing to group, nothing to ask
            await self._ask_about_groups()
        groups = self.groups.plan(items)
        for i, group in enumerate(groups):
            await self._slots.acquire()
            try:
                request = await self._request(group)
                if request is not None:
                    estimate = len(request.payload) + self._overhead
                    if self.bucket is not None:
                        await self.bucket.take(estimate)
            except BaseException:
                self._slots.release()
                raise
            if request is None:
                self._slots.release()
                continue
            why = self._blocked(estimate)
            if why is not None:
                self._slots.release()
                if self.bucket is not None:
                    self.bucket.settle(estimate, 0)
                rest = [item for later in groups[i:] for item in later]
                await self._release(rest, f"not sent: {why}", sent=False)
                return
            task = asyncio.create_task(self._send(group, request, estimate))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _ask_about_groups(self) -> None:
        """Whether, and how large, the cloud takes groups (GET /v2, counted as drain bytes)."""
        estimate = self._overhead  # a GET: its request line and headers
        if self.bucket is not None:
            await self.bucket.take(estimate)
        try:
            with self._meter.call("drain") as tally:
                try:
                    metadata = await self._client.server_metadata()
                finally:
                    if self.bucket is not None:
                        self.bucket.settle(estimate, tally.sent)
        except CloudRejected:  # a v2 server without server metadata: one request per item
            self.groups.learn({})
        except (CloudError, BudgetExhausted):
            self.groups.learn(None)
        else:
            self.groups.learn(metadata)
            log.info(
                "the cloud takes %s",
                f"groups of up to {self.groups.items_per_group} items per request"
                if self.groups.limits is not None
                else "one item per request",
            )

    async def _release(self, items: Sequence[QueuedItem], error: str, *, sent: bool = True) -> None:
        """Back to pending; `sent=False` when they never left: not counted as attempts."""
        await asyncio.gather(
            *(self._queue.release(item.ticket, error, sent=sent) for item in items)
        )

    def _blocked(self, estimate: int) -> str | None:
        if self._monitor.state is LinkState.DOWN:
            return "link down"
        if self._hold_until > self._clock.monotonic():
            return "paused"
        if not self._budget.allows(estimate):
            self._hold(self._config.idle_poll_s, "budget")
            return "data budget spent"
        return None

    async def _request(self, group: list[QueuedItem]) -> CloudRequest | None:
        """The very bytes the client will send for `group`, built once off the event loop
        (milliseconds for a group of 64), which also size the call. None if they cannot be
        built (never so for items this agent queued): the items that cannot be built alone are
        rejected, the others go back to pending to be grouped without them."""
        try:
            return await self._off_loop(self._build(group))
        except (ValueError, InvalidInput) as error:
            problems: list[Exception | None] = [error]
            if len(group) > 1:
                problems = [await self._build_error(item) for item in group]
            try:
                for item, problem in zip(group, problems, strict=True):
                    if problem is None:
                        await self._queue.release(item.ticket, "regrouped", sent=False)
                    else:
                        log.error("cannot build a request for ticket %s: %s", item.ticket, problem)
                        await self._queue.mark_rejected(item.ticket, f"cannot be sent: {problem}")
            except StorageError as failure:  # still claimed: the lease brings them back
                log.warning("could not settle unbuildable tickets: %s", failure)
            return None

    def _build(self, group: Sequence[QueuedItem]) -> Callable[[], CloudRequest]:
        binary, compress = self.groups.binary, self._client.compress
        return partial(request_for, group, binary=binary, compress=compress)

    async def _build_error(self, item: QueuedItem) -> Exception | None:
        try:
            await self._off_loop(self._build([item]))
        except (ValueError, InvalidInput) as error:
            return error
        return None

    async def _send(self, group: list[QueuedItem], request: CloudRequest, estimate: int) -> None:
        try:
            if len(group) == 1:
                await self._deliver(group[0], request, estimate)
            else:
                await self._deliver_group(group, request, estimate)
        except Exception:  # a failed SQLite write must not kill the forwarder; the lease saves it
            log.exception("could not record the outcome of tickets %s", [i.ticket for i in group])
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def _drain_call(self, body_bytes: int, estimate: int) -> Iterator[None]:
        """Around one delivery call: counted as a drain call, its bytes settled in the bucket,
        and the request line and headers it really took learnt for the next estimate."""
        with self._meter.call("drain") as tally:
            try:
                yield
            finally:
                if self.bucket is not None:
                    self.bucket.settle(estimate, tally.sent)
                if tally.attempts == 1 and tally.sent:
                    self._overhead = max(0, tally.sent - body_bytes)

    async def _deliver(self, item: QueuedItem, request: CloudRequest, estimate: int) -> None:
        try:
            with self._drain_call(len(request.payload), estimate):
                answer = await self._client.send(request, reader=self._encoder)
            stored = await self._off_loop(partial(stored_answer, answer.body))
        except BudgetExhausted as error:
            await self._queue.release(item.ticket, f"not sent: {error}", sent=False)
            self._hold(self._config.idle_poll_s, "budget")
        except CloudRejected as error:
            await self._refused(item, error)
        except CloudUnavailable as error:
            await self._queue.release(item.ticket, str(error))
            if error.retry_after is not None:
                self._hold(error.retry_after, "retry_after")
            elif not isinstance(error, CircuitOpen):
                self._failed()
        except InvalidInput as error:
            await self._queue.release(item.ticket, f"cloud answer is not a v2 response: {error}")
            self._failed()
        else:
            if self._faults is not None:
                self._faults.hit(AFTER_SEND_BEFORE_MARK)
            await self._store_answer(item, stored)
            self._failures = 0

    async def _deliver_group(
        self, group: list[QueuedItem], request: CloudRequest, estimate: int
    ) -> None:
        """One infer_group call for `group`; then each item as its own answer says. A group
        that fails as a whole leaves every item as a single call failing so would."""
        keys = [item.ticket for item in group]
        try:
            with self._drain_call(len(request.payload), estimate):
                answer = await self._client.send(request, reader=self._encoder)
            # Decoding 64 answers and encoding them for storage would hold the event loop for
            # tens of milliseconds (local answers wait meanwhile); one item's store per loop
            # step is all that stays.
            answers, stored = await self._off_loop(partial(stored_group, answer.body, keys))
        except BudgetExhausted as error:
            await self._release(group, f"not sent: {error}", sent=False)
            self._hold(self._config.idle_poll_s, "budget")
            return
        except CloudRejected as error:
            await self._group_refused(group, error)
            return
        except CloudUnavailable as error:
            await self._release(group, str(error))
            if error.retry_after is not None:
                self._hold(error.retry_after, "retry_after")
            elif not isinstance(error, CircuitOpen):
                self._failed()
            return
        except InvalidInput as error:
            await self._release(group, f"cloud answer is not a group answer: {error}")
            self._failed()
            return
        failed = False
        for item, result, ready in zip(group, answers, stored, strict=True):
            failed |= not await self._settle_item(item, result, ready)
        if not failed:
            self._failures = 0

    async def _settle_item(
        self, item: QueuedItem, result: GroupItemAnswer, stored: bytes | InvalidInput | None
    ) -> bool:
        """Store or refuse one item of a group as its own answer says (`stored`: what
        `stored_answers` made of it); False if it failed."""
        if isinstance(stored, InvalidInput):
            await self._queue.release(item.ticket, f"cloud answer is not a v2 response: {stored}")
            self._failed()
            return False
        if stored is not None:
            if self._faults is not None:
                self._faults.hit(AFTER_SEND_BEFORE_MARK)
            await self._store_answer(item, stored)
            return True
        message = f"cloud answered {result.status} for this item: {result.error[:200]}"
        if 400 <= result.status < 500 and result.status != 429:
            await self._refused(item, CloudRejected(message, result.status, result.retry_after))
            return False
        await self._queue.release(item.ticket, message)
        if result.retry_after is not None:
            self._hold(result.retry_after, "retry_after")
        else:
            self._failed()
        return False

    async def _group_refused(self, group: list[QueuedItem], error: CloudRejected) -> None:
        """A 4xx for the group as a whole is not the items' fault, unless it would be theirs
        alone too (a setup problem: device key, model name)."""
        if error.status == 413:  # too large as a group: smaller groups, the items stay
            self.groups.shrink(len(group))
            await self._release(group, f"group of {len(group)} too large: {error}")
        elif error.status in (400, 405):  # the cloud does not read groups (any more)
            self.groups.forget()
            await self._release(group, f"group refused: {error}")
            self._failed()
        else:
            if error.status == 404:  # no such model, or no such endpoint: ask again first
                self.groups.forget()
            for item in group:
                await self._refused(item, error)

    async def _store_answer(self, item: QueuedItem, result: bytes) -> None:
        """Store the cloud's answer under the item's ticket, trying again after a pause while
        the queue file cannot be written: the answer in hand is worth keeping, and if the
        process dies meanwhile the item is sent again and the cloud replays the answer."""
        while True:
            try:
                await self._queue.mark_delivered(item.ticket, result)
                return
            except StorageError as error:
                log.warning("could not store the answer to ticket %s: %s", item.ticket, error)
                self._metrics.holds.labels("storage").inc()
                await self._clock.sleep(self._storage_pause())

    def _storage_pause(self) -> float:
        """How long to wait before writing to the queue file again: growing, but never past
        a few seconds, so delivery resumes soon after the disk has room again."""
        self._storage_failures += 1
        return self._storage_backoff(self._storage_failures)

    async def _refused(self, item: QueuedItem, error: CloudRejected) -> None:
        status = error.status
        if status in SETUP_STATUSES:
            await self._queue.release(item.ticket, str(error))
            if self._hold_until <= self._clock.monotonic():
                log.error(
                    "the cloud refused this device or model (%s); pausing delivery for %.0f s: %s",
                    status,
                    self._config.setup_backoff_s,
                    error,
                )
            self._hold(self._config.setup_backoff_s, "setup")
        elif status in _LATER_STATUSES:
            await self._queue.release(item.ticket, str(error))
            if error.retry_after is not None:
                self._hold(error.retry_after, "retry_after")
            else:
                self._failed()
        else:
            log.warning("the cloud rejected ticket %s: %s", item.ticket, error)
            await self._queue.mark_rejected(item.ticket, f"rejected by the cloud: {error}")

    def _failed(self) -> None:
        self._failures += 1
        self._hold(self._backoff(self._failures), "failure")

    def _hold(self, seconds: float, reason: str) -> None:
        self._hold_until = max(self._hold_until, self._clock.monotonic() + seconds)
        self._metrics.holds.labels(reason).inc()

    async def _nap(self, seconds: float) -> None:
        """Sleep on the clock, or less if woken."""
        await sleep_or_wake(self._clock, seconds, self._wake)


def request_for(group: Sequence[QueuedItem], *, binary: bool, compress: bool) -> CloudRequest:
    """The cloud request delivering `group`: one item's own infer call, or an infer_group call.
    Pure: the forwarder runs it on its worker thread."""
    if len(group) == 1:
        item = group[0]
        return infer_request(
            item.model, item.payload, idempotency_key=item.ticket, binary=binary,
            compress=compress,
        )  # fmt: skip
    items = [GroupItem(item.ticket, item.payload) for item in group]
    return group_request(group[0].model, items, binary=binary, compress=compress)


def stored_group(
    answer: Mapping[str, Any], keys: Sequence[str]
) -> tuple[list[GroupItemAnswer], list[bytes | InvalidInput | None]]:
    """A group's answer read for `keys` (InvalidInput if it is not one for them) and what
    `stored_answers` makes of it. Pure: the forwarder runs it on its worker thread."""
    answers = decode_group_answer(answer, keys)
    return answers, stored_answers(answers)


def stored_answer(response: Mapping[str, Any]) -> bytes:
    """What a delivered ticket keeps of the cloud's v2 `response`; InvalidInput if it does not
    decode as one (only an answer that decodes is stored)."""
    decode_infer_response(response)
    return encode_result(dict(response))


def stored_answers(answers: Sequence[GroupItemAnswer]) -> list[bytes | InvalidInput | None]:
    """`stored_answer` of each item's 200 response, or the InvalidInput it raised; None for
    an item the cloud answered otherwise. Pure: the forwarder runs it on a worker thread."""
    out: list[bytes | InvalidInput | None] = []
    for result in answers:
        if result.status != 200 or result.response is None:
            out.append(None)
            continue
        try:
            out.append(stored_answer(result.response))
        except InvalidInput as error:
            out.append(error)
    return out


async def housekeep(
    queue: DurableQueue,
    budget: DataBudget,
    config: RouterConfig,
    clock: Clock,
    refresh: Callable[[], Awaitable[None]],
) -> None:
    """Until cancelled: expire due items and `refresh` the figures every `expire_interval_s`;
    purge items ended more than `results_retention_s` ago every `purge_interval_s`. Runs with
    or without a cloud, so TTLs hold while the link is down."""
    next_purge = clock.monotonic()
    while True:
        try:
            await queue.expire_due()
            if clock.monotonic() >= next_purge:
                await queue.purge(config.results_retention_s)
                await budget.forget_before()
                next_purge = clock.monotonic() + config.purge_interval_s
            await refresh()
        except Exception:  # a full disk now is no reason to stop expiring later
            log.exception("queue housekeeping failed; trying again later")
        await clock.sleep(config.expire_interval_s)
