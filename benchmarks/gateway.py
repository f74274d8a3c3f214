"""Cloud gateway throughput vs. the bare ASGI server, and the cost of a replay vs. a model run.

All servers are uvicorn + starlette, one worker each, on this machine. The gateway runs with
device auth and idempotency on (a fresh Idempotency-Key per request, so every one is a model run
and two SQLite writes); the canned server reads the body and returns a stored v2 answer; a third
server answers with the model and does nothing else (the floor for any server that does). The
load keeps 16 requests in flight over 16 keep-alive connections, generated twice: by a minimal
asyncio client (what the servers can do) and by httpx (what a device's client sees).
Target: gateway >= 0.6 x canned. About a minute:

    .venv/bin/python benchmarks/gateway.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
from _harness import Result, http_load, print_table, summarize  # beside this script

from cloud_gateway.keys import KeyStore
from model_runtime import ModelRepository, json_codec
from model_runtime.demo import CLOUD_REPOSITORY, HELDOUT
from model_runtime.sockets import bind_socket
from model_runtime.v2_json import decode_infer_request, encode_infer_request, encode_infer_response

INFER = "/v2/models/digits-large/infer"
BIN = Path(sys.executable).parent
CONCURRENCY = 16


# -- the canned server: same ASGI stack, no gateway ----------------------------------------------


def serve_canned(answer_file: Path, port_file: Path, with_model: bool) -> None:
    """Read the body, return the stored answer; `with_model`: answer it with the model instead
    (parse, check and decode the v2 body, one run, encode), and nothing else a gateway does:
    no auth, no idempotency, no metrics. That is the floor for any server answering with it."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    answer = answer_file.read_bytes()
    model = ModelRepository.load(CLOUD_REPOSITORY).get("digits-large")

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
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


# -- processes ------------------------------------------------------------------------------------


@contextmanager
def daemon(command: list[str], port_file: Path, env: dict[str, str]) -> Iterator[int]:
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start")
            time.sleep(0.05)
        port = int(json.loads(port_file.read_text())["http"])
        while True:
            try:
                httpx.post(f"http://127.0.0.1:{port}{INFER}", content=b"{}")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


# -- load -----------------------------------------------------------------------------------------


async def load_httpx(
    port: int,
    body: bytes,
    headers: Callable[[int], dict[str, str]],
    total: int,
    concurrency: int,
) -> Result:
    """The same load from httpx's async client, as the router's cloud client sends it."""
    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            start = time.perf_counter()
            response = await client.post(INFER, content=body, headers=headers(i))
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")

    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30.0
    ) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return Result("", total, seconds, latencies)


def run_load(
    name: str,
    port: int,
    body: bytes,
    headers: Callable[[int], dict[str, str]],
    total: int,
    concurrency: int = CONCURRENCY,
    *,
    client: str = "raw",
) -> Result:
    if client == "raw":
        asyncio.run(http_load(port, INFER, body, headers, min(200, total), concurrency))  # warm up
        result = asyncio.run(http_load(port, INFER, body, headers, total, concurrency))
    else:
        asyncio.run(load_httpx(port, body, headers, min(200, total), concurrency))  # warm up
        result = asyncio.run(load_httpx(port, body, headers, total, concurrency))
    return Result(name, result.calls, result.seconds, result.latencies_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--canned", nargs=2, metavar=("ANSWER", "PORT_FILE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--with-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.canned:
        serve_canned(Path(args.canned[0]), Path(args.canned[1]), args.with_model)
        return

    x = np.load(HELDOUT)["X"]
    one = json.dumps(encode_infer_request({"X": x[:1]})).encode()
    batch = json.dumps(encode_infer_request({"X": x[:256]})).encode()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        root = Path(tmp)
        token = KeyStore(root / "keys.sqlite3").add("bench-device").token
        auth = {"Authorization": f"Bearer {token}"}

        def fresh_key(i: int) -> dict[str, str]:
            return {**auth, "Idempotency-Key": uuid.uuid4().hex}

        gateway_env = {
            # The limiter still runs on every request; only its limit is out of the way.
            "CLOUD_GATEWAY_RATE_LIMIT_PER_S": "1000000",
            "CLOUD_GATEWAY_RATE_LIMIT_BURST": "1000000",
            # One device sends all 16 requests in flight: more than its default of 8.
            "CLOUD_GATEWAY_MAX_IN_FLIGHT_PER_DEVICE": "1000",
        }
        gateway_port = servers.enter_context(
            daemon(
                [
                    str(BIN / "cloud-gateway"),
                    "serve",
                    "--port",
                    "0",
                    "--metrics-port",
                    "0",
                    "--state-dir",
                    str(root),
                    "--port-file",
                    str(root / "gateway.json"),
                ],
                root / "gateway.json",
                gateway_env,
            )
        )
        url = f"http://127.0.0.1:{gateway_port}"
        # The canned server returns the gateway's own answer: the same bytes on the wire.
        (root / "answer.json").write_bytes(
            httpx.post(url + INFER, content=one, headers=auth).content
        )
        bare_ports = {}
        for name, extra in (("canned", []), ("model", ["--with-model"])):
            bare_ports[name] = servers.enter_context(
                daemon(
                    [
                        sys.executable,
                        __file__,
                        "--canned",
                        str(root / "answer.json"),
                        str(root / f"{name}.json"),
                        *extra,
                    ],
                    root / f"{name}.json",
                    {},
                )
            )
        contenders: list[tuple[str, int, Callable[[int], dict[str, str]]]] = [
            ("canned v2 answer", bare_ports["canned"], lambda i: auth),
            ("v2 answered by the model, nothing else", bare_ports["model"], lambda i: auth),
            ("gateway: auth, idempotency, model run", gateway_port, fresh_key),
        ]

        # Alternating rounds, best of each: other load on a shared machine only slows a round.
        tables = []
        for client in ("raw", "httpx"):
            rounds: list[list[Result]] = [[] for _ in contenders]
            for _ in range(args.rounds):
                for results, (name, port, headers) in zip(rounds, contenders, strict=True):
                    results.append(run_load(name, port, one, headers, args.requests, client=client))
            tables.append((client, [max(r, key=lambda x: x.throughput) for r in rounds]))

        n = max(300, args.requests // 10)
        costs = []
        for label, body in (("1 image", one), ("256 images", batch)):
            stored = {**auth, "Idempotency-Key": f"replay-{len(body)}"}
            httpx.post(url + INFER, content=body, headers=stored)
            costs.append((f"model run, {label}", run_load("", gateway_port, body, fresh_key, n, 1)))
            costs.append(
                (f"replay, {label}", run_load("", gateway_port, body, lambda i, h=stored: h, n, 1))
            )

    clients = {
        "raw": "a minimal asyncio HTTP/1.1 client (server capacity)",
        "httpx": "httpx.AsyncClient (as a device's cloud client sends)",
    }
    for client, best in tables:
        rows = [
            (r.name, summarize(r) | {"x canned": r.throughput / best[0].throughput}) for r in best
        ]
        print_table(
            f"Gateway vs. bare uvicorn + starlette, load from {clients[client]}: 1 worker each, "
            f"{CONCURRENCY} requests in flight, 1 image per request, best of {args.rounds} "
            f"alternating rounds of {args.requests}",
            rows,
        )
    print_table(
        "Replay vs. model run, one request at a time", [(name, summarize(r)) for name, r in costs]
    )
    for client, (canned, _, gateway) in tables:
        ratio = gateway.throughput / canned.throughput
        print(f"gateway / canned throughput, {client} client: {ratio:.2f} (target >= 0.6)")


if __name__ == "__main__":
    main()
