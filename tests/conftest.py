"""Checks for the whole suite: no process a test started may outlive the run."""

from __future__ import annotations

import pytest

from tests.support.leak_check import LeakCheck


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LeakCheck(), "leak-check")
