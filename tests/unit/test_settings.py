"""AgentSettings: defaults that work, precedence flags > environment > file, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.settings import SettingsError, load_settings
from model_runtime.demo import EDGE_REPOSITORY


def test_defaults_work_on_a_fresh_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_AGENT_PORT", raising=False)
    s = load_settings()
    assert (s.host, s.port, s.metrics_port) == ("127.0.0.1", 8001, 9101)
    assert s.model_repository == EDGE_REPOSITORY


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("port = 1111\nmetrics_port = 2222\nonnx_threads = 3\n", encoding="utf-8")
    monkeypatch.setenv("EDGE_AGENT_PORT", "3333")
    monkeypatch.setenv("EDGE_AGENT_METRICS_PORT", "4444")
    s = load_settings(config, port=5555)
    assert (s.port, s.metrics_port, s.onnx_threads) == (5555, 4444, 3)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("port = 70000\n", "port: must be at most 65535, got 70000"),
        ("prot = 1\n", "prot: unknown setting in"),
        ('log_level = "LOUD"\n', "log_level: must be one of 'debug', 'info'"),
        ("port = [\n", "is not valid TOML"),
        (
            "rest_header_timeout_seconds = 0\n",
            "rest_header_timeout_seconds: must be more than 0.0, got 0",
        ),
        ("rest_max_connections = 0\n", "rest_max_connections: must be at least 1, got 0"),
    ],
)
def test_invalid_file_names_the_key(tmp_path: Path, text: str, words: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(SettingsError, match=words.replace("[", r"\[")):
        load_settings(config)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"agent\.toml"):
        load_settings(tmp_path / "agent.toml")
