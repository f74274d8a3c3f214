"""The agent and its stubs run at both ends of the supported protobuf range.

The test environment has the protobuf 6 that tritonclient[grpc] pulls in. Here the lowest
supported versions (protobuf, grpcio and the grpc health and reflection packages generated for
them), then the newest the registry has, are installed into a throwaway directory put first on
PYTHONPATH; a real agent is started on them and called through the committed stubs, with every
warning an error (a gencode/runtime mismatch warns or fails at import).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import start_agent

LOWEST = ["protobuf==6.31.1", "grpcio==1.80.0", "grpcio-health-checking==1.80.0",
          "grpcio-reflection==1.80.0"]  # fmt: skip
NEWEST = ["protobuf", "grpcio", "grpcio-health-checking", "grpcio-reflection"]
ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = re.compile(
    r"NewConnectionError|ConnectionError|ConnectTimeout|ReadTimeout|ProxyError|"
    r"Temporary failure in name resolution|Network is unreachable|No route to host"
)

CLIENT = """
import json
import sys
import grpc
import numpy as np
from google.protobuf import __version__ as protobuf_version
from grpc_health.v1 import health_pb2, health_pb2_grpc
from edge_agent.grpc._generated import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from model_runtime.demo import HELDOUT

x = np.load(HELDOUT)["X"][:2].astype(np.float32)
with grpc.insecure_channel(sys.argv[1]) as channel:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
print(json.dumps([protobuf_version, health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
                  [o.name for o in answer.outputs], answer.parameters["route"].string_param]))
"""


def install(requirements: list[str], target: Path) -> Path:
    """pip-install `requirements` alone (no dependencies) into `target`."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--target", str(target), *requirements],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        if UNREACHABLE.search(result.stdout + result.stderr):
            pytest.skip(f"the package registry cannot be reached: {result.stderr.strip()[-300:]}")
        pytest.fail(f"pip install {' '.join(requirements)} failed:\n{result.stderr}")
    return target


@pytest.mark.parametrize("requirements", [LOWEST, NEWEST], ids=["lowest", "newest"])
def test_agent_and_stubs_work_on_protobuf(requirements: list[str], tmp_path: Path) -> None:
    site = install(requirements, tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PYTHONWARNINGS": "error"}
    agent = start_agent(tmp_path, env=env)
    try:
        called = subprocess.run(
            [sys.executable, "-c", CLIENT, agent.address("grpc")],
            capture_output=True, text=True, timeout=60, env={**os.environ, **env},
        )  # fmt: skip
    finally:
        assert agent.stop() == 0
    assert called.returncode == 0, called.stderr
    version, health, outputs, route = json.loads(called.stdout)
    if requirements is LOWEST:
        assert version == "6.31.1"
    else:
        assert int(version.split(".")[0]) >= 7
    assert health == "SERVING"
    assert outputs == ["label", "probabilities"]
    assert route == "edge"
    assert "Warning" not in agent.log()
