"""The long kill campaign (issue 13, item 1): at least 1,000 SIGKILLs of the agent and 100 of the
gateway's workers, with the link flapping, then the same accounting as the default suite's short
run (tests/integration/test_agent_power_cut.py). Not in the default run (marker `soak`):

    .venv/bin/pytest -m soak tests/soak/test_kill_campaign.py -s

KILL_CAMPAIGN_AGENT_KILLS, KILL_CAMPAIGN_GATEWAY_KILLS and KILL_CAMPAIGN_SEED change the plan;
KILL_CAMPAIGN_REPORT names a file for the figures (a Markdown table, as in RELIABILITY.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.kill_campaign import IN_FLIGHT_PER_AGENT, Campaign, CampaignPlan

pytestmark = [pytest.mark.soak, pytest.mark.timeout(0)]


def test_kill_campaign(tmp_path: Path) -> None:
    plan = CampaignPlan(
        agent_kills=int(os.environ.get("KILL_CAMPAIGN_AGENT_KILLS", "1000")),
        gateway_kills=int(os.environ.get("KILL_CAMPAIGN_GATEWAY_KILLS", "100")),
        seed=int(os.environ.get("KILL_CAMPAIGN_SEED", "13")),
        drain_timeout_s=900.0,
    )
    with Campaign(tmp_path, plan) as campaign:
        report = campaign.run()
    table = report.table()
    print(table)
    if "KILL_CAMPAIGN_REPORT" in os.environ:
        Path(os.environ["KILL_CAMPAIGN_REPORT"]).write_text(table + "\n", encoding="utf-8")
    a = report.accounting
    assert report.agent_kills["total"] >= plan.agent_kills
    assert report.gateway_kills >= plan.gateway_kills
    assert report.integrity_failures == []
    assert a.problems() == []
    assert a.duplicates <= report.gateway_kills * IN_FLIGHT_PER_AGENT
