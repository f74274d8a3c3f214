"""The suite's leak check fails a run whose test left a process running, and names the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.leak_check import descendants, read_process

ROOT = Path(__file__).resolve().parents[2]


def run_inner_suite(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(body, encoding="utf-8")
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_configure  # noqa: F401\n", encoding="utf-8"
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "default",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_a_process_left_running_fails_the_run_naming_its_test(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    result = run_inner_suite(
        tmp_path,
        "import pathlib, subprocess, sys\n"
        "def test_clean():\n"
        "    subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
        "def test_leaky():\n"
        "    p = subprocess.Popen(['sleep', '300'])\n"
        f"    pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    leaks = [line for line in result.stdout.splitlines() if line.startswith("LEAKED")]
    assert len(leaks) == 1, result.stdout
    assert "sleep 300" in leaks[0]
    assert "test_inner.py::test_leaky" in leaks[0]
    assert read_process(int(pid_file.read_text())) is None  # and it was stopped


def test_a_clean_run_passes(tmp_path: Path) -> None:
    result = run_inner_suite(
        tmp_path,
        "import subprocess\n"
        "def test_stops_what_it_starts():\n"
        "    p = subprocess.Popen(['sleep', '300'])\n"
        "    p.kill()\n"
        "    p.wait()\n",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LEAKED" not in result.stdout


def test_descendants_include_grandchildren() -> None:
    with subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    ) as shell:
        try:
            assert shell.stdout is not None
            grandchild = int(shell.stdout.readline())
            pids = {p.pid for p in descendants(os.getpid())}
            assert {shell.pid, grandchild} <= pids
        finally:
            os.kill(grandchild, 9)
            shell.kill()
