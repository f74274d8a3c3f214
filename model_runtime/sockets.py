"""Listening sockets for the daemons' HTTP servers, bound before the server starts, so that a
taken port fails at start-up and port 0 yields one real port to report; which hosts are local."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["bind_socket", "is_loopback"]


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket, bound once here, so port 0 yields one real port (for all workers).

    Created with proto=IPPROTO_TCP on purpose: asyncio turns Nagle's algorithm off only for
    sockets that say so (`base_events._set_nodelay`), and with Nagle on, every response whose
    headers and body go out in two writes waits ~40 ms for the client's delayed ACK.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) can only be reached from this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything
