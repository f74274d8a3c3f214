"""The one table from core exceptions to gRPC status codes.

Keyed by exception type, most specific first; anything unlisted is INTERNAL with a generic
message (the details are logged, never sent: they may hold payload fragments).
"""

from __future__ import annotations

import logging

import grpc

from edge_agent.inference import ServiceStopping
from model_runtime import InvalidInput, ModelNotFound, RequestTooLarge
from router.errors import DiskFull, QueueFull, StorageError, TicketNotFound, TooManyWatchers

__all__ = ["STATUS_BY_ERROR", "status_for"]

log = logging.getLogger(__name__)

STATUS_BY_ERROR: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TicketNotFound, grpc.StatusCode.NOT_FOUND),
    (TooManyWatchers, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServiceStopping, grpc.StatusCode.UNAVAILABLE),
    # gRPC's own words for RESOURCE_EXHAUSTED include "the entire file system is out of space"
    (DiskFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StorageError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: Exception, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller gets for `exc`."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return code, str(exc)
    log.error("internal error", exc_info=exc, extra={"fields": {"request_id": request_id or "-"}})
    return grpc.StatusCode.INTERNAL, "internal error; see the agent's log"
