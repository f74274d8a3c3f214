"""GatewaySettings and the `cloud-gateway` CLI: defaults, precedence, errors naming the key."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud_gateway.cli import app
from cloud_gateway.keys import KeyStore
from cloud_gateway.settings import GatewaySettings, SettingsError, load_settings
from model_runtime.demo import CLOUD_REPOSITORY


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLOUD_GATEWAY_"):
            monkeypatch.delenv(name)


def test_defaults_serve_the_bundled_model_on_localhost() -> None:
    s = load_settings()
    assert (s.host, s.port, s.metrics_port, s.workers) == ("127.0.0.1", 8000, 9102, 1)
    assert s.model_repository == CLOUD_REPOSITORY
    assert s.upstream is None
    assert s.idempotency_store == "sqlite"
    assert s.idempotency_retention_s == 7 * 86_400
    assert s.key_db_path == Path("var/cloud-gateway/keys.sqlite3")


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 1111\nworkers = 3\nupstream = "http://a:8080/"\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("CLOUD_GATEWAY_PORT", "2222")
    monkeypatch.setenv("CLOUD_GATEWAY_WORKERS", "4")
    s = load_settings(config, {"port": 3333, "host": None})
    assert s.port == 3333  # flag
    assert s.workers == 4  # env over file
    assert s.upstream == "http://a:8080"  # file, trailing slash dropped
    assert s.host == "0.0.0.0"  # a flag left unset does not hide the file


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"port": 70000}, "port: must be at most 65535, got 70000"),
        ({"upstream": "ftp://x"}, "upstream: must be an http:// or https:// URL"),
        ({"idempotency_store": "memcached://x"}, "idempotency_store: must be 'sqlite' or a"),
        ({"workers": 0}, "workers: must be at least 1, got 0"),
        ({"blocking_threads": 0}, "blocking_threads: must be at least 1, got 0"),
        ({"blocking_threads": 1000}, "blocking_threads: must be at most 256, got 1000"),
    ],
)
def test_bad_flags_name_the_key_and_where_to_set_it(flags: dict[str, object], words: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, flags)
    assert words in str(err.value)
    key = next(iter(flags))
    assert f"CLOUD_GATEWAY_{key.upper()}" in str(err.value)


def test_bad_env_and_unknown_file_keys_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_GATEWAY_MAX_BODY_BYTES", "lots")
    config = tmp_path / "g.toml"
    config.write_text("prot = 8000\n")
    with pytest.raises(SettingsError) as err:
        load_settings(config)
    message = str(err.value)
    assert "max_body_bytes: must be a whole number, got 'lots'" in message
    assert (
        f"prot: unknown setting in {config} (`cloud-gateway config show --all` lists them all)"
        in (message)
    )


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="No such file or directory"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")
    with pytest.raises(SettingsError, match=r"broken\.toml"):
        load_settings(broken)


def test_settings_survive_the_trip_to_a_worker_process() -> None:
    s = load_settings(None, {"port": 0, "workers": 2})
    assert pickle.loads(pickle.dumps(s)) == s
    assert isinstance(pickle.loads(pickle.dumps(s)), GatewaySettings)


def test_config_check_prints_settings_or_names_the_bad_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    config = tmp_path / "g.toml"
    config.write_text("workers = 2\n")
    ok = runner.invoke(app, ["config", "check", "--config", str(config)])
    assert ok.exit_code == 0
    assert "workers = 2" in ok.output
    monkeypatch.setenv("CLOUD_GATEWAY_RATE_LIMIT_PER_S", "-1")
    bad = runner.invoke(app, ["config", "check"])
    assert bad.exit_code == 2
    assert "rate_limit_per_s" in bad.output


def test_keys_commands_show_a_key_once_and_never_again(tmp_path: Path) -> None:
    runner = CliRunner()
    db = ["--key-db", str(tmp_path / "keys.sqlite3")]
    added = runner.invoke(app, ["keys", "add", "clinic-7", *db])
    assert added.exit_code == 0, added.output
    token = added.stdout.strip().splitlines()[0]
    assert token.startswith("cgk_")
    assert KeyStore(tmp_path / "keys.sqlite3").authenticate(token) == "clinic-7"

    listed = runner.invoke(app, ["keys", "list", *db])
    assert "clinic-7" in listed.output
    assert "active" in listed.output
    assert token.split(".")[1] not in listed.output

    revoked = runner.invoke(app, ["keys", "revoke", "clinic-7", *db])
    assert revoked.exit_code == 0
    assert "revoked 1 key" in revoked.output
    assert "revoked" in runner.invoke(app, ["keys", "list", *db]).output
    again = runner.invoke(app, ["keys", "revoke", "clinic-7", *db])
    assert again.exit_code == 1
    bad_name = runner.invoke(app, ["keys", "add", "no spaces please", *db])
    assert bad_name.exit_code == 2
