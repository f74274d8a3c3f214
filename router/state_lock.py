"""StateDirLock: one process at a time on a router state dir (queue, budget, audit, hard examples).

An exclusive flock(2) on `<state_dir>/agent.lock`, taken before any of those files is opened and
held until they are all closed; the kernel drops it when the process ends, even on SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from model_runtime.private_files import PRIVATE_FILE_MODE, private_dir
from router.errors import RouterError

__all__ = ["LOCK_FILE", "StateDirInUse", "StateDirLock"]

LOCK_FILE = "agent.lock"


class StateDirInUse(RouterError):
    """Another process holds the state dir's lock; `holder` is its pid when it wrote one."""

    def __init__(self, path: str, holder: int | None) -> None:
        self.path = path
        self.holder = holder
        who = "another process" if holder is None else f"another process (pid {holder})"
        super().__init__(f"state dir {path} is in use by {who}")


class StateDirLock:
    """Hold with `StateDirLock.acquire(state_dir)`, let go with `release()`.

    The lock is advisory: it keeps out whatever takes it too (every Router does). The file stays
    after release: deleting it would let two processes lock two different files of that name.
    """

    def __init__(self, state_dir: Path, fd: int) -> None:
        """Use `acquire`."""
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        """Take the lock at once or raise StateDirInUse; creates the state dir if need be.

        Non-blocking: a second agent must fail at once, not wait for the first to stop.
        OSError (a state dir that cannot be made or written) is raised as it is.
        """
        state_dir = Path(state_dir).absolute()
        private_dir(state_dir)
        # Python's fds are close-on-exec (PEP 446): a child the process runs can't keep it held.
        fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirInUse(str(state_dir), holder) from None
        except BaseException:
            os.close(fd)
            raise
        # For the message of whoever comes next. Written over, then cut, so a reader sees one
        # whole pid; a pid left by a dead holder is never read, as its lock is gone with it.
        mine = f"{os.getpid()}\n".encode()
        os.pwrite(fd, mine, 0)
        os.ftruncate(fd, len(mine))
        return cls(state_dir, fd)

    def release(self) -> None:
        """Let go (idempotent). Call it after the state dir's files are closed."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):  # the pid is only a hint; never fail a clean stop
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last fd of the open file drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None
