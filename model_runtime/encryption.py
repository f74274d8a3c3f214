"""Encryption at rest: stored blobs (queued requests, answers, hard examples) sealed with
AES-256-GCM under a keyring whose keys come from files; each sealed blob names its key.

A sealed blob is MAGIC, the key id (8 bytes), a random 96-bit nonce, then the ciphertext and
its tag. The key id is a hash of the key, so rotating is: a new key file becomes the current
one, the old one stays listed among the old keys until no row sealed with it is left. The
associated data binds a blob to its place (the row and column it was written to), so a blob
copied into another row does not decrypt. Blobs without MAGIC were written before encryption
was turned on and are read as they are.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from model_runtime.private_files import SecretFileError, read_secret_text

__all__ = [
    "KEY_BYTES",
    "MAGIC",
    "DataKey",
    "DataKeyError",
    "Keyring",
    "UnknownDataKey",
    "sealed_key_id_sql",
]

MAGIC = b"\x00ECR1"
"""Starts every sealed blob; no plaintext stored here can (JSON starts with `{`, gzip `\\x1f`)."""
KEY_BYTES = 32
_ID_BYTES = 8
_NONCE_BYTES = 12
_HEADER = len(MAGIC) + _ID_BYTES + _NONCE_BYTES


class DataKeyError(Exception):
    """A key file is unusable, or a sealed blob cannot be opened; the message says which."""


class UnknownDataKey(DataKeyError):
    """Data sealed with a key that is not in the keyring (its file is not configured)."""

    def __init__(self, key_id: str, where: str) -> None:
        self.key_id = key_id
        super().__init__(
            f"{where} holds data encrypted with key {key_id}, which is not configured; list "
            f"its file in encryption_old_key_files (or as encryption_key_file)"
        )


@dataclass(frozen=True, slots=True)
class DataKey:
    id: bytes
    secret: bytes = b""

    @property
    def id_hex(self) -> str:
        return self.id.hex()

    @classmethod
    def from_secret(cls, secret: bytes) -> DataKey:
        if len(secret) != KEY_BYTES:
            raise DataKeyError(f"a data key is {KEY_BYTES} bytes, got {len(secret)}")
        digest = hashlib.sha256(b"edge-cloud-router data key id\x00" + secret).digest()
        return cls(digest[:_ID_BYTES], secret)

    @classmethod
    def load(cls, path: Path) -> tuple[DataKey, str | None]:
        """The key in `path` (32 random bytes, base64: `openssl rand -base64 32`) and a
        warning about the file's mode, if any. Raises DataKeyError naming the file."""
        try:
            text, warning = read_secret_text(path, "encryption key file")
        except SecretFileError as exc:
            raise DataKeyError(str(exc)) from None
        try:
            secret = base64.b64decode(text, validate=True)
        except ValueError:  # binascii.Error, or a character outside ASCII
            raise DataKeyError(
                f"encryption key file {path}: not base64; make one with "
                f"`openssl rand -base64 32 > {path}`"
            ) from None
        try:
            return cls.from_secret(secret), warning
        except DataKeyError as exc:
            raise DataKeyError(f"encryption key file {path}: {exc}") from None


class Keyring:
    """Seals with the current key (none: stores plaintext) and opens with any listed key."""

    def __init__(self, current: DataKey | None = None, old: Sequence[DataKey] = ()) -> None:
        self.current = current
        self._keys = {k.id: AESGCM(k.secret) for k in (*old, *([current] if current else []))}
        self._sealer = None if current is None else self._keys[current.id]

    @classmethod
    def load(
        cls, key_file: Path | None, old_key_files: Iterable[Path] = ()
    ) -> tuple[Keyring, list[str]]:
        """The keyring of these files, and warnings about their modes."""
        warnings: list[str] = []
        keys = []
        for path in (*([key_file] if key_file else []), *old_key_files):
            key, warning = DataKey.load(path)
            keys.append(key)
            if warning is not None:
                warnings.append(warning)
        current = keys[0] if key_file is not None else None
        return cls(current, keys[1:] if key_file is not None else keys), warnings

    @property
    def encrypting(self) -> bool:
        return self._sealer is not None

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(k.hex() for k in self._keys)

    def seal(self, data: bytes, context: bytes) -> bytes:
        """`data` encrypted under the current key, bound to `context` (its row and column);
        `data` itself when no key is current."""
        if self._sealer is None or self.current is None:
            return data
        nonce = os.urandom(_NONCE_BYTES)
        return MAGIC + self.current.id + nonce + self._sealer.encrypt(nonce, data, context)

    def open(self, blob: bytes, context: bytes, where: str = "the state dir") -> bytes:
        """The plaintext of `blob` sealed for `context`; a blob not sealed is returned as is.
        Raises UnknownDataKey, or DataKeyError if it was damaged or moved."""
        if not blob.startswith(MAGIC):
            return blob
        key_id = blob[len(MAGIC) : len(MAGIC) + _ID_BYTES]
        aead = self._keys.get(key_id)
        if aead is None:
            raise UnknownDataKey(key_id.hex(), where)
        nonce = blob[len(MAGIC) + _ID_BYTES : _HEADER]
        try:
            return aead.decrypt(nonce, blob[_HEADER:], context)
        except InvalidTag:
            raise DataKeyError(
                f"{where}: encrypted data failed its integrity check (damaged, or not "
                "written for this row)"
            ) from None

    def require(self, key_ids: Iterable[bytes | str], where: str) -> None:
        """Raise UnknownDataKey unless every key id (as stored, or hex) is in the keyring."""
        for key_id in key_ids:
            raw = bytes.fromhex(key_id) if isinstance(key_id, str) else key_id
            if raw not in self._keys:
                raise UnknownDataKey(raw.hex(), where)


def sealed_key_id_sql(column: str) -> str:
    """An SQL expression giving the key id of a sealed blob in `column`, NULL for plaintext."""
    start, end = len(MAGIC) + 1, _ID_BYTES
    return (
        f"CASE WHEN substr({column}, 1, {len(MAGIC)}) = x'{MAGIC.hex()}'"
        f" THEN substr({column}, {start}, {end}) END"
    )
