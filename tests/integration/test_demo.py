"""`edge-agent demo` runs end to end on a fresh machine and accounts for every request."""

from __future__ import annotations

import re
import subprocess

from tests.support.processes import BIN


def test_demo_replays_through_an_outage_and_delivers_every_queued_request() -> None:
    result = subprocess.run(
        [str(BIN / "edge-agent"), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "120", "PATH": str(BIN)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(re.findall(r"│ ([a-z][^│]*?)\s+│\s+([^│]*?)\s+│", result.stdout))
    assert rows["requests"] == "719"
    edge = int(rows["answered at the edge"].split()[0])
    live = int(rows["escalated to the cloud, live"])
    queued = int(rows["queued (provisional answer + ticket)"])
    assert edge + live + queued == 719
    assert queued > 0  # the outage queued requests...
    assert rows["delivered later"] == str(queued)  # ...and every one was delivered
    assert float(rows["accuracy, hybrid (what the app ends with)"]) > float(
        rows["accuracy, edge only"]
    )
