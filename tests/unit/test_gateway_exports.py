"""The gateway's public names: every module declares `__all__`, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import cloud_gateway

SUBMODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(cloud_gateway.__path__, "cloud_gateway.")
    if m.name != "cloud_gateway.__main__"
)
MODULES = ["cloud_gateway", *SUBMODULES, "model_runtime.v2_json"]


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_what_it_exports(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []
    assert module.__doc__, f"{name} has no docstring"
