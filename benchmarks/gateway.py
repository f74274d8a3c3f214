"""The cloud gateway against the peers' v2 REST and against its own floor; a replay against a
model run.

Every server is its own process with one worker on this machine, serving the same ONNX file
(the demo cloud model `digits-large`) through onnxruntime with one thread, and answering the
same one-image v2 JSON request:

- the gateway as shipped, device auth and idempotency on: a fresh Idempotency-Key per request,
  so every request is a model run with its idempotency claim and answer written to SQLite;
- the gateway on the other HTTP stacks (parser x event loop, benchmarks/peers/gateway_stack.py):
  the measurement behind the choice of stack;
- the floor: the gateway's own HTTP stack (uvicorn with the same parser and event loop, and
  Starlette) answering with the model and nothing else: parse and check the v2 body, one run,
  encode; no auth, no idempotency, no metrics, no limits. The floor for any server doing so;
- a canned answer on the same stack: what the HTTP stack alone costs;
- KServe 0.21's and MLServer 1.7.1's v2 REST (benchmarks/peers/setup.sh), as rest_path.py runs
  them: KServe logging at WARNING, MLServer in one process without an access log.

Load: `--requests` POSTs over 16 kept-alive connections from a minimal asyncio HTTP/1.1 client
(_harness.http_load: a full client such as httpx costs as much CPU per request as the servers
and would measure itself). Rounds alternate between the servers, so drift on a shared machine
hits all alike; figures are medians of the rounds, with each server's CPU time per request.
Targets: the gateway >= 1.3x the best peer's throughput and >= 0.9x its floor's. About three
minutes:

    benchmarks/peers/setup.sh
    .venv/bin/python benchmarks/gateway.py [--requests 3000] [--rounds 5] [--commits C1 C2...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Result, http_load, print_table, serving, summarize
from rest_path import Server, rest_server, start_kserve, start_mlserver

from cloud_gateway import server as gateway_server
from cloud_gateway.keys import KeyStore
from model_runtime import ModelRepository, json_codec
from model_runtime.demo import CLOUD_REPOSITORY, HELDOUT
from model_runtime.sockets import bind_socket
from model_runtime.v2_json import decode_infer_request, encode_infer_request, encode_infer_response

MODEL = "digits-large"
ONNX = CLOUD_REPOSITORY / MODEL / "1" / "model.onnx"
INFER = f"/v2/models/{MODEL}/infer"
BIN = Path(sys.executable).parent
PEERS = Path(__file__).resolve().parent / "peers"
ROOT = PEERS.parent.parent
CONCURRENCY = 16
STACKS = [(h, loop) for h in ("h11", "httptools") for loop in ("asyncio", "uvloop")]
SHIPPED = (gateway_server.HTTP_PARSER, gateway_server.EVENT_LOOP)
GATEWAY = "gateway: auth, idempotency, model run"
FLOOR = "floor: the model and nothing else"
GATEWAY_ENV = {
    # The limiter still runs on every request; only its limit is out of the way.
    "CLOUD_GATEWAY_RATE_LIMIT_PER_S": "1000000",
    "CLOUD_GATEWAY_RATE_LIMIT_BURST": "1000000",
    # One device sends all 16 requests in flight: more than its default of 8.
    "CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "1000",
}
PEER_NAMES = ("KServe 0.21 REST", "MLServer 1.7.1 REST")


# -- the floor and the canned server: the gateway's HTTP stack, nothing of the gateway ------------


def serve_bare(answer_file: Path, port_file: Path, with_model: bool, http: str, loop: str) -> None:
    """Read the body, return the stored answer; `with_model`: answer it with the model instead
    (parse, check and decode the v2 body, one run, encode), and nothing else a gateway does."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answer = answer_file.read_bytes()
    model = ModelRepository.load(CLOUD_REPOSITORY).get(MODEL)

    async def infer(request: Request) -> Response:
        body = await request.body()
        if not with_model:
            return Response(answer, media_type="application/json")
        decoded = decode_infer_request(json_codec.loads(body), model)
        outputs = model.outputs_for(decoded.inputs)
        encoded = encode_infer_response(
            model.name, outputs, model_version=str(model.version), request_id=decoded.id
        )
        return Response(json_codec.dumps(encoded), media_type="application/json")

    app = Starlette(routes=[Route(INFER, infer, methods=["POST"])])
    sock = bind_socket("127.0.0.1", 0)  # the gateway's own listening socket, for equal footing
    port_file.write_text(json.dumps({"http": sock.getsockname()[1]}))
    config = uvicorn.Config(
        app, http=http, loop=loop, log_level="warning", access_log=False, server_header=False
    )
    uvicorn.Server(config).run(sockets=[sock])


# -- processes ------------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(
    command: list[str], port_file: Path, env: dict[str, str], cwd: Path | None = None
) -> Iterator[tuple[int, int]]:
    """Run a server that writes its port to `port_file`; yields (pid, port) once it answers."""

    def port() -> int:
        return int(json.loads(port_file.read_text())["http"])

    def ready() -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError, httpx.TransportError):
            httpx.post(f"http://127.0.0.1:{port()}{INFER}", content=b"{}")
            return True
        return False

    with serving(command, ready, env={**os.environ, **env}, cwd=cwd) as (pid, _seconds):
        yield pid, port()


def start_gateway(stack: ExitStack, root: Path, name: str, http: str, loop: str) -> tuple[int, int]:
    """`cloud-gateway serve`, on another stack than the shipped one through gateway_stack.py."""
    if (http, loop) == SHIPPED:
        command = [str(BIN / "cloud-gateway")]
    else:
        command = [sys.executable, str(PEERS / "gateway_stack.py"), http, loop]
    command += ["serve", "--port", "0", "--metrics-port", "0", "--state-dir", str(root / name)]
    command += ["--port-file", str(root / f"{name}.json"), "--key-db", str(root / "keys.sqlite3")]
    return stack.enter_context(daemon(command, root / f"{name}.json", GATEWAY_ENV))


def start_gateway_at(stack: ExitStack, root: Path, commit: str) -> tuple[int, int]:
    """`cloud-gateway serve` as of `commit` (its tree exported beside the others' state), on
    the stack it had then, with the same settings as start_gateway's."""
    tree = root / f"tree-{commit}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", commit], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    command = [sys.executable, "-m", "cloud_gateway", "serve", "--port", "0"]
    command += ["--metrics-port", "0", "--state-dir", str(root / commit)]
    command += ["--port-file", str(root / f"{commit}.json"), "--key-db", str(root / "keys.sqlite3")]
    # Its own tree first on the path, ahead of this checkout's editable install.
    env = {**GATEWAY_ENV, "PYTHONPATH": str(tree)}
    return stack.enter_context(daemon(command, root / f"{commit}.json", env, cwd=tree))


def start_bare(stack: ExitStack, root: Path, name: str, with_model: bool) -> tuple[int, int]:
    http, loop = SHIPPED
    command = [sys.executable, __file__, "--bare", str(root / "answer.json"), str(root / name)]
    command += ["--stack", http, loop, *(["--with-model"] if with_model else [])]
    return stack.enter_context(daemon(command, root / name, {}))


# -- measuring ------------------------------------------------------------------------------------


def _median(results: list[Result]) -> dict[str, float]:
    keys = summarize(results[0]).keys()
    return {k: statistics.median(summarize(r)[k] for r in results) for k in keys}


def one_at_a_time(port: int, body: bytes, headers: Callable[[int], dict[str, str]]) -> Result:
    asyncio.run(http_load(port, INFER, body, headers, 100, 1))  # warm up
    return asyncio.run(http_load(port, INFER, body, headers, 1000, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per round and server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--stacks",
        default="all",
        help="gateways on other HTTP stacks: 'all' or 'none' (the shipped one only)",
    )
    parser.add_argument(
        "--commits",
        nargs="*",
        default=[],
        metavar="COMMIT",
        help="also the gateway as of these commits (each a git archive run with this venv): "
        "what the changes since bought",
    )
    parser.add_argument("--bare", nargs=2, metavar=("ANSWER", "PORT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--stack", nargs=2, metavar=("HTTP", "LOOP"), help=argparse.SUPPRESS)
    parser.add_argument("--with-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        serve_bare(Path(args.bare[0]), Path(args.bare[1]), args.with_model, *args.stack)
        return

    x = np.load(HELDOUT)["X"]
    one = json_codec.dumps(encode_infer_request({"X": x[:1]}))
    batch = json_codec.dumps(encode_infer_request({"X": x[:256]}))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        token = KeyStore(root / "keys.sqlite3").add("bench-device").token
        auth = {"Authorization": f"Bearer {token}"}

        def fresh_key(i: int) -> dict[str, str]:
            return {**auth, "Idempotency-Key": uuid.uuid4().hex}

        servers: list[Server] = []
        gateway_pid, gateway_port = start_gateway(stack, root, "gateway", *SHIPPED)
        servers.append(rest_server(GATEWAY, gateway_port, gateway_pid, one, INFER, fresh_key))
        others = [s for s in STACKS if s != SHIPPED] if args.stacks == "all" else []
        for http, loop in others:
            name = f"gateway-{http}-{loop}"
            pid, port = start_gateway(stack, root, name, http, loop)
            label = f"{GATEWAY}, on {http} + {loop}"
            servers.append(rest_server(label, port, pid, one, INFER, fresh_key))
        for commit in args.commits:
            pid, port = start_gateway_at(stack, root, commit)
            label = f"{GATEWAY}, as of {commit}"
            servers.append(rest_server(label, port, pid, one, INFER, fresh_key))
        # The canned server returns the gateway's own answer: the same bytes on the wire.
        (root / "answer.json").write_bytes(
            httpx.post(f"http://127.0.0.1:{gateway_port}{INFER}", content=one, headers=auth).content
        )
        for name, with_model in ((FLOOR, True), ("canned v2 answer, same stack", False)):
            pid, port = start_bare(stack, root, f"bare-{with_model}.json", with_model)
            servers.append(rest_server(name, port, pid, one, INFER))
        work = root / "peers"
        work.mkdir()
        peers = [
            start_kserve(stack, one, ONNX, MODEL),
            start_mlserver(stack, work, one, ONNX, MODEL),
        ]
        servers += [p for p in peers if p is not None]

        runs: dict[str, list[Result]] = {s.name: [] for s in servers}
        for _ in range(args.rounds):  # alternate, so drift in the machine hits all alike
            for server in servers:
                runs[server.name].append(server.run(CONCURRENCY, args.requests))
        figures = {name: _median(results) for name, results in runs.items()}

        costs = []
        for label, body in (("1 image", one), ("256 images", batch)):
            stored = {**auth, "Idempotency-Key": f"replay-{len(body)}"}
            httpx.post(f"http://127.0.0.1:{gateway_port}{INFER}", content=body, headers=stored)
            costs.append((f"model run, {label}", one_at_a_time(gateway_port, body, fresh_key)))
            costs.append(
                (f"replay, {label}", one_at_a_time(gateway_port, body, lambda i, h=stored: h))
            )

    gateway = figures[GATEWAY]
    rows = [
        (name, figure | {"gateway ÷ this, req/s": gateway["req/s"] / figure["req/s"]})
        for name, figure in figures.items()
    ]
    print_table(
        f"The gateway ({SHIPPED[0]} + {SHIPPED[1]}), its floor and the peers' v2 REST: one image "
        f"of {MODEL} per request, {CONCURRENCY} in flight, medians of {args.rounds} alternating "
        f"rounds of {args.requests}",
        rows,
    )
    print_table(
        "Replay vs. model run, one request at a time", [(name, summarize(r)) for name, r in costs]
    )
    peer_rates = {n: figures[n]["req/s"] for n in PEER_NAMES if n in figures}
    if peer_rates:
        best = max(peer_rates, key=peer_rates.__getitem__)
        ratio = gateway["req/s"] / peer_rates[best]
        print(f"gateway / best peer ({best}), req/s at c16: {ratio:.2f} (target >= 1.3)")
    print(
        f"gateway / floor, req/s at c16: {gateway['req/s'] / figures[FLOOR]['req/s']:.2f} "
        "(target >= 0.9)"
    )


if __name__ == "__main__":
    main()
