"""Fixtures of the router's integration tests: a real `cloud-gateway` process, the fault proxy in
front of it, and Routers on real SQLite files talking to it through the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from model_runtime.demo import HELDOUT
from router import Router
from tests.integration.gateway.helpers import Gateway
from tests.integration.router.helpers import fast_config
from tests.support.fault_proxy import FaultProxy


@pytest.fixture(scope="session")
def pixels() -> np.ndarray:
    return np.asarray(np.load(HELDOUT)["X"], dtype=np.float32)


RouterFactory = Callable[..., Awaitable[Router]]


@pytest.fixture
async def make_router(
    gateway: Gateway, proxy: FaultProxy, tmp_path: Path
) -> AsyncIterator[RouterFactory]:
    """`await make_router(**config changes)`: a Router on a fresh registry, via the proxy."""
    opened: list[Router] = []

    async def make(**changes: Any) -> Router:
        changes.setdefault("state_dir", tmp_path / f"state-{len(opened)}")
        config = fast_config(proxy.url, gateway.key, **changes)
        router = await Router.open(config, CollectorRegistry())
        opened.append(router)
        return router

    yield make
    for router in opened:
        await router.close()
