"""Forwarder: drains the durable queue to the cloud while the link is up, within a bandwidth cap.

Highest priority first (the queue's claim order), in batches, up to `drain_concurrency` calls in
flight, each call paid for in a token bucket *before* it is sent. Each claimed item ends in one
of three ways per attempt: delivered (the answer is stored under its ticket), released for a later
attempt (the cloud or the link failed, or the device's setup is wrong), or rejected (the cloud
refused the request itself): router.delivery_outcomes. Building a call's request and reading its
answer (the functions at the end) run on the forwarder's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from model_runtime.errors import InvalidInput
from model_runtime.fault_points import FaultPlan
from model_runtime.infer_group import GroupItem, GroupItemAnswer, decode_group_answer
from model_runtime.v2_json import decode_infer_response
from router.budget import DataBudget
from router.clock import Clock, sleep_or_wake
from router.cloud_client import CloudClient, CloudRequest, group_request, infer_request
from router.config import RouterConfig
from router.connectivity import ConnectivityMonitor
from router.decision import LinkState
from router.delivery_outcomes import SETUP_STATUSES, DeliveryOutcomes
from router.durable_queue import DurableQueue, QueuedItem
from router.errors import BudgetExhausted, CloudError, CloudRejected, CloudUnavailable, StorageError
from router.grouping import GroupPlanner
from router.metrics import CloudMeter, RouterMetrics
from router.tickets import encode_result
from router.token_bucket import TokenBucket

__all__ = [
    "SETUP_STATUSES",
    "Forwarder",
    "TokenBucket",
    "request_for",
    "stored_answer",
    "stored_answers",
    "stored_group",
]

log = logging.getLogger(__name__)
R = TypeVar("R")

_HEADER_GUESS = 400  # request line and headers before the first call measured them


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
        self._overhead = _HEADER_GUESS
        self.groups = GroupPlanner(config.drain_group_items, config.drain_group_bytes, clock)
        self._outcomes = DeliveryOutcomes(queue, self.groups, metrics, config, clock, faults=faults)
        # Building a call's request (binary tensors, group framing, gzip) and reading its answer
        # (JSON parse, decode, encoding for storage) is CPU work kept off the event loop, on
        # one thread of its own: a drain uses at most one core for it, and the local model's
        # runs never wait in the default pool behind it.
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="drain-encode")

    def wake(self) -> None:
        """New items were queued: look at once instead of at the next poll."""
        self._wake.set()

    # -- the drain loop -------------------------------------------------------------------------

    async def run(self) -> None:
        outcomes = self._outcomes
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
                    outcomes.hold(outcomes.storage_pause(), "storage")
                    continue
                outcomes.storage_works()
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
            if self._outcomes.hold_until > now:
                await self._nap(self._outcomes.hold_until - now)
            elif self._monitor.state is LinkState.DOWN:
                await self._monitor.wait_up()
                if self._monitor.state is LinkState.DOWN:
                    await self._nap(0.1)  # the breaker closed and opened again meanwhile
            elif not self._budget.allows(self._overhead):
                self._outcomes.hold(self._config.idle_poll_s, "budget")
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
                await self._outcomes.release(rest, f"not sent: {why}", sent=False)
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

    def _blocked(self, estimate: int) -> str | None:
        if self._monitor.state is LinkState.DOWN:
            return "link down"
        if self._outcomes.held():
            return "paused"
        if not self._budget.allows(estimate):
            self._outcomes.hold(self._config.idle_poll_s, "budget")
            return "data budget spent"
        return None

    async def _nap(self, seconds: float) -> None:
        """Sleep on the clock, or less if woken."""
        await sleep_or_wake(self._clock, seconds, self._wake)

    # -- one call -------------------------------------------------------------------------------

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
            await self._outcomes.unbuildable(group, problems)
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
        except CloudRejected as error:
            await self._outcomes.refused(item, error)
        except (BudgetExhausted, CloudUnavailable, InvalidInput) as error:
            await self._outcomes.call_failed([item], error, "a v2 response")
        else:
            await self._outcomes.answered(item, stored)
            self._outcomes.succeeded()

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
        except CloudRejected as error:
            await self._outcomes.group_refused(group, error)
            return
        except (BudgetExhausted, CloudUnavailable, InvalidInput) as error:
            await self._outcomes.call_failed(group, error, "a group answer")
            return
        failed = False
        for item, result, ready in zip(group, answers, stored, strict=True):
            failed |= not await self._outcomes.settle_item(item, result, ready)
        if not failed:
            self._outcomes.succeeded()


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
