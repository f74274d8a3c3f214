"""One log event per inference call, at DEBUG, in the same shape for both transports: what
identifies the call and how it ended, never its tensors."""

from __future__ import annotations

import logging

__all__ = ["log_infer", "logging_calls"]

log = logging.getLogger("edge_agent.requests")


def logging_calls() -> bool:
    """Whether each call is logged: a check cheap enough for every call."""
    return log.isEnabledFor(logging.DEBUG)


def log_infer(
    request_id: str,
    model: str,
    code: str,
    seconds: float | None,
    route: object,
    problem: str | None = None,
) -> None:
    fields = {"request_id": request_id or "-", "model": model, "code": code, "route": route}
    if seconds is not None:
        fields["seconds"] = round(seconds, 6)
    if problem is not None:
        fields["problem"] = problem
    log.debug("infer", extra={"fields": fields})
