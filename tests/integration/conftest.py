"""Fixtures that start real edge-agent processes on ephemeral ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.support.processes import Daemon, start_daemon


def agent_ready(daemon: Daemon) -> bool:
    return bool(triton.InferenceServerClient(daemon.address("grpc")).is_server_ready())


def start_agent(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    return start_daemon(
        "edge-agent",
        [
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--state-dir",
            str(workdir / "state"),
            *args,
        ],
        workdir,
        ready=agent_ready,
        env=env,
    )


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One agent on the bundled demo repository, shared by a module's read-only tests."""
    daemon = start_agent(tmp_path_factory.mktemp("agent"), "--max-message-bytes", "65536")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def client(agent: Daemon) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(agent.address("grpc"))


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier that takes a few hundred milliseconds per call, to hold calls in flight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    size, layers = 256, 60
    nodes, inits = [], []
    previous = "X"
    for i in range(layers):
        w = numpy_helper.from_array(
            (rng.normal(size=(size, size)) / size).astype(np.float32), f"W{i}"
        )
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"H{i}"]))
        previous = f"H{i}"
    nodes.append(helper.make_node("Softmax", [previous], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    root = tmp_path_factory.mktemp("slow-repo")
    (root / "slow" / "1").mkdir(parents=True)
    onnx.save(model, root / "slow" / "1" / "model.onnx")
    return root
