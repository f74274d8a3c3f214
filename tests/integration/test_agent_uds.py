"""The gRPC API on a Unix-domain socket: beside TCP or instead of it, mode 0660, the same
answers and the same access rules as over TCP."""

from __future__ import annotations

import socket
import stat
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.integration.conftest import TOKENS, start_agent
from tests.support.processes import BIN

X = np.load(Path(__file__).resolve().parents[2] / "model_runtime" / "demo" / "heldout.npz")["X"]


def infer_request(i: int) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="X", datatype="FP32", shape=[1, 64])
    return pb.ModelInferRequest(
        model_name="digits", inputs=[tensor], raw_input_contents=[X[i : i + 1].tobytes()]
    )


def uds_ready(path: Path, metadata: tuple[tuple[str, str], ...] = ()) -> bool:
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return bool(stub.ServerReady(pb.ServerReadyRequest(), metadata=metadata, timeout=2).ready)


def test_answers_on_the_socket_equal_those_over_tcp_and_the_socket_is_0660(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.sock"
    agent = start_agent(tmp_path, "--uds", str(path))
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with (
            grpc.insecure_channel(f"unix:{path}") as local,
            grpc.insecure_channel(agent.address("grpc")) as tcp,
        ):
            for i in range(5):
                over_uds = pb_grpc.GRPCInferenceServiceStub(local).ModelInfer(infer_request(i))
                over_tcp = pb_grpc.GRPCInferenceServiceStub(tcp).ModelInfer(infer_request(i))
                assert over_uds.raw_output_contents == over_tcp.raw_output_contents
                assert over_uds.parameters == over_tcp.parameters
    finally:
        agent.stop()
    assert not path.exists(), "the agent removes its socket when it stops"


def test_socket_only_with_tokens_asks_for_a_token_there_too(
    tmp_path: Path, token_file: Path
) -> None:
    path = tmp_path / "agent.sock"
    bearer = (("authorization", f"Bearer {TOKENS['kiosk-a']}"),)
    agent = start_agent(
        tmp_path,
        "--no-tcp",
        "--uds",
        str(path),
        "--token-file",
        str(token_file),
        ready=lambda d: uds_ready(path, bearer),
    )
    try:
        assert "grpc" not in agent.ports, "no TCP listener"
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(infer_request(0), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.ModelInfer(infer_request(0), metadata=bearer, timeout=5).outputs
    finally:
        agent.stop()


def test_a_leftover_socket_is_replaced_but_one_in_use_is_not(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    # A socket file nobody serves any more (an agent killed with SIGKILL leaves one).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(path))
    first = start_agent(tmp_path / "first", "--uds", str(path))
    try:
        assert uds_ready(path)
        second = subprocess.run(
            [str(BIN / "edge-agent"), "serve", "--port", "0", "--no-rest", "--metrics-port", "0",
             "--state-dir", str(tmp_path / "second"), "--uds", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"cannot listen on unix:{path}: another process is serving" in second.stderr
        assert uds_ready(path), "the first agent still serves on its socket"
    finally:
        first.stop()


def test_no_tcp_without_a_socket_is_refused_before_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--no-tcp", "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "uds: tcp_enabled is off: give a Unix socket path to serve on" in result.stderr
    assert "--uds" in result.stderr
