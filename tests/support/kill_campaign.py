"""The kill campaign: SIGKILL the agent again and again at random moments (start-up, enqueue, live
escalation, drain) and the gateway's workers now and then, with the link flapping, then account.

Shared by the short seeded run of the default suite (tests/integration/test_agent_power_cut.py)
and the long one (tests/soak/test_kill_campaign.py). The cloud is a real `cloud-gateway` with two
workers in upstream mode, in front of the counting upstream (tests/support/counting_upstream.py),
behind the fault proxy that flaps. After every kill the agent's files get `PRAGMA
integrity_check`, and the gateway's idempotency file after every kill of a worker.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.conftest import agent_ready, cloud_agent_command
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.counting_upstream import CountingUpstream
from tests.support.fault_proxy import FaultProxy
from tests.support.ledger import Accounting, Ledger, integrity_check
from tests.support.processes import Daemon, spawn_daemon, start_daemon, wait_until
from tests.support.reliability import queue_settled, send_escalations

__all__ = ["AGENT_FILES", "IN_FLIGHT_PER_AGENT", "Campaign", "CampaignPlan", "CampaignReport"]

AGENT_FILES = ("queue.sqlite", "budget.sqlite")
"""The agent's SQLite files checked after every kill."""


# One agent has at most this many model runs in flight at the gateway: the forwarder's four
# calls (drain_concurrency) of up to 64 queued items each (drain_group_items), and one live
# escalation. A worker's death can cut off at most that many runs before their answers are
# stored.
IN_FLIGHT_PER_AGENT = 4 * 64 + 1


@dataclass(frozen=True)
class CampaignPlan:
    agent_kills: int
    gateway_kills: int
    seed: int = 13
    startup_share: float = 0.15
    """Share of the agent's lives cut short during start-up, before it serves."""
    life_s: tuple[float, float] = (0.05, 1.5)
    """A serving life lasts a uniform draw from this range, then the power goes."""
    per_life: int = 60
    """At most this many requests per life, so a life's length never grows with the machine's
    speed."""
    flap_s: tuple[float, float] = (0.3, 1.0)
    """The link is cut, then restored, each for a uniform draw from this range."""
    drain_timeout_s: float = 120.0


@dataclass
class CampaignReport:
    plan: CampaignPlan
    accounting: Accounting
    agent_kills: Counter[str] = field(default_factory=Counter)
    """By what was happening: start-up, request in flight (enqueue or live escalation), delivery
    in flight (drain); a kill may count under both of the last two."""
    gateway_kills: int = 0
    integrity_checks: int = 0
    integrity_failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def duplicates_per_gateway_kill(self) -> float:
        return self.accounting.duplicates / self.gateway_kills if self.gateway_kills else 0.0

    def rows(self) -> list[tuple[str, str]]:
        a = self.accounting
        return [
            ("agent SIGKILLs", str(self.agent_kills["total"])),
            ("... during start-up", str(self.agent_kills["startup"])),
            ("... with a request in flight", str(self.agent_kills["request"])),
            ("... with deliveries in flight", str(self.agent_kills["drain"])),
            ("gateway worker SIGKILLs", str(self.gateway_kills)),
            ("requests sent", str(a.sent)),
            ("acknowledged: queued / answered live", f"{a.routes['queue']} / {a.routes['cloud']}"),
            ("committed, acknowledgement cut off", str(a.unacknowledged_in_queue)),
            (
                "integrity checks (failed)",
                f"{self.integrity_checks} ({len(self.integrity_failures)})",
            ),
            ("acknowledged requests lost", str(len(a.lost))),
            ("acknowledged requests unfinished", str(len(a.unfinished))),
            ("answers unlike the cloud model's", str(len(a.wrong_answers))),
            ("model runs (inputs run more than once)", f"{a.runs} ({a.duplicates})"),
            ("duplicates per gateway kill", f"{self.duplicates_per_gateway_kill:.3f}"),
            ("most runs of one input", str(a.max_runs_per_input)),
            ("wall time", f"{self.wall_s:.0f} s"),
        ]

    def table(self) -> str:
        lines = ["| figure | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)


class Campaign:
    """Run with `run()` inside `with Campaign(...) as c:` (the context stops every process)."""

    def __init__(self, workdir: Path, plan: CampaignPlan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self._kill_rng = random.Random(plan.seed + 2)  # the killer's thread draws its own
        self.ledger = Ledger()
        self.report = CampaignReport(plan, Accounting())
        self.after_kill: Callable[[int, Path], None] | None = None
        """Called with the life's number and the state dir after each kill (negative controls
        tamper with the files there)."""
        self.state = workdir / "agent" / "state"
        self._stack: list[Callable[[], None]] = []
        self._start_times: list[float] = []
        self._lock = threading.Lock()
        self.upstream: CountingUpstream
        self.gateway: Gateway
        self.proxy: FaultProxy

    # -- the parts --------------------------------------------------------------------------

    def __enter__(self) -> Campaign:
        try:
            self.upstream = CountingUpstream()
            self._stack.append(self.upstream.close)
            self.gateway = start_gateway(
                self.workdir / "gateway",
                "--workers",
                "2",
                "--upstream",
                self.upstream.url,
                # The campaign is about crashes: the device's rate limit would only slow the
                # drain after an outage down.
                env={"CLOUD_GATEWAY_RATE_LIMIT_PER_S": "10000"},
            )
            self._stack.append(lambda: self.gateway.daemon.stop())
            self.proxy = FaultProxy("127.0.0.1", self.gateway.daemon.ports["http"]).start()
            self._stack.append(self.proxy.close)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._stack:
            self._stack.pop()()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        return cloud_agent_command(self.workdir / "agent", self.gateway, self.proxy)

    def start_agent(self) -> Daemon:
        args, env = self._command()
        return start_daemon("edge-agent", args, self.workdir / "agent", ready=agent_ready, env=env)

    # -- the campaign -----------------------------------------------------------------------

    def run(self) -> CampaignReport:
        started = time.monotonic()
        plan = self.plan
        with self._flapping():
            for life in range(plan.agent_kills):
                # Each life kills a gateway worker with the chance owed / lives left: the kills
                # spread over the campaign, and the last lives make up for any still owed.
                owed = plan.gateway_kills - self.report.gateway_kills
                killer = None
                if owed > 0 and self.rng.random() < owed / (plan.agent_kills - life):
                    killer = threading.Timer(
                        self.rng.uniform(0.0, plan.life_s[1]), self._kill_gateway_worker
                    )
                    killer.start()
                if self.rng.random() < plan.startup_share:
                    self._startup_life()
                else:
                    self._serving_life()
                if killer is not None:
                    killer.join()
                self.report.agent_kills["total"] += 1
                self._check(self.state, AGENT_FILES)
                if self.after_kill is not None:
                    self.after_kill(life, self.state)
        self.proxy.restore()
        self._drain()
        self.report.accounting = self.ledger.account(
            self.state / "queue.sqlite", self.upstream.counts()
        )
        self.report.wall_s = time.monotonic() - started
        return self.report

    def _startup_life(self) -> None:
        """Spawn the agent and cut the power before it serves (a draw within the start-up
        times measured so far)."""
        args, env = self._command()
        typical = statistics.median(self._start_times) if self._start_times else 1.0
        agent = spawn_daemon("edge-agent", args, self.workdir / "agent", env=env)
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.process.wait(self.rng.uniform(0.0, typical))
        agent.kill()
        self.report.agent_kills["startup"] += 1

    def _serving_life(self) -> None:
        begun = time.monotonic()
        agent = self.start_agent()
        self._start_times.append(time.monotonic() - begun)
        stop = threading.Event()
        busy = threading.Event()
        client = threading.Thread(target=self._send, args=(agent, stop, busy), daemon=True)
        client.start()
        try:
            stop.wait(self.rng.uniform(*self.plan.life_s))
            in_flight = busy.is_set()
        finally:
            agent.kill()
            stop.set()
            client.join(30)
        if in_flight:
            self.report.agent_kills["request"] += 1
        if self._deliveries_in_flight():
            self.report.agent_kills["drain"] += 1

    def _send(self, agent: Daemon, stop: threading.Event, busy: threading.Event) -> None:
        """Escalations one at a time until the power goes; each acknowledgement is recorded."""
        send_escalations(agent, self.ledger, self.plan.per_life, stop=stop, busy=busy)

    def _kill_gateway_worker(self) -> None:
        """SIGKILL one of the gateway's workers (on the timer's thread); while both are being
        started again, wait for one rather than skip the kill."""
        deadline = time.monotonic() + 30
        while not (pids := self.gateway.worker_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.kill(self._kill_rng.choice(pids), signal.SIGKILL)
        except (IndexError, ProcessLookupError):
            return  # none came up, or it died meanwhile: the kill stays owed
        with self._lock:
            self.report.gateway_kills += 1
        self._check(self.workdir / "gateway" / "state", ("idempotency.sqlite3",))

    def _deliveries_in_flight(self) -> bool:
        queue = self.state / "queue.sqlite"
        if not queue.exists():
            return False
        try:
            with sqlite3.connect(f"{queue.resolve().as_uri()}?mode=ro", uri=True) as db:
                row = db.execute("SELECT COUNT(*) FROM items WHERE state = 'in_flight'").fetchone()
        except sqlite3.DatabaseError:
            return False
        return bool(row[0])

    def _check(self, directory: Path, files: tuple[str, ...]) -> None:
        for name in files:
            result = integrity_check(directory / name)
            with self._lock:  # the gateway's checks run on the killer's thread
                self.report.integrity_checks += 1
                if result != "ok":
                    self.report.integrity_failures.append(f"{name}: {result}")

    @contextmanager
    def _flapping(self) -> Iterator[None]:
        stop = threading.Event()
        rng = random.Random(self.plan.seed + 1)

        def flap() -> None:
            while not stop.is_set():
                self.proxy.cut()
                if stop.wait(rng.uniform(*self.plan.flap_s)):
                    return
                self.proxy.restore()
                stop.wait(rng.uniform(*self.plan.flap_s))

        flapper = threading.Thread(target=flap, daemon=True)
        flapper.start()
        try:
            yield
        finally:
            stop.set()
            flapper.join(10)
            self.proxy.restore()

    def _drain(self) -> None:
        """One last life with the link up, until every item has ended; then a clean stop."""
        try:
            wait_until(lambda: len(self.gateway.worker_pids()) == 2, 60, what="both workers")
        except TimeoutError as exc:  # say what the supervisor saw happen to them
            process = self.gateway.daemon.process
            log = self.gateway.daemon.log().splitlines()
            raise AssertionError(
                f"{exc} (gateway pid {process.pid}, exit code {process.poll()}); its log ends:\n"
                + "\n".join(log[-40:])
            ) from None
        agent = self.start_agent()
        try:
            wait_until(
                queue_settled(self.state),
                self.plan.drain_timeout_s,
                interval=0.2,
                what="every queued item to end",
            )
        finally:
            agent.stop()
        self._check(self.state, AGENT_FILES)
