"""Footprint: the edge agent's time from process start to ModelReady and its resident memory.

Side by side, when `.venv-mlserver` exists (scripts/test.sh makes it): MLServer 1.7.1 serving
a scikit-learn model of the same data in one process, measured the same way.

    .venv/bin/python benchmarks/footprint.py [--starts 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _harness import print_table, rss_mb

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc
from model_runtime.demo import HELDOUT

MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"


def _free_port() -> int:
    # Only for MLServer, which cannot report a port it picked itself.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_and_measure(
    command: list[str], grpc_port: int, model: str, input_name: str, x: np.ndarray
) -> tuple[float, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=0.5).ready:
                    break
            except grpc.RpcError:
                pass
            if time.perf_counter() - started > 60:
                raise TimeoutError(f"{command[0]} not ready in 60 s")
            time.sleep(0.005)
        ready_s = time.perf_counter() - started
        request = pb.ModelInferRequest(
            model_name=model,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=input_name,
                    datatype="FP32",
                    shape=list(x.shape),
                )
            ],
            raw_input_contents=[x.tobytes()],
        )
        for _ in range(200):  # warm, as in service
            stub.ModelInfer(request, timeout=10)
        rss = rss_mb(process.pid)
        channel.close()
        return ready_s, rss
    finally:
        process.terminate()
        process.wait(30)


def _mlserver_repo(work: Path, grpc_port: int) -> Path:
    import joblib
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    data = np.load(HELDOUT)
    model = make_pipeline(PCA(10), LogisticRegression(max_iter=2000)).fit(data["X"], data["y"])
    repo = work / "mlserver"
    (repo / "digits").mkdir(parents=True)
    joblib.dump(model, repo / "digits" / "model.joblib")
    (repo / "digits" / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "digits",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib"},
            }
        )
    )
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "http_port": _free_port(),
                "grpc_port": grpc_port,
                "metrics_port": _free_port(),
                "parallel_workers": 0,
            }
        )
    )
    return repo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    x = np.load(HELDOUT)["X"][:1]
    work = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    rows = []

    runs = []
    for _ in range(args.starts):
        port = _free_port()
        agent = [
            str(Path(sys.executable).parent / "edge-agent"),
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--rest-port",
            "0",
            "--state-dir",
            tempfile.mkdtemp(prefix="bench-footprint-"),
        ]
        runs.append(_start_and_measure(agent, port, "digits", "X", x))
    rows.append(
        (
            "edge agent (demo model)",
            {
                "start to ModelReady s": statistics.median(r[0] for r in runs),
                "RSS MB": statistics.median(r[1] for r in runs),
            },
        )
    )

    if MLSERVER.exists():
        runs = []
        for _ in range(args.starts):
            port = _free_port()
            repo = _mlserver_repo(work / str(port), port)
            runs.append(
                _start_and_measure([str(MLSERVER), "start", str(repo)], port, "digits", "X", x)
            )
        rows.append(
            (
                "MLServer 1.7.1 (same data, sklearn)",
                {
                    "start to ModelReady s": statistics.median(r[0] for r in runs),
                    "RSS MB": statistics.median(r[1] for r in runs),
                },
            )
        )
    print_table(f"Footprint: medians of {args.starts} starts; RSS after 200 warm calls", rows)
    print("targets (edge agent): RSS <= 120 MB, start to ModelReady <= 1.5 s")


if __name__ == "__main__":
    main()
