"""`edge-agent demo` runs end to end on a fresh machine and accounts for every request;
`edge-agent demo --web` serves the kiosk page beside a cloud that Enter takes away."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest

from tests.support.processes import BIN, wait_until


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
    # Not on a terminal: progress comes as plain lines on stderr, not a bar nobody sees.
    progress = [line for line in result.stderr.splitlines() if line.startswith("demo: ")]
    assert progress[0] == "demo: replaying the held-out set: 0 of 719"
    assert "demo: replayed: 719 of 719" in progress
    assert any(line.startswith("demo: the cloud is gone: ") for line in progress)
    assert progress[-1] == f"demo: delivered: {queued} of {queued}"


def test_web_demo_serves_the_kiosk_page_and_takes_the_cloud_away_on_enter() -> None:
    demo = subprocess.Popen(
        [str(BIN / "edge-agent"), "demo", "--web"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"PATH": str(BIN)},
    )
    assert demo.stdin is not None
    assert demo.stdout is not None
    try:
        page = demo.stdout.readline().removeprefix("kiosk page: ").strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/kiosk/", page), page
        agent = page.removesuffix("/kiosk/")
        assert "<canvas" in httpx.get(page).text
        digit = {"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [8.0] * 64}
        request = {"inputs": [digit], "parameters": {"escalation": "always"}}

        def route() -> str:
            answer = httpx.post(f"{agent}/v2/models/digits/infer", json=request, timeout=30)
            return str(answer.json()["parameters"]["route"])

        wait_until(lambda: route() == "cloud", timeout=30, what="a live escalation")
        assert demo.stdout.readline().startswith(f"every answer escalated: {page}")
        assert demo.stdout.readline().startswith("Enter takes the cloud away")
        demo.stdin.write("\n")
        demo.stdin.flush()
        assert demo.stdout.readline().startswith("the cloud is gone")
        assert route() == "queue"
        demo.stdin.close()  # the end of its input ends the demo
        assert demo.wait(60) == 0
        assert demo.stdout.read().strip() == "stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(page)  # and its agent is gone with it
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        demo.stdout.close()
        if not demo.stdin.closed:
            demo.stdin.close()
