"""The agent's v2 gRPC decoder under Hypothesis: random models, versions, tensors (names,
datatypes, shapes, typed or raw contents, non-finite values), requested outputs and parameters,
sent to a real agent whose cloud is configured but down (so unsure items take the queue). Each
request gets OK or a clear refusal naming what is wrong, never INTERNAL or UNKNOWN, and the
agent logs no error and keeps serving.

AGENT_FUZZ_EXAMPLES (default 300) requests; raise it for a longer search.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.integration.conftest import start_agent
from tests.support.processes import Daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

EXAMPLES = int(os.environ.get("AGENT_FUZZ_EXAMPLES", "300"))
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BYTES"]
DATATYPES += ["BF16", "fp32", "", "FLOAT"]


@pytest.fixture(scope="module")
def fuzzed_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("fuzz-agent")
    with socket.socket() as closed:  # bound, never listening: the cloud refuses connections
        closed.bind(("127.0.0.1", 0))
        key = work / "device.key"
        key.write_text("cgk_fuzz.not-a-real-key")
        key.chmod(0o600)  # private, as the agent wants its key
        daemon = start_agent(
            work,
            "--cloud-url",
            f"http://127.0.0.1:{closed.getsockname()[1]}",
            "--device-key-file",
            str(key),
            "--max-message-bytes",
            "65536",
        )
        yield daemon
        daemon.stop()


@pytest.fixture(scope="module")
def stub(fuzzed_agent: Daemon) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(fuzzed_agent.address("grpc")) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
dims = st.one_of(
    st.sampled_from([1, 2, 3, 64, 63, 0, -1]),
    st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    name = draw(st.sampled_from(["X", "X", "X", "Y", ""]) | st.text(max_size=8))
    datatype = draw(st.sampled_from(["FP32"] * 4 + DATATYPES))
    shape = draw(st.sampled_from([[1, 64], [2, 64], [3, 64]]) | st.lists(dims, max_size=4))
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    n = draw(st.sampled_from([64, 128, 192, 63, 0]) | st.integers(0, 300))
    raw: bytes | None = None
    how = draw(st.sampled_from(["raw", "fp32", "other", "none"]))
    if how == "raw":
        values = draw(st.lists(floats, min_size=n, max_size=n))
        raw = struct.pack(f"<{n}f", *values) + draw(st.binary(max_size=3))
    elif how == "fp32":
        tensor.contents.fp32_contents.extend(draw(st.lists(floats, min_size=n, max_size=n)))
    elif how == "other":
        tensor.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1))))
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=3)))
    for key, value in draw(st.dictionaries(st.text(max_size=6), parameters(), max_size=2)).items():
        tensor.parameters[key].CopyFrom(value)
    return tensor, raw


@st.composite
def parameters(draw: st.DrawFn) -> pb.InferParameter:
    which = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64"]))
    if which == "bool":
        return pb.InferParameter(bool_param=draw(st.booleans()))
    if which == "int64":
        return pb.InferParameter(int64_param=draw(st.integers(-(2**63), 2**63 - 1)))
    if which == "uint64":
        return pb.InferParameter(uint64_param=draw(st.integers(0, 2**64 - 1)))
    if which == "double":
        return pb.InferParameter(double_param=draw(st.floats()))
    words = st.sampled_from(["auto", "never", "always", "5", "0", "9", "-1", "1e9", "nan"])
    return pb.InferParameter(string_param=draw(words | st.text(max_size=10)))


@st.composite
def requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["digits"] * 6 + ["", "nope", "digits/1"])),
        model_version=draw(st.sampled_from(["", "", "1", "2", "01", "-1", "x"])),
        id=draw(st.text(max_size=12)),
    )
    raws = []
    for tensor, raw in draw(st.lists(tensors(), min_size=0, max_size=3)):
        request.inputs.append(tensor)
        raws.append(raw)
    if any(r is not None for r in raws):
        request.raw_input_contents.extend(r or b"" for r in raws[: draw(st.integers(0, 3))])
    for name in draw(st.lists(st.sampled_from(["label", "probabilities", "routing.route", "x"]))):
        request.outputs.add(name=name)
    known = st.sampled_from(["escalation", "priority", "ttl_seconds"])
    for key, value in draw(
        st.dictionaries(known | st.text(max_size=6), parameters(), max_size=4)
    ).items():
        request.parameters[key].CopyFrom(value)
    return request


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=requests())
def test_any_request_gets_a_clear_status(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest
) -> None:
    call = stub.ModelInfer.future(request, timeout=10)
    code, details = call.code(), call.details()
    assert code in CLEAR, (code, details)
    if code is not grpc.StatusCode.OK:
        assert details, code
        return
    response = call.result()
    assert response.outputs
    assert response.parameters["route"].string_param in ("edge", "cloud", "queue", "mixed")


def test_after_the_fuzzing_the_agent_serves_and_logged_no_error(
    fuzzed_agent: Daemon, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    errors = [line for line in fuzzed_agent.log().splitlines() if '"level": "error"' in line]
    assert not errors, errors[:5]
    assert Path(fuzzed_agent.log_path).exists()
