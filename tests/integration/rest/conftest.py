"""Fixtures of the REST transport's tests: an HTTP client of the agent."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import Daemon


@pytest.fixture
def rest(agent: Daemon) -> Iterator[httpx.Client]:
    """A client of the test's agent: the module's, or one a module starts per test."""
    with httpx.Client(base_url=f"http://{agent.address('rest')}", timeout=30) as client:
        yield client
