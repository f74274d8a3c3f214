"""Fixtures that start real edge-agent processes on ephemeral ports."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import httpx
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import Daemon, start_daemon

if TYPE_CHECKING:
    from tests.support.reliability import Rig

T = TypeVar("T")


def agent_ready(daemon: Daemon) -> bool:
    return bool(triton.InferenceServerClient(daemon.address("grpc")).is_server_ready())


def start_agent(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ready: Callable[[Daemon], bool] | None = agent_ready,
    prefix: Sequence[str] = (),
) -> Daemon:
    """`edge-agent serve` on ports 0; `ready` says when it serves (an agent that asks callers
    for a token needs a client that has one); `prefix`: see start_daemon."""
    return start_daemon(
        "edge-agent", agent_args(workdir, *args), workdir, ready=ready, env=env, prefix=prefix
    )


def agent_args(workdir: Path, *args: str) -> list[str]:
    """The arguments of `edge-agent` serving on ports 0 (gRPC, metrics, REST) with
    `workdir`/state as its state dir."""
    ports = ["--port", "0", "--metrics-port", "0", "--rest-port", "0"]
    return ["serve", *ports, "--state-dir", str(workdir / "state"), *args]


# Two callers' bearer tokens, and the token file that names them (token_file).
TOKENS = {"kiosk-a": "a" * 8 + "0123456789abcdef", "kiosk-b": "b" * 8 + "0123456789abcdef"}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("".join(f"{name} {token}\n" for name, token in TOKENS.items()))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One agent on the bundled demo repository, shared by a module's read-only tests."""
    daemon = start_agent(tmp_path_factory.mktemp("agent"), "--max-message-bytes", "65536")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def client(agent: Daemon) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(agent.address("grpc"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A real `cloud-gateway serve` on ephemeral ports, with a key for one device."""
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.daemon.stop()


@pytest.fixture
def proxy(gateway: Gateway) -> Iterator[FaultProxy]:
    """The link between the edge and the gateway: cut, delay, throttle or reset it at will."""
    with FaultProxy("127.0.0.1", gateway.daemon.ports["http"]) as p:
        yield p


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """The reliability tests' counting upstream, with the gateways and proxy they start."""
    from tests.support.reliability import Rig  # it builds on this module's helpers

    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def start_agent_with_cloud(
    workdir: Path,
    gateway: Gateway,
    proxy: FaultProxy,
    *args: str,
    env: dict[str, str] | None = None,
    ready: Callable[[Daemon], bool] = agent_ready,
) -> Daemon:
    """An agent escalating to `gateway` through `proxy`, probing the link often, so a cut or a
    black hole shows within seconds."""
    args, env = cloud_agent_command(workdir, gateway, proxy, *args, env=env)
    return start_daemon("edge-agent", args, workdir, ready=ready, env=env)


def cloud_agent_command(
    workdir: Path,
    gateway: Gateway,
    proxy: FaultProxy,
    *args: str,
    env: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment of `start_agent_with_cloud`'s agent, to spawn it without
    waiting (tests that cut the power during start-up)."""
    key_file = write_device_key(workdir, gateway)
    # Probes often, so a cut shows at once; a black hole shows after three probe timeouts, each
    # long enough that a busy machine's slow answer is not taken for a dead link.
    fast_probes = {
        "EDGE_AGENT_PROBE_INTERVAL_SECONDS": "0.3",
        "EDGE_AGENT_PROBE_TIMEOUT_SECONDS": "2",
    }
    cloud = ("--cloud-url", proxy.url, "--device-key-file", str(key_file))
    return agent_args(workdir, *cloud, *args), {**fast_probes, **(env or {})}


def write_device_key(workdir: Path, gateway: Gateway, mode: int = 0o600) -> Path:
    """`workdir`/device.key holding the gateway's key for its device, private by default (as
    the agent wants its key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    key_file = workdir / "device.key"
    key_file.write_text(gateway.key, encoding="utf-8")
    key_file.chmod(mode)
    return key_file


def agent_metric(agent: Daemon, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the agent's /metrics whose labels include `labels`."""
    text = httpx.get(f"http://{agent.address('metrics')}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


LINK_WORKS = ("up", "degraded")
"""Link states in which the agent has reached the cloud and escalates to it. Wait for one of
these, not for `up` alone: on a busy machine one probe may time out, and the link then reads
`degraded` until that failure leaves the monitor's last 64 observations (about 20 s of probes
0.3 s apart, longer when the machine is slow), however well the link works."""


def model_runs(gateway: Gateway) -> float:
    """How often the gateway ran the cloud model, from its /metrics."""
    return gateway.metric("cloud_gateway_model_runs_total", model="digits-large")


def collect_stream(stream: Iterator[T]) -> queue.Queue[T]:
    """Read a server stream (WatchResults) in a thread into a queue; cancelling the stream
    ends the thread."""
    received: queue.Queue[T] = queue.Queue()

    def read() -> None:
        try:
            for item in stream:
                received.put(item)
        except grpc.RpcError:  # the test's own cancel ends the stream
            pass

    threading.Thread(target=read, daemon=True).start()
    return received
