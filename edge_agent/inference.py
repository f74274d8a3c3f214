"""InferenceService: the agent's transport-free core. Checks a decoded request against its
model, runs the model, scores each item and hands the answer to the router, which says for
each item whether the local answer stands, the cloud answered, or the request was queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_agent.access import ANONYMOUS, CLIENT_ID_PARAMETER, Caller, check_client_id
from edge_agent.metrics import AgentMetrics
from model_runtime import InvalidInput, ModelRepository, OnnxModel
from model_runtime.batching import DynamicBatcher
from model_runtime.onnx_model import Prediction
from router import CallerWishes, LocalAnswer, RoutedAnswer, Router

__all__ = [
    "ROUTING_OUTPUTS",
    "InferRequest",
    "InferResult",
    "InferenceService",
    "ServerInfo",
    "ServiceStopping",
]

Array = npt.NDArray[np.generic]
ParameterValue = bool | int | float | str

# Per-item routing facts, served beside the model's own outputs only when a request names
# them, so a plain v2 client gets exactly the outputs it asked for.
ROUTING_OUTPUTS = frozenset(
    {
        "routing.confidence",  # FP32 [N]
        "routing.route",  # BYTES [N]: edge, cloud or queue
        "routing.reason",  # BYTES [N]: why (router.Reason)
        "routing.provisional",  # BOOL [N]: the local answer may be superseded
        "routing.ticket",  # BYTES [N]: the ticket of a queued item, else empty
    }
)
MIXED = "mixed"


class ServiceStopping(Exception):
    """The agent is draining before it stops: it answers the calls it has, takes no new ones."""

    def __init__(self) -> None:
        super().__init__("the agent is stopping; send the request again shortly")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    name: str
    version: str
    extensions: tuple[str, ...] = ()


# InferRequest, InferResult (and model_runtime's Prediction) are made for every call and never
# changed after: not frozen, because a frozen dataclass sets each field through
# object.__setattr__, which made their construction 3-4x dearer (BENCHMARKS.md, issue 14).
@dataclass(slots=True)
class InferRequest:
    """A decoded request: inputs already checked one by one against the model's specs."""

    model: OnnxModel
    inputs: dict[str, Array]
    outputs: Sequence[str] = ()
    """Outputs asked for by name; empty means all of the model's own outputs."""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)
    id: str = ""
    time_left_s: float | None = None
    """The caller's deadline, as seconds left when the request arrived; None if none was set."""
    caller: Caller = ANONYMOUS
    """Who sent it (edge_agent.access): with its `client_id` parameter, whose results its
    queued items become."""


@dataclass(slots=True)
class InferResult:
    model: OnnxModel
    id: str
    outputs: dict[str, Array]
    parameters: dict[str, ParameterValue]


class InferenceService:
    def __init__(
        self,
        repository: ModelRepository,
        router: Router,
        metrics: AgentMetrics,
        info: ServerInfo,
        *,
        default_ttl_seconds: float,
    ) -> None:
        self.repository = repository
        self.router = router
        self.metrics = metrics
        self.info = info
        self.default_ttl_seconds = default_ttl_seconds
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._batchers: dict[OnnxModel, DynamicBatcher] = {}
        self._default_wishes = CallerWishes.from_parameters(
            {}, default_ttl_seconds=default_ttl_seconds, priorities=router.config.priorities
        )

    def model(self, name: str, version: str = "") -> OnnxModel:
        """The model to answer with; raises ModelNotFound."""
        return self.repository.get(name, version)

    def ready(self) -> bool:
        # Every model is loaded and warmed before the server starts, so serving means ready,
        # until the drain before a stop begins.
        return self._accepting

    def stop_accepting(self) -> None:
        """From now on `infer` raises ServiceStopping; those already in `infer` go on."""
        self._accepting = False

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no `infer` is in progress, at most `timeout_s`; whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._in_flight == 0

    async def infer(self, request: InferRequest) -> InferResult:
        # Refused by the agent itself while it drains, so that every late caller gets the same
        # retryable answer: the gRPC server, once stopping, would reset some calls (CANCELLED).
        if not self._accepting:
            raise ServiceStopping()
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._infer(request)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _infer(self, request: InferRequest) -> InferResult:
        model = request.model
        # The input names were checked by the transport's decoder, before any tensor was read.
        if request.outputs:
            model.check_output_names(request.outputs, extra=ROUTING_OUTPUTS)
        parameters = request.parameters
        if parameters:
            wishes = CallerWishes.from_parameters(
                parameters,
                default_ttl_seconds=self.default_ttl_seconds,
                priorities=self.router.config.priorities,
            )
            owner = request.caller.owner(check_client_id(parameters.get(CLIENT_ID_PARAMETER)))
        else:
            wishes, owner = self._default_wishes, request.caller.owner()
        items = _batch_size(request.inputs)
        model_metrics = self.metrics.models[model.name]

        started = time.perf_counter()
        if model.config.batching is None and model.runs_inline(items):
            prediction = model.predict(request.inputs)  # what _run would do, two coroutines less
        else:
            prediction = await self._run(model, request.inputs, items, request.time_left_s)
        model_metrics.inference_seconds.observe(time.perf_counter() - started)
        for value in prediction.confidence.tolist():
            model_metrics.confidence.observe(value)
        model_metrics.items.inc(items)

        local = LocalAnswer(
            prediction.outputs,
            prediction.confidence,
            model.config.threshold,
            model.config.cloud_model,
        )
        routed = await self.router.route(
            model=model.name,
            inputs=request.inputs,
            local=local,
            wishes=wishes,
            time_left_s=request.time_left_s,
            request_id=request.id,
            owner=owner,
        )
        outputs = {
            name: _routing_output(name, routed) if name in ROUTING_OUTPUTS else routed.outputs[name]
            for name in (request.outputs or model.output_names)
        }
        return InferResult(model, request.id, outputs, _response_parameters(routed))

    async def _run(
        self, model: OnnxModel, inputs: dict[str, Array], items: int, time_left_s: float | None
    ) -> Prediction:
        """The model's run, through its dynamic batcher when its config asks for one."""
        batching = model.config.batching
        if batching is None:
            return await model.run(inputs, items)
        batcher = self._batchers.get(model)
        if batcher is None or batcher.config != batching:  # new, or changed by a reload
            batcher = self._batchers[model] = DynamicBatcher(
                model, batching, self.metrics.models[model.name].count_batch_run
            )
        return await batcher.run(inputs, items, time_left_s)


def _one_or_mixed(values: Sequence[str]) -> str:
    return values[0] if len(set(values)) == 1 else MIXED


def _response_parameters(routed: RoutedAnswer) -> dict[str, ParameterValue]:
    """The response-level facts: one value for the request, `mixed` when a batch's items differ."""
    items = routed.items
    if len(items) == 1:
        item = items[0]
        one: dict[str, ParameterValue] = {
            "route": item.route.value,
            "reason": item.reason.value,
            "confidence": item.confidence,
            "provisional": item.provisional,
        }
        if item.ticket:
            one["ticket"] = item.ticket
        return one
    parameters: dict[str, ParameterValue] = {
        "route": _one_or_mixed([i.route.value for i in items]),
        "reason": _one_or_mixed([i.reason.value for i in items]),
        # The batch is as sure as its least sure item.
        "confidence": min(i.confidence for i in items),
        "provisional": any(i.provisional for i in items),
    }
    tickets = [i.ticket for i in items if i.ticket]
    if len(tickets) == 1:
        parameters["ticket"] = tickets[0]
    elif tickets:
        parameters["tickets"] = len(tickets)  # each one is in the output routing.ticket
    return parameters


def _routing_output(name: str, routed: RoutedAnswer) -> Array:
    items = routed.items
    if name == "routing.confidence":
        return np.array([i.confidence for i in items], dtype=np.float32)
    if name == "routing.provisional":
        return np.array([i.provisional for i in items], dtype=np.bool_)
    if name == "routing.route":
        return np.array([i.route.value for i in items], dtype=np.object_)
    if name == "routing.reason":
        return np.array([i.reason.value for i in items], dtype=np.object_)
    return np.array([i.ticket or "" for i in items], dtype=np.object_)


def _batch_size(inputs: Mapping[str, Array]) -> int:
    if len(inputs) == 1:
        array = next(iter(inputs.values()))
        return array.shape[0] if array.ndim else 1
    sizes = {name: array.shape[0] if array.ndim else 1 for name, array in inputs.items()}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise InvalidInput("inputs", f"inputs disagree on the batch size ({listed})", "shape")
    return distinct.pop()
