"""Both daemons speak one command-line grammar: the same `config check`, exit codes (2 for usage
and configuration errors), log levels in any case, and one line per error, never a traceback."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from model_runtime.demo import EDGE_REPOSITORY
from tests.support.processes import BIN

PROGRAMS = ["edge-agent", "cloud-gateway"]


def run(program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / program), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_config_file_that_is_a_directory_or_missing_is_one_line(
    program: str, tmp_path: Path
) -> None:
    (tmp_path / "conf.toml").mkdir()
    for command in (["config", "check"], ["serve"]):
        result = run(program, *command, "--config", "conf.toml", cwd=tmp_path)
        assert result.returncode == 2
        assert one_line(result) == f"{program}: config file conf.toml is a directory, not a file"
        result = run(program, *command, "--config", "nowhere.toml", cwd=tmp_path)
        assert result.returncode == 2
        assert one_line(result) == (
            f"{program}: cannot read config file nowhere.toml: No such file or directory"
        )


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_config_file_that_is_not_text_is_one_line(program: str, tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_bytes(b"\xff\xfe\x00port = 1")
    result = run(program, "config", "check", "--config", "conf.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == f"{program}: config file conf.toml is not text (UTF-8)"


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("level", ["DEBUG", "debug", "Warning"])
def test_log_levels_are_taken_in_any_case(program: str, level: str, tmp_path: Path) -> None:
    (tmp_path / "conf.toml").write_text(f'log_level = "{level}"\n')
    result = run(program, "config", "check", "--config", "conf.toml", "--no-models", cwd=tmp_path) \
        if program == "edge-agent" else \
        run(program, "config", "check", "--config", "conf.toml", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'log_level = "{level.lower()}"' in result.stdout


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_flag_value_of_the_wrong_kind_is_one_line_exit_2(program: str, tmp_path: Path) -> None:
    result = run(program, "serve", "--port", "eighty", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result) == (
        f"{program}: --port: must be a whole number (see `{program} serve --help`)"
    )


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_taken_port_is_one_line_naming_the_address_exit_2(program: str, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        # The agent's REST port too must be free, or its error names that one instead.
        rest = ["--rest-port", "0"] if program == "edge-agent" else []
        result = run(
            program, "serve", "--port", str(port), "--metrics-port", "0", *rest,
            "--state-dir", str(tmp_path / "state"), cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 2
    assert one_line(result) == (
        f"{program}: cannot listen on 127.0.0.1:{port}: address in use or not available"
    )


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_broken_model_repository_is_one_line_exit_2(program: str, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(EDGE_REPOSITORY, repo)
    (repo / "digits" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    result = run(
        program, "serve", "--port", "0", "--metrics-port", "0", "--model-repository", str(repo),
        "--state-dir", str(tmp_path / "state"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert one_line(result).startswith(
        f"{program}: model 'digits': model.onnx is not a loadable ONNX model"
    )


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_port_file_in_a_missing_directory_is_one_line_exit_2(
    program: str, tmp_path: Path
) -> None:
    result = run(
        program, "serve", "--port", "0", "--metrics-port", "0", "--port-file", "no/ports.json",
        "--state-dir", str(tmp_path / "state"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "port_file: its directory no does not exist" in one_line(result)


def test_a_key_database_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    result = run("cloud-gateway", "keys", "list", "--key-db", "keys", cwd=tmp_path)
    assert result.returncode == 2
    assert one_line(result).startswith("cloud-gateway: cannot open the key database keys: ")
