"""Bad requests get a clear status naming the problem, are counted, and change nothing.

Requests are built with tritonclient's own v2 protobuf classes, so they are what any
third-party client could put on the wire, including what its helpers would refuse to build.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.support.processes import Daemon

X = np.load(Path(__file__).resolve().parents[2] / "model_runtime" / "demo" / "heldout.npz")["X"]
Tensor = pb.ModelInferRequest.InferInputTensor


def raw_request(x: np.ndarray, datatype: str = "FP32", **fields: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=str(fields.pop("model_name", "digits")),
        inputs=[Tensor(name=str(fields.pop("name", "X")), datatype=datatype, shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
        **fields,
    )


def nan_input() -> pb.ModelInferRequest:
    x = X[:2].copy()
    x[1, 5] = np.nan
    return raw_request(x)


def both_contents() -> pb.ModelInferRequest:
    request = raw_request(X[:1])
    request.inputs[0].contents.fp32_contents.extend(X[0].tolist())
    return request


def typed_contents_short() -> pb.ModelInferRequest:
    tensor = Tensor(name="X", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend([0.5] * 63)
    return pb.ModelInferRequest(model_name="digits", inputs=[tensor])


def wrong_byte_length() -> pb.ModelInferRequest:
    request = raw_request(X[:2])
    request.raw_input_contents[0] = X[:2].tobytes()[:-4]
    return request


def two_raw_for_one_input() -> pb.ModelInferRequest:
    request = raw_request(X[:1])
    request.raw_input_contents.append(X[0].tobytes())
    return request


CASES: dict[str, tuple[Callable[[], pb.ModelInferRequest], grpc.StatusCode, str, str | None]] = {
    "unknown model": (
        lambda: raw_request(X[:1], model_name="nope"),
        grpc.StatusCode.NOT_FOUND,
        "model 'nope' is not served here",
        None,
    ),
    "unknown version": (
        lambda: raw_request(X[:1], model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        "model 'digits' version '9' is not served here",
        None,
    ),
    "unknown input": (
        lambda: raw_request(X[:1], name="pixels"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pixels: model 'digits' has no such input (inputs: X)",
        "unknown_input",
    ),
    "missing input": (
        lambda: pb.ModelInferRequest(model_name="digits"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: input is missing",
        "missing_input",
    ),
    "wrong datatype": (
        lambda: raw_request(X[:1].astype(np.float64), datatype="FP64"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: datatype is FP64, expected FP32",
        "datatype",
    ),
    "wrong shape": (
        lambda: raw_request(X[:2, :60]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: shape [2, 60] does not match [-1, 64]",
        "shape",
    ),
    "byte length": (
        wrong_byte_length,
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: raw contents are 508 bytes, but shape [2, 64] of FP32 needs 512",
        "byte_size",
    ),
    "typed contents count": (
        typed_contents_short,
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: 63 values given, but shape [1, 64] needs 64",
        "shape",
    ),
    "raw count": (
        two_raw_for_one_input,
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents: 2 entries for 1 inputs",
        "byte_size",
    ),
    "both contents and raw": (
        both_contents,
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: both contents and raw_input_contents are set",
        "contents_conflict",
    ),
    "nan": (
        nan_input,
        grpc.StatusCode.INVALID_ARGUMENT,
        "X: value at index [1, 5] is nan",
        "non_finite",
    ),
    "unknown output": (
        lambda: raw_request(
            X[:1], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "logits: model 'digits' has no such output",
        "unknown_output",
    ),
    "too large": (
        # 300 items x 64 x 4 bytes = 76,800 bytes, over the fixture's 65,536-byte limit
        lambda: raw_request(np.resize(X, (300, 64))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "over the limit of 65536 bytes",
        None,
    ),
}


@pytest.fixture(scope="module")
def stub(agent: Daemon) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(agent.address("grpc")))


def scrape(agent: Daemon) -> str:
    return httpx.get(f"http://{agent.address('metrics')}/metrics").text


def counter(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_clearly_and_counted(
    case: str, agent: Daemon, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    make, code, words, reason = CASES[case]
    before = scrape(agent)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(make(), timeout=10)
    assert info.value.code() == code
    assert words in info.value.details()

    after = scrape(agent)
    model = "unknown" if case == "unknown model" else "digits"
    labels = {"code": code.name, "method": "ModelInfer", "model": model}
    assert (
        counter(after, "edge_agent_requests_total", **labels)
        == counter(before, "edge_agent_requests_total", **labels) + 1
    )
    if reason is not None:
        key = {"model": "digits", "reason": reason}
        assert (
            counter(after, "edge_agent_invalid_requests_total", **key)
            == counter(before, "edge_agent_invalid_requests_total", **key) + 1
        )
    # and the agent goes on answering
    assert stub.ModelInfer(raw_request(X[:1]), timeout=10).outputs[0].name == "label"


def test_far_too_large_message_is_refused_by_the_transport(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(raw_request(np.resize(X, (2000, 64))), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_bad_requests_leave_threads_and_memory_unchanged(
    agent: Daemon, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    def burst() -> None:
        for make, _code, _words, _reason in CASES.values():
            for _ in range(20):
                with pytest.raises(grpc.RpcError):
                    stub.ModelInfer(make(), timeout=10)

    agent.assert_steady(burst)
