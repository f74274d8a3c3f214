"""Start a real daemon on ephemeral ports, learn its ports, wait for health, stop it cleanly.

Daemons are started with `--port-file F`: once every socket is bound they write
{"name": port, ...} to F atomically, so tests never guess ports nor bind-then-close them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Daemon", "spawn_daemon", "start_daemon", "wait_until"]

BIN = Path(sys.executable).parent


def wait_until(
    condition: Callable[[], bool],
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll `condition` until it is true; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except Exception:  # a daemon that is still starting refuses connections
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    """A running daemon process and the ports it reported."""

    process: subprocess.Popen[str]
    ports: dict[str, int]
    log_path: Path
    args: list[str] = field(default_factory=list)
    port_file: Path = Path()

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def cpu_seconds(self) -> float:
        """CPU time (user and system) the daemon and its worker processes have used so far."""
        return process_cpu_seconds(self.process.pid)

    def threads_and_rss_kb(self) -> tuple[int, int]:
        """The process's thread count and resident memory in kB, from /proc (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
        rss_kb = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
        assert threads is not None
        assert rss_kb is not None
        return int(threads.group(1)), int(rss_kb.group(1))

    def assert_steady(self, burst: Callable[[], None]) -> None:
        """After a first `burst` (which allocates what any steady state needs), three more
        leave the process's thread count as it was and its memory within 2 MB."""
        burst()
        threads_before, rss_before = self.threads_and_rss_kb()
        for _ in range(3):
            burst()
        threads_after, rss_after = self.threads_and_rss_kb()
        assert threads_after == threads_before
        assert rss_after - rss_before < 2048, f"RSS grew by {rss_after - rss_before} kB"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: a power cut, as far as the process can tell."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def spawn_daemon(
    command: str,
    args: Sequence[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    prefix: Sequence[str] = (),
) -> Daemon:
    """Run `<venv>/bin/<command> serve ... --port-file` and return at once, its ports unknown
    (`start_daemon` waits for them); for tests that cut the power during start-up."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{command}.{os.getpid()}.{time.monotonic_ns()}.ports.json"
    log_path = port_file.with_suffix(".log")
    full = [*prefix, str(BIN / command), *args, "--port-file", str(port_file)]
    log = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen(
        full,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec_fn,
    )
    log.close()
    return Daemon(process, {}, log_path, full, port_file)


def start_daemon(
    command: str,
    args: Sequence[str],
    workdir: Path,
    *,
    ready: Callable[[Daemon], bool] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    preexec_fn: Callable[[], None] | None = None,
    prefix: Sequence[str] = (),
) -> Daemon:
    """Run `<venv>/bin/<command> serve ... --port-file`, wait for its ports, then for `ready`.

    `preexec_fn` runs in the child before the daemon starts (to lower its resource limits);
    `prefix` comes before the command (`ip netns exec NS`, which execs it in the same process).
    """
    daemon = spawn_daemon(command, args, workdir, env=env, preexec_fn=preexec_fn, prefix=prefix)
    process, port_file = daemon.process, daemon.port_file

    def reported() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited with {process.returncode}:\n{daemon.log()}")
        if not port_file.exists():
            return False
        daemon.ports = json.loads(port_file.read_text())
        return True

    try:
        _wait_strict(reported, timeout, f"{command} to report its ports")
        if ready is not None:
            wait_until(lambda: ready(daemon), timeout, what=f"{command} to become ready")
    except BaseException:
        daemon.kill()
        raise
    return daemon


def _wait_strict(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Like wait_until, but an exception from `condition` (the daemon died) fails at once."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and of its live descendants so far, from /proc
    (Linux): what it and the workers it started have used; 0 once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return 0.0
    children = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            children += [int(child) for child in (task / "children").read_text().split()]
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_cpu_seconds(child) for child in children)
