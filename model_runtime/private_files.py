"""Files only their owner can read: the modes of what both daemons create, and the checks on the
secret files (keys, tokens, certificates' keys) an operator gives them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "InsecureSecretFile",
    "SecretFileError",
    "check_secret_file",
    "private_dir",
    "private_file",
    "read_secret_text",
    "restrict_umask",
    "write_private_bytes",
]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class SecretFileError(Exception):
    """A secret file cannot be used; the message names it and says why."""


class InsecureSecretFile(SecretFileError):
    """A secret file others could write: whoever can write it can replace the secret."""

    def __init__(self, what: str, path: Path, mode: int) -> None:
        self.path = path
        self.mode = mode
        super().__init__(
            f"{what} {path} is writable by its group or by anyone (mode {mode:04o}); "
            f"make it private: chmod 600 {path}"
        )


def restrict_umask() -> None:
    """From now on this process creates files 0600 and directories 0700 whatever the umask it
    was started with: it also covers files third-party code creates (SQLite's -wal and -shm,
    uvicorn's, prometheus-client's). Called once by each daemon's command line."""
    os.umask(0o077)


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) 0700; an existing directory is left as it is, since
    an operator may have opened it to a group on purpose."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    for created in missing:
        # mkdir's mode passes through the umask and parents get the default: set them here.
        with contextlib.suppress(OSError):
            os.chmod(created, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and 0600 if it does not exist (SQLite gives its -wal and -shm the
    mode of the database file, so creating that first makes all three private)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
        os.chmod(path, PRIVATE_FILE_MODE)  # os.open's mode passes through the umask
    return Path(path)


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`, which is (made) 0600 whatever it was before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
    finally:
        os.close(fd)


def read_secret_text(path: Path, what: str) -> tuple[str, str | None]:
    """The text of secret file `path` (`what` names it in messages), stripped, and a warning to
    log if others may read it. Raises SecretFileError (InsecureSecretFile if others may write
    it)."""
    try:
        warning = check_secret_file(path, what)
        return Path(path).read_text(encoding="utf-8").strip(), warning
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise SecretFileError(f"cannot read {what} {path}: {why}") from None


def check_secret_file(path: Path, what: str) -> str | None:
    """Raise InsecureSecretFile if others may write `path`; return a warning to log if others
    may read it, else None. OSError (missing, unreadable) is raised as it is."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InsecureSecretFile(what, Path(path), mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (
            f"{what} {path} is readable by its group or by anyone (mode {mode:04o}); "
            f"make it private: chmod 600 {path}"
        )
    return None
