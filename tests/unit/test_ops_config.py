"""Configuration and identity: `edge-agent config check --config FILE`, the commented example configs of
both daemons, and the site and device that appear in the agent's metrics and logs."""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from pathlib import Path

import pytest
import typer
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from cloud_gateway.cli import app as gateway_app
from cloud_gateway.settings import GatewaySettings
from edge_agent import __version__
from edge_agent.config_cli import config_app
from edge_agent.metrics import AgentMetrics
from edge_agent.settings import AgentSettings, SettingsError, load_settings
from model_runtime import ModelRepository
from model_runtime.demo import EDGE_REPOSITORY
from model_runtime.logs import JsonFormatter
from tests.support.server_cert import server_cert_files

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "config"
KEY = "cgk_0123456789abcdef.secret-key-material-never-printed"


def cli() -> typer.Typer:
    """`edge-agent` with the config commands, as edge_agent/cli.py registers them."""
    app = typer.Typer()
    app.add_typer(config_app, name="config")
    return app


@pytest.fixture(autouse=True)
def _no_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("EDGE_AGENT_", "CLOUD_GATEWAY_")):
            monkeypatch.delenv(name)


def check(file: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli(), ["config", "check", "--config", str(file), *args])
    return result.exit_code, result.stdout, result.stderr


def test_check_prints_the_settings_in_force_as_toml_without_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "device.key"
    key_file.write_text(KEY)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "clinic-7"\nport = 9001\ncloud_url = "https://gw.example.org"\n'
        f'device_key_file = "{key_file}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    code, out, err = check(config)
    assert (code, err) == (0, "")
    shown = tomllib.loads(out)
    assert shown["site"] == "clinic-7"
    assert shown["device"] == "edge-agent"
    assert shown["port"] == 9001
    assert shown["device_key_file"] == str(key_file)
    assert KEY not in out
    # it is the whole effective configuration: feeding it back gives the same settings
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert load_settings(again) == load_settings(config)


def test_check_refuses_a_password_in_the_cloud_url_without_printing_it(tmp_path: Path) -> None:
    key_file = tmp_path / "device.key"
    key_file.write_text(KEY)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'cloud_url = "https://ops:pa55@gw.example.org:8443/v2"\ndevice_key_file = "{key_file}"\n'
    )
    code, out, err = check(config, "--no-models")
    assert code == 2
    assert "cloud_url: must not carry a user name or password" in err
    assert "pa55" not in out + err
    assert "ops:" not in out + err


def test_check_names_each_bad_key_on_its_own_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'port = 70000\nprot = 1\nsite = "clinic 7"\ncloud_url = "ftp://gw"\n'
        "default_ttl_seconds = 9999999\n"
    )
    code, out, err = check(config)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 5, err
    for key in ("port", "prot", "site", "cloud_url", "default_ttl_seconds"):
        assert sum(f": {key}: " in line for line in lines) == 1, (key, err)
    assert all(line.startswith("edge-agent: ") for line in lines)
    assert any(f"prot: unknown setting in {config}" in line for line in lines)
    assert any("EDGE_AGENT_PORT" in line for line in lines)  # where else it could come from


def test_check_reports_what_start_up_would_trip_on(tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'model_repository = "{tmp_path / "no-models"}"\ncloud_url = "https://gw"\n'
        f'device_key_file = "{empty}"\n'
    )
    code, _, err = check(config)
    assert code == 2
    assert f"model_repository: {tmp_path / 'no-models'} is not a directory" in err
    assert f"device_key_file: {empty} is empty" in err

    config.write_text('cloud_url = "https://gw"\n')
    code, _, err = check(config)
    assert code == 2
    assert "device_key_file: required when cloud_url is set" in err


def test_check_of_a_missing_or_broken_file(tmp_path: Path) -> None:
    code, _, err = check(tmp_path / "nowhere.toml")
    assert code == 2
    assert "nowhere.toml" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("port = [\n")
    code, _, err = check(broken)
    assert code == 2
    assert "is not valid TOML" in err


def _documented(example: Path) -> dict[str, object]:
    """Every `key = value` of an example, commented out or not, as TOML."""
    lines = [
        match.group(1)
        for line in example.read_text(encoding="utf-8").splitlines()
        if (match := re.fullmatch(r"#?\s*(\w+ = [^#]+?)\s*(#.*)?", line))
    ]
    return tomllib.loads("\n".join(lines))


def test_agent_example_config_is_valid_and_documents_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = EXAMPLES / "edge-agent.example.toml"
    documented = _documented(example)
    assert set(documented) == set(AgentSettings.model_fields)
    # The commented lines show the defaults.
    defaults = AgentSettings.model_validate({"device_key_file": None})
    active = tomllib.loads(example.read_text(encoding="utf-8"))
    for key, value in documented.items():
        # Optional files (default: none) show an example path instead.
        if key not in active and getattr(defaults, key) is not None:
            assert getattr(defaults, key) == value, key
    # The file as shipped passes `config check`, with this machine's paths from the
    # environment (which wins over the file).
    key_file = tmp_path / "device.key"
    key_file.write_text(KEY)
    metrics_token_file = tmp_path / "metrics-token"
    metrics_token_file.write_text(KEY)
    metrics_token_file.chmod(0o600)
    monkeypatch.setenv("EDGE_AGENT_MODEL_REPOSITORY", str(EDGE_REPOSITORY))
    monkeypatch.setenv("EDGE_AGENT_DEVICE_KEY_FILE", str(key_file))
    monkeypatch.setenv("EDGE_AGENT_METRICS_TOKEN_FILE", str(metrics_token_file))
    cert, key, _ = server_cert_files(tmp_path, "metrics", "clinic-7.vpn.example.org")
    monkeypatch.setenv("EDGE_AGENT_METRICS_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("EDGE_AGENT_METRICS_TLS_KEY_FILE", str(key))
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "state"))
    code, out, err = check(example)
    assert (code, err) == (0, "")
    assert tomllib.loads(out)["site"] == "clinic-7"


def test_gateway_example_config_is_valid_and_documents_every_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    example = EXAMPLES / "cloud-gateway.example.toml"
    assert set(_documented(example)) == set(GatewaySettings.model_fields)
    monkeypatch.setenv("CLOUD_GATEWAY_MODEL_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("CLOUD_GATEWAY_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(gateway_app, ["config", "check", "--config", str(example)])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["host"] == "0.0.0.0"


def test_site_and_device_are_checked_and_default_to_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings()
    assert settings.site
    assert settings.device == "edge-agent"
    monkeypatch.setenv("EDGE_AGENT_SITE", "clinic-7")
    assert load_settings(device="kiosk-2").site == "clinic-7"
    with pytest.raises(SettingsError) as caught:
        load_settings(site='clinic"7', device="")
    assert [p.split(":")[0] for p in caught.value.problems] == ["site", "device"]


def test_metrics_name_the_site_device_and_version() -> None:
    registry = CollectorRegistry()
    AgentMetrics(
        registry,
        ModelRepository.load(EDGE_REPOSITORY),
        site="clinic-7",
        device="kiosk-2",
        default_ttl_seconds=3600,
    )
    labels = {"site": "clinic-7", "device": "kiosk-2", "version": __version__}
    assert registry.get_sample_value("edge_agent_info", labels) == 1
    assert registry.get_sample_value("edge_agent_queue_default_ttl_seconds") == 3600


def test_json_log_lines_carry_the_site_and_device() -> None:
    formatter = JsonFormatter({"site": "clinic-7", "device": "kiosk-2"})
    record = logging.LogRecord("edge_agent", logging.INFO, __file__, 1, "serving", None, None)
    record.fields = {"grpc": "127.0.0.1:8001"}
    line = json.loads(formatter.format(record))
    assert line["site"] == "clinic-7"
    assert line["device"] == "kiosk-2"
    assert (line["msg"], line["grpc"], line["level"]) == ("serving", "127.0.0.1:8001", "info")
