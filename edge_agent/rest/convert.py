"""v2 JSON bodies <-> the agent's plain request and result objects, for the REST API.

The JSON format is model_runtime's (the gateway's too); the checks against the model are the
ones the gRPC side makes (OnnxModel's), so both transports refuse a request in the same words.
"""

from __future__ import annotations

from typing import Any

from edge_agent.access import ANONYMOUS, Caller
from edge_agent.inference import InferRequest, InferResult
from model_runtime import OnnxModel
from model_runtime.v2_json import encode_infer_response, read_infer_request
from router import RouterStatus, TicketResult

__all__ = [
    "decode_infer_request",
    "encode_infer_result",
    "encode_status",
    "encode_ticket_result",
]


def decode_infer_request(
    body: object, model: OnnxModel, time_left_s: float | None, caller: Caller = ANONYMOUS
) -> InferRequest:
    """Check and decode a parsed v2 request body for `model`; raises InvalidInput."""
    request = read_infer_request(body)
    model.check_input_names([t.name for t in request.inputs])
    inputs = {t.name: t.decode(model.input_by_name[t.name]) for t in request.inputs}
    return InferRequest(
        model=model,
        inputs=inputs,
        outputs=request.outputs or (),
        parameters=request.parameters,
        id=request.id or "",
        time_left_s=time_left_s,
        caller=caller,
    )


def encode_infer_result(result: InferResult) -> dict[str, Any]:
    return encode_infer_response(
        result.model.name,
        result.outputs,
        model_version=str(result.model.version),
        request_id=result.id or None,
        parameters=result.parameters,
    )


def encode_ticket_result(result: TicketResult) -> dict[str, Any]:
    """A ticket as RouterService.GetResult tells it, in JSON: outputs as v2 tensors."""
    answer = encode_infer_response(result.model, result.outputs)
    ended = result.state not in ("pending", "delivered")
    return {
        "ticket": result.ticket,
        "state": result.state,
        "model_name": result.model,
        "cursor": result.cursor,
        "enqueued_at": result.enqueued_at,
        "finished_at": result.finished_at,
        "attempts": result.attempts,
        "error": (result.error or "") if ended else "",
        "outputs": answer["outputs"],
    }


def encode_status(status: RouterStatus) -> dict[str, Any]:
    """RouterService.Status in JSON; null where the protobuf answer says 0 for "none"."""
    budget = {}
    for period in ("day", "month"):
        limit, used, left = status.budget.get(period, (None, 0, None))
        budget[f"{period}_budget"] = {"limit_bytes": limit, "used_bytes": used, "left_bytes": left}
    return {
        "cloud_configured": status.cloud_configured,
        "link_state": status.link_state,
        "rtt_seconds": status.rtt_s,
        "breaker_open": status.breaker_open,
        "queue_depth_by_priority": {str(p): n for p, n in status.depth_by_priority.items()},
        "oldest_item_age_seconds": status.oldest_age_s,
        "queue_bytes": status.queue_bytes,
        **budget,
    }
