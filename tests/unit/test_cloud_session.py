"""A failure inside httpx that is the link's, not the agent's, is a network error to the router."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from router.cloud_client import CloudClient
from router.errors import CloudUnavailable
from router.retrying import RetryPolicy


def test_a_pooled_connection_closed_under_the_client_is_a_network_error() -> None:
    # anyio's own bug cannot be provoked on demand (it needs a pooled connection whose transport
    # the link closed at the right moment), so httpx's send raises what anyio raised then.
    async def scenario() -> None:
        attempts: list[str] = []
        client = CloudClient(
            "http://127.0.0.1:9",
            "dev-key-0123456789",
            retry=RetryPolicy(max_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.01),
            on_attempt=lambda record: attempts.append(record.outcome),
        )

        async def closed_transport(*args: object, **kwargs: object) -> httpx.Response:
            raise AttributeError("'NoneType' object has no attribute 'getpeername'")

        client._session._http.send = closed_transport  # type: ignore[method-assign]
        try:
            with pytest.raises(CloudUnavailable, match="connection closed under the client"):
                await client.infer("digits", b"{}", idempotency_key="k-1")
        finally:
            await client.aclose()
        assert attempts == ["network_error", "network_error"]  # retried as any cut link is

    asyncio.run(scenario())
