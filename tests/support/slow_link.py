"""A real slow link for tests and benchmarks: two network namespaces joined by a veth pair, each
direction shaped to the same rate by a `tbf` qdisc (netem is not available on these machines).

The edge namespace holds 198.18.0.1, the cloud namespace 198.18.0.2 (RFC 2544's range for
benchmarking networks, which no real host uses); nothing is added to the machine's own
namespace, so links of several tests or engineers never meet. Daemons run inside with
`ip netns exec` (`SlowLink.run`). Needs root and iproute2; `unavailable()` says why not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["CLOUD_ADDRESS", "EDGE_ADDRESS", "SlowLink", "slow_link", "unavailable"]

EDGE_ADDRESS = "198.18.0.1"
CLOUD_ADDRESS = "198.18.0.2"
_QUEUE_SECONDS = 4.0
"""How long a packet may wait in the shaper's queue: a 2G link's deep buffer, so TCP's bursts
wait rather than being dropped."""


def unavailable() -> str | None:
    """Why a slow link cannot be made here, or None."""
    if os.geteuid() != 0:
        return "a slow link needs root (network namespaces and tc); run as root, as CI does"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"a slow link needs `{tool}` (iproute2: apt-get install iproute2)"
    return None


class SlowLinkError(RuntimeError):
    """Setting up the link failed; the message has the command and what it said."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SlowLinkError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class SlowLink:
    """Two namespaces, `edge` and `cloud`, joined at `rate_bit_s` bits per second each way."""

    edge: str
    cloud: str
    rate_bit_s: int

    @property
    def rate_bytes_s(self) -> float:
        return self.rate_bit_s / 8

    def command(self, side: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the `side` namespace ("edge" or "cloud")."""
        return ["ip", "netns", "exec", self._namespace(side), *argv]

    def run(self, side: str, argv: Sequence[str], timeout: float = 60.0) -> str:
        """Run `argv` in `side`, return its stdout; CalledProcessError if it fails."""
        return subprocess.run(
            self.command(side, argv), capture_output=True, text=True, check=True, timeout=timeout
        ).stdout

    def fetch(self, side: str, url: str) -> str:
        """GET `url` from inside `side` (for a daemon's loopback-only metrics, say)."""
        script = (
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
        )
        return self.run(side, [sys.executable, "-c", script, url], timeout=30.0)

    def set_up(self, up: bool) -> None:
        """Take the link down (as an outage) or bring it back."""
        _ip("-n", self.edge, "link", "set", "veth-edge", "up" if up else "down")

    def _namespace(self, side: str) -> str:
        if side not in ("edge", "cloud"):
            raise ValueError(f"side: edge or cloud, got {side!r}")
        return self.edge if side == "edge" else self.cloud

    def close(self) -> None:
        """Delete both namespaces (and the veth pair with them); never fails."""
        for namespace in (self.edge, self.cloud):
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)


def _shape(namespace: str, device: str, rate_bit_s: int) -> None:
    # burst: one full-size packet (and a little), the least tbf needs to pass any packet.
    limit = max(3000, int(rate_bit_s / 8 * _QUEUE_SECONDS))
    _tc = ["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf"]
    done = subprocess.run(
        [*_tc, "rate", f"{rate_bit_s}bit", "burst", "3000", "limit", str(limit)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SlowLinkError(f"tc tbf on {namespace}/{device}: {done.stderr.strip()}")


def open_slow_link(rate_bit_s: int) -> SlowLink:
    """Make the two namespaces and the shaped veth pair between them; SlowLinkError if the
    kernel or the tools refuse (whatever was made is removed first)."""
    tag = uuid.uuid4().hex[:8]
    link = SlowLink(f"ecr-edge-{tag}", f"ecr-cloud-{tag}", rate_bit_s)
    try:
        for namespace in (link.edge, link.cloud):
            _ip("netns", "add", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", link.edge, "link", "add", "veth-edge", "type", "veth", "peer", "name", "veth-cloud", "netns", link.cloud)  # fmt: skip
        for namespace, device, address in (
            (link.edge, "veth-edge", EDGE_ADDRESS),
            (link.cloud, "veth-cloud", CLOUD_ADDRESS),
        ):
            _ip("-n", namespace, "addr", "add", f"{address}/30", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            _shape(namespace, device, rate_bit_s)
    except BaseException:
        link.close()
        raise
    return link


@contextmanager
def slow_link(rate_bit_s: int) -> Iterator[SlowLink]:
    """A SlowLink for the `with` block, removed afterwards however the block ends."""
    link = open_slow_link(rate_bit_s)
    try:
        yield link
    finally:
        link.close()
