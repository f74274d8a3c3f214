"""A server certificate and key written to files (made with trustme, key mode 0600), and a
client context that trusts their CA: for the daemons' TLS settings in tests."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

__all__ = ["server_cert_files"]


def server_cert_files(directory: Path, name: str, *hosts: str) -> tuple[Path, Path, ssl.SSLContext]:
    """`<name>.crt` and `<name>.key` in `directory`, for `hosts` (127.0.0.1 if none), and a
    client context that trusts the CA that signed them."""
    ca = trustme.CA()
    leaf = ca.issue_cert(*(hosts or ("127.0.0.1",)))
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return cert, key, client
