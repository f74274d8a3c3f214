"""`edge-agent calibrate` end to end: the real command, real onnxruntime, copies of real repos.

The demo's quality bars are checked on the bundled models; a second classifier, built here,
shows the command is not tied to the demo. The package's own model_runtime/demo is never
written: every run works on a copy in tmp_path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.calibration import stratified_split
from model_runtime.confidence import confidence
from model_runtime.demo import CLOUD_REPOSITORY, EDGE_REPOSITORY, HELDOUT
from model_runtime.model_config import load_model_config
from model_runtime.v2_json import decode_infer_request, encode_infer_response
from tests.support.counting_upstream import send_json

pytestmark = pytest.mark.integration

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def calibrate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGE_AGENT), "calibrate", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def copy_repo(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# --- the demo models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One calibration of a copy of the bundled edge repository, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("demo")
    repo = copy_repo(EDGE_REPOSITORY, tmp / "edge")
    config = repo / "digits" / "config.toml"
    original = config.read_bytes()
    proc = calibrate(
        "--model-repository", repo, "--target-escalation", "0.2", "--report", tmp / "report"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp / "report" / "report.json").read_text())
    return {"proc": proc, "report": report, "repo": repo, "tmp": tmp, "original": original}


def test_demo_meets_the_quality_bars(demo_run: dict[str, Any]) -> None:
    report = demo_run["report"]
    test = report["test"]
    assert report["calibration_items"] + report["test_items"] == 719
    assert abs(test["escalation_rate"] - 0.20) <= 0.03
    assert test["pgr"] >= 0.8
    assert test["cpt"]["95%"] <= 0.35
    assert test["ece_after"] <= test["ece_before"] / 2 or test["ece_after"] < 0.02
    # The accuracies the model card states for the whole held-out split bracket these.
    acc = test["accuracy"]
    assert acc["edge"] < acc["hybrid"] <= acc["cloud"] + 1e-12
    assert 0.5 < test["apgr"] <= 1.0


def test_demo_table_shows_sizes_and_figures(demo_run: dict[str, Any]) -> None:
    out = demo_run["proc"].stdout
    report = demo_run["report"]
    assert f"{report['calibration_items']} / {report['test_items']} items" in out
    assert "bundled digits-large" in out
    for label in (
        "ECE before / after scaling",
        "AURC max_probability",
        "AURC margin",
        "AURC entropy",
        "realized escalation",
        "PGR",
        "APGR",
        "CPT(95%)",
    ):
        assert label in out
    assert f"{report['test']['escalation_rate']:.1%}" in out
    assert demo_run["proc"].stderr == ""


def test_demo_writes_config_and_keeps_backup(demo_run: dict[str, Any]) -> None:
    config = demo_run["repo"] / "digits" / "config.toml"
    backup = config.with_name("config.toml.bak")
    assert backup.read_bytes() == demo_run["original"]
    written = load_model_config("digits", config)
    chosen = demo_run["report"]["chosen"]
    assert written.threshold == chosen["threshold"]
    assert written.temperature == chosen["temperature"]
    assert written.confidence_method.value == chosen["confidence_method"]
    # Everything else is kept as it was.
    before = load_model_config("digits", backup)
    assert written.labels == before.labels
    assert written.cloud_model == before.cloud_model == "digits-large"
    assert written.output_kind == before.output_kind


def test_written_config_reproduces_the_reported_escalation(demo_run: dict[str, Any]) -> None:
    """What an agent serving the new config would do on the test part: the rate in the report."""
    repo, report = demo_run["repo"], demo_run["report"]
    cfg = load_model_config("digits", repo / "digits" / "config.toml")
    data = np.load(HELDOUT)
    _, test_idx = stratified_split(data["y"], report["calibration_share"], report["seed"])
    session = ort.InferenceSession(
        str(repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (scores,) = session.run(["probabilities"], {"X": data["X"][test_idx]})
    conf = confidence(scores, cfg.output_kind, cfg.confidence_method, cfg.temperature)
    assert float((conf < cfg.threshold).mean()) == pytest.approx(report["test"]["escalation_rate"])


def test_demo_report_has_plots(demo_run: dict[str, Any]) -> None:
    report_dir = demo_run["tmp"] / "report"
    for name in ("reliability.png", "risk_coverage.png", "pgr.png"):
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000  # a drawn figure, not an empty canvas
    assert demo_run["report"]["config"]["written"] is True


def test_dry_run_leaves_config_untouched(tmp_path: Path) -> None:
    repo = copy_repo(EDGE_REPOSITORY, tmp_path / "edge")
    config = repo / "digits" / "config.toml"
    before = config.read_bytes()
    proc = calibrate("--model-repository", repo, "--target-pgr", "0.9", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout
    assert re.search(r"^  target +pgr 0\.9$", proc.stdout, re.MULTILINE)
    assert config.read_bytes() == before
    assert not config.with_name("config.toml.bak").exists()


# --- bad data files -----------------------------------------------------------------------------


def _heldout() -> dict[str, np.ndarray]:
    with np.load(HELDOUT) as d:
        return {"X": d["X"], "y": d["y"]}


def _missing_y() -> dict[str, np.ndarray]:
    return {"X": _heldout()["X"]}


def _wrong_shape() -> dict[str, np.ndarray]:
    d = _heldout()
    return {"X": d["X"][:, :60], "y": d["y"]}


def _short_y() -> dict[str, np.ndarray]:
    d = _heldout()
    return {"X": d["X"], "y": d["y"][:-5]}


def _label_out_of_range() -> dict[str, np.ndarray]:
    d = _heldout()
    d["y"] = d["y"].copy()
    d["y"][7] = 10
    return d


def _non_finite() -> dict[str, np.ndarray]:
    d = _heldout()
    d["X"] = d["X"].copy()
    d["X"][3, 2] = np.nan
    return d


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_missing_y, "missing array y"),
        (_wrong_shape, "X has shape [719, 60]"),
        (_short_y, "y has shape [714], expected [719]"),
        (_label_out_of_range, "y has labels out of range (10; the model has 10 classes"),
        (_non_finite, "X holds a non-finite value at index [3, 2]"),
    ],
)
def test_bad_data_file_is_one_error_line_and_no_change(
    tmp_path: Path, make: Any, problem: str
) -> None:
    repo = copy_repo(EDGE_REPOSITORY, tmp_path / "edge")
    config = repo / "digits" / "config.toml"
    before = config.read_bytes()
    bad = tmp_path / "bad.npz"
    np.savez(bad, **make())
    proc = calibrate("--model-repository", repo, "--data", bad)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0]
    assert problem in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert config.read_bytes() == before
    assert not config.with_name("config.toml.bak").exists()


def test_file_that_is_not_npz(tmp_path: Path) -> None:
    repo = copy_repo(EDGE_REPOSITORY, tmp_path / "edge")
    bad = tmp_path / "data.npz"
    bad.write_text("X,y\n1,2\n")
    proc = calibrate("--model-repository", repo, "--data", bad)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"edge-agent calibrate: {bad}: not an .npz file (numpy.savez writes one)"
    )


# --- a second classifier, built here --------------------------------------------------------------


def _logits_model(weights: np.ndarray, bias: np.ndarray, path: Path) -> None:
    """An ONNX graph answering logits X @ W + b: the output kind the demo models don't use."""
    from onnx import TensorProto, helper, numpy_helper, save_model

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["z"]),
            helper.make_node("Add", ["z", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, weights.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, weights.shape[1]])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    save_model(model, str(path))


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wine (3 classes): a weak edge model answering logits, a strong cloud model from skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tmp = tmp_path_factory.mktemp("wine")
    x, y = load_wine(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    rng = np.random.default_rng(1)
    train = rng.permutation(len(y))[:60]
    held = np.setdiff1d(np.arange(len(y)), train)
    # The edge sees two features only; zero weights on the rest keep the same input.
    weak = LogisticRegression(max_iter=1000).fit(x[train][:, :2], y[train])
    w = np.zeros((x.shape[1], 3))
    w[:2] = weak.coef_.T
    _logits_model(w, weak.intercept_, tmp / "edge" / "wine" / "1" / "model.onnx")
    (tmp / "edge" / "wine" / "config.toml").write_text(
        'labels = ["class_0", "class_1", "class_2"]\noutput_kind = "logits"\n'
        'cloud_model = "wine-large"\n'
    )
    strong = LogisticRegression(max_iter=1000).fit(x[train], y[train])
    cloud = tmp / "cloud" / "wine-large" / "1" / "model.onnx"
    cloud.parent.mkdir(parents=True)
    cloud.write_bytes(
        to_onnx(strong, x[:1], options={"zipmap": False}, target_opset=17).SerializeToString()
    )
    np.savez(tmp / "wine.npz", X=x[held], y=y[held])
    return {"repo": tmp / "edge", "cloud": cloud, "data": tmp / "wine.npz", "tmp": tmp}


def test_second_classifier_end_to_end(wine: dict[str, Path]) -> None:
    report_dir = wine["tmp"] / "report"
    proc = calibrate(
        "--model-repository",
        wine["repo"],
        "--model",
        "wine",
        "--data",
        wine["data"],
        "--cloud-model",
        wine["cloud"],
        "--target-escalation",
        "0.3",
        "--report",
        report_dir,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["classes"] == 3
    assert report["calibration_items"] + report["test_items"] == 118
    test = report["test"]
    assert test["accuracy"]["cloud"] > test["accuracy"]["edge"]
    assert test["accuracy"]["hybrid"] > test["accuracy"]["edge"]
    assert 0.15 <= test["escalation_rate"] <= 0.45
    assert test["pgr"] is not None
    config = load_model_config("wine", wine["repo"] / "wine" / "config.toml")
    assert config.output_kind.value == "logits"  # kept
    assert config.temperature == report["chosen"]["temperature"]
    assert config.threshold == report["chosen"]["threshold"] > 0
    assert (report_dir / "pgr.png").read_bytes().startswith(PNG_MAGIC)


def test_second_classifier_needs_a_cloud_source(wine: dict[str, Path]) -> None:
    proc = calibrate("--model-repository", wine["repo"], "--model", "wine", "--data", wine["data"])
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "has no cloud_pred array: give --cloud-model PATH.onnx or --cloud-url URL"
    )


def test_binary_classifier_with_cloud_answers_in_the_file(tmp_path: Path) -> None:
    """Breast cancer (2 classes), probabilities from skl2onnx, cloud answers as cloud_pred."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x).astype(np.float32)
    edge = LogisticRegression(C=0.01, max_iter=1000).fit(x[:200, :3], y[:200])
    # An edge model that reads 3 of the 30 features, as a real small model might.
    x3 = x[:, :3]
    model_path = tmp_path / "repo" / "tumour" / "1" / "model.onnx"
    model_path.parent.mkdir(parents=True)
    model_path.write_bytes(
        to_onnx(edge, x3[:1], options={"zipmap": False}, target_opset=17).SerializeToString()
    )
    rng = np.random.default_rng(0)
    cloud_pred = np.where(rng.random(len(y)) < 0.97, y, 1 - y)  # a cloud right 97% of the time
    np.savez(tmp_path / "data.npz", X=x3[200:], y=y[200:], cloud_pred=cloud_pred[200:])
    proc = calibrate(
        "--model-repository",
        tmp_path / "repo",
        "--model",
        "tumour",
        "--data",
        tmp_path / "data.npz",
        "--target-accuracy",
        "0.95",
        "--seed",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    assert "cloud_pred in data.npz" in proc.stdout
    config = tmp_path / "repo" / "tumour" / "config.toml"
    assert load_model_config("tumour", config).threshold > 0
    # There was no config before: written from defaults, nothing to back up.
    assert not config.with_name("config.toml.bak").exists()


# --- cloud answers from a live v2 server --------------------------------------------------------


@pytest.fixture
def v2_server() -> Iterator[dict[str, Any]]:
    """A minimal v2 REST server on an ephemeral port running the real cloud model."""
    session = ort.InferenceSession(
        str(CLOUD_REPOSITORY / "digits-large" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    seen: dict[str, Any] = {"paths": set(), "keys": set(), "calls": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["paths"].add(self.path)
            seen["keys"].add(self.headers.get("Authorization"))
            seen["calls"] += 1
            if self.headers.get("Authorization") != "Bearer s3cret":
                return self._reply(401, {"error": "unknown device key"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            inputs = decode_infer_request(body).inputs
            label, probs = session.run(None, {"X": inputs["X"]})
            self._reply(
                200, encode_infer_response("digits-large", {"label": label, "probabilities": probs})
            )

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            send_json(self, status, body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "seen": seen}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cloud_answers_from_a_v2_server(
    tmp_path: Path, v2_server: dict[str, Any], demo_run: dict[str, Any]
) -> None:
    repo = copy_repo(EDGE_REPOSITORY, tmp_path / "edge")
    key = tmp_path / "device.key"
    key.write_text("s3cret\n")
    proc = calibrate(
        "--model-repository",
        repo,
        "--cloud-url",
        v2_server["url"],
        "--device-key-file",
        key,
        "--report",
        tmp_path / "report",
        "--dry-run",
    )
    assert proc.returncode == 0, proc.stderr
    seen = v2_server["seen"]
    assert seen["paths"] == {"/v2/models/digits-large/infer"}
    assert seen["keys"] == {"Bearer s3cret"}
    assert seen["calls"] == 3  # 719 items in batches of 256
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    # The same cloud model over the wire: the same figures as the bundled run.
    assert report["test"] == demo_run["report"]["test"]


def test_cloud_server_refusing_the_key_fails_cleanly(
    tmp_path: Path, v2_server: dict[str, Any]
) -> None:
    repo = copy_repo(EDGE_REPOSITORY, tmp_path / "edge")
    key = tmp_path / "device.key"
    key.write_text("wrong")
    proc = calibrate(
        "--model-repository", repo, "--cloud-url", v2_server["url"], "--device-key-file", key
    )
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert "HTTP 401" in proc.stderr
    assert not (repo / "digits" / "config.toml.bak").exists()
