"""The agent's RouterService (proto/router_service.proto): tickets, result streams, status."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from edge_agent.grpc.convert import encode_status, encode_ticket_result
from edge_agent.grpc.status import status_for
from edge_agent.metrics import AgentMetrics
from model_runtime import InvalidInput
from router import Router

__all__ = ["RouterServicer"]

_OK = grpc.StatusCode.OK.name


class RouterServicer(rpb_grpc.RouterServiceServicer):
    def __init__(self, router: Router, metrics: AgentMetrics) -> None:
        self.router = router
        self.metrics = metrics

    async def GetResult(
        self, request: rpb.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> rpb.TicketResult:
        try:
            if not request.ticket:
                raise InvalidInput("ticket", "is empty; give the ticket of a queued request")
            result = await self.router.result(request.ticket)
        except Exception as exc:
            code, message = status_for(exc)
            self.metrics.count_request("GetResult", "", code.name)
            await context.abort(code, message)
        self.metrics.count_request("GetResult", "", _OK)
        return encode_ticket_result(result)

    async def WatchResults(
        self, request: rpb.WatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.TicketResult]:
        self.metrics.count_request("WatchResults", "", _OK)
        # Ends only when the caller goes away (grpc cancels this generator) or the agent stops.
        async for result in self.router.watch(request.after_cursor, tuple(request.tickets)):
            yield encode_ticket_result(result)

    async def Status(
        self, request: rpb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> rpb.StatusResponse:
        self.metrics.count_request("Status", "", _OK)
        return encode_status(await self.router.status())
