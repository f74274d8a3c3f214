"""Hard examples on real SQLite files: what is kept (live and delivered queued escalations), what
is deleted (unanswered items, anything past the retention, everything when off), the cap, restarts,
and the export command's file and errors."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import typer
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from edge_agent.export_cli import export_hard_examples_command
from model_runtime.v2_json import encode_infer_request, encode_infer_response
from router.clock import FakeClock
from router.cloud_client import encode_body
from router.config import RouterConfig
from router.durable_queue import DurableQueue
from router.hard_examples import (
    HardExamplesError,
    HardExampleStore,
    NoHardExamples,
    discard_hard_examples,
    load_hard_examples,
)
from router.router import Router
from router.tickets import encode_result

DAY = 86400.0
RNG = np.random.default_rng(0)
X = RNG.random((6, 64), dtype=np.float32)


def body(key: str, i: int) -> bytes:
    return encode_body(encode_infer_request({"X": X[i : i + 1]}, request_id=key))


def answer(label: int) -> dict[str, np.ndarray]:
    probabilities = np.full((1, 10), 0.02, dtype=np.float32)
    probabilities[0, label] = 0.82
    return {"label": np.asarray([label], dtype=np.int64), "probabilities": probabilities}


def rows(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0])


def leftovers(state: Path) -> list[str]:
    return sorted(p.name for p in state.glob("hard_examples.sqlite*"))


class Store:
    def __init__(self, store: HardExampleStore, registry: CollectorRegistry) -> None:
        self.store = store
        self.registry = registry

    def count(self, outcome: str, model: str = "digits") -> float:
        labels = {"model": model, "outcome": outcome}
        return self.registry.get_sample_value("edge_agent_router_hard_examples_total", labels) or 0


async def open_store(
    path: Path, clock: FakeClock, *, retention_s: float = 30 * DAY, cap: int | None = None
) -> Store:
    registry = CollectorRegistry()
    store = await HardExampleStore.open(
        path, registry, retention_s=retention_s, cap_bytes=cap, clock=clock
    )
    return Store(store, registry)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "hard_examples.sqlite"


@pytest.fixture
async def kept(path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    s = await open_store(path, clock)
    yield s
    await s.store.aclose()


async def test_live_escalations_are_kept_with_the_clouds_answer(kept: Store, path: Path) -> None:
    kept.store.keep_live(
        "digits",
        "digits-large",
        [("k0", body("k0", 0), answer(7)), ("k1", body("k1", 1), answer(2))],
    )
    await kept.store.flush()
    assert kept.count("stored") == 2
    examples = load_hard_examples(path)
    assert examples.model == "digits"
    assert examples.cloud_model == "digits-large"
    np.testing.assert_array_equal(examples.inputs["X"], X[:2])  # exactly, float32 round trip
    assert examples.cloud_pred.tolist() == [7, 2]
    assert examples.cloud_pred.dtype == np.int64
    assert examples.cloud_scores is not None
    assert examples.cloud_scores.shape == (2, 10)
    assert examples.source.tolist() == ["live", "live"]


async def test_queued_items_are_kept_once_answered_and_forgotten_if_not(
    tmp_path: Path, path: Path, clock: FakeClock, kept: Store
) -> None:
    queue = await DurableQueue.open(
        tmp_path / "queue.sqlite", clock=clock, on_end=kept.store.on_end
    )
    try:
        for i, ticket in enumerate(("q0", "q1")):
            await queue.enqueue(ticket, "digits-large", body(ticket, i), ttl_s=60)
        kept.store.keep_queued(
            "digits", "digits-large", [("q0", body("q0", 0)), ("q1", body("q1", 1))]
        )
        await kept.store.flush()
        with pytest.raises(NoHardExamples, match="no answered hard examples"):
            load_hard_examples(path)  # not before the cloud has answered
        claimed = {item.ticket for item in await queue.claim_batch(10, 1 << 20)}
        assert claimed == {"q0", "q1"}
        await queue.release("q1", "link down")
        encoded = encode_result(encode_infer_response("digits-large", answer(4)))
        assert await queue.mark_delivered("q0", encoded)
        clock.advance(61)
        assert await queue.expire_due() == ["q1"]
        await kept.store.flush()
        await kept.store.flush()  # the end callbacks' writes, submitted after the first flush
    finally:
        await queue.close()
    assert (kept.count("stored"), kept.count("discarded")) == (1, 1)
    assert rows(path) == 1  # the expired item's input is gone
    examples = load_hard_examples(path)
    np.testing.assert_array_equal(examples.inputs["X"], X[:1])
    assert examples.cloud_pred.tolist() == [4]
    assert examples.source.tolist() == ["queued"]


async def test_examples_past_the_retention_are_purged(path: Path, clock: FakeClock) -> None:
    kept = await open_store(path, clock, retention_s=2 * DAY)
    try:
        kept.store.keep_live("digits", "digits-large", [("old", body("old", 0), answer(1))])
        await kept.store.flush()
        clock.advance(1.5 * DAY)
        kept.store.keep_live("digits", "digits-large", [("new", body("new", 1), answer(3))])
        await kept.store.flush()
        assert await kept.store.purge() == 0
        clock.advance(0.6 * DAY)  # "old" is now 2.1 days old, "new" 0.6
        assert await kept.store.purge() == 1
        assert kept.registry.get_sample_value("edge_agent_router_hard_examples_purged_total") == 1
        assert load_hard_examples(path).cloud_pred.tolist() == [3]
        clock.advance(2 * DAY)
        assert await kept.store.purge() == 1
        assert rows(path) == 0
        assert kept.store.stored_bytes == 0
    finally:
        await kept.store.aclose()


async def test_beyond_the_cap_new_examples_are_not_kept(path: Path, clock: FakeClock) -> None:
    kept = await open_store(path, clock, cap=500)
    try:
        kept.store.keep_live("digits", "digits-large", [("a", body("a", 0), answer(1))])
        await kept.store.flush()
        assert kept.store.stored_bytes > 500  # one example is already over this tiny cap
        kept.store.keep_live("digits", "digits-large", [("b", body("b", 1), answer(1))])
        kept.store.keep_queued("digits", "digits-large", [("c", body("c", 2))])
        await kept.store.flush()
        assert (kept.count("stored"), kept.count("cap")) == (1, 2)
        assert rows(path) == 1
    finally:
        await kept.store.aclose()


async def test_a_queued_example_survives_a_restart(
    tmp_path: Path, path: Path, clock: FakeClock
) -> None:
    first = await open_store(path, clock)
    first.store.keep_queued("digits", "digits-large", [("q", body("q", 5))])
    await first.store.aclose()

    again = await open_store(path, clock)
    queue = await DurableQueue.open(
        tmp_path / "queue.sqlite", clock=clock, on_end=again.store.on_end
    )
    try:
        await queue.enqueue("q", "digits-large", body("q", 5), ttl_s=60)
        await queue.claim_batch(1, 1 << 20)
        encoded = encode_result(encode_infer_response("digits-large", answer(8)))
        await queue.mark_delivered("q", encoded)
        await again.store.flush()
        await again.store.flush()
        assert again.count("stored") == 1
    finally:
        await queue.close()
        await again.store.aclose()
    examples = load_hard_examples(path)
    np.testing.assert_array_equal(examples.inputs["X"], X[5:6])
    assert examples.cloud_pred.tolist() == [8]


async def test_turned_off_the_router_deletes_what_was_kept(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "hard_examples.sqlite"
    kept = await open_store(path, clock)
    kept.store.keep_live("digits", "digits-large", [("a", body("a", 0), answer(1))])
    await kept.store.aclose()
    assert path.exists()
    router = await Router.open(RouterConfig(state_dir=tmp_path), CollectorRegistry())
    try:
        assert router.hard_examples is None
        assert not path.exists()
        assert leftovers(tmp_path) == []
    finally:
        await router.close()
    assert not discard_hard_examples(path)


async def test_on_the_router_keeps_its_file_in_the_state_dir(tmp_path: Path) -> None:
    config = RouterConfig(state_dir=tmp_path, hard_examples_retention_s=DAY)
    router = await Router.open(config, CollectorRegistry())
    try:
        assert router.hard_examples is not None
        assert config.hard_examples_path == tmp_path / "hard_examples.sqlite"
        assert config.hard_examples_path.exists()
    finally:
        await router.close()


# -- reading them back ----------------------------------------------------------------------------


async def test_several_models_need_a_choice(kept: Store, path: Path) -> None:
    kept.store.keep_live("digits", "digits-large", [("a", body("a", 0), answer(1))])
    kept.store.keep_live("letters", "letters-large", [("b", body("b", 1), answer(2))])
    await kept.store.flush()
    with pytest.raises(HardExamplesError, match=r"several models \(digits, letters\)"):
        load_hard_examples(path)
    assert load_hard_examples(path, "letters").cloud_pred.tolist() == [2]
    with pytest.raises(NoHardExamples, match="model 'nope'"):
        load_hard_examples(path, "nope")


def test_missing_or_corrupt_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "hard_examples.sqlite"
    with pytest.raises(NoHardExamples, match="no hard examples file"):
        load_hard_examples(missing)
    assert not missing.exists()  # reading never creates the file
    missing.write_bytes(b"not a database at all" * 100)
    with pytest.raises(HardExamplesError, match="cannot be read"):
        load_hard_examples(missing)


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(export_hard_examples_command)
    return app


async def test_export_writes_the_arrays_atomically(kept: Store, tmp_path: Path) -> None:
    kept.store.keep_live(
        "digits", "digits-large", [(f"k{i}", body(f"k{i}", i), answer(i)) for i in range(3)]
    )
    await kept.store.flush()
    out = tmp_path / "out" / "hard.npz"
    out.parent.mkdir()
    result = CliRunner().invoke(cli(), ["--out", str(out), "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "wrote 3 hard examples of digits" in result.output
    with np.load(out) as data:
        assert set(data.files) == {
            "X", "cloud_pred", "cloud_scores", "created_at", "source", "model", "cloud_model"
        }  # fmt: skip
        np.testing.assert_array_equal(data["X"], X[:3])
        assert data["cloud_pred"].tolist() == [0, 1, 2]
        assert str(data["model"]) == "digits"
    assert [p.name for p in out.parent.iterdir()] == ["hard.npz"]  # no temporary file left


async def test_export_errors_leave_the_old_file_alone(kept: Store, tmp_path: Path) -> None:
    out = tmp_path / "hard.npz"
    out.write_bytes(b"previous export")
    runner = CliRunner()
    args = ["--out", str(out), "--state-dir", str(tmp_path)]
    empty = runner.invoke(cli(), args)
    assert empty.exit_code == 1
    assert "no answered hard examples" in empty.output
    kept.store.keep_live("digits", "digits-large", [("a", body("a", 0), answer(1))])
    kept.store.keep_live("letters", "letters-large", [("b", body("b", 1), answer(2))])
    await kept.store.flush()
    several = runner.invoke(cli(), args)
    assert several.exit_code == 2
    assert "--model" in several.output
    nowhere = runner.invoke(cli(), ["--out", str(tmp_path / "no" / "dir.npz"), "--state-dir", str(tmp_path), "--model", "digits"])  # fmt: skip
    assert nowhere.exit_code == 2
    assert "dir.npz" in nowhere.output
    assert out.read_bytes() == b"previous export"
