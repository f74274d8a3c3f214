"""Hard examples for retraining, opt-in: escalated inputs kept with the cloud's answers in a SQLite
file of their own (`hard_examples.sqlite` in the state dir) for a retention period, then purged.

Two sources: live escalations (kept with the answer at once) and queued requests (kept when
queued, completed when the cloud's answer is delivered, deleted if the item ends unanswered).
`load_hard_examples` reads them back as arrays for `edge-agent export-hard-examples`. With a
current key in the keyring, requests and answers are stored sealed (model_runtime.encryption).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter

from model_runtime.encryption import DataKeyError, Keyring, sealed_key_id_sql
from model_runtime.errors import InvalidInput
from model_runtime.v2_json import decode_infer_request, encode_infer_response
from router.audit import class_of, scores_output
from router.clock import Clock, SystemClock
from router.durable_queue import ItemState, ItemStatus
from router.errors import RouterError
from router.sqlite_files import Migration, SqliteWorker, WriteHooks, open_database
from router.tickets import decode_result, encode_result

__all__ = [
    "HARD_EXAMPLE_MIGRATIONS",
    "OUTCOMES",
    "SOURCES",
    "HardExampleStore",
    "HardExamples",
    "HardExamplesError",
    "NoHardExamples",
    "discard_hard_examples",
    "load_hard_examples",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]

SOURCES = ("live", "queued")
OUTCOMES = ("stored", "discarded", "cap", "error")
"""`stored`: kept with the cloud's answer; `discarded`: a queued item ended unanswered (expired,
dropped, rejected), its input is deleted; `cap`: not kept, the file is at its cap; `error`."""

HARD_EXAMPLE_MIGRATIONS: tuple[Migration, ...] = (
    (
        # key: the item's ticket (its Idempotency-Key at the cloud); request and answer are the
        # gzipped v2 JSON bodies, as sent and as received; answer is NULL while queued.
        """CREATE TABLE examples (
            key         TEXT PRIMARY KEY,
            model       TEXT NOT NULL,
            cloud_model TEXT NOT NULL,
            source      TEXT NOT NULL,
            created_at  REAL NOT NULL,
            request     BLOB NOT NULL,
            answer      BLOB,
            answered_at REAL
        )""",
        "CREATE INDEX examples_created ON examples (created_at)",
    ),
)

NS = "edge_agent_router"
_SIZE = "SELECT COALESCE(SUM(LENGTH(request) + COALESCE(LENGTH(answer), 0)), 0) FROM examples"


class HardExamplesError(RouterError):
    """The hard examples file cannot be exported; the message names the file and the problem."""


class NoHardExamples(HardExamplesError):
    """There is nothing to export: no file, or no answered examples (of the model asked for)."""


class HardExampleStore:
    """Open with `await HardExampleStore.open(...)`; run `run(interval_s)` as a task for the
    retention purge; `aclose` before the queue closes. Writes never hold up an answer: they go
    to the store's own SQLite thread and are counted when committed."""

    def __init__(
        self,
        path: Path,
        registry: CollectorRegistry,
        *,
        retention_s: float,
        cap_bytes: int | None = None,
        clock: Clock | None = None,
        keyring: Keyring | None = None,
        hooks: WriteHooks | None = None,
    ) -> None:
        """Use `open`."""
        if not retention_s > 0:
            raise ValueError(
                f"retention_s: must be > 0 (a store that keeps nothing), got {retention_s!r}"
            )
        self.path = Path(path)
        self.retention_s = float(retention_s)
        self.cap_bytes = cap_bytes or None
        self.clock: Clock = clock or SystemClock()
        self.keyring = keyring or Keyring()
        self.stored_bytes = 0
        """Bytes of requests and answers kept (compressed); written on the SQLite thread."""
        self._worker = SqliteWorker(
            f"hard-examples:{self.path.name}", store="hard_examples", hooks=hooks
        )
        self._pending: dict[str, str] = {}
        """Ticket -> model of queued items whose answer is awaited."""
        self._closed = False
        self.examples = Counter(
            f"{NS}_hard_examples",
            "Escalated items offered to the hard-examples store, by model and outcome (stored, "
            "discarded, cap, error).",
            ["model", "outcome"],
            registry=registry,
        )
        self.purged = Counter(
            f"{NS}_hard_examples_purged",
            "Hard examples deleted because they were older than the retention period.",
            registry=registry,
        )

    @classmethod
    async def open(
        cls,
        path: Path,
        registry: CollectorRegistry,
        *,
        retention_s: float,
        cap_bytes: int | None = None,
        clock: Clock | None = None,
        keyring: Keyring | None = None,
        hooks: WriteHooks | None = None,
    ) -> HardExampleStore:
        """Raises UnknownDataKey if the file holds examples sealed with a key not in `keyring`."""
        store = cls(
            path, registry, retention_s=retention_s, cap_bytes=cap_bytes, clock=clock,
            keyring=keyring, hooks=hooks,
        )  # fmt: skip
        opened = await store._worker.start(
            lambda: open_database(store.path, HARD_EXAMPLE_MIGRATIONS, now=store.clock.wall)
        )
        if opened.quarantined is not None:
            log.error("hard examples file was corrupt; moved aside to %s", opened.quarantined)

        def load(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            store.keyring.require(_sealed_key_ids(conn), str(store.path))
            store.stored_bytes = int(conn.execute(_SIZE).fetchone()[0])
            return conn.execute("SELECT key, model FROM examples WHERE answer IS NULL").fetchall()

        store._pending = dict(await store._worker.call(load))
        return store

    async def flush(self) -> None:
        """Wait until everything handed in so far is committed (and counted)."""
        await self._worker.call(lambda conn: None)

    async def aclose(self) -> None:
        """Commit what was handed in, then close the file."""
        self._closed = True
        await self._worker.close()

    # -- keeping ----------------------------------------------------------------------------

    def keep_live(
        self, model: str, cloud_model: str, items: Sequence[tuple[str, bytes, Mapping[str, Array]]]
    ) -> None:
        """Keep items the cloud answered live: (key, one-row v2 request body, the cloud's
        one-row outputs) each."""
        if not items or not self._room(model, len(items)):
            return
        now = self.clock.wall()

        def job(conn: sqlite3.Connection) -> int:
            rows = [
                (
                    key,
                    model,
                    cloud_model,
                    "live",
                    now,
                    self._seal_request(key, body),
                    self._seal_answer(
                        key, encode_result(encode_infer_response(cloud_model, dict(outputs)))
                    ),
                    now,
                )
                for key, body, outputs in items
            ]
            conn.executemany(
                "INSERT OR IGNORE INTO examples (key, model, cloud_model, source, created_at,"
                " request, answer, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.stored_bytes += sum(len(r[5]) + len(r[6]) for r in rows)
            return len(rows)

        self._submit(job, model, "stored", len(items))

    def keep_queued(self, model: str, cloud_model: str, items: Sequence[tuple[str, bytes]]) -> None:
        """Keep the inputs of items just queued, (ticket, one-row v2 request body) each, until
        the cloud's answer is delivered (`on_end`).

        Called right after the queue's commit returns, before the forwarder can have sent the
        item and heard back, so this write reaches the store's thread before the answer's.
        """
        if not items or not self._room(model, len(items)):
            return
        now = self.clock.wall()
        for key, _ in items:
            self._pending[key] = model

        def job(conn: sqlite3.Connection) -> int:
            rows = [
                (key, model, cloud_model, "queued", now, self._seal_request(key, body))
                for key, body in items
            ]
            conn.executemany(
                "INSERT OR IGNORE INTO examples (key, model, cloud_model, source, created_at,"
                " request) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.stored_bytes += sum(len(r[5]) for r in rows)
            return 0  # counted when answered

        self._submit(job, model, "stored", len(items))

    def on_end(self, ended: Sequence[ItemStatus]) -> None:
        """The queue's end callback: complete delivered items with the cloud's answer; delete
        the inputs of items that ended unanswered."""
        done: list[tuple[str, str, bytes | None]] = []
        for status in ended:
            model = self._pending.pop(status.ticket, None)
            if model is None:
                continue
            answer = status.result if status.state is ItemState.DELIVERED else None
            done.append((status.ticket, model, answer))
        if not done or self._closed:
            return
        now = self.clock.wall()

        def job(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            counted = []
            for key, model, answer in done:
                if answer:
                    sealed = self._seal_answer(key, answer)
                    cur = conn.execute(
                        "UPDATE examples SET answer = ?, answered_at = ? WHERE key = ?",
                        (sealed, now, key),
                    )
                    self.stored_bytes += len(sealed) * cur.rowcount
                    outcome = "stored"
                else:
                    cur = conn.execute("DELETE FROM examples WHERE key = ?", (key,))
                    outcome = "discarded"
                if cur.rowcount:  # 0: purged meanwhile
                    counted.append((model, outcome))
            return counted

        def then(future: asyncio.Future[list[tuple[str, str]]]) -> None:
            if future.cancelled() or future.exception() is not None:
                self._failed(future, [m for _, m, _ in done])
                return
            for model, outcome in future.result():
                self.examples.labels(model, outcome).inc()

        self._worker.submit(job, then)

    # -- retention --------------------------------------------------------------------------

    async def purge(self) -> int:
        """Delete examples kept longer than the retention period; return how many."""
        cutoff = self.clock.wall() - self.retention_s

        def job(conn: sqlite3.Connection) -> list[str]:
            keys = [
                r[0]
                for r in conn.execute(
                    "DELETE FROM examples WHERE created_at < ? RETURNING key", (cutoff,)
                )
            ]
            self.stored_bytes = int(conn.execute(_SIZE).fetchone()[0])
            return keys

        keys = await self._worker.call(job)
        for key in keys:
            self._pending.pop(key, None)
        if keys:
            self.purged.inc(len(keys))
        return len(keys)

    async def run(self, interval_s: float) -> None:
        """Until cancelled: purge now, then every `interval_s` seconds."""
        while True:
            try:
                await self.purge()
            except Exception:
                log.exception("hard examples purge failed; trying again later")
            await self.clock.sleep(interval_s)

    # -- plumbing ---------------------------------------------------------------------------

    def _seal_request(self, key: str, body: bytes) -> bytes:
        return self.keyring.seal(gzip.compress(body, mtime=0), _context("request", key))

    def _seal_answer(self, key: str, answer: bytes) -> bytes:
        return self.keyring.seal(answer, _context("answer", key))

    def _room(self, model: str, n: int) -> bool:
        if self._closed:
            return False
        if self.cap_bytes is not None and self.stored_bytes >= self.cap_bytes:
            self.examples.labels(model, "cap").inc(n)
            return False
        return True

    def _submit(
        self, job: Callable[[sqlite3.Connection], int], model: str, outcome: str, n: int
    ) -> None:
        def then(future: asyncio.Future[int]) -> None:
            if future.cancelled() or future.exception() is not None:
                self._failed(future, [model] * n)
            elif future.result():
                self.examples.labels(model, outcome).inc(future.result())

        self._worker.submit(job, then)

    def _failed(self, future: asyncio.Future[Any], models: Sequence[str]) -> None:
        error = None if future.cancelled() else future.exception()
        log.error("could not keep %d hard example(s): %r", len(models), error)
        for model in models:
            self.examples.labels(model, "error").inc()


def _context(column: str, key: str) -> bytes:
    """What a sealed blob is bound to: its column and its example's key."""
    return f"hard_examples.{column}\x00{key}".encode()


def _sealed_key_ids(conn: sqlite3.Connection) -> list[bytes]:
    return [
        r[0]
        for column in ("request", "answer")
        for r in conn.execute(
            f"SELECT DISTINCT {sealed_key_id_sql(column)} AS k FROM examples WHERE k IS NOT NULL"
        )
    ]


def discard_hard_examples(path: Path) -> bool:
    """Delete the hard examples file and its -wal and -shm; True if there was one."""
    found = False
    for part in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            os.unlink(part)
            found = True
        except FileNotFoundError:
            pass
    return found


# -- export ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HardExamples:
    """Kept examples of one model with the cloud's answers, oldest first."""

    model: str
    cloud_model: str
    inputs: dict[str, Array]
    """Input name -> the inputs stacked, one row per example."""
    cloud_pred: Array
    """The cloud's class per example: index of its highest score, or its `label`."""
    cloud_scores: Array | None
    """The cloud's class scores (N, K), when every answer carried them."""
    created_at: Array
    source: Array
    """`live` or `queued` per example."""


def load_hard_examples(
    path: Path, model: str | None = None, keyring: Keyring | None = None
) -> HardExamples:
    """The answered examples in the file at `path` (of `model`, which may be left out when the
    file holds one model only), opened with `keyring` if they were sealed. Raises
    HardExamplesError naming the file and the problem."""
    if not path.is_file():
        raise NoHardExamples(
            f"{path}: no hard examples file (are they on? hard_examples_retention_days > 0)"
        )
    try:
        # rw, not ro: a WAL database of a stopped agent needs its -shm made to be read.
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)) as conn:
            models = [r[0] for r in conn.execute("SELECT DISTINCT model FROM examples")]
            if model is None and len(models) > 1:
                raise HardExamplesError(
                    f"{path}: holds examples of several models ({', '.join(sorted(models))});"
                    " choose one with --model"
                )
            chosen = model if model is not None else (models[0] if models else None)
            rows = conn.execute(
                "SELECT key, cloud_model, source, created_at, request, answer FROM examples"
                " WHERE model = ? AND answer IS NOT NULL ORDER BY created_at, key",
                (chosen,),
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise HardExamplesError(f"{path}: cannot be read: {exc}") from None
    if not rows:
        which = f"model '{chosen}'" if chosen is not None else "any model"
        raise NoHardExamples(f"{path}: no answered hard examples of {which}")
    assert chosen is not None
    keys = keyring or Keyring()
    try:
        opened = [
            (key, cloud, source, created, keys.open(request, _context("request", key), str(path)),
             keys.open(answer, _context("answer", key), str(path)))
            for key, cloud, source, created, request, answer in rows
        ]  # fmt: skip
    except DataKeyError as exc:
        raise HardExamplesError(str(exc)) from None
    return _examples(path, chosen, opened)


def _examples(path: Path, model: str, rows: Sequence[Any]) -> HardExamples:
    inputs: dict[str, list[Array]] = {}
    preds: list[int | str] = []
    scores: list[Array | None] = []
    for key, _, _, _, request, answer in rows:
        try:
            decoded = decode_infer_request(json.loads(gzip.decompress(request)))
            outputs, _ = decode_result(answer)
        except (OSError, ValueError, InvalidInput) as exc:
            raise HardExamplesError(f"{path}: example {key} cannot be decoded: {exc}") from None
        pred = class_of(outputs)
        if pred is None:
            raise HardExamplesError(f"{path}: the cloud's answer to {key} holds no class")
        preds.append(pred)
        scores.append(_scores(outputs))
        for name, array in decoded.inputs.items():
            inputs.setdefault(name, []).append(array)
    stacked = {}
    for name, arrays in inputs.items():
        if len(arrays) != len(rows) or len({(a.shape[1:], a.dtype) for a in arrays}) != 1:
            raise HardExamplesError(
                f"{path}: input {name} differs in shape or type between examples"
            )
        stacked[name] = np.concatenate(arrays)
    kept_scores = None
    if all(s is not None for s in scores) and len({s.shape for s in scores if s is not None}) == 1:
        kept_scores = np.concatenate([s for s in scores if s is not None]).astype(np.float32)
    all_ints = all(isinstance(p, int) for p in preds)
    return HardExamples(
        model=model,
        cloud_model=str(rows[-1][1]),
        inputs=stacked,
        cloud_pred=np.asarray(preds, dtype=np.int64 if all_ints else np.str_),
        cloud_scores=kept_scores,
        created_at=np.asarray([r[3] for r in rows], dtype=np.float64),
        source=np.asarray([r[2] for r in rows], dtype=np.str_),
    )


def _scores(outputs: Mapping[str, Array]) -> Array | None:
    """The row of class scores `class_of` read, if it read scores."""
    name = scores_output(outputs)
    return None if name is None else outputs[name][:1]
