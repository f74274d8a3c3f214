"""Power cuts: SIGKILL the agent again and again at random moments (start-up, enqueue, live
escalation, drain) and the gateway's workers now and then, with the link flapping.

The short, seeded version of the kill campaign (tests/support/kill_campaign.py; the long one is
tests/soak/test_kill_campaign.py, figures in RELIABILITY.md). Every acknowledged request must end
in exactly one terminal state with the cloud model's answer, and the model must run once per
input but for runs a gateway worker's death cut off before their answer was stored. The negative
controls show that the same accounting catches acknowledged requests that do vanish.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.support.kill_campaign import IN_FLIGHT_PER_AGENT, Campaign, CampaignPlan


# Ten agent start-ups (each imports onnxruntime and loads the models) and a drain: 77 s with
# other engineers' test runs beside it; the suite's 120 s would be near.
@pytest.mark.timeout(600)
def test_acknowledged_requests_survive_power_cuts_and_gateway_crashes(tmp_path: Path) -> None:
    plan = CampaignPlan(agent_kills=10, gateway_kills=3, seed=7)
    with Campaign(tmp_path, plan) as campaign:
        report = campaign.run()
    a = report.accounting
    print(report.table())
    assert (report.agent_kills["total"], report.gateway_kills) == (10, 3)
    assert a.routes["queue"] > 0  # the run did acknowledge requests it could have lost
    assert report.integrity_failures == []
    assert a.problems() == []
    assert a.end_states.keys() <= {"delivered"}
    # Once per input, unless a worker died between a run and storing its answer.
    assert a.duplicates <= report.gateway_kills * IN_FLIGHT_PER_AGENT
    assert a.max_runs_per_input <= 1 + report.gateway_kills


# The final drain alone may wait drain_timeout_s (120 s), the suite's whole limit; now and then
# it stalls about 60 s before the last items end (2 runs in 9 here, alone, on this code and on
# ec6a985 alike; the cause is not found yet), which under load passed 120 s.
@pytest.mark.timeout(300)
def test_the_accounting_catches_acknowledged_rows_removed(tmp_path: Path) -> None:
    plan = CampaignPlan(agent_kills=4, gateway_kills=0, seed=8, startup_share=0.0, life_s=(1, 2))
    removed: list[str] = []
    with Campaign(tmp_path, plan) as campaign:

        def remove_rows(life: int, state: Path) -> None:
            acked = campaign.ledger.acked_tickets()
            if removed or len(acked) < 3:
                return
            removed.extend(acked[:3])
            with sqlite3.connect(state / "queue.sqlite") as db:
                db.executemany("DELETE FROM items WHERE ticket = ?", [(t,) for t in removed])

        campaign.after_kill = remove_rows
        report = campaign.run()
    assert len(removed) == 3
    assert sorted(report.accounting.lost) == sorted(removed)


# The final drain alone may wait drain_timeout_s (120 s), the suite's whole limit; now and then
# it stalls about 60 s before the last items end (2 runs in 9 here, alone, on this code and on
# ec6a985 alike; the cause is not found yet), which under load passed 120 s.
@pytest.mark.timeout(300)
def test_the_accounting_catches_the_wal_of_a_crashed_agent_dropped(tmp_path: Path) -> None:
    # As a power cut with synchronous=OFF would leave it: commits the app was told of, never
    # synced, gone. The WAL holds every commit since the last checkpoint.
    plan = CampaignPlan(agent_kills=4, gateway_kills=0, seed=9, startup_share=0.0, life_s=(1, 2))
    dropped: list[str] = []
    with Campaign(tmp_path, plan) as campaign:

        def drop_wal(life: int, state: Path) -> None:
            wal = state / "queue.sqlite-wal"
            if dropped or not campaign.ledger.acked_tickets() or not wal.exists():
                return
            dropped.extend(campaign.ledger.acked_tickets())
            for name in ("queue.sqlite-wal", "queue.sqlite-shm"):
                (state / name).unlink(missing_ok=True)

        campaign.after_kill = drop_wal
        report = campaign.run()
    lost = report.accounting.lost
    assert dropped
    assert lost
    assert set(lost) <= set(dropped)
