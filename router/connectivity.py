"""ConnectivityMonitor: what the router knows about the link to the cloud, from probes and real calls.

It keeps the link state, round-trip time, expected cloud latency and goodput, owns the circuit
breaker, probes `/v2/health/ready` with a growing backoff while the link is down (never more than
`recovery_probe_cap_s` apart while items wait for it), as often as the data budget lets it, and
wakes whoever waits for the link to come back.

Link states:
- down: the breaker is not closed (it saw `failure_threshold` failures in a row and no probe has
  succeeded since), or nothing has succeeded yet since start. Escalation is pointless.
- degraded: the breaker is closed, but a call or probe failed within `recent_window_s`, or the
  round-trip time is above `degraded_rtt_s`. Calls mostly work; expect retries and slowness.
- up: the breaker is closed, nothing failed recently and the round-trip time is normal.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from router.breaker import BreakerState, CircuitBreaker
from router.clock import Clock, SystemClock, sleep_or_wake
from router.decision import LinkState, LinkView
from router.errors import BudgetExhausted
from router.link_check import failure_cause
from router.retrying import LinkBackoff

__all__ = ["ConnectivityMonitor", "LinkSnapshot", "MonitorConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkSnapshot:
    """What the escalation policy needs to know about the link, at one instant."""

    state: LinkState
    breaker: BreakerState
    rtt_s: float | None
    """EWMA of the time from sending a request to its response headers (probes and calls)."""
    expected_latency_s: float | None
    """Quantile (p90 by default) of the whole duration of recent successful cloud calls."""
    goodput_bytes_per_s: float | None
    """Bytes moved by recent successful calls divided by the time they took; the time includes
    the cloud model's, so this is a lower bound of what the link itself carries."""
    consecutive_failures: int
    since_success_s: float | None
    """Seconds since the last success; None if nothing has succeeded yet."""

    @property
    def breaker_open(self) -> bool:
        """True while calls are held back (open, or half-open waiting for its probe)."""
        return self.breaker is not BreakerState.CLOSED


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    probe_interval_s: float = 30.0
    """While the link works, probe when nothing was heard from the cloud for this long."""
    probe_timeout_s: float = 5.0
    """A probe that takes longer counts as failed."""
    recent_window_s: float = 120.0
    """Failures this recent make the link degraded; goodput is measured over this window."""
    degraded_rtt_s: float = 2.0
    """A round-trip time above this makes the link degraded."""
    rtt_alpha: float = 0.3
    """Weight of the newest sample in the round-trip time's EWMA."""
    latency_samples: int = 32
    """How many recent successful calls the expected latency is taken from."""
    latency_quantile: float = 0.9
    recovery_probe_cap_s: float = 10.0
    """While items wait for a down link, probes are at most this far apart (the backoff is
    capped there), so their delivery starts within about this long of the link's return. A
    probe that cannot connect sends nothing, so this costs no data budget."""

    def __post_init__(self) -> None:
        for name in (
            "probe_interval_s",
            "probe_timeout_s",
            "recent_window_s",
            "degraded_rtt_s",
            "recovery_probe_cap_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("rtt_alpha", "latency_quantile"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.latency_samples < 1:
            raise ValueError(f"latency_samples must be at least 1, got {self.latency_samples}")


class ConnectivityMonitor:
    """Link state from `probe()` (GET /v2/health/ready, True when ready) and from real calls.

    The CloudClient reports each call through `allow_call` / `record_success` /
    `record_failure` / `record_neutral` (its CallObserver protocol). Use from one event loop.
    """

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        *,
        clock: Clock | None = None,
        config: MonitorConfig | None = None,
        breaker: CircuitBreaker | None = None,
        backoff: LinkBackoff | None = None,
        probe_wait: Callable[[bool], float] | None = None,
    ) -> None:
        """`probe_wait(urgent)` says how many seconds the data budget wants the next probe to
        wait, urgent when items wait for a down link (router.budget.ProbeBudget); `probe` may
        raise BudgetExhausted instead of sending."""
        self._probe = probe
        self._probe_wait = probe_wait
        self._clock = clock or SystemClock()
        self.config = config or MonitorConfig()
        self._backoff = backoff or LinkBackoff()
        self.breaker = breaker or CircuitBreaker(self._clock, cooldown=self._backoff)
        cfg = self.config
        self._observations: deque[tuple[float, bool]] = deque(maxlen=64)
        self._latencies: deque[float] = deque(maxlen=cfg.latency_samples)
        self._transfers: deque[tuple[float, int, float]] = deque(maxlen=cfg.latency_samples)
        self._rtt: float | None = None
        self._last_success: float | None = None
        self._next_probe_at = self._clock.monotonic()
        self._refused_until = -math.inf
        self._waiting = False
        self._listeners: list[Callable[[LinkState], None]] = []
        self._last_state = LinkState.DOWN
        self._announced = False  # the first verdict is logged even when it is "down"
        self._last_cause = "no answer yet"
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False

    # --- what the policy and the forwarder read -------------------------------------------

    @property
    def state(self) -> LinkState:
        if self.breaker.state is not BreakerState.CLOSED or self._last_success is None:
            return LinkState.DOWN
        now = self._clock.monotonic()
        recent_failure = any(
            not ok and now - t <= self.config.recent_window_s for t, ok in self._observations
        )
        if recent_failure or (self._rtt is not None and self._rtt > self.config.degraded_rtt_s):
            return LinkState.DEGRADED
        return LinkState.UP

    def snapshot(self) -> LinkSnapshot:
        now = self._clock.monotonic()
        return LinkSnapshot(
            state=self.state,
            breaker=self.breaker.state,
            rtt_s=self._rtt,
            expected_latency_s=self._expected_latency(),
            goodput_bytes_per_s=self._goodput(now),
            consecutive_failures=self.breaker.consecutive_failures,
            since_success_s=None if self._last_success is None else now - self._last_success,
        )

    def view(self) -> LinkView:
        """The part of the snapshot the escalation policy reads."""
        snap = self.snapshot()
        return LinkView(
            state=snap.state,
            breaker_open=snap.breaker_open,
            expected_latency_s=snap.expected_latency_s,
            goodput_bytes_per_s=snap.goodput_bytes_per_s,
        )

    def add_listener(self, listener: Callable[[LinkState], None]) -> Callable[[], None]:
        """Call `listener(new_state)` on every change of link state; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def wait_up(self) -> None:
        """Return once the link is usable (up or degraded); at once if it already is."""
        await self._up.wait()

    # --- what the cloud client reports (CallObserver) --------------------------------------

    def allow_call(self) -> bool:
        return self.breaker.allow()

    def record_success(self, rtt_s: float, bytes_transferred: int, seconds: float) -> None:
        """A call succeeded: `rtt_s` to its response headers, `seconds` in all."""
        now = self._clock.monotonic()
        self._latencies.append(seconds)
        self._transfers.append((now, bytes_transferred, seconds))
        self._observe(True, rtt_s)

    def record_failure(self, kind: str = "error", cause: str | None = None) -> None:
        """A call or probe failed in a way that says the cloud or the link is unwell; `cause`
        says why in a word (router.link_check: dns, refused, timeout, tls, http 503...)."""
        log.debug("cloud call failed: %s (%s)", kind, cause or "no cause given")
        self._last_cause = cause or kind
        self._observe(False, None)

    def record_neutral(self, rtt_s: float | None = None) -> None:
        """The cloud answered but the answer says nothing of its health (4xx, 429)."""
        self.breaker.release()
        if rtt_s is not None:
            self._update_rtt(rtt_s)
        self._wake.set()

    def set_waiting(self, waiting: bool) -> None:
        """Items wait (or no longer wait) for the link: while they do, a down link is probed
        at least every `recovery_probe_cap_s`."""
        if waiting and not self._waiting:
            cap = self.config.recovery_probe_cap_s
            self.breaker.hasten(cap)
            self._next_probe_at = min(self._next_probe_at, self._clock.monotonic() + cap)
            self._wake.set()
        self._waiting = waiting

    # --- probing -----------------------------------------------------------------------------

    async def probe(self) -> bool:
        """Probe once if the breaker allows it (False otherwise) and record the result."""
        if not self.breaker.allow():
            return False
        start = self._clock.monotonic()
        try:
            async with asyncio.timeout(self.config.probe_timeout_s):
                ok = await self._probe()
        except asyncio.CancelledError:
            self.breaker.release()  # the half-open slot must not stay taken
            raise
        except BudgetExhausted:  # nothing was sent, nothing learnt; ask again later
            self.breaker.release()
            self._refused_until = self._clock.monotonic() + self.config.probe_interval_s
            return False
        except Exception as error:  # whatever the probe raised, the cloud did not say "ready"
            log.debug("cloud probe failed: %r", error)
            self.record_failure("probe", failure_cause(error))
            return False
        if ok:
            self._observe(True, self._clock.monotonic() - start)
        else:
            self.record_failure("probe", "not ready")
        return ok

    async def run(self) -> None:
        """Probe until `stop()`: at once, then on the schedule the last outcome set."""
        while not self._stopping:
            delay = max(self._next_probe_in(), self._budget_wait())
            if delay > 0:
                await self._sleep_or_wake(delay)
            elif not await self.probe() and self.breaker.state is BreakerState.HALF_OPEN:
                # a real call holds the half-open slot; its verdict will wake us
                await self._sleep_or_wake(max(self.breaker.retry_in(), 0.01))

    def stop(self) -> None:
        """End `run()` soon; a stopped monitor stays stopped."""
        self._stopping = True
        self._wake.set()

    # --- internals ---------------------------------------------------------------------------

    def _observe(self, ok: bool, rtt_s: float | None) -> None:
        now = self._clock.monotonic()
        self._observations.append((now, ok))
        if ok:
            self.breaker.record_success()
            self._last_success = now
            self._next_probe_at = now + self.config.probe_interval_s
        else:
            self.breaker.record_failure()
            backoff = self._backoff(self.breaker.consecutive_failures)
            if self._waiting:
                backoff = min(backoff, self.config.recovery_probe_cap_s)
                self.breaker.hasten(self.config.recovery_probe_cap_s)
            self._next_probe_at = now + backoff
        if rtt_s is not None:
            self._update_rtt(rtt_s)
        self._publish()
        self._wake.set()

    def _update_rtt(self, rtt_s: float) -> None:
        alpha = self.config.rtt_alpha
        self._rtt = rtt_s if self._rtt is None else alpha * rtt_s + (1 - alpha) * self._rtt

    def _publish(self) -> None:
        state = self.state
        if state is LinkState.DOWN:
            self._up.clear()
        else:
            self._up.set()
        changed = state is not self._last_state
        if not changed and self._announced:
            return
        self._last_state = state
        self._announced = True
        self._log_state(state)
        if not changed:  # the first verdict, "down" as at start: said, but not news
            return
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:  # one broken listener must not blind the others
                log.exception("link state listener failed")

    def _budget_wait(self) -> float:
        wait = self._refused_until - self._clock.monotonic()
        if self._probe_wait is not None:
            wait = max(wait, self._probe_wait(self._waiting and self.state is LinkState.DOWN))
        return wait

    def _log_state(self, state: LinkState) -> None:
        """One line per change of link state: down with its cause, up with the round trip."""
        rtt = "unknown" if self._rtt is None else f"{self._rtt * 1000:.0f} ms"
        if state is LinkState.DOWN:
            log.warning("cloud link is down: %s", self._last_cause)
        elif state is LinkState.DEGRADED:
            now = self._clock.monotonic()
            recent = any(
                not ok and now - t <= self.config.recent_window_s for t, ok in self._observations
            )
            why = f"a recent failure ({self._last_cause})" if recent else "slow"
            log.warning("cloud link is degraded: %s, round trip %s", why, rtt)
        else:
            log.info("cloud link is up, round trip %s", rtt)

    def _next_probe_in(self) -> float:
        state = self.breaker.state
        if state is BreakerState.CLOSED:
            return self._next_probe_at - self._clock.monotonic()
        return self.breaker.retry_in()

    async def _sleep_or_wake(self, seconds: float) -> None:
        self._wake.clear()
        await sleep_or_wake(self._clock, seconds, self._wake)

    def _expected_latency(self) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        rank = math.ceil(self.config.latency_quantile * len(ordered)) - 1
        return ordered[max(0, rank)]

    def _goodput(self, now: float) -> float | None:
        window = self.config.recent_window_s
        recent = [(b, s) for t, b, s in self._transfers if now - t <= window]
        seconds = sum(s for _, s in recent)
        if not recent or seconds <= 0:
            return None
        return sum(b for b, _ in recent) / seconds
