"""Our v2 stubs and tritonclient's own copy of the same protos in one process.

Both define the `inference` package; an app (or a benchmark) that imports both must be able to
call the agent with either, whichever it imports first. A fresh interpreter per order, since
the clash (when there is one) happens at import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.integration.conftest import start_agent
from tests.support.processes import Daemon

ROOT = Path(__file__).resolve().parents[2]
OURS = "from edge_agent.grpc._generated import grpc_service_pb2 as pb, grpc_service_pb2_grpc"
THEIRS = "import tritonclient.grpc as triton"

CALL_WITH_EACH = """
import json, sys
import grpc
import numpy as np
from model_runtime.demo import HELDOUT

x = np.load(HELDOUT)["X"][:3].astype(np.float32)
with grpc.insecure_channel(sys.argv[1]) as channel:
    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    ours = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
ours_labels = np.frombuffer(ours.raw_output_contents[0], dtype=np.int64).tolist()

client = triton.InferenceServerClient(sys.argv[1])
given = triton.InferInput("X", list(x.shape), "FP32")
given.set_data_from_numpy(x)
theirs = client.infer("digits", [given])
print(json.dumps({"ours": [ours.outputs[0].name, ours_labels],
                  "theirs": theirs.as_numpy("label").tolist()}))
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = start_agent(tmp_path_factory.mktemp("coexist"))
    yield daemon
    daemon.stop()


@pytest.mark.parametrize(
    ("first", "second"), [(OURS, THEIRS), (THEIRS, OURS)], ids=["ours-first", "tritonclient-first"]
)
def test_both_stubs_import_and_call_the_agent(agent: Daemon, first: str, second: str) -> None:
    script = "\n".join([first, second, CALL_WITH_EACH])
    called = subprocess.run(
        [sys.executable, "-c", script, agent.address("grpc")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert called.returncode == 0, "\n".join(called.stderr.splitlines()[-3:])
    answer = json.loads(called.stdout)
    assert answer["ours"][0] == "label"
    assert len(answer["ours"][1]) == 3
    assert answer["ours"][1] == answer["theirs"]


def test_reflection_describes_the_inference_service(agent: Daemon) -> None:
    # The agent's descriptors live in a pool of their own; reflection must still serve them.
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        router = pool.FindServiceByName("edgecloud.router.v1.RouterService")
    assert "ModelInfer" in service.methods_by_name
    assert (
        service.methods_by_name["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
    )
    assert "WatchResults" in router.methods_by_name
