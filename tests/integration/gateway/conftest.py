"""Fixtures of the gateway's integration tests; the helpers they use are in helpers.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis

from model_runtime.demo import HELDOUT
from tests.integration.gateway.helpers import (
    MLSERVER,
    SKLEARN_MODEL,
    UNDECLARED_MODEL,
    MLServer,
    Redis,
    StallingUpstream,
    free_port_for_mlserver,
)
from tests.support.processes import wait_until


@pytest.fixture(scope="session")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(HELDOUT)
    return data["X"], data["y"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it as root)")
    server = Redis(tmp_path_factory.mktemp("redis") / "redis.sock")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: Redis) -> AsyncIterator[aioredis.Redis]:
    """A client of the module's redis-server, emptied first."""
    c = aioredis.Redis.from_url(redis_server.url)
    await c.flushall()
    yield c
    await c.aclose()


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    if not MLSERVER.exists():
        pytest.skip(f"{MLSERVER} is missing; scripts/test.sh creates .venv-mlserver")
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    root = tmp_path_factory.mktemp("mlserver")
    model_dir = root / "models" / SKLEARN_MODEL
    model_dir.mkdir(parents=True)
    x, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x / 16.0, y)
    joblib.dump(model, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": SKLEARN_MODEL,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "1"},
                # Declared, so the gateway can check requests before forwarding them.
                "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}],
            }
        )
    )
    # The same model again, its inputs undeclared: the gateway forwards requests unchecked.
    raw_dir = root / "models" / UNDECLARED_MODEL
    raw_dir.mkdir()
    joblib.dump(model, raw_dir / "model.joblib")
    (raw_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": UNDECLARED_MODEL,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "1"},
            }
        )
    )
    http_port = free_port_for_mlserver()
    (root / "models" / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": free_port_for_mlserver(),
                "metrics_port": free_port_for_mlserver(),
                # Inference in the server process: no worker pool to spawn in a test.
                "parallel_workers": 0,
            }
        )
    )
    log = (root / "mlserver.log").open("wb")
    process = subprocess.Popen(
        [str(MLSERVER), "start", str(root / "models")], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError((root / "mlserver.log").read_text())
        return all(
            httpx.get(f"{url}/v2/models/{m}/ready").status_code == 200
            for m in (SKLEARN_MODEL, UNDECLARED_MODEL)
        )

    try:
        wait_until(ready, 60.0, what="MLServer to load the model")
        yield MLServer(url, model_dir, process)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def stalling_upstream() -> Iterator[StallingUpstream]:
    upstream = StallingUpstream()
    yield upstream
    upstream.close()
