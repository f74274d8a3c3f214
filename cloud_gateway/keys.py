"""KeyStore: device keys in a SQLite file, kept only as hashes, checked in constant time.

A key reads `cgk_<key id>.<secret>`. The id is public and finds the row; the secret is 256
random bits whose SHA-256 is all the file holds. A plain hash suffices because the secret is
random, not chosen by a person: guessing a 256-bit preimage is hopeless however fast the hash,
and slow password hashes (bcrypt, argon2) would add milliseconds to every request for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_gateway.errors import AuthenticationFailed, InvalidDeviceName
from cloud_gateway.sqlite_pool import ConnectionPool
from model_runtime.private_files import private_dir, private_file
from model_runtime.sqlite_wal import enable_wal

__all__ = ["DeviceKey", "KeyStore", "NewKey"]

PREFIX = "cgk_"
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_KEY = re.compile(r"cgk_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_keys (
    key_id        TEXT PRIMARY KEY,
    device        TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    created_at    REAL NOT NULL,
    revoked_at    REAL
);
CREATE INDEX IF NOT EXISTS device_keys_device ON device_keys (device);
"""


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """A stored key as `keys list` shows it: never the secret."""

    key_id: str
    device: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A freshly created key; `token` is shown once and stored nowhere."""

    key_id: str
    device: str
    token: str


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


class KeyStore:
    """Device keys in one SQLite file; thread-safe (a pool of connections, ConnectionPool)."""

    def __init__(
        self, path: Path, *, now: Callable[[], float] = time.time, connections: int = 1
    ) -> None:
        """`connections`: as many as threads may look keys up at once (the gateway's worker
        threads); the `keys` commands need one."""
        self.path = path
        self._now = now
        private_file(private_dir(path.parent) / path.name)
        self._pool = ConnectionPool(self._open, connections)
        with self._pool.connection() as db:
            db.executescript(_SCHEMA)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        enable_wal(db)
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def _execute(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._pool.connection() as db:
            return db.execute(sql, args).fetchall()

    def _update(self, sql: str, args: tuple[object, ...]) -> int:
        with self._pool.connection() as db:
            return db.execute(sql, args).rowcount

    def add(self, device: str) -> NewKey:
        if not _DEVICE.fullmatch(device):
            raise InvalidDeviceName(
                device,
                "use 1-128 letters, digits and . _ : @ -, starting with a letter or digit",
            )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        self._update(
            "INSERT INTO device_keys (key_id, device, secret_sha256, created_at) "
            "VALUES (?, ?, ?, ?)",
            (key_id, device, _digest(secret), self._now()),
        )
        return NewKey(key_id, device, f"{PREFIX}{key_id}.{secret}")

    def revoke(self, device: str, key_id: str | None = None) -> int:
        """Revoke the device's active keys (or only `key_id`); returns how many."""
        sql = "UPDATE device_keys SET revoked_at = ? WHERE device = ? AND revoked_at IS NULL"
        args: tuple[object, ...] = (self._now(), device)
        if key_id is not None:
            sql += " AND key_id = ?"
            args += (key_id,)
        return self._update(sql, args)

    def list(self) -> list[DeviceKey]:
        rows = self._execute(
            "SELECT key_id, device, created_at, revoked_at FROM device_keys "
            "ORDER BY device, created_at"
        )
        return [DeviceKey(*row) for row in rows]

    def lookup(self, key_id: str) -> tuple[str, bytes, bool] | None:
        """(device, secret hash, revoked) of a key id, or None."""
        rows = self._execute(
            "SELECT device, secret_sha256, revoked_at IS NOT NULL FROM device_keys "
            "WHERE key_id = ?",
            (key_id,),
        )
        return None if not rows else (rows[0][0], rows[0][1], bool(rows[0][2]))

    def authenticate(self, token: str) -> str:
        """The device a bearer token belongs to; AuthenticationFailed otherwise."""
        key_id, secret = split_token(token)
        found = self.lookup(key_id)
        return check_secret(found, secret)

    def close(self) -> None:
        self._pool.close()


def split_token(token: str) -> tuple[str, str]:
    """(key id, secret) of a well-formed token; AuthenticationFailed('malformed') otherwise."""
    match = _KEY.fullmatch(token)
    if match is None:
        raise AuthenticationFailed("malformed")
    return match.group(1), match.group(2)


# Compared with when the key id is unknown, so that an unknown id costs what a known id with a
# wrong secret costs (a hash and a comparison): timing does not tell which ids exist. Random per
# process, so no secret can match it.
_DUMMY_DIGEST = _digest(secrets.token_urlsafe(32))


def check_secret(found: tuple[str, bytes, bool] | None, secret: str) -> str:
    """The device, if `secret` matches the stored hash of a key that is not revoked."""
    stored = _DUMMY_DIGEST if found is None else found[1]
    # Constant time, so response timing says nothing about how much of a guess was right.
    matches = hmac.compare_digest(stored, _digest(secret))
    if found is None or not matches:
        raise AuthenticationFailed("unknown")
    device, _, revoked = found
    if revoked:
        raise AuthenticationFailed("revoked")
    return device
