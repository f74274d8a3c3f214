"""StateDirLock with real processes and real flock(2): one holder at a time, named in the refusal,
gone with its process even on SIGKILL; a Router takes it before it opens any file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from router import Router, RouterConfig
from router.state_lock import LOCK_FILE, StateDirInUse, StateDirLock
from tests.support.processes import wait_until

# Holds the lock until its stdin closes or it is killed.
HOLD = (
    "import sys; from pathlib import Path; from router.state_lock import StateDirLock;"
    " lock = StateDirLock.acquire(Path(sys.argv[1])); sys.stdin.read()"
)


def hold(state: Path) -> subprocess.Popen[bytes]:
    """Another process holding the lock on `state`, once this returns."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], stdin=subprocess.PIPE)

    def locked() -> bool:
        if holder.poll() is not None:
            raise AssertionError(f"the holder exited with {holder.returncode}")
        # It writes its pid only once it holds the lock.
        return (state / LOCK_FILE).read_text() == f"{holder.pid}\n"

    try:
        wait_until(locked, timeout=30, what="the other process to take the lock")
    except BaseException:
        kill(holder)
        raise
    return holder


def kill(holder: subprocess.Popen[bytes]) -> None:
    """SIGKILL: no clean-up runs in the holder."""
    holder.kill()
    holder.wait(timeout=30)
    if holder.stdin is not None:
        holder.stdin.close()


def names(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir())


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def holder(state: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = hold(state)
    yield process
    kill(process)


def test_a_second_process_is_refused_with_the_holders_pid(
    state: Path, holder: subprocess.Popen[bytes]
) -> None:
    with pytest.raises(StateDirInUse) as refused:
        StateDirLock.acquire(state)
    assert refused.value.holder == holder.pid
    assert refused.value.path == str(state)
    assert (
        str(refused.value) == f"state dir {state} is in use by another process (pid {holder.pid})"
    )
    assert (state / LOCK_FILE).read_text() == f"{holder.pid}\n"  # the refused one wrote nothing


def test_the_lock_goes_with_its_process_even_on_sigkill(
    state: Path, holder: subprocess.Popen[bytes]
) -> None:
    with pytest.raises(StateDirInUse):
        StateDirLock.acquire(state)
    kill(holder)
    # The file and its stale pid are still there; nothing needed clearing.
    assert (state / LOCK_FILE).read_text() == f"{holder.pid}\n"
    lock = StateDirLock.acquire(state)
    try:
        assert (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_a_clean_release_lets_the_next_one_in(state: Path) -> None:
    first = StateDirLock.acquire(state)
    # flock(2) locks belong to the open file: a second open in the same process is refused too.
    with pytest.raises(StateDirInUse):
        StateDirLock.acquire(state)
    first.release()
    first.release()  # idempotent
    assert (state / LOCK_FILE).read_text() == ""  # no pid left to mislead a reader
    kill(hold(state))  # another process now gets it at once


async def test_a_router_takes_the_lock_before_it_opens_any_file(
    state: Path, holder: subprocess.Popen[bytes]
) -> None:
    with pytest.raises(StateDirInUse) as refused:
        await Router.open(RouterConfig(state_dir=state), CollectorRegistry())
    assert refused.value.holder == holder.pid
    assert names(state) == [LOCK_FILE]  # no queue, no budget file


async def test_a_second_router_is_refused_and_the_first_carries_on(state: Path) -> None:
    first = await Router.open(RouterConfig(state_dir=state), CollectorRegistry())
    try:
        files = names(state)
        with pytest.raises(StateDirInUse):
            await Router.open(RouterConfig(state_dir=state), CollectorRegistry())
        assert names(state) == files
        assert (await first.status()).queue_bytes == 0  # still open and answering
    finally:
        await first.close()
    again = await Router.open(RouterConfig(state_dir=state), CollectorRegistry())
    await again.close()
