"""Protobuf <-> the agent's plain request and result objects, for the v2 gRPC API.

Every check on a tensor is made here or in model_runtime, before the model sees anything,
and every error names the tensor at fault.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from edge_agent.access import ANONYMOUS, Caller
from edge_agent.grpc._generated import grpc_service_pb2 as pb
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.inference import InferRequest, InferResult, ParameterValue
from model_runtime import InvalidInput, OnnxModel
from model_runtime.tensors import array_from_raw, array_from_values, check_finite, datatype_of
from router import RouterStatus, TicketResult

__all__ = [
    "decode_infer_request",
    "decode_parameters",
    "encode_infer_result",
    "encode_parameters",
    "encode_status",
    "encode_ticket_result",
]

Array = npt.NDArray[np.generic]

_TICKET_STATES = {
    "pending": rpb.TicketResult.PENDING,
    "delivered": rpb.TicketResult.DELIVERED,
    "expired": rpb.TicketResult.EXPIRED,
    "dropped": rpb.TicketResult.DROPPED,
    "rejected": rpb.TicketResult.REJECTED,
}

# Which InferTensorContents field carries each datatype (FP16 and BF16 have none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    decoded: dict[str, ParameterValue] = {}
    if not params:  # most calls: spares iterating an empty map through Mapping.items
        return decoded
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            decoded[key] = getattr(param, which)
    return decoded


def encode_parameters(
    target: Mapping[str, pb.InferParameter], values: Mapping[str, ParameterValue]
) -> None:
    for key, value in values.items():
        param = target[key]  # a protobuf map creates the entry on access
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value


def _decode_input(
    name: str, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, model: OnnxModel
) -> Array:
    # Each field read once: every read of a protobuf field from Python makes a new object.
    datatype = tensor.datatype
    shape = list(tensor.shape)
    model.input_by_name[name].check(datatype, shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(
                name,
                "both contents and raw_input_contents are set; use one of them",
                "contents_conflict",
            )
        array = array_from_raw(name, datatype, shape, raw)
    else:
        field = _CONTENTS_FIELD.get(datatype)
        if field is None:
            raise InvalidInput(
                name, f"{datatype} data must be sent in raw_input_contents", "datatype"
            )
        array = array_from_values(name, datatype, shape, getattr(tensor.contents, field))
    check_finite(name, array)
    return array


def decode_infer_request(
    request: pb.ModelInferRequest,
    model: OnnxModel,
    time_left_s: float | None,
    caller: Caller = ANONYMOUS,
) -> InferRequest:
    """Check and decode a ModelInferRequest for `model`; raises InvalidInput."""
    tensors = request.inputs
    names = [t.name for t in tensors]
    model.check_input_names(names)
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(names):
        raise InvalidInput(
            "raw_input_contents",
            f"{len(raw_contents)} entries for {len(names)} inputs; "
            "give one per input, in the order of inputs",
            "byte_size",
        )
    inputs = {
        name: _decode_input(name, tensor, raw_contents[i] if raw_contents else None, model)
        for i, (name, tensor) in enumerate(zip(names, tensors, strict=True))
    }
    outputs = request.outputs
    return InferRequest(
        model,
        inputs,
        [o.name for o in outputs] if outputs else (),
        decode_parameters(request.parameters),
        request.id,
        time_left_s,
        caller,
    )


def _raw_bytes(array: Array) -> bytes:
    if array.dtype.kind in "OSU":
        # v2 BYTES: each element as a 4-byte little-endian length, then its bytes.
        parts = []
        for item in array.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order, whatever the array's own layout


OutputSignature = tuple[tuple[str, str, tuple[int, ...]], ...]


@functools.lru_cache(maxsize=256)
def _response_head(model: str, version: int, outputs: OutputSignature) -> pb.ModelInferResponse:
    """A response holding the model and its outputs' metadata (name, datatype, shape), not
    their data: the same for every answer of a given batch size, so built once and copied."""
    head = pb.ModelInferResponse(model_name=model, model_version=str(version))
    for name, datatype, shape in outputs:
        head.outputs.add(name=name, datatype=datatype, shape=shape)
    return head


def encode_infer_result(result: InferResult) -> pb.ModelInferResponse:
    outputs = result.outputs
    signature = tuple([(name, datatype_of(a), a.shape) for name, a in outputs.items()])
    response = pb.ModelInferResponse()
    # One copy inside upb instead of a message and three fields set from Python per output.
    response.CopyFrom(_response_head(result.model.name, result.model.version, signature))
    if result.id:
        response.id = result.id
    response.raw_output_contents.extend([_raw_bytes(array) for array in outputs.values()])
    encode_parameters(response.parameters, result.parameters)
    return response


def encode_ticket_result(result: TicketResult) -> rpb.TicketResult:
    message = rpb.TicketResult(
        ticket=result.ticket,
        state=_TICKET_STATES[result.state],
        model_name=result.model,
        cursor=result.cursor,
        enqueued_at=result.enqueued_at,
        finished_at=result.finished_at or 0.0,
        attempts=result.attempts,
        error=(result.error or "") if result.state not in ("pending", "delivered") else "",
    )
    for name, array in result.outputs.items():
        message.outputs.add(
            name=name,
            datatype=datatype_of(array),
            shape=array.shape,
            raw_contents=_raw_bytes(array),
        )
    return message


def encode_status(status: RouterStatus) -> rpb.StatusResponse:
    message = rpb.StatusResponse(
        link_state=status.link_state,
        rtt_seconds=status.rtt_s or 0.0,
        breaker_open=status.breaker_open,
        queue_depth_by_priority=status.depth_by_priority,
        oldest_item_age_seconds=status.oldest_age_s or 0.0,
        queue_bytes=status.queue_bytes,
        cloud_configured=status.cloud_configured,
    )
    for period, target in (("day", message.day_budget), ("month", message.month_budget)):
        limit, used, left = status.budget.get(period, (None, 0, None))
        target.limit_bytes = limit or 0
        target.used_bytes = used
        target.left_bytes = left or 0
    return message
