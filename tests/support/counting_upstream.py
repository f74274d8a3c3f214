"""A v2 REST server of the tests' own, behind the gateway's upstream mode: it runs the cloud model's
ONNX file and counts its runs per input, so a test can tell how often the model ran for each one.

The gateway knows nothing of it but its URL: what it counts is what the model really did,
whatever the gateway believes. `hold()` keeps every answer back until `release()`, for as long as
the test wants (a slow run, without a slow computation).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from model_runtime.demo import CLOUD_REPOSITORY
from model_runtime.v2_json import decode_infer_request, encode_infer_response

__all__ = ["MODEL", "CountingUpstream", "digest", "run_cloud_model", "send_json"]

MODEL = "digits-large"
_ONNX = CLOUD_REPOSITORY / MODEL / "1" / "model.onnx"
_METADATA = {
    "name": MODEL,
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ],
}


def digest(x: npt.NDArray[np.float32]) -> str:
    """The identity of one input row, as the campaign's ledger and this server both see it."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:32]


_SESSION: ort.InferenceSession | None = None


def run_cloud_model(x: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    """The cloud model's answer to `x` ([N, 64]), run here: what every answer must equal."""
    global _SESSION
    if _SESSION is None:
        _SESSION = ort.InferenceSession(str(_ONNX), providers=["CPUExecutionProvider"])
    label, probabilities = _SESSION.run(["label", "probabilities"], {"X": x.astype(np.float32)})
    return {"label": label, "probabilities": probabilities}


def send_json(handler: BaseHTTPRequestHandler, status: int, document: dict[str, Any]) -> None:
    """Answer a request of `http.server` with `document` as JSON."""
    payload = json.dumps(document).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A gateway killed mid-request resets its connections: that is the test, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class CountingUpstream:
    """Start with the constructor, stop with `close()` (or use it as a context manager)."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        """Model runs per input digest (a batch of N rows is N runs)."""
        self.requests = 0
        self.arrived = threading.Event()
        """Set when an inference request arrives (cleared by the test)."""
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()
        self._session = ort.InferenceSession(str(_ONNX), providers=["CPUExecutionProvider"])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept alive, as the gateway's pool expects

            def do_GET(self) -> None:
                if self.path.startswith("/v2/health/") or self.path.endswith("/ready"):
                    send_json(self, 200, {"ready": True})
                elif self.path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
                    send_json(self, 200, _METADATA)
                else:
                    send_json(self, 404, {"error": f"unknown path {self.path}"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:  # its sender died mid-request (a worker killed)
                    self.close_connection = True
                    return
                if not self.path.startswith(f"/v2/models/{MODEL}") or not self.path.endswith(
                    "/infer"
                ):
                    send_json(self, 404, {"error": f"unknown path {self.path}"})
                    return
                send_json(self, 200, outer._infer(body))

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _infer(self, body: bytes) -> dict[str, Any]:
        request = decode_infer_request(json.loads(body))
        x = np.asarray(request.inputs["X"], dtype=np.float32)
        with self._lock:
            self.requests += 1
        self.arrived.set()
        self._released.wait(120)  # a run held as long as the test wants
        label, probabilities = self._session.run(["label", "probabilities"], {"X": x})
        with self._lock:
            for row in x:
                self.runs[digest(row[None, :])] += 1
        return encode_infer_response(
            MODEL,
            {"label": label, "probabilities": probabilities},
            model_version="1",
            request_id=request.id,
        )

    def counts(self) -> Counter[str]:
        """A copy of the runs per digest, taken under the lock."""
        with self._lock:
            return Counter(self.runs)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold every answer until the block ends (and always release it then)."""
        self._released.clear()
        try:
            yield
        finally:
            self._released.set()

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> CountingUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
