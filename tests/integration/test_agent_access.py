"""Who may call the agent and whose results they see, on real agents over real sockets: bearer
tokens and mTLS (certificates made here with trustme), health open to all, results shown to the
caller that queued them, watchers capped, and the parser edges of RouterService.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from edge_agent.grpc._generated import router_service_pb2 as rpb
from edge_agent.grpc._generated import router_service_pb2_grpc as rpb_grpc
from model_runtime.demo import HELDOUT
from tests.integration.conftest import (
    TOKENS,
    collect_stream,
    start_agent,
    start_agent_with_cloud,
)
from tests.integration.gateway.helpers import Gateway
from tests.integration.test_audit_agent import metric
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, Daemon, wait_until

X = np.load(HELDOUT)["X"].astype(np.float32)


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


def infer_request(i: int, **parameters: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(X[i : i + 1].tobytes())
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


def ready_with(token: str) -> Callable[[Daemon], bool]:
    def ready(daemon: Daemon) -> bool:
        with grpc.insecure_channel(daemon.address("grpc")) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            return stub.ServerReady(pb.ServerReadyRequest(), metadata=metadata, timeout=5).ready

    return ready


@pytest.fixture
def agent(
    tmp_path: Path, token_file: Path, gateway: Gateway, proxy: FaultProxy
) -> Iterator[Daemon]:
    daemon = start_agent_with_cloud(
        tmp_path,
        gateway,
        proxy,
        "--token-file",
        str(token_file),
        ready=ready_with(TOKENS["kiosk-a"]),
    )
    yield daemon
    daemon.stop()


def test_every_call_but_health_needs_a_known_token(agent: Daemon) -> None:
    with grpc.insecure_channel(agent.address("grpc")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # Load balancers and probes carry no token: health stays open.
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        router = rpb_grpc.RouterServiceStub(channel)
        for metadata, reason in (
            ((), "missing"),
            ((("authorization", "Bearer " + "x" * 24),), "unknown"),
            ((("authorization", "Basic dXNlcjpwdw=="),), "malformed"),
        ):
            for call in (
                lambda md: v2.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=5),
                lambda md: v2.ModelInfer(infer_request(0), metadata=md, timeout=5),
                lambda md: router.Status(rpb.StatusRequest(), metadata=md, timeout=5),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, reason
            assert metric(agent, "edge_agent_auth_failures_total", reason=reason) == 3
        answer = v2.ModelInfer(infer_request(0), metadata=bearer("kiosk-b"), timeout=5)
        assert answer.model_name == "digits"


def test_a_result_reaches_only_the_caller_and_client_id_that_queued_it(
    agent: Daemon, proxy: FaultProxy
) -> None:
    channel = grpc.insecure_channel(agent.address("grpc"))
    v2 = pb_grpc.GRPCInferenceServiceStub(channel)
    router = rpb_grpc.RouterServiceStub(channel)

    def watch(name: str, client_id: str = "") -> tuple[grpc.Future, queue.Queue[rpb.TicketResult]]:
        stream = router.WatchResults(
            rpb.WatchResultsRequest(client_id=client_id), metadata=bearer(name)
        )
        return stream, collect_stream(stream)

    def queued(name: str, client_id: str = "") -> str:
        answer = v2.ModelInfer(
            infer_request(0, escalation="always", client_id=client_id),
            metadata=bearer(name),
            timeout=10,
        )
        assert answer.parameters["route"].string_param == "queue"
        return answer.parameters["ticket"].string_param

    try:
        proxy.cut()
        mine = queued("kiosk-a", "screen-1")
        watchers = {
            "a/screen-1": watch("kiosk-a", "screen-1"),
            "a": watch("kiosk-a"),
            "b/screen-1": watch("kiosk-b", "screen-1"),
        }
        proxy.restore()
        got = watchers["a/screen-1"][1].get(timeout=30)
        assert (got.ticket, got.state) == (mine, rpb.TicketResult.DELIVERED)
        # The same ticket, asked for by anyone else, is unknown: not even its existence shows.
        for name, client_id in (("kiosk-b", "screen-1"), ("kiosk-a", "")):
            with pytest.raises(grpc.RpcError) as hidden:
                router.GetResult(
                    rpb.GetResultRequest(ticket=mine, client_id=client_id),
                    metadata=bearer(name),
                    timeout=5,
                )
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
        mine_again = router.GetResult(
            rpb.GetResultRequest(ticket=mine, client_id="screen-1"),
            metadata=bearer("kiosk-a"),
            timeout=5,
        )
        assert mine_again.state == rpb.TicketResult.DELIVERED
        # Results stream in end order: had the others' watchers been shown the first result,
        # it would come before their own.
        proxy.cut()
        theirs, plain = queued("kiosk-b", "screen-1"), queued("kiosk-a")
        proxy.restore()
        assert watchers["b/screen-1"][1].get(timeout=30).ticket == theirs
        assert watchers["a"][1].get(timeout=30).ticket == plain
    finally:
        for stream, _ in watchers.values():
            stream.cancel()
        channel.close()


@pytest.fixture
def plain_agent(tmp_path: Path) -> Iterator[Daemon]:
    daemon = start_agent(tmp_path, env={"EDGE_AGENT_MAX_WATCHERS": "2"})
    yield daemon
    daemon.stop()


def test_watchers_beyond_the_cap_are_refused_and_counted(plain_agent: Daemon) -> None:
    with grpc.insecure_channel(plain_agent.address("grpc")) as channel:
        router = rpb_grpc.RouterServiceStub(channel)
        streams = [router.WatchResults(rpb.WatchResultsRequest()) for _ in range(2)]
        wait_until(
            lambda: metric(plain_agent, "edge_agent_router_result_watchers") == 2,
            what="two watchers to be open",
        )
        third = router.WatchResults(rpb.WatchResultsRequest())
        with pytest.raises(grpc.RpcError) as refused:
            next(third)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 result watchers" in str(refused.value.details())
        assert metric(plain_agent, "edge_agent_router_result_watchers_refused_total") == 1
        streams[0].cancel()
        wait_until(
            lambda: metric(plain_agent, "edge_agent_router_result_watchers") == 1,
            what="the cancelled watcher to give its place back",
        )
        again = router.WatchResults(rpb.WatchResultsRequest())
        for stream in (again, *streams):
            stream.cancel()


def test_every_way_a_watcher_ends_gives_its_place_back(plain_agent: Daemon) -> None:
    def watchers() -> float:
        return metric(plain_agent, "edge_agent_router_result_watchers")

    with grpc.insecure_channel(plain_agent.address("grpc")) as channel:
        router = rpb_grpc.RouterServiceStub(channel)
        for _ in range(20):  # cancelled at once, perhaps before the agent has even started it
            router.WatchResults(rpb.WatchResultsRequest()).cancel()
        for _ in range(10):  # cancelled once open
            opened = [router.WatchResults(rpb.WatchResultsRequest()) for _ in range(2)]
            wait_until(lambda: watchers() == 2, what="two watchers to be open")
            for stream in opened:
                stream.cancel()
        ended = [router.WatchResults(rpb.WatchResultsRequest(), timeout=1) for _ in range(2)]
        for stream in ended:  # the caller's deadline ends them
            with pytest.raises(grpc.RpcError) as late:
                next(stream)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: watchers() == 0, what="every ended watcher to give its place back")
        again = [router.WatchResults(rpb.WatchResultsRequest()) for _ in range(2)]
        wait_until(lambda: watchers() == 2, what="two new watchers admitted")
        for stream in again:
            stream.cancel()
    assert metric(plain_agent, "edge_agent_router_result_watchers_refused_total") == 0


def test_router_service_parser_edges_are_invalid_argument_in_one_line(plain_agent: Daemon) -> None:
    with grpc.insecure_channel(plain_agent.address("grpc")) as channel:
        router = rpb_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as cursor:
            next(router.WatchResults(rpb.WatchResultsRequest(after_cursor=2**63), timeout=5))
        assert cursor.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = str(cursor.value.details())
        assert details.startswith("after_cursor: must be an integer 0..9223372036854775807")
        assert "\n" not in details
        assert "Overflow" not in details
        huge = "t" * (1 << 20)
        with pytest.raises(grpc.RpcError) as ticket:
            router.GetResult(rpb.GetResultRequest(ticket=huge), timeout=5)
        assert ticket.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(str(ticket.value.details())) < 200  # the ticket is not echoed back
        with pytest.raises(grpc.RpcError) as client:
            router.GetResult(rpb.GetResultRequest(ticket="t", client_id="no spaces"), timeout=5)
        assert client.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(client.value.details()).startswith("client_id: must be")


# -- mTLS ----------------------------------------------------------------------------------------


def test_mtls_lets_in_clients_with_a_certificate_of_the_ca_only(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("kiosk-1.clinic", common_name="kiosk-1")
    stranger = trustme.CA().issue_cert("kiosk-9.clinic", common_name="kiosk-9")
    files = {}
    for name, blob in (
        ("agent.crt", server.cert_chain_pems[0]),
        ("agent.key", server.private_key_pem),
        ("clients-ca.crt", ca.cert_pem),
    ):
        files[name] = tmp_path / name
        blob.write_to_path(str(files[name]))
        files[name].chmod(0o600)

    def channel_for(cert: trustme.LeafCert | None) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=None if cert is None else cert.private_key_pem.bytes(),
            certificate_chain=None if cert is None else cert.cert_chain_pems[0].bytes(),
        )
        return grpc.secure_channel(
            f"127.0.0.1:{daemon.ports['grpc']}",
            credentials,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )

    def ready(d: Daemon) -> bool:
        nonlocal daemon
        daemon = d
        with channel_for(client) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready)

    daemon: Daemon
    from tests.support.processes import start_daemon

    daemon = start_daemon(
        "edge-agent",
        [
            "serve", "--port", "0", "--metrics-port", "0", "--state-dir", str(tmp_path / "s"),
            "--tls-cert-file", str(files["agent.crt"]), "--tls-key-file", str(files["agent.key"]),
            "--tls-client-ca-file", str(files["clients-ca.crt"]),
            "--rest-port", "0",
        ],
        tmp_path,
        ready=ready,
    )  # fmt: skip
    try:
        with channel_for(client) as channel:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(0), timeout=5
            )
            assert answer.model_name == "digits"
        for cert in (None, stranger):  # no certificate, or one of another CA: no connection
            with channel_for(cert) as channel, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                    pb.ServerReadyRequest(), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # Nor does plaintext get an answer.
        with grpc.insecure_channel(daemon.address("grpc")) as channel, pytest.raises(grpc.RpcError):
            pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                pb.ServerReadyRequest(), timeout=5
            )
    finally:
        daemon.stop()


# -- beyond loopback -----------------------------------------------------------------------------


def test_beyond_loopback_without_authentication_the_agent_will_not_start(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--host", "0.0.0.0", "--port", "0",
         "--metrics-port", "0", "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "0.0.0.0 is beyond loopback: give token_file or tls_client_ca_file" in done.stderr
    assert "--insecure" in done.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_insecure_serves_beyond_loopback_with_a_warning_at_start(tmp_path: Path) -> None:
    agent = start_agent(tmp_path, "--host", "0.0.0.0", "--insecure")
    try:
        with grpc.insecure_channel(agent.address("grpc")) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    finally:
        agent.stop()
    warnings = [line for line in agent.log().splitlines() if '"level": "warning"' in line]
    assert any("without authentication (insecure = true)" in line for line in warnings)
