"""Metered link: bytes and seconds per escalation on a real slow link (issue 15).

A real `cloud-gateway` runs in one network namespace, this script's router in another, joined
by a veth pair shaped by tbf to `--rate` bits per second each way (tests/support/slow_link.py;
needs root). In the same run:

1. Drain: `--items` held-out digits queued while the link was down are drained by a Router
   (the forwarder, as in the agent) with today's framing (one request per item, with the
   headers main's client sent: Accept, Connection, User-Agent) and with groups
   (infer_group, `drain_group_items` 64; tensors as bytes, which the gateway lists). Bytes
   per delivered item are the router's own byte
   metrics (the data budget's bytes: request and status lines, headers, gzip bodies); time
   runs from the first attempt to the last delivery. The budget used must equal them.
2. Image-sized escalations: one live call each for a 3x96x96 input as UINT8 and as FP32 (a
   photo of scikit-learn's sample images, averaged down to 96x96) to models of that input
   generated here with fixed weights: bytes each way and seconds, tensors as decimal JSON (as
   sent before issue 15) and as bytes (the v2 binary tensor extension).
3. Framings measured without the link, on the same items: gzip vs zstd of the bodies (bytes,
   CPU ms), decimal JSON vs the tensor's own bytes (the v2 binary tensor extension), and
   HTTP/2's header compression (HPACK, from the `hpack` library, as httpx's `http2` extra
   would send them) against HTTP/1.1's headers as measured.

    sudo .venv/bin/python benchmarks/metered_link.py [--rate 64000] [--items 10000]

`pip install -e '.[bench]'` brings zstandard and hpack for part 3.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gzip
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from _harness import print_table, until_delivered  # beside this script

from model_runtime.demo import CLOUD_REPOSITORY, HELDOUT
from model_runtime.infer_group import GroupItem, encode_group_request
from model_runtime.v2_json import encode_infer_request
from router import DurableQueue, Router, RouterConfig
from router.cloud_client import CloudClient, encode_body
from router.config import QUEUE_FILE
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.support.slow_link import CLOUD_ADDRESS, SlowLink, open_slow_link, unavailable

CLOUD_MODEL = "digits-large"
MAIN_HEADERS = {
    "Accept": "*/*",
    "Connection": "keep-alive",
    "User-Agent": f"python-httpx/{httpx.__version__}",
}
"""What main's cloud client sent besides this branch's headers: today's framing, to the byte."""


def enter_namespace(name: str) -> None:
    """Move this process (one thread yet) into network namespace `name`: every socket opened
    afterwards is the edge's."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {name}")
    finally:
        os.close(fd)


# -- image models ------------------------------------------------------------------------------


def image_models(repository: Path) -> None:
    """`image-uint8` and `image-fp32`: [N, 3, 96, 96] in, 10 class probabilities out, fixed
    weights (seed 0): a mean pool to 3x12x12, then a linear layer and a softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.05, (3 * 12 * 12, 10)).astype(np.float32)
    for name, dtype in (("image-uint8", TensorProto.UINT8), ("image-fp32", TensorProto.FLOAT)):
        nodes = []
        source = "x"
        if dtype == TensorProto.UINT8:
            nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
            source = "xf"
        nodes += [
            helper.make_node("AveragePool", [source], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ]  # fmt: skip
        graph = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("x", dtype, ["N", 3, 96, 96])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
            [numpy_helper.from_array(weights, "W")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (repository / name / "1").mkdir(parents=True)
        onnx.save(model, repository / name / "1" / "model.onnx")
        labels = ", ".join(f'"{i}"' for i in range(10))
        (repository / name / "config.toml").write_text(
            f'labels = [{labels}]\noutput = "probabilities"\noutput_kind = "probabilities"\n'
        )


def photo() -> np.ndarray:
    """A real photograph (scikit-learn's sample image), averaged down to [1, 3, 96, 96] UINT8."""
    from sklearn.datasets import load_sample_images

    image = load_sample_images().images[0][:384, 128:512]
    small = image.reshape(96, 4, 96, 4, 3).mean(axis=(1, 3)).astype(np.uint8)
    return small.transpose(2, 0, 1)[None]


# -- part 1: drain -----------------------------------------------------------------------------


async def queue_backlog(path: Path, rows: np.ndarray) -> None:
    queue = await DurableQueue.open(path)
    try:
        for row in rows:
            ticket = str(uuid.uuid4())
            body = encode_body(encode_infer_request({"X": row[None, :]}, request_id=ticket))
            await queue.enqueue(ticket, CLOUD_MODEL, body, ttl_s=7 * 86400)
    finally:
        await queue.close()


async def drain(
    gateway: Gateway, url: str, rows: np.ndarray, state: Path, *, grouped: bool
) -> dict[str, float]:
    await queue_backlog(state / QUEUE_FILE, rows)
    config = RouterConfig(
        cloud_url=url,
        device_key=gateway.key,
        state_dir=state,
        drain_group_items=64 if grouped else 1,
        # One day's budget, far above what the drain needs: counted, never binding.
        budget_day_bytes=10**9,
    )
    registry = CollectorRegistry()
    started = time.monotonic()  # the link is up: the first probe goes at once
    router = await Router.open(config, registry)
    try:
        if not grouped:
            assert router._drain is not None
            router._drain._session._http.headers.update(MAIN_HEADERS)
        await until_delivered(router, len(rows))
        seconds = time.monotonic() - started
        used = sum(u.used_bytes for u in router.budget.usage() if u.period.value == "day")
    finally:
        await router.close()

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    sent = value("edge_agent_router_cloud_sent_bytes_total", path="drain")
    received = value("edge_agent_router_cloud_received_bytes_total", path="drain")
    probes = value("edge_agent_router_cloud_sent_bytes_total", path="probe") + value(
        "edge_agent_router_cloud_received_bytes_total", path="probe"
    )
    n = len(rows)
    return {
        "items": float(n),
        "calls": value("edge_agent_router_cloud_calls_total", path="drain", result="ok"),
        "sent B/item": sent / n,
        "received B/item": received / n,
        "both ways B/item": (sent + received) / n,
        "seconds": seconds,
        "items/s": n / seconds,
        "budget - wire B": used - (sent + received + probes),
    }


# -- part 2: image escalations -----------------------------------------------------------------


async def escalations(
    gateway: Gateway, url: str, image: np.ndarray
) -> list[tuple[str, dict[str, float]]]:
    """One live call each, tensors as decimal JSON and as bytes, after a warm-up call."""
    rows = []
    async with CloudClient(url, gateway.key) as client:
        for name, tensor in (
            ("image-uint8", image),
            ("image-fp32", image.astype(np.float32) / 255),
        ):
            for binary in (False, True):
                warm = str(uuid.uuid4())
                body = encode_body(encode_infer_request({"x": tensor}, request_id=warm))
                await client.infer(name, body, idempotency_key=warm, binary=binary)
                key = str(uuid.uuid4())
                body = encode_body(encode_infer_request({"x": tensor}, request_id=key))
                start = time.perf_counter()
                answer = await client.infer(name, body, idempotency_key=key, binary=binary)
                seconds = time.perf_counter() - start
                framing = "bytes (binary extension)" if binary else "decimal JSON (today)"
                rows.append(
                    (
                        f"{name.split('-')[1].upper()} 3x96x96, {framing}",
                        {
                            "sent B": float(answer.bytes_sent),
                            "received B": float(answer.bytes_received),
                            "seconds": seconds,
                        },
                    )
                )
    return rows


# -- part 3: framings measured off the link ------------------------------------------------------


def compression_rows(x: np.ndarray, image: np.ndarray) -> list[tuple[str, dict[str, float]]]:
    try:
        import zstandard
    except ImportError:
        print("zstandard is not installed (pip install -e '.[bench]'): no zstd rows")
        zstandard = None
    tickets = [str(uuid.uuid4()) for _ in range(64)]
    items = [
        GroupItem(t, encode_body(encode_infer_request({"X": x[i : i + 1]}, request_id=t)))
        for i, t in enumerate(tickets)
    ]
    group = encode_group_request(items)[0]
    fp32 = image.astype(np.float32) / 255
    bodies = {
        "one digits item, JSON": items[0].body,
        "64 digits items (a group), JSON": group,
        "64 digits items, FP32 bytes (binary)": encode_group_request(
            [GroupItem(t, _binary_request(x[i : i + 1], t)) for i, t in enumerate(tickets)]
        )[0],
        "image UINT8, JSON": encode_body(encode_infer_request({"x": image})),
        "image UINT8, binary": image.tobytes(),
        "image FP32, JSON": encode_body(encode_infer_request({"x": fp32})),
        "image FP32, binary": fp32.astype("<f4").tobytes(),
    }
    rows = []
    for name, body in bodies.items():
        figures: dict[str, float] = {"raw B": float(len(body))}
        for label, compress in _compressors(zstandard).items():
            start = time.process_time()
            out = compress(body)
            figures[f"{label} B"] = float(len(out))
            figures[f"{label} ms"] = (time.process_time() - start) * 1000
        rows.append((name, figures))
    return rows


def _binary_request(x: np.ndarray, request_id: str) -> bytes:
    """A v2 request in the binary tensor extension: a JSON header, then the tensor's bytes."""
    header = {
        "id": request_id,
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": list(x.shape),
             "parameters": {"binary_data_size": x.nbytes}},
        ],
    }  # fmt: skip
    return encode_body(header) + x.astype("<f4").tobytes()


def _compressors(zstandard: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"gzip-9": lambda b: gzip.compress(b, 9, mtime=0)}
    if zstandard is not None:
        for level in (3, 19):
            out[f"zstd-{level}"] = zstandard.ZstdCompressor(level=level).compress
    return out


def http2_rows(key: str) -> list[tuple[str, dict[str, float]]]:
    """Header bytes of the 2nd and later requests on one connection: HTTP/1.1 as this branch
    sends them (measured from the request httpx builds) vs HTTP/2 (HPACK + a HEADERS and a
    DATA frame header of 9 bytes each)."""
    try:
        import hpack
    except ImportError:
        print("hpack is not installed (pip install -e '.[bench]'): no HTTP/2 rows")
        return []
    rows = []
    for name, path, extra in (
        ("single infer", f"/v2/models/{CLOUD_MODEL}/infer", {"content-type": "application/json", "idempotency-key": str(uuid.uuid4())}),
        ("infer_group", f"/v2/models/{CLOUD_MODEL}/infer_group", {"content-type": "application/octet-stream", "inference-header-content-length": "2950"}),
    ):  # fmt: skip
        h1 = (
            f"POST {path} HTTP/1.1\r\nHost: {CLOUD_ADDRESS}:8000\r\nAuthorization: Bearer {key}\r\n"
            "Accept-Encoding: gzip\r\nContent-Encoding: gzip\r\nContent-Length: 190\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            + "\r\n"
        )
        encoder = hpack.Encoder()
        sizes = []
        for _ in range(3):
            headers = [
                (":method", "POST"), (":scheme", "http"), (":authority", f"{CLOUD_ADDRESS}:8000"),
                (":path", path), ("authorization", f"Bearer {key}"), ("accept-encoding", "gzip"),
                ("content-encoding", "gzip"), ("content-length", "190"),
                *((k, str(uuid.uuid4()) if k == "idempotency-key" else v) for k, v in extra.items()),
            ]  # fmt: skip
            sizes.append(len(encoder.encode(headers)) + 18)
        rows.append(
            (
                name,
                {
                    "HTTP/1.1 B": float(len(h1)),
                    "HTTP/2 first B": float(sizes[0]),
                    "HTTP/2 later B": float(sizes[-1]),
                },
            )
        )
    return rows


# -- main ------------------------------------------------------------------------------------------


async def on_the_link(
    link: SlowLink, gateway: Gateway, args: argparse.Namespace, tmp: Path
) -> None:
    url = f"http://{CLOUD_ADDRESS}:{gateway.daemon.ports['http']}"
    x = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
    rows = x[np.arange(args.items) % len(x)]
    kbit = f"{link.rate_bit_s // 1000} kbit/s"
    drains = []
    for grouped in (False, True):
        name = f"{kbit}, {'groups of 64' if grouped else 'one request per item (today)'}"
        figures = await drain(gateway, url, rows, tmp / f"edge-{grouped}", grouped=grouped)
        drains.append((name, figures))
        print(name, figures, flush=True)
    today, grouped_figures = drains[0][1], drains[1][1]
    print_table(f"Drain of {args.items} queued digits on a {kbit} link", drains)
    ratios = {
        k: grouped_figures[k] / today[k] for k in ("sent B/item", "both ways B/item", "seconds")
    }
    print_table("Groups / today, same run", [("ratio", ratios)])
    print_table(
        f"One live escalation of an image-sized input on a {kbit} link",
        await escalations(gateway, url, photo()),
    )


def main() -> None:
    # A stop (SIGTERM, Ctrl-C) still stops the gateway and removes the namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rate", type=int, default=64_000, help="the link's bits per second each way"
    )
    parser.add_argument("--items", type=int, default=10_000, help="queued digits to drain")
    parser.add_argument("--framings-only", action="store_true", help="part 3 only (no root)")
    args = parser.parse_args()
    x = np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)
    print_table(
        "Bodies: gzip vs zstd, JSON vs the tensor's own bytes", compression_rows(x, photo())
    )
    print_table(
        "Request headers: HTTP/1.1 vs HTTP/2 (HPACK)",
        http2_rows("cgk_" + "0" * 16 + "." + "x" * 43),
    )
    if args.framings_only:
        return
    why = unavailable()
    if why is not None:
        sys.exit(f"metered_link: {why}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        repository = tmp / "models"
        import shutil

        shutil.copytree(CLOUD_REPOSITORY, repository)
        image_models(repository)
        link = open_slow_link(args.rate)
        gateway: Gateway | None = None
        try:
            gateway = start_gateway(
                tmp / "cloud", "--host", CLOUD_ADDRESS, "--model-repository", str(repository),
                prefix=link.command("cloud", []),
                ready=lambda d: "live" in link.fetch("cloud", f"http://{CLOUD_ADDRESS}:{d.ports['http']}/v2/health/live"),
                env={"CLOUD_GATEWAY_RATE_LIMIT_PER_S": "10000", "CLOUD_GATEWAY_RATE_LIMIT_BURST": "10000"},
            )  # fmt: skip
            enter_namespace(link.edge)
            asyncio.run(on_the_link(link, gateway, args, tmp))
        finally:
            if gateway is not None:
                gateway.daemon.stop()
            link.close()


if __name__ == "__main__":
    main()
