"""What the README tells a newcomer to run works as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import start_agent

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEFAULT_ADDRESS = "127.0.0.1:8001"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def test_the_client_install_line_names_the_client_extra() -> None:
    assert "```sh\n.venv/bin/pip install -e '.[client]'\n```" in section("Calling the agent")


def test_calling_the_agent_snippet_runs_as_written(tmp_path: Path) -> None:
    (snippet,) = re.findall(r"```python\n(.*?)```", section("Calling the agent"), re.S)
    # The one change: the agent under test listens on a free port, not on the default one.
    assert snippet.count(DEFAULT_ADDRESS) == 1
    agent = start_agent(tmp_path)
    try:
        ran = subprocess.run(
            [sys.executable, "-c", snippet.replace(DEFAULT_ADDRESS, agent.address("grpc"))],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    finally:
        agent.stop()
    assert ran.returncode == 0, ran.stderr
    assert re.fullmatch(r"\[\d\]\n", ran.stdout), ran.stdout  # the predicted digit


def test_the_calibrate_example_runs_as_written_and_rewrites_the_copy(tmp_path: Path) -> None:
    (script,) = re.findall(
        r"```sh\n(.*?)```", section("Calibrating the escalation threshold"), re.S
    )
    # The repository's files and venv, seen from a directory of the test's own (the example's
    # `cp` writes into the current directory).
    (tmp_path / "model_runtime").symlink_to(ROOT / "model_runtime")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    ran = subprocess.run(
        ["bash", "-euc", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stderr
    config = tmp_path / "models" / "digits" / "config.toml"
    assert (tmp_path / "models" / "digits" / "config.toml.bak").is_file()
    assert config.read_text() != (ROOT / "model_runtime/demo/edge/digits/config.toml").read_text()
