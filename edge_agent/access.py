"""Who may call the agent's API and whose results a caller may see: rules with no transport in
them, applied by the gRPC adapter (edge_agent.grpc.auth) and by any other transport alike.

A caller is anonymous when the agent asks for no credentials (loopback, or `--insecure`);
otherwise it is named by its bearer token (`token:<name>`) or its client certificate
(`cert:<common name>`). A queued request belongs to its caller and the `client_id` it gave,
if any; a ticket's result is shown only to the same caller with the same client id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from model_runtime import InvalidInput
from model_runtime.private_files import SecretFileError, read_secret_text

__all__ = [
    "ANONYMOUS",
    "CLIENT_ID_PARAMETER",
    "AccessDenied",
    "AccessPolicy",
    "Caller",
    "TokenFileError",
    "check_client_id",
    "read_token_file",
]

CLIENT_ID_PARAMETER = "client_id"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,62}")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_MIN_TOKEN_CHARS = 16
_BEARER = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Caller:
    principal: str
    """`""` (anonymous), `token:<name>` or `cert:<common name>`."""

    def owner(self, client_id: str = "") -> str:
        """The owner of what this caller queues with `client_id`: what GetResult and
        WatchResults compare. `""` for an anonymous caller without a client id, so results
        queued before owners existed stay where they were."""
        if not self.principal and not client_id:
            return ""
        # JSON keeps the two parts apart whatever a certificate's name holds.
        return json.dumps([self.principal, client_id], separators=(",", ":"))


ANONYMOUS = Caller("")


def check_client_id(value: object) -> str:
    """A caller's client id (a request parameter or field); "" when not given. Raises
    InvalidInput without echoing what was sent."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise InvalidInput(
            "client_id", f"must be 1-128 of A-Z a-z 0-9 . _ : - (got {size})", "parameter"
        )
    return value


class AccessDenied(Exception):
    """The call carries no acceptable credentials; `reason` is one of REASONS (a metric label)."""

    REASONS = ("missing", "malformed", "unknown")

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class TokenFileError(Exception):
    """The token file cannot be used; the message names the file and the line."""


class AccessPolicy:
    """Authenticates callers. With no tokens and no client certificates every caller is
    anonymous; with either, a call needs one (a certificate is checked by the TLS layer before
    any call: `certificate_name` is the name in the verified certificate, or None)."""

    def __init__(
        self, tokens: Mapping[str, str] | None = None, *, client_certificates: bool = False
    ) -> None:
        """`tokens`: name -> token."""
        # Digests of equal length: comparing them takes the same time whatever was sent.
        self._tokens = [(_digest(token), name) for name, token in (tokens or {}).items()]
        self.client_certificates = client_certificates

    @property
    def required(self) -> bool:
        """Whether a call needs credentials at all."""
        return bool(self._tokens) or self.client_certificates

    @classmethod
    def from_files(
        cls, token_file: Path | None, *, client_certificates: bool
    ) -> tuple[AccessPolicy, str | None]:
        """The policy, and a warning about the token file's mode if others may read it."""
        if token_file is None:
            return cls(client_certificates=client_certificates), None
        tokens, warning = read_token_file(token_file)
        return cls(tokens, client_certificates=client_certificates), warning

    def authenticate(self, *, authorization: str | None, certificate_name: str | None) -> Caller:
        """The caller of a call with this `authorization` header (or metadata) value and this
        verified client certificate name; raises AccessDenied."""
        if not self.required:
            return ANONYMOUS
        if authorization is not None and self._tokens:
            match = _BEARER.fullmatch(authorization)
            if match is None:
                raise AccessDenied("malformed", "authorization: expected 'Bearer <token>'")
            name = self._token_name(match[1])
            if name is None:
                raise AccessDenied("unknown", "authorization: unknown token")
            return Caller(f"token:{name}")
        if certificate_name:
            return Caller(f"cert:{certificate_name}")
        raise AccessDenied(
            "missing", "this agent needs credentials: authorization: Bearer <token> metadata"
        )

    def _token_name(self, given: str) -> str | None:
        digest = _digest(given)
        found = None
        for known, name in self._tokens:  # every entry, so the time says nothing of a match
            if hmac.compare_digest(digest, known):
                found = name
        return found


def read_token_file(path: Path) -> tuple[dict[str, str], str | None]:
    """name -> token from `path`: one `<name> <token>` per line, `#` comments; tokens of at
    least 16 characters (`openssl rand -hex 32`). Raises TokenFileError."""
    try:
        text, warning = read_secret_text(path, "token file")
    except SecretFileError as exc:
        raise TokenFileError(str(exc)) from None
    lines = text.splitlines()
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        where = f"token file {path}, line {number}"
        if len(parts) != 2:
            raise TokenFileError(f"{where}: expected '<name> <token>'")
        name, token = parts
        if not _NAME.fullmatch(name):
            raise TokenFileError(
                f"{where}: the name must be 1-63 of A-Z a-z 0-9 . _ : - starting with a "
                "letter or digit"
            )
        if len(token) < _MIN_TOKEN_CHARS or not token.isprintable():
            raise TokenFileError(
                f"{where}: the token must be at least {_MIN_TOKEN_CHARS} printable characters "
                "(make one with `openssl rand -hex 32`)"
            )
        if name in tokens:
            raise TokenFileError(f"{where}: the name {name} is given twice")
        if token in tokens.values():
            raise TokenFileError(f"{where}: the same token is given to two names")
        tokens[name] = token
    if not tokens:
        raise TokenFileError(f"token file {path} has no tokens")
    return tokens, warning


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
