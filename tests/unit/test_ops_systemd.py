"""deploy/systemd: both units pass `systemd-analyze verify`, restart on failure, are sandboxed,
stop after the agent's grace period, and reload the agent's model configs with SIGHUP."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_gateway.settings import GatewaySettings
from edge_agent.settings import AgentSettings
from model_runtime.connection_guard import FD_RESERVE

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_BIN = "/opt/edge-cloud-router/venv/bin"
SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
}


def directives(path: Path) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, by key (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].isdigit():
            return int(value[: -len(suffix)]) * factor
    return float(value)


@pytest.mark.parametrize("name", ["edge-agent", "cloud-gateway"])
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    # verify checks that ExecStart exists: point it at this checkout's virtualenv.
    unit = tmp_path / f"{name}.service"
    text = (UNITS / unit.name).read_text(encoding="utf-8")
    assert INSTALLED_BIN in text
    unit.write_text(text.replace(INSTALLED_BIN, str(Path(sys.executable).parent)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("name", ["edge-agent", "cloud-gateway"])
def test_unit_restarts_on_failure_sandboxed_as_its_own_user(name: str) -> None:
    d = directives(UNITS / f"{name}.service")
    assert d["Restart"] == ["on-failure"]
    assert d["User"] == [name]
    assert d["ExecStart"][0].startswith(f"{INSTALLED_BIN}/{name} serve --config /etc/{name}/")
    for key, value in SANDBOX.items():
        assert d.get(key) == [value], key
    # ProtectSystem=strict makes everything read-only but the state directory
    assert d["ReadWritePaths"] == [f"/var/lib/{name}"]
    assert d["StateDirectory"] == [name]
    assert d["RestartPreventExitStatus"] == ["2"]  # invalid settings: a restart cannot help


def test_agent_stops_after_its_grace_period_and_reloads_on_sighup() -> None:
    d = directives(UNITS / "edge-agent.service")
    grace = AgentSettings.model_fields["grace_seconds"].default
    assert seconds(d["TimeoutStopSec"][0]) > grace + 5
    assert d["KillSignal"] == ["SIGTERM"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_the_gateway_unit_gives_room_for_its_connections() -> None:
    # systemd's default soft limit of 1,024 descriptors would lower the connection cap to 640
    # per worker (issue 12).
    limit = int(directives(UNITS / "cloud-gateway.service")["LimitNOFILE"][0])
    assert limit >= GatewaySettings().max_connections + FD_RESERVE


def test_the_agent_unit_gives_room_for_its_connections() -> None:
    # Under systemd's default 1,024, the watchers alone (max_watchers, each possibly on a
    # connection of its own) could take every descriptor the queue and the REST API need.
    limit = int(directives(UNITS / "edge-agent.service")["LimitNOFILE"][0])
    defaults = AgentSettings.model_fields
    need = defaults["max_watchers"].default + defaults["rest_max_connections"].default + FD_RESERVE
    assert limit >= need
