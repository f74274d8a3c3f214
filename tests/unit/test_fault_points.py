"""The tests' fault switch: its grammar, which hits it acts at, what it raises, and each daemon
refusing a bad one at start."""

from __future__ import annotations

import pickle
import sqlite3
import threading
from pathlib import Path

import pytest

from cloud_gateway.cli import app as gateway_app
from cloud_gateway.settings import FAULT_POINTS as GATEWAY_POINTS
from edge_agent.cli import app as agent_app
from model_runtime import fault_points
from model_runtime.command_line import EXIT_USAGE, run_command_line
from model_runtime.fault_points import Action, Fault, FaultPlan, FaultSpecError, sqlite_error
from router.config import FAULT_POINTS as AGENT_POINTS
from tests.support.processes import wait_until

POINTS = {"queue.commit": True, "router.after_commit_before_answer": False}


class Crashed(Exception):
    pass


def crash() -> None:
    raise Crashed


def acts(plan: FaultPlan, point: str, hits: int) -> list[Action | None]:
    return [plan.hit(point) for _ in range(hits)]


def test_unset_or_empty_means_no_plan_at_all() -> None:
    assert FaultPlan.from_environ({}, "EDGE_AGENT_FAULTS", POINTS) is None
    assert FaultPlan.from_environ({"EDGE_AGENT_FAULTS": " "}, "EDGE_AGENT_FAULTS", POINTS) is None


def test_the_kth_hit_only_a_range_or_every_hit_from_k() -> None:
    plan = FaultPlan.parse("queue.commit:2:eio", POINTS)
    assert acts(plan, "queue.commit", 4) == [None, Action.EIO, None, None]
    plan = FaultPlan.parse("queue.commit:2-3:enospc", POINTS)
    assert acts(plan, "queue.commit", 4) == [None, Action.ENOSPC, Action.ENOSPC, None]
    plan = FaultPlan.parse("queue.commit:3+:eio", POINTS)
    assert acts(plan, "queue.commit", 5) == [None, None, Action.EIO, Action.EIO, Action.EIO]
    assert plan.hits("queue.commit") == 5


def test_a_crash_is_the_default_action_and_points_count_apart() -> None:
    plan = FaultPlan.parse(
        "router.after_commit_before_answer:2, queue.commit:1:eio", POINTS, kill=crash
    )
    assert plan.hit("router.after_commit_before_answer") is None
    assert plan.hit("queue.commit") is Action.EIO
    with pytest.raises(Crashed):
        plan.hit("router.after_commit_before_answer")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("queue.commit", "is not <point>:<k>"),
        ("queue.commit:0", "is not <point>:<k>"),
        ("queue.commit:2-1", "the range ends before it starts"),
        ("queue.comit:1", "unknown point 'queue.comit'; known: queue.commit, router."),
        ("queue.commit:1:eof", "the action must be crash, hold, eio or enospc"),
        ("router.after_commit_before_answer:1:eio", "is not a write; it can only crash or hold"),
        ("queue.commit:1:hold", "a hold needs EDGE_AGENT_FAULTS_RELEASE, the file whose"),
    ],
)
def test_a_bad_switch_is_refused_naming_the_variable(spec: str, problem: str) -> None:
    with pytest.raises(FaultSpecError, match=r"^EDGE_AGENT_FAULTS: ") as err:
        FaultPlan.from_environ({"EDGE_AGENT_FAULTS": spec}, "EDGE_AGENT_FAULTS", POINTS)
    assert problem in str(err.value)


def test_a_plan_handed_to_a_worker_process_counts_afresh() -> None:
    plan = FaultPlan.parse("queue.commit:2:eio", POINTS)
    plan.hit("queue.commit")
    copy = pickle.loads(pickle.dumps(plan))
    assert copy.faults == (Fault("queue.commit", 2, 2, Action.EIO),)
    assert copy.hits("queue.commit") == 0


def test_a_hold_waits_until_the_release_file_exists_then_carries_on(tmp_path: Path) -> None:
    release = tmp_path / "release"
    environ = {
        "EDGE_AGENT_FAULTS": "queue.commit:2:hold",
        "EDGE_AGENT_FAULTS_RELEASE": str(release),
    }
    plan = FaultPlan.from_environ(environ, "EDGE_AGENT_FAULTS", POINTS)
    assert plan is not None
    assert pickle.loads(pickle.dumps(plan)).release == release  # workers hold too
    assert plan.hit("queue.commit") is None
    results: list[Action | None] = []
    holder = threading.Thread(target=lambda: results.append(plan.hit("queue.commit")))
    holder.start()
    wait_until(lambda: plan.hits("queue.commit") == 2, 10.0, what="the second hit")
    holder.join(0.2)
    assert holder.is_alive()  # held
    release.touch()
    holder.join(10.0)
    assert results == [None]  # no write fails after a hold


def test_a_hold_whose_parent_has_gone_ends_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = FaultPlan.parse("queue.commit:1:hold", POINTS, release=tmp_path / "never", kill=crash)
    parents = iter([100, 100, 1])  # reparented to init: its supervisor or test was killed
    monkeypatch.setattr(fault_points.os, "getppid", lambda: next(parents))
    with pytest.raises(Crashed):
        plan.hit("queue.commit")


def test_injected_errors_are_what_sqlite_raises_on_a_real_disk() -> None:
    full, failing = sqlite_error(Action.ENOSPC), sqlite_error(Action.EIO)
    assert (str(full), full.sqlite_errorcode) == ("database or disk is full", sqlite3.SQLITE_FULL)
    assert (str(failing), failing.sqlite_errorcode) == ("disk I/O error", sqlite3.SQLITE_IOERR)


def test_each_daemon_names_its_points() -> None:
    assert {p for p, write in AGENT_POINTS.items() if write} == {
        "queue.commit",
        "budget.commit",
        "audit.commit",
        "hard_examples.commit",
    }
    assert {p for p, write in AGENT_POINTS.items() if not write} == {
        "router.after_commit_before_answer",
        "forwarder.after_send_before_mark",
    }
    assert GATEWAY_POINTS == {
        "gateway.after_run_before_store": False,
        "gateway.worker_start": False,
        "idempotency.mid_checkpoint": False,
        "idempotency.commit": True,
    }


@pytest.mark.parametrize(
    ("program", "variable"),
    [("edge-agent", "EDGE_AGENT_FAULTS"), ("cloud-gateway", "CLOUD_GATEWAY_FAULTS")],
)
def test_serve_with_a_bad_switch_stops_at_once_with_exit_code_2(
    program: str,
    variable: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, "queue.commit")
    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")  # the agent's serve would set it for good
    app = agent_app if program == "edge-agent" else gateway_app
    code = run_command_line(app, program, ["serve", "--state-dir", str(tmp_path / "state")])
    assert code == EXIT_USAGE
    assert (
        capsys.readouterr().err
        == f"{program}: {variable}: 'queue.commit' is not <point>:<k>[+|-<m>][:crash|hold|eio|enospc]\n"
    )
    assert not (tmp_path / "state").exists()  # nothing started
