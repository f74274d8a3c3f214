"""The v2 (Open Inference Protocol) gRPC error rules, as checks any v2 server can be put to.

One place for the list that benchmarks/peers.py prints for every server: each check sends one
request a well-behaved server must refuse with a given status (or, for the last, answer), and
passes when the status is that one. The agent's own tests hold it to the same rules with its
exact words (tests/integration/test_agent_bad_input.py); here only the status counts, since
every server words its errors its own way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import grpc_service_pb2_grpc as pb_grpc

__all__ = ["CHECKS", "Check", "run_checks"]

Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor
Code = grpc.StatusCode


@dataclass(frozen=True)
class Check:
    name: str
    request: Callable[[str, str, np.ndarray], pb.ModelInferRequest]
    """(model, input name, one good item of shape [1, ...]) -> the request to send."""
    expected: Code


def _raw(model: str, name: str, x: np.ndarray, datatype: str = "FP32") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[Tensor(name=name, datatype=datatype, shape=list(x.shape))],
        raw_input_contents=[x.tobytes()],
    )


def _with(x: np.ndarray, index: int, value: float) -> np.ndarray:
    bad = x.copy().reshape(-1)
    bad[index] = value
    return bad.reshape(x.shape)


def _short_raw(m: str, n: str, x: np.ndarray) -> pb.ModelInferRequest:
    r = _raw(m, n, x)
    r.raw_input_contents[0] = x.tobytes()[:-4]
    return r


def _typed_short(m: str, n: str, x: np.ndarray) -> pb.ModelInferRequest:
    t = Tensor(name=n, datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.reshape(-1)[:-1].tolist())
    return pb.ModelInferRequest(model_name=m, inputs=[t])


def _two_raw(m: str, n: str, x: np.ndarray) -> pb.ModelInferRequest:
    r = _raw(m, n, x)
    r.raw_input_contents.append(x.tobytes())
    return r


def _both(m: str, n: str, x: np.ndarray) -> pb.ModelInferRequest:
    r = _raw(m, n, x)
    r.inputs[0].contents.fp32_contents.extend(x.reshape(-1).tolist())
    return r


def _twice(m: str, n: str, x: np.ndarray) -> pb.ModelInferRequest:
    r = _raw(m, n, x)
    r.inputs.append(Tensor(name=n, datatype="FP32", shape=list(x.shape)))
    r.raw_input_contents.append(x.tobytes())
    return r


def _shape(m: str, n: str, x: np.ndarray, shape: list[int]) -> pb.ModelInferRequest:
    r = _raw(m, n, x)
    del r.inputs[0].shape[:]
    r.inputs[0].shape.extend(shape)
    return r


CHECKS: tuple[Check, ...] = (
    Check("unknown model", lambda m, n, x: _raw("no-such-model", n, x), Code.NOT_FOUND),
    Check(
        "unknown version",
        lambda m, n, x: pb.ModelInferRequest(
            model_name=m,
            model_version="97",
            inputs=_raw(m, n, x).inputs,
            raw_input_contents=[x.tobytes()],
        ),
        Code.NOT_FOUND,
    ),
    Check("unknown input", lambda m, n, x: _raw(m, "no_such_input", x), Code.INVALID_ARGUMENT),
    Check(
        "missing input", lambda m, n, x: pb.ModelInferRequest(model_name=m), Code.INVALID_ARGUMENT
    ),
    Check("input given twice", _twice, Code.INVALID_ARGUMENT),
    Check(
        "wrong datatype",
        lambda m, n, x: _raw(m, n, x.astype(np.float64), "FP64"),
        Code.INVALID_ARGUMENT,
    ),
    Check(
        "wrong shape",
        lambda m, n, x: _shape(m, n, x, [x.shape[0], *(d + 1 for d in x.shape[1:])]),
        Code.INVALID_ARGUMENT,
    ),
    Check(
        "wrong number of dimensions",
        lambda m, n, x: _shape(m, n, x, [x.size]),
        Code.INVALID_ARGUMENT,
    ),
    Check(
        "negative dimension",
        lambda m, n, x: _shape(m, n, x, [-1, *x.shape[1:]]),
        Code.INVALID_ARGUMENT,
    ),
    Check("raw bytes short of the shape", _short_raw, Code.INVALID_ARGUMENT),
    Check("typed values short of the shape", _typed_short, Code.INVALID_ARGUMENT),
    Check("two raw contents for one input", _two_raw, Code.INVALID_ARGUMENT),
    Check("both typed and raw contents", _both, Code.INVALID_ARGUMENT),
    Check("NaN value", lambda m, n, x: _raw(m, n, _with(x, 5, np.nan)), Code.INVALID_ARGUMENT),
    Check("infinite value", lambda m, n, x: _raw(m, n, _with(x, 3, np.inf)), Code.INVALID_ARGUMENT),
    Check(
        "unknown output",
        lambda m, n, x: pb.ModelInferRequest(
            model_name=m,
            inputs=_raw(m, n, x).inputs,
            raw_input_contents=[x.tobytes()],
            outputs=[Output(name="no_such_output")],
        ),
        Code.INVALID_ARGUMENT,
    ),
    Check(
        "a good request after all of these",
        lambda m, n, x: _raw(m, n, x),
        Code.OK,
    ),
)


def run_checks(address: str, model: str, input_name: str, x: np.ndarray) -> dict[str, bool]:
    """Each check's name -> whether the server at `address` passed it (in CHECKS' order)."""
    passed = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for check in CHECKS:
            try:
                stub.ModelInfer(check.request(model, input_name, x), timeout=30)
                code = Code.OK
            except grpc.RpcError as exc:
                code = exc.code()
            passed[check.name] = code == check.expected
    return passed
