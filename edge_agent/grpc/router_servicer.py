"""The agent's RouterService (proto/router_service.proto): tickets, result streams, status.

A caller sees the results of its own requests only: the owner of a ticket is the caller
(edge_agent.grpc.auth) with the client id it gives.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from edge_agent.access import check_client_id
from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from edge_agent.grpc.auth import current_caller
from edge_agent.grpc.convert import encode_status, encode_ticket_result
from edge_agent.grpc.status import status_for
from edge_agent.metrics import AgentMetrics
from router import Router, TicketResult

__all__ = ["RouterServicer"]

_OK = grpc.StatusCode.OK.name
_ENCODED_KEPT = 256


class RouterServicer(rpb_grpc.RouterServiceServicer):
    def __init__(self, router: Router, metrics: AgentMetrics) -> None:
        self.router = router
        self.metrics = metrics
        # The watchers of one owner are handed the same TicketResult for an end: encoded once
        # for all of them, not once per stream. Keyed by identity; the value keeps it alive.
        self._encoded: OrderedDict[int, tuple[TicketResult, rpb.TicketResult]] = OrderedDict()

    async def GetResult(
        self, request: rpb.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TicketResult:
        try:
            owner = current_caller().owner(check_client_id(request.client_id))
            result = await self.router.result(request.ticket, owner=owner)
        except Exception as exc:
            await self._abort(context, "GetResult", exc)
        self.metrics.count_request("GetResult", "", _OK)
        return encode_ticket_result(result)

    async def WatchResults(
        self, request: rpb.WatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.TicketResult]:
        try:
            owner = current_caller().owner(check_client_id(request.client_id))
            # Checked before the first message: a refusal is the stream's status, not a hang.
            results = self.router.watch(request.after_cursor, tuple(request.tickets), owner=owner)
        except Exception as exc:
            await self._abort(context, "WatchResults", exc)
        self.metrics.count_request("WatchResults", "", _OK)
        # Ends only when the caller goes away (grpc cancels this generator) or the agent stops;
        # closed here, not left to the garbage collector, so its watcher place is free at once.
        async with contextlib.aclosing(results):
            async for result in results:
                yield self._encode(result)

    def _encode(self, result: TicketResult) -> rpb.TicketResult:
        kept = self._encoded.get(id(result))
        if kept is not None and kept[0] is result:
            return kept[1]
        message = encode_ticket_result(result)
        self._encoded[id(result)] = (result, message)
        if len(self._encoded) > _ENCODED_KEPT:
            self._encoded.popitem(last=False)
        return message

    async def Status(
        self, request: rpb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.StatusResponse:
        self.metrics.count_request("Status", "", _OK)
        return encode_status(await self.router.status())

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
        code, message = status_for(exc)
        self.metrics.count_request(method, "", code.name)
        await context.abort(code, message)
