"""Dynamic batching on a real agent: concurrent gRPC callers share a run and each gets its own
rows; a bad request among them is refused alone; a lone caller's deadline still holds.

The batch is filled by count (four callers, max_batch_size 4) under a queue delay far longer
than any of this takes, so the outcome does not depend on the machine's speed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from model_runtime.demo import EDGE_REPOSITORY
from tests.integration.conftest import agent_metric as metric
from tests.integration.conftest import start_agent
from tests.support.processes import Daemon

X = np.load(EDGE_REPOSITORY.parent / "heldout.npz")["X"].astype(np.float32)


def request(x: np.ndarray, datatype: str = "FP32") -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="X", datatype=datatype, shape=list(x.shape))
    return pb.ModelInferRequest(
        model_name="digits", inputs=[tensor], raw_input_contents=[x.tobytes()]
    )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Daemon]:
    repository = tmp_path / "models"
    shutil.copytree(EDGE_REPOSITORY, repository)
    with (repository / "digits" / "config.toml").open("a") as config:
        config.write("\n[batching]\nmax_batch_size = 4\nmax_queue_delay_us = 1000000\n")
    daemon = start_agent(tmp_path, "--model-repository", str(repository))
    yield daemon
    daemon.stop()


def test_concurrent_callers_share_a_run_and_each_gets_its_own_rows(agent: Daemon) -> None:
    rows = [X[i : i + 1] for i in range(4)]
    bad = request(X[:1].astype(np.float64), "FP64")
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def call(r: pb.ModelInferRequest) -> pb.ModelInferResponse | grpc.RpcError:
            try:
                return stub.ModelInfer(r, timeout=30)
            except grpc.RpcError as exc:
                return exc

        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(call, [request(r) for r in rows] + [bad]))

    refused = answers.pop()
    assert isinstance(refused, grpc.RpcError)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "X: datatype is FP64, expected FP32" in refused.details()
    assert metric(agent, "edge_agent_batch_runs_total", model="digits") == 1
    assert metric(agent, "edge_agent_batch_requests_total", model="digits") == 4

    session = ort.InferenceSession(str(EDGE_REPOSITORY / "digits" / "1" / "model.onnx"))
    for r, answer in zip(rows, answers, strict=True):
        assert isinstance(answer, pb.ModelInferResponse)
        label, probabilities = session.run(["label", "probabilities"], {"X": r})
        got = dict(zip([o.name for o in answer.outputs], answer.raw_output_contents, strict=True))
        assert np.frombuffer(got["label"], dtype=np.int64).tolist() == label.tolist()
        # Its own row; in a batch of four, the floats may differ from a lone run's last bits.
        np.testing.assert_allclose(
            np.frombuffer(got["probabilities"], dtype=np.float32), probabilities[0], rtol=1e-5
        )


def test_a_lone_caller_is_answered_within_its_deadline(agent: Daemon) -> None:
    # Nobody joins its batch: without its deadline it would wait the full second's delay,
    # with one of 0.6 s it waits at most half of that.
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answer = stub.ModelInfer(request(X[:1]), timeout=0.6)
    assert answer.outputs[0].name == "label"
    assert metric(agent, "edge_agent_batch_runs_total", model="digits") == 1
    assert metric(agent, "edge_agent_batch_requests_total", model="digits") == 1
