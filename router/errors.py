"""Errors raised by the router core; the edge agent maps them to gRPC status codes in one table.

RouterError
├── QueueFull            the durable queue is at its disk cap and refuses new items
├── QueueCorrupt         the queue file could not be opened; it was quarantined
├── QueueSchemaTooNew    the queue file was written by a newer version; it is left untouched
├── BudgetExhausted      the data budget for the period is spent
├── TicketNotFound       no such ticket (never issued, or past its retention)
├── TooManyWatchers      as many result watchers as allowed are watching already
├── StorageError         a write to one of the state dir's files failed; none of it was kept
│   └── DiskFull         ... because the disk (or the file system) is full
└── CloudError           a cloud call did not produce an answer
    ├── CloudUnavailable connection failed, timed out, 5xx, 429, or the breaker is open
    │   ├── CircuitOpen  the circuit breaker is open; the call was not attempted
    │   └── RateLimited  the rate the cloud accepts would not let the call start in time
    └── CloudRejected    the cloud refused the request itself (4xx other than 429)
"""

from __future__ import annotations

__all__ = [
    "BudgetExhausted",
    "CircuitOpen",
    "CloudError",
    "CloudRejected",
    "CloudUnavailable",
    "DiskFull",
    "QueueCorrupt",
    "QueueFull",
    "QueueSchemaTooNew",
    "RateLimited",
    "RouterError",
    "StorageError",
    "TicketNotFound",
    "TooManyWatchers",
]


class RouterError(Exception):
    """Base of every error the router raises."""


class QueueFull(RouterError):
    def __init__(self, used_bytes: int, cap_bytes: int) -> None:
        self.used_bytes = used_bytes
        self.cap_bytes = cap_bytes
        super().__init__(f"queue is full: {used_bytes} of {cap_bytes} bytes used")


class QueueCorrupt(RouterError):
    def __init__(self, path: str, moved_to: str, reason: str) -> None:
        self.path = path
        self.moved_to = moved_to
        self.reason = reason
        super().__init__(f"queue file {path} is corrupt ({reason}); moved to {moved_to}")


class BudgetExhausted(RouterError):
    def __init__(self, period: str, used_bytes: int, limit_bytes: int) -> None:
        self.period = period
        self.used_bytes = used_bytes
        self.limit_bytes = limit_bytes
        super().__init__(f"{period} data budget spent: {used_bytes} of {limit_bytes} bytes")


class TicketNotFound(RouterError):
    def __init__(self, ticket: str) -> None:
        self.ticket = ticket
        super().__init__(f"ticket '{ticket}' is unknown or past its retention")


class CloudError(RouterError):
    """A cloud call failed; `status` is the HTTP status when there was one."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class CloudUnavailable(CloudError):
    """Worth trying again later: the link or the cloud is down, slow or overloaded."""


class CloudRejected(CloudError):
    """Not worth retrying: the cloud says the request itself is wrong."""


class CircuitOpen(CloudUnavailable):
    """The circuit breaker is open (or its one half-open probe is taken); nothing was sent."""

    def __init__(self, retry_in: float | None = None) -> None:
        self.retry_in = retry_in
        when = "" if retry_in is None else f"; next probe in {retry_in:.1f} s"
        super().__init__(f"cloud circuit breaker is open{when}")


class RateLimited(CloudUnavailable):
    """The agent's own rate or the cloud's Retry-After would start the call only after its
    deadline; nothing was sent. `retry_after` is how long it would have had to wait."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(
            f"the cloud's rate limit lets the call start only in {wait_s:.2f} s, past its deadline",
            status=None,
            retry_after=wait_s,
        )


class QueueSchemaTooNew(RouterError):
    """Refuse to open rather than quarantine: a downgrade must not discard a newer queue."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"queue file {path} has schema version {found}; this version reads up to {supported}"
        )


class TooManyWatchers(RouterError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"{limit} result watchers are connected already, the most this agent allows; "
            "close one or try again later"
        )


class StorageError(RouterError):
    """A write to a state file failed (an I/O error, a full disk) and was undone whole."""

    kind = "io_error"

    def __init__(self, store: str, problem: str) -> None:
        self.store = store
        """Which file: queue, budget, audit, hard_examples."""
        self.problem = problem
        super().__init__(f"the {store} file could not be written ({problem}); nothing was stored")


class DiskFull(StorageError):
    kind = "disk_full"
