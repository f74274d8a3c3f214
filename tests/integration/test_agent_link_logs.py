"""What the agent says about its link to the cloud: one line per change, with the cause when
down and the round trip when up; `config check --probe-cloud`, step by step."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.integration.conftest import start_agent, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, Daemon, wait_until


def messages(agent: Daemon) -> list[str]:
    lines = [json.loads(line) for line in agent.log().splitlines() if line.startswith("{")]
    return [str(line["msg"]) for line in lines]


def link_lines(agent: Daemon) -> list[str]:
    return [m for m in messages(agent) if m.startswith("cloud link is")]


def test_an_unresolvable_cloud_is_said_at_start_up_with_its_cause(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    key.write_text("cgk_0123456789abcdef.not-a-real-key")
    agent = start_agent(
        tmp_path,
        "--cloud-url",
        "http://no-such-host.invalid:8000",
        "--allow-plain-http",  # a name, not loopback: plain http must be asked for
        "--device-key-file",
        str(key),
    )
    try:
        wait_until(lambda: link_lines(agent), what="a line about the link")
    finally:
        agent.stop()
    assert link_lines(agent)[0] == "cloud link is down: dns"


def test_each_change_of_link_state_is_one_line_and_calls_stay_quiet(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    agent = start_agent_with_cloud(tmp_path, gateway, proxy)
    try:
        wait_until(lambda: link_lines(agent), what="the first line about the link")
        proxy.cut()
        wait_until(lambda: any("down" in m for m in link_lines(agent)), what="the link down")
        proxy.restore()
        wait_until(
            lambda: not link_lines(agent)[-1].startswith("cloud link is down"),
            timeout=30,
            what="the link back",
        )
    finally:
        agent.stop()
    lines = link_lines(agent)
    down = next(i for i, line in enumerate(lines) if "down" in line)
    assert re.fullmatch(r"cloud link is up, round trip \d+ ms", lines[0]), lines
    # The first failures make the link degraded, then the breaker opens: down, with the cause.
    for line in lines[1:down]:
        assert re.fullmatch(r"cloud link is degraded: a recent failure \(reset\), .*", line), lines
    assert re.fullmatch(r"cloud link is down: (reset|refused)", lines[down]), lines
    assert re.fullmatch(r"cloud link is (up|degraded: .*), round trip \d+ ms", lines[-1]), lines
    # Probes went out every 0.3 s meanwhile; neither httpx nor the router logs them at INFO.
    assert not [m for m in messages(agent) if m.startswith("HTTP Request")]


def test_a_key_file_without_a_cloud_is_a_warning(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    key.write_text("cgk_0123456789abcdef.not-a-real-key")
    agent = start_agent(tmp_path, "--device-key-file", str(key))
    agent.stop()
    assert any(m.startswith("device_key_file is set but cloud_url is not") for m in messages(agent))


def probe_cloud(tmp_path: Path, url: str, key: str) -> subprocess.CompletedProcess[str]:
    key_file = tmp_path / "device.key"
    key_file.write_text(key)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'cloud_url = "{url}"\ndevice_key_file = "{key_file}"\nallow_plain_http = true\n'
    )
    return subprocess.run(
        [str(BIN / "edge-agent"), "config", "check", "--config", str(config), "--no-models",
         "--probe-cloud"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_probe_cloud_resolves_connects_and_authenticates(tmp_path: Path, gateway: Gateway) -> None:
    url = f"http://localhost:{gateway.daemon.ports['http']}"
    good = probe_cloud(tmp_path, url, gateway.key)
    assert good.returncode == 0, good.stderr
    steps = [line for line in good.stderr.splitlines() if line.startswith("cloud: ")]
    assert [s.split(":")[1].strip() for s in steps] == ["resolve", "connect", "authenticate"]
    assert all(": ok: " in s for s in steps), steps
    assert gateway.key not in good.stdout + good.stderr

    bad = probe_cloud(tmp_path, url, "cgk_0123456789abcdef.not-a-real-key")
    assert bad.returncode == 1
    assert "cloud: authenticate: FAILED: the cloud refuses the device key (401)" in bad.stderr

    nowhere = probe_cloud(tmp_path, "http://no-such-host.invalid:8000", gateway.key)
    assert nowhere.returncode == 1
    assert "cloud: resolve: FAILED: no-such-host.invalid: the name does not resolve" in (
        nowhere.stderr
    )
