"""The secrets the agent reads at start-up, once: the device key, the API's tokens, the
/metrics token, the data keys, and the TLS files of both its ends; each file checked for a
private mode on the way.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.access import AccessPolicy, TokenFileError
from edge_agent.settings import AgentSettings, is_loopback
from model_runtime.encryption import DataKeyError, Keyring
from model_runtime.metrics_endpoint import metrics_secrets
from model_runtime.private_files import SecretFileError, check_secret_file
from router.cloud_client import CloudTls

__all__ = [
    "Credentials",
    "CredentialsError",
    "DeviceKeyFileError",
    "load_credentials",
    "read_device_key",
]


class CredentialsError(Exception):
    """A secret file cannot be used; the message is the one line the operator sees."""


class DeviceKeyFileError(CredentialsError):
    """The device key file does not hold the key alone on one line; `problem` says how,
    never quoting the key."""

    def __init__(self, path: Path, problem: str) -> None:
        hint = "" if problem == "is empty" else "; put the key alone on one line"
        super().__init__(f"device key file {path} {problem}{hint}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class Credentials:
    device_key: str | None
    access: AccessPolicy
    keyring: Keyring
    cloud_tls: CloudTls | None
    metrics_token: str | None = None
    """The bearer token /metrics asks for; None: none asked for."""
    metrics_tls: ssl.SSLContext | None = None
    """The TLS server side of /metrics; None: plain HTTP."""
    warnings: list[str] = field(default_factory=list)
    """What to log at start-up: readable secret files, an API open to anyone."""


def load_credentials(settings: AgentSettings) -> Credentials:
    """Read and check every secret file the settings name; raises CredentialsError."""
    warnings: list[str] = []
    try:
        device_key = _device_key(settings.device_key_file, warnings)
        access, warning = AccessPolicy.from_files(
            settings.token_file, client_certificates=settings.tls_client_ca_file is not None
        )
        metrics_token, metrics_tls, metrics_warnings = metrics_secrets(
            settings.metrics_token_file,
            settings.metrics_tls_cert_file,
            settings.metrics_tls_key_file,
        )
        warnings += metrics_warnings
        keyring, key_warnings = Keyring.load(
            settings.encryption_key_file, settings.encryption_old_key_files
        )
        for path in (settings.tls_key_file, settings.cloud_client_key):
            if path is not None:
                _note(check_secret_file(path, "TLS private key file"), warnings)
    except (TokenFileError, DataKeyError, SecretFileError) as exc:
        raise CredentialsError(str(exc)) from None
    except OSError as exc:
        raise CredentialsError(f"cannot read {exc.filename}: {exc.strerror}") from None
    _note(warning, warnings)
    warnings += key_warnings
    if not access.required and not is_loopback(settings.host):
        warnings.append(
            f"serving the gRPC API on {settings.host} without authentication (insecure = true): "
            "anyone who can reach the port can call it and read every result"
        )
    elif access.required and settings.tls_cert_file is None and not is_loopback(settings.host):
        warnings.append(
            f"tokens cross the network to {settings.host} in clear; set tls_cert_file and "
            "tls_key_file so the API speaks TLS"
        )
    cloud_tls = None
    if settings.cloud_ca_file is not None or settings.cloud_client_cert is not None:
        cloud_tls = CloudTls(
            settings.cloud_ca_file, settings.cloud_client_cert, settings.cloud_client_key
        )
        try:
            cloud_tls.context()  # now, so a bad file stops the start with its name
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"cloud TLS files: {exc}") from None
    return Credentials(device_key, access, keyring, cloud_tls, metrics_token, metrics_tls, warnings)


def _device_key(path: Path | None, warnings: list[str]) -> str | None:
    if path is None:
        return None
    key, warning = read_device_key(path)
    _note(warning, warnings)
    return key


def read_device_key(path: Path) -> tuple[str, str | None]:
    """The key in device key file `path`, and a warning to log if others may read the file.
    One final newline is the editor's, not the key's; any other whitespace or a second line
    would reach the cloud as part of the key (or fail there), so it is refused here, with the
    file's name. Raises CredentialsError (DeviceKeyFileError for the file's text)."""
    what = "device key file"
    try:
        warning = check_secret_file(path, what)
        text = Path(path).read_text(encoding="utf-8")
    except SecretFileError as exc:
        raise CredentialsError(str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise CredentialsError(f"cannot read {what} {path}: {why}") from None
    key = text.removesuffix("\n").removesuffix("\r")
    problem = _key_text_problem(key)
    if problem is not None:
        raise DeviceKeyFileError(path, problem)
    return key, warning


def _key_text_problem(key: str) -> str | None:
    if not key or key.isspace():
        return "is empty"
    if key[0].isspace():
        return "has whitespace before the key"
    if key[-1].isspace():
        return "has whitespace after the key"
    if "\n" in key or "\r" in key:
        return "has more than one line"
    if any(c.isspace() for c in key):
        return "has whitespace inside the key"
    if not key.isprintable():
        return "has a character that is not printable"
    return None


def _note(warning: str | None, warnings: list[str]) -> None:
    if warning is not None:
        warnings.append(warning)
