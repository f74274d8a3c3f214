"""Starting and stopping the agent: clear one-line failures, a clean drain on SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from model_runtime.model_config import load_model_config
from tests.integration.conftest import LINK_WORKS, start_agent, start_agent_with_cloud
from tests.integration.gateway.helpers import Gateway
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, Daemon, wait_until

X = np.load(HELDOUT)["X"][:4]


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    # A state dir of its own: the default one may be held by another agent (StateDirLock).
    with tempfile.TemporaryDirectory(prefix="agent-state-") as state_dir:
        return subprocess.run(
            [
                str(BIN / "edge-agent"),
                "serve",
                "--metrics-port",
                "0",
                "--rest-port",
                "0",
                "--state-dir",
                state_dir,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


def test_sigterm_lets_calls_in_flight_finish_then_exits_zero(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    # Three live escalations are held in the black-holed link for as long as the test wants:
    # their time in flight depends on nothing this machine computes.
    agent = start_agent_with_cloud(
        tmp_path,
        gateway,
        proxy,
        "--grace-seconds",
        "60",
        env={"EDGE_AGENT_LIVE_TIMEOUT_SECONDS": "120"},
    )
    try:
        wait_until(lambda: _link_state(agent) in LINK_WORKS, what="the link to work")
        client = triton.InferenceServerClient(agent.address("grpc"))
        proxy.black_hole()
        results: list[object] = []

        def call(i: int) -> None:
            inp = triton.InferInput("X", [1, 64], "FP32")
            inp.set_data_from_numpy(X[i : i + 1])
            try:
                answer = client.infer(
                    "digits", [inp], parameters={"escalation": "always"}, client_timeout=120
                )
                results.append(answer.get_response().parameters["route"].string_param)
            except InferenceServerException as exc:
                results.append(exc.status())

        callers = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in callers:
            t.start()
        metrics_url = f"http://{agent.address('metrics')}/metrics"
        wait_until(
            lambda: "edge_agent_requests_in_flight 3.0" in httpx.get(metrics_url).text,
            what="3 calls in flight",
        )

        agent.process.send_signal(signal.SIGTERM)
        wait_until(lambda: '"msg": "stopping"' in agent.log(), what="the agent to begin its drain")
        inp = triton.InferInput("X", [1, 64], "FP32")
        inp.set_data_from_numpy(X[:1])
        with pytest.raises(InferenceServerException) as refused:
            client.infer("digits", [inp], client_timeout=30)
        assert agent.process.poll() is None  # still draining: the calls are held in the link
        proxy.restore()
        for t in callers:
            t.join(120)

        assert agent.process.wait(60) == 0
        assert results == ["cloud"] * 3  # every call that was in flight got the cloud's answer
        # New calls are turned away, retryably, by the agent itself while it drains.
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "the agent is stopping" in str(refused.value.message())
        assert '"msg": "stopped"' in agent.log()
    finally:
        proxy.restore()
        agent.stop()


def _link_state(agent: Daemon) -> str:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        stub = rpb_grpc.RouterServiceStub(channel)
        return str(stub.Status(rpb.StatusRequest(), timeout=5).link_state)


def test_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    first = start_agent(tmp_path)
    try:
        result = run_agent("--port", str(first.ports["grpc"]))
    finally:
        first.stop()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"edge-agent: cannot listen on 127.0.0.1:{first.ports['grpc']}: address in use or not available"
    ]


def test_unusable_state_dir_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--metrics-port", "0", "--rest-port", "0",
         "--state-dir", str(blocker / "state")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"edge-agent: cannot use state dir {blocker / 'state'}: Not a directory"
    ]


def test_broken_repository_is_one_clear_line(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(EDGE_REPOSITORY, repo)
    (repo / "digits" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    result = run_agent("--port", "0", "--model-repository", str(repo))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "edge-agent: model 'digits': model.onnx is not a loadable ONNX model"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "port: must be at most 65535, got 70000 (set as --port or"),
        (["--onnx-threads", "0"], "onnx_threads: must be at least 1, got 0"),
        (["--log-level", "loud"], "log_level: must be one of 'debug', 'info', 'warning'"),
    ],
)
def test_invalid_settings_are_one_clear_line(args: list[str], words: str) -> None:
    result = run_agent(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert words in lines[0]


def test_sighup_puts_a_new_calibration_in_force(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(EDGE_REPOSITORY, repo)
    agent = start_agent(tmp_path, "--model-repository", str(repo))
    metrics_url = f"http://{agent.address('metrics')}/metrics"
    try:
        assert 'edge_agent_model_temperature{model="digits"} 1.0' in httpx.get(metrics_url).text
        calibrated = subprocess.run(
            [
                str(BIN / "edge-agent"),
                "calibrate",
                "--model-repository",
                str(repo),
                "--model",
                "digits",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert calibrated.returncode == 0, calibrated.stderr
        config = load_model_config("digits", repo / "digits" / "config.toml")
        assert config.temperature != 1.0

        agent.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                f'edge_agent_model_temperature{{model="digits"}} {config.temperature}'
                in httpx.get(metrics_url).text
            ),
            what="the new temperature on /metrics",
        )
        text = httpx.get(metrics_url).text
        assert f'edge_agent_model_threshold{{model="digits"}} {config.threshold}' in text
        assert 'edge_agent_config_reloads_total{result="applied"} 1.0' in text

        # A broken config is refused as a whole; the calibrated one stays in force.
        (repo / "digits" / "config.toml").write_text("threshold = 7\n", encoding="utf-8")
        agent.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                'edge_agent_config_reloads_total{result="refused"} 1.0'
                in httpx.get(metrics_url).text
            ),
            what="the refused reload to be counted",
        )
        assert (
            f'edge_agent_model_temperature{{model="digits"}} {config.temperature}'
            in httpx.get(metrics_url).text
        )
        assert triton.InferenceServerClient(agent.address("grpc")).is_model_ready("digits")
    finally:
        agent.stop()
