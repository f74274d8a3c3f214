from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetResultRequest(_message.Message):
    __slots__ = ("ticket", "client_id")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    client_id: str
    def __init__(self, ticket: _Optional[str] = ..., client_id: _Optional[str] = ...) -> None: ...

class WatchResultsRequest(_message.Message):
    __slots__ = ("after_cursor", "tickets", "client_id")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TICKETS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    tickets: _containers.RepeatedScalarFieldContainer[str]
    client_id: str
    def __init__(self, after_cursor: _Optional[int] = ..., tickets: _Optional[_Iterable[str]] = ..., client_id: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "raw_contents")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw_contents: bytes
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw_contents: _Optional[bytes] = ...) -> None: ...

class TicketResult(_message.Message):
    __slots__ = ("ticket", "state", "model_name", "outputs", "cursor", "enqueued_at", "finished_at", "attempts", "error")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[TicketResult.State]
        PENDING: _ClassVar[TicketResult.State]
        DELIVERED: _ClassVar[TicketResult.State]
        EXPIRED: _ClassVar[TicketResult.State]
        DROPPED: _ClassVar[TicketResult.State]
        REJECTED: _ClassVar[TicketResult.State]
    STATE_UNSPECIFIED: TicketResult.State
    PENDING: TicketResult.State
    DELIVERED: TicketResult.State
    EXPIRED: TicketResult.State
    DROPPED: TicketResult.State
    REJECTED: TicketResult.State
    TICKET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    state: TicketResult.State
    model_name: str
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    cursor: int
    enqueued_at: float
    finished_at: float
    attempts: int
    error: str
    def __init__(self, ticket: _Optional[str] = ..., state: _Optional[_Union[TicketResult.State, str]] = ..., model_name: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., cursor: _Optional[int] = ..., enqueued_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Budget(_message.Message):
    __slots__ = ("limit_bytes", "used_bytes", "left_bytes")
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEFT_BYTES_FIELD_NUMBER: _ClassVar[int]
    limit_bytes: int
    used_bytes: int
    left_bytes: int
    def __init__(self, limit_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., left_bytes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("link_state", "rtt_seconds", "breaker_open", "queue_depth_by_priority", "oldest_item_age_seconds", "queue_bytes", "day_budget", "month_budget", "cloud_configured")
    class QueueDepthByPriorityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    LINK_STATE_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_OPEN_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_BY_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    OLDEST_ITEM_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DAY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MONTH_BUDGET_FIELD_NUMBER: _ClassVar[int]
    CLOUD_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    link_state: str
    rtt_seconds: float
    breaker_open: bool
    queue_depth_by_priority: _containers.ScalarMap[int, int]
    oldest_item_age_seconds: float
    queue_bytes: int
    day_budget: Budget
    month_budget: Budget
    cloud_configured: bool
    def __init__(self, link_state: _Optional[str] = ..., rtt_seconds: _Optional[float] = ..., breaker_open: bool = ..., queue_depth_by_priority: _Optional[_Mapping[int, int]] = ..., oldest_item_age_seconds: _Optional[float] = ..., queue_bytes: _Optional[int] = ..., day_budget: _Optional[_Union[Budget, _Mapping]] = ..., month_budget: _Optional[_Union[Budget, _Mapping]] = ..., cloud_configured: bool = ...) -> None: ...
