"""The Jepsen-style accounting of the reliability tests: what the apps were told, against what the
agent's files hold and what the cloud model really ran.

Every request a test sends gets an input no other request has (so the counting upstream can tell
runs apart); the ledger records it when sent and again when acknowledged: queued (a ticket) or
answered by the cloud at once. `account` then reads the agent's queue file (the agent stopped)
and the upstream's counts, and says what was lost, what never finished, which answers differ from
the cloud model's, and how often the model ran more than once for one input.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from model_runtime.demo import HELDOUT
from router.tickets import decode_result
from tests.support.counting_upstream import digest, run_cloud_model

__all__ = ["END_STATES", "Accounting", "Ledger", "integrity_check"]

END_STATES = frozenset({"delivered", "expired", "dropped", "rejected"})
_X = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)


@dataclass
class _Request:
    seq: int
    x: npt.NDArray[np.float32]
    digest: str
    route: str | None = None
    """None until acknowledged; then "queue" (with a ticket), "cloud" or "edge"."""
    ticket: str | None = None
    answer_ok: bool = True


class Ledger:
    """Thread-safe: the campaign's client threads write, the test reads at the end."""

    def __init__(self, first: int = 0) -> None:
        """`first`: the number of the ledger's first input; ledgers whose numbers do not overlap
        send different inputs, so one counting upstream can serve them one after another."""
        self._lock = threading.Lock()
        self._requests: list[_Request] = []
        self._first = first

    def new_input(self) -> tuple[int, npt.NDArray[np.float32]]:
        """A one-row input no other request of the ledger has: a held-out digit whose corner
        pixel (always 0 in the data set) carries the request's number."""
        with self._lock:
            seq = len(self._requests)
            number = self._first + seq
            x = _X[number % len(_X)][None, :].copy()
            x[0, 0] = (number + 1) / 2**20
            self._requests.append(_Request(seq, x, digest(x)))
        return seq, x

    def acknowledged(
        self,
        seq: int,
        route: str,
        ticket: str | None = None,
        outputs: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> None:
        """The app got an answer: queued under `ticket`, or answered with `outputs` now (then
        they are compared with the cloud model's at once)."""
        with self._lock:
            request = self._requests[seq]
        ok = True
        if route == "cloud" and outputs is not None:
            ok = _same_answer(outputs, run_cloud_model(request.x))
        with self._lock:
            request.route, request.ticket, request.answer_ok = route, ticket, ok

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self._requests)

    def acked_tickets(self) -> list[str]:
        with self._lock:
            return [r.ticket for r in self._requests if r.ticket is not None]

    def queued(self) -> list[tuple[str, npt.NDArray[np.float32]]]:
        """(ticket, input) of every request acknowledged as queued."""
        with self._lock:
            return [(r.ticket, r.x) for r in self._requests if r.ticket is not None]

    def account(self, queue_file: Path, runs: Counter[str]) -> Accounting:
        """Read the queue file (of a stopped agent) and the upstream's runs per digest."""
        with self._lock:
            requests = list(self._requests)
        by_ticket = {r.ticket: r for r in requests if r.ticket is not None}
        with sqlite3.connect(f"{queue_file.resolve().as_uri()}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT ticket, state, result FROM items").fetchall()
        found = {ticket: (state, result) for ticket, state, result in rows}
        acc = Accounting(sent=len(requests))
        for r in requests:
            if r.route is None:
                continue
            acc.acknowledged += 1
            acc.routes[r.route] += 1
            if not r.answer_ok:
                acc.wrong_answers.append(f"seq {r.seq} (live)")
            if r.ticket is None:
                continue
            if r.ticket not in found:
                acc.lost.append(r.ticket)
                continue
            state, result = found[r.ticket]
            acc.end_states[state] += 1
            if state not in END_STATES:
                acc.unfinished.append(r.ticket)
            elif state == "delivered":
                outputs, _ = decode_result(result)
                if not _same_answer(outputs, run_cloud_model(r.x)):
                    acc.wrong_answers.append(r.ticket)
        acc.unacknowledged_in_queue = sum(1 for t in found if t not in by_ticket)
        sent_digests = {r.digest for r in requests}
        acc.runs = sum(runs.values())
        acc.unknown_runs = sum(n for d, n in runs.items() if d not in sent_digests)
        acc.duplicates = sum(n - 1 for d, n in runs.items() if n > 1)
        acc.max_runs_per_input = max(runs.values(), default=0)
        for r in requests:
            answered = r.route == "cloud" or (
                r.ticket is not None and found.get(r.ticket, ("", None))[0] == "delivered"
            )
            if answered and runs.get(r.digest, 0) == 0:
                acc.never_run.append(f"seq {r.seq}")
        return acc


@dataclass
class Accounting:
    sent: int = 0
    acknowledged: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    """Acknowledged requests by route: queue (a ticket), cloud (answered live), edge."""
    end_states: Counter[str] = field(default_factory=Counter)
    """Acknowledged queued requests by their state in the queue file."""
    lost: list[str] = field(default_factory=list)
    """Acknowledged tickets the queue file does not hold."""
    unfinished: list[str] = field(default_factory=list)
    """Acknowledged tickets still waiting or in flight at the end."""
    wrong_answers: list[str] = field(default_factory=list)
    never_run: list[str] = field(default_factory=list)
    """Answered requests whose input the model never ran on."""
    unacknowledged_in_queue: int = 0
    """Items committed whose acknowledgement never reached the app (the power went first):
    they are delivered like the rest."""
    runs: int = 0
    unknown_runs: int = 0
    """Runs of inputs no request carried."""
    duplicates: int = 0
    """Runs beyond the first of one input."""
    max_runs_per_input: int = 0

    def problems(self) -> list[str]:
        """What breaks a promise other than duplicates (which the caller bounds)."""
        found = []
        for name in ("lost", "unfinished", "wrong_answers", "never_run"):
            items = getattr(self, name)
            if items:
                found.append(f"{len(items)} {name.replace('_', ' ')}: {items[:5]}")
        if self.unknown_runs:
            found.append(f"{self.unknown_runs} runs of inputs nobody sent")
        return found


def integrity_check(path: Path) -> str:
    """`PRAGMA integrity_check` of a SQLite file as a crashed process left it ("ok" when sound),
    read-only so that the check changes nothing the next start will find."""
    if not path.exists():
        return "ok"
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10) as db:
            return "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check").fetchall())
    except sqlite3.DatabaseError as exc:
        return f"cannot check: {exc}"


def _same_answer(got: Mapping[str, npt.NDArray[Any]], want: Mapping[str, npt.NDArray[Any]]) -> bool:
    if set(want) - set(got):
        return False
    return bool(
        np.array_equal(np.asarray(got["label"]).reshape(-1), want["label"].reshape(-1))
        and np.allclose(
            np.asarray(got["probabilities"], dtype=np.float32).reshape(want["probabilities"].shape),
            want["probabilities"],
            atol=1e-6,
        )
    )
