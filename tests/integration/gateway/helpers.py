"""Helpers of the gateway's integration tests: real `cloud-gateway serve` processes on ephemeral
ports, and the real servers around them (redis-server, MLServer, upstreams that are down or stall).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_gateway.keys import KeyStore
from model_runtime.v2_json import encode_infer_request
from tests.support.counting_upstream import send_json
from tests.support.processes import Daemon, start_daemon, wait_until

ROOT = Path(__file__).resolve().parents[3]
UNLIMITED_RATE = {
    "CLOUD_GATEWAY_RATE_LIMIT_PER_S": "100000",
    "CLOUD_GATEWAY_RATE_LIMIT_BURST": "100000",
}
"""Environment for a gateway one test client loads hard: its rate limit is not what is tested."""
MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"
DEVICE = "clinic-1"


@dataclass
class Gateway:
    """A running gateway and the key of a device it knows."""

    daemon: Daemon
    key: str
    key_db: Path

    @property
    def url(self) -> str:
        return f"http://{self.daemon.address('http')}"

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.key}"}
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def metrics_text(self) -> str:
        return httpx.get(f"http://{self.daemon.address('metrics')}/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total

    def worker_pids(self) -> list[int]:
        pid = self.daemon.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children if "spawn_main" in _cmdline(int(c))]


def serving_pid(gateway: Gateway, response: httpx.Response) -> int:
    """The worker that holds the connection `response` came on (from /proc)."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    server_port = gateway.daemon.ports["http"]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            inode = fields[9]
    assert inode is not None, "connection not found in /proc/net/tcp"
    for pid in gateway.worker_pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def add_key(key_db: Path, device: str = DEVICE) -> str:
    store = KeyStore(key_db)
    try:
        return store.add(device).token
    finally:
        store.close()


def start_gateway(
    workdir: Path,
    *args: str,
    key_db: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    prefix: Sequence[str] = (),
    ready: Callable[[Daemon], bool] | None = None,
) -> Gateway:
    """`cloud-gateway serve` on ports 0 with its own state dir (and a shared key db if given);
    `prefix` and `ready` (how to tell it serves) for one started in a network namespace."""
    state = workdir / "state"
    key_db = key_db or state / "keys.sqlite3"
    key = add_key(key_db)

    def live(d: Daemon) -> bool:
        return httpx.get(f"http://{d.address('http')}/v2/health/live").status_code == 200

    daemon = start_daemon(
        "cloud-gateway",
        [
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--state-dir",
            str(state),
            "--key-db",
            str(key_db),
            *args,
        ],
        workdir,
        ready=ready or live,
        prefix=prefix,
        # Unbuffered, so a test reading the log sees every line written so far.
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=preexec_fn,
    )
    return Gateway(daemon, key, key_db)


def module_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    *args: str,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[Gateway]:
    """The body of a module fixture (`yield from` it): `start_gateway` in a new directory
    `name` (with `workers` worker processes, every one started), yielded to the module's tests,
    then stopped, which must exit 0 (else the tail of its log says why)."""
    if workers > 1:
        args = (*args, "--workers", str(workers))
    gw = start_gateway(tmp_path_factory.mktemp(name), *args, env=env)
    try:
        if workers > 1:  # one worker serves in the supervisor's own process
            wait_until(lambda: len(gw.worker_pids()) == workers, 30.0, what=f"{workers} workers")
        yield gw
    finally:
        code = gw.daemon.stop()
    assert code == 0, gw.daemon.log()[-4000:]


def infer_body(x: np.ndarray, request_id: str | None = None, **kwargs: Any) -> bytes:
    return json.dumps(encode_infer_request({"X": x}, request_id=request_id, **kwargs)).encode()


# -- redis-server ------------------------------------------------------------------------------


@dataclass
class Redis:
    socket_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        # A unix socket in the test's directory: redis cannot report an ephemeral TCP port,
        # and a socket path needs no port at all.
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._pong, 10.0, what="redis-server to answer PING")

    def _pong(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.socket_path.unlink(missing_ok=True)


# -- MLServer, the third-party v2 server -------------------------------------------------------


def free_port_for_mlserver() -> int:
    # Bind-then-close, used ONLY for MLServer: it takes fixed ports from settings.json and has
    # no way to report a port it picked itself. Our own daemons report theirs (--port-file).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MLServer:
    url: str
    model_dir: Path
    process: subprocess.Popen[bytes]


SKLEARN_MODEL = "digits-sklearn"
UNDECLARED_MODEL = "digits-sklearn-undeclared"


# -- small upstreams that misbehave ------------------------------------------------------------


class StallingUpstream:
    """A v2 server that answers metadata at once but never answers an inference request."""

    def __init__(self) -> None:
        self.infer_requests = 0
        self._release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                metadata = {"name": "digits-large", "versions": [], "platform": ""}
                send_json(self, 200, {**metadata, "inputs": [], "outputs": []})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.infer_requests += 1
                outer._release.wait(120)  # holds the connection open, silent

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


class DownThenUp:
    """A port that refuses connections until `relay_to` makes it forward to a real server.

    The socket is bound but not listening, so connecting is refused (a server that is down),
    and nobody else can take the port meanwhile; `relay_to` starts listening on it.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._closed = False

    def relay_to(self, port: int) -> None:
        self._sock.listen()
        threading.Thread(target=self._accept, args=(port,), daemon=True).start()

    def _accept(self, port: int) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
