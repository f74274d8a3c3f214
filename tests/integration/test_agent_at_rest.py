"""What the daemons leave on disk: private modes whatever the umask, the device key file's own
mode checked, and patients' inputs and the cloud's answers encrypted when a key is given, with
rotation to a new key. Real agents and a real gateway, real SQLite files (WAL included).
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.integration.conftest import start_agent, start_agent_with_cloud, write_device_key
from tests.integration.gateway.helpers import Gateway, start_gateway
from tests.integration.test_audit_agent import UNSURE, X, link_works
from tests.integration.test_hard_examples_agent import delivered
from tests.support.fault_proxy import FaultProxy
from tests.support.processes import BIN, Daemon, wait_until

pytestmark = pytest.mark.integration

# An input no file may show in clear: a value whose text and bytes appear nowhere else.
MARKER = np.float32(0.70710677)
ROW = X[int(UNSURE[0]) : int(UNSURE[0]) + 1].astype(np.float32)
ROW[0, 5] = MARKER
# What a plaintext row of the queue or of the hard examples holds: the v2 JSON of the input
# (the marker as text) or of the cloud's answer; gzip hides text, so the raw bytes are checked
# in the uncompressed queue, and the JSON keys in both.
CLEAR = (str(MARKER).encode(), ROW.tobytes(), b'"inputs"', b'"outputs"')


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The umask of a shell outside systemd, inherited by the daemons the test starts."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def ask(agent: Daemon, row: np.ndarray, **parameters: object) -> dict[str, object]:
    inp = triton.InferInput("X", list(row.shape), "FP32")
    inp.set_data_from_numpy(row)
    client = triton.InferenceServerClient(agent.address("grpc"))
    result = client.infer("digits", [inp], parameters=parameters or None, client_timeout=30)
    return {
        k: getattr(v, v.WhichOneof("parameter_choice"))
        for k, v in result.get_response().parameters.items()
    }


def queue_and_deliver(agent: Daemon, proxy: FaultProxy, state: Path) -> dict[str, list[bytes]]:
    """The marker row escalated live once, and queued during a cut then delivered once; what
    `clear_bytes` found in `state` while the queued request waited (WAL files included)."""
    wait_until(lambda: link_works(agent), what="the link to work")
    assert ask(agent, ROW, escalation="always")["route"] == "cloud"
    proxy.cut()
    ticket = str(ask(agent, ROW, escalation="always")["ticket"])
    waiting = clear_bytes(state)
    proxy.restore()
    wait_until(lambda: delivered(agent.address("grpc"), ticket), timeout=30, what="delivery")
    return waiting


def modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def clear_bytes(root: Path) -> dict[str, list[bytes]]:
    """Files under `root` holding any of CLEAR, with what they hold."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if hits := [c for c in CLEAR if c in data]:
                found[str(path.relative_to(root))] = hits
    return found


def write_key(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def test_everything_the_daemons_create_is_private_under_umask_022(
    tmp_path: Path, umask_022: None
) -> None:
    key_db = tmp_path / "keys" / "keys.sqlite3"
    gateway_state = tmp_path / "gw" / "state"
    gw = start_gateway(tmp_path / "gw", key_db=key_db)  # its state dir is its own to make
    try:
        with FaultProxy("127.0.0.1", gw.daemon.ports["http"]) as proxy:
            agent = start_agent_with_cloud(
                tmp_path / "agent", gw, proxy, env={"EDGE_AGENT_HARD_EXAMPLES_RETENTION_DAYS": "1"}
            )
            try:
                queue_and_deliver(agent, proxy, tmp_path / "agent" / "state")
                port_files = [p for p in (tmp_path / "agent").iterdir() if p.suffix == ".json"]
                agent_modes = modes(tmp_path / "agent" / "state")
                gateway_modes = modes(gateway_state)
                port_modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in port_files}
                out = tmp_path / "export" / "hard.npz"
                out.parent.mkdir()
                done = subprocess.run(
                    [str(BIN / "edge-agent"), "export-hard-examples", "--out", str(out),
                     "--state-dir", str(tmp_path / "agent" / "state")],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                export_mode = stat.S_IMODE(out.stat().st_mode)
            finally:
                agent.stop()
    finally:
        gw.daemon.stop()
    # the queue, budget and hard examples with their -wal and -shm, the lock; the gateway's
    # idempotency file with its -wal and -shm
    for expected in ("queue.sqlite-wal", "queue.sqlite-shm", "hard_examples.sqlite", "agent.lock"):
        assert expected in agent_modes
    assert "idempotency.sqlite3" in gateway_modes
    for name, mode in {**agent_modes, **gateway_modes}.items():
        assert mode in (0o600, 0o700), f"{name}: {mode:04o}"
    assert agent_modes["."] == gateway_modes["."] == 0o700
    assert port_modes
    assert set(port_modes.values()) == {0o600}
    assert export_mode == 0o600


def test_a_device_key_file_others_may_write_is_refused_one_they_may_read_warned(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    key_file = write_device_key(tmp_path, gateway, mode=0o666)
    done = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--metrics-port", "0",
         "--state-dir", str(tmp_path / "s"), "--cloud-url", proxy.url,
         "--device-key-file", str(key_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"device key file {key_file} is writable by its group or by anyone" in done.stderr
    assert gateway.key not in done.stderr + done.stdout
    key_file.chmod(0o644)
    agent = start_agent(tmp_path, "--cloud-url", proxy.url, "--device-key-file", str(key_file))
    agent.stop()
    assert f"device key file {key_file} is readable by its group or by anyone" in agent.log()


@pytest.mark.parametrize(
    ("text", "problem"),
    [(" {key}\n", "whitespace before the key"), ("{key} \n", "whitespace after the key"),
     ("{key}\n\n", "whitespace after the key"), ("{key}\nsecond\n", "more than one line"),
     ("{head} {tail}\n", "whitespace inside the key"), ("\n", "is empty")],
    ids=["leading-space", "trailing-space", "blank-line", "two-lines", "inner-space", "empty"],
)  # fmt: skip
def test_a_device_key_file_that_is_not_one_clean_line_stops_the_start(
    tmp_path: Path, gateway: Gateway, text: str, problem: str
) -> None:
    key_file = write_device_key(tmp_path, gateway)
    key = gateway.key
    key_file.write_text(text.format(key=key, head=key[:8], tail=key[8:]))
    done = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--metrics-port", "0",
         "--rest-port", "0", "--state-dir", str(tmp_path / "s"),
         "--cloud-url", gateway.url, "--device-key-file", str(key_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    assert lines[0].startswith(f"edge-agent: device key file {key_file}")
    assert problem in lines[0]
    assert key[:8] not in done.stderr + done.stdout


def test_a_device_key_file_may_end_with_one_newline(tmp_path: Path, gateway: Gateway) -> None:
    key_file = write_device_key(tmp_path, gateway)
    key_file.write_text(gateway.key + "\r\n")  # an editor on Windows
    agent = start_agent(tmp_path, "--cloud-url", gateway.url, "--device-key-file", str(key_file))
    try:
        wait_until(lambda: link_works(agent), what="the link to work")
        x = np.asarray(X[:1], dtype=np.float32)
        given = triton.InferInput("X", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        answer = triton.InferenceServerClient(agent.address("grpc")).infer(
            "digits", [given], parameters={"escalation": "always"},
            outputs=[triton.InferRequestedOutput("routing.route")],
        )  # fmt: skip
        assert answer.as_numpy("routing.route").tolist() == [b"cloud"]  # the gateway took the key
    finally:
        agent.stop()


def test_with_a_key_no_file_of_the_state_dir_holds_an_input_or_answer_in_clear(
    tmp_path: Path, gateway: Gateway, proxy: FaultProxy
) -> None:
    old_key = write_key(tmp_path / "old.key")
    hard = {"EDGE_AGENT_HARD_EXAMPLES_RETENTION_DAYS": "1"}
    encrypted = {**hard, "EDGE_AGENT_ENCRYPTION_KEY_FILE": str(old_key)}
    state = tmp_path / "sealed" / "state"
    agent = start_agent_with_cloud(tmp_path / "sealed", gateway, proxy, env=encrypted)
    try:
        waiting = queue_and_deliver(agent, proxy, state)
        delivered_ = clear_bytes(state)  # WAL files included, before any checkpoint
        assert any(p.endswith("-wal") for p in os.listdir(state))
    finally:
        agent.stop()
    assert waiting == {}
    assert delivered_ == {}
    assert clear_bytes(state) == {}

    # Without the key the agent will not start: what was sealed with it could not be sent.
    done = subprocess.run(
        [str(BIN / "edge-agent"), "serve", "--port", "0", "--metrics-port", "0",
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **hard},
    )  # fmt: skip
    assert done.returncode == 2
    assert "holds data encrypted with key" in done.stderr
    # Rotation: a new key seals from now on, the old one, listed, still opens what it sealed.
    new_key = write_key(tmp_path / "new.key")
    rotated = {
        **hard,
        "EDGE_AGENT_ENCRYPTION_KEY_FILE": str(new_key),
        "EDGE_AGENT_ENCRYPTION_OLD_KEY_FILES": f'["{old_key}"]',
    }
    agent = start_agent_with_cloud(tmp_path / "sealed", gateway, proxy, env=rotated)
    try:
        assert queue_and_deliver(agent, proxy, state) == {}
    finally:
        agent.stop()
    out = tmp_path / "hard.npz"
    done = subprocess.run(
        [str(BIN / "edge-agent"), "export-hard-examples", "--out", str(out),
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **rotated},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = np.load(out)["X"]
    assert len(exported) == 4  # two live, two queued, under two keys
    assert (exported[:, 5] == MARKER).all()
    assert clear_bytes(state) == {}

    # The same run without a key leaves the input in clear: what the checks above would catch.
    plain = tmp_path / "plain" / "state"
    agent = start_agent_with_cloud(tmp_path / "plain", gateway, proxy, env=hard)
    try:
        waiting = queue_and_deliver(agent, proxy, plain)
    finally:
        agent.stop()
    assert str(MARKER).encode() in waiting["queue.sqlite-wal"]
