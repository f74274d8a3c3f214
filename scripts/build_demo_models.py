"""Rebuild the bundled demo models in model_runtime/demo/ from scikit-learn's digits set.

Run `pip install -e '.[models]' && python scripts/build_demo_models.py`. Seeds are fixed, so
a rebuild with the same library versions reproduces the same models and the same card.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import skl2onnx
import sklearn
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from model_runtime.model_config import ModelConfig, write_model_config

DEMO = Path(__file__).resolve().parent.parent / "model_runtime" / "demo"
SEED = 0
HELDOUT_SHARE = 0.4
EDGE_NAME, CLOUD_NAME = "digits", "digits-large"
# The edge threshold before calibration: escalate roughly the least sure fifth of the
# training items. `edge-agent calibrate` replaces it with a fitted one.
EDGE_ESCALATION_SHARE = 0.2


def _export(model: object, X: np.ndarray, path: Path) -> None:
    onx = to_onnx(
        model,
        X[:1],
        options={"zipmap": False},  # probabilities as a plain (N, K) tensor, not a list of maps
        target_opset={"": 17, "ai.onnx.ml": 3},
        initial_types=None,
    )
    # A stable graph name and no producer version keep rebuilds byte-identical.
    onx.graph.name = path.parent.parent.name
    onx.producer_version = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def _accuracy(path: Path, X: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {session.get_inputs()[0].name: X})[0]
    return float((labels == y).mean())


def main() -> None:
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=HELDOUT_SHARE, random_state=SEED, stratify=y
    )

    edge = make_pipeline(PCA(10, random_state=SEED), LogisticRegression(max_iter=2000))
    cloud = MLPClassifier((256, 128), max_iter=800, random_state=SEED)
    edge.fit(X_train, y_train)
    cloud.fit(X_train, y_train)

    labels = [str(c) for c in range(10)]
    edge_path = DEMO / "edge" / EDGE_NAME / "1" / "model.onnx"
    cloud_path = DEMO / "cloud" / CLOUD_NAME / "1" / "model.onnx"
    _export(edge, X_train, edge_path)
    _export(cloud, X_train, cloud_path)

    train_conf = edge.predict_proba(X_train).max(axis=1)
    threshold = round(float(np.quantile(train_conf, EDGE_ESCALATION_SHARE)), 4)
    write_model_config(
        edge_path.parent.parent / "config.toml",
        ModelConfig(
            labels=labels, output="probabilities", threshold=threshold, cloud_model=CLOUD_NAME
        ),
    )
    write_model_config(
        cloud_path.parent.parent / "config.toml",
        ModelConfig(labels=labels, output="probabilities"),
    )
    for backup in DEMO.rglob("*.bak"):
        backup.unlink()

    np.savez_compressed(DEMO / "heldout.npz", X=X_test, y=y_test)
    edge_acc = _accuracy(edge_path, X_test, y_test)
    cloud_acc = _accuracy(cloud_path, X_test, y_test)
    card = f"""# Demo models

Two classifiers of handwritten digits for trying the system with nothing to download. Rebuilt
by `python scripts/build_demo_models.py` (needs the `models` extra); seeds are fixed.

| | edge: `{EDGE_NAME}` | cloud: `{CLOUD_NAME}` |
| --- | --- | --- |
| model | PCA to 10 components + logistic regression | MLP, hidden layers 256 and 128 |
| file | `edge/{EDGE_NAME}/1/model.onnx` ({edge_path.stat().st_size:,} bytes) | `cloud/{CLOUD_NAME}/1/model.onnx` ({cloud_path.stat().st_size:,} bytes) |
| accuracy on the held-out split | **{edge_acc:.4f}** | **{cloud_acc:.4f}** |

- **Data**: scikit-learn's `load_digits` ({len(X)} images of 8x8 pixels, 10 classes; the UCI
  optical recognition of handwritten digits set), pixels scaled to 0..1 as FP32.
- **Split**: stratified, seed {SEED}: {len(X_train)} training images, {len(X_test)} held out.
  The held-out split is `heldout.npz` (`X`: FP32 [{len(X_test)}, 64], `y`: INT64 [{len(X_test)}]),
  used by the tests, the benchmarks and `edge-agent calibrate`; no model saw it in training.
- **Inputs and outputs** (both models): input `X` FP32 [-1, 64]; outputs `label` INT64 [-1] and
  `probabilities` FP32 [-1, 10].
- **Escalation**: the edge model's threshold ({threshold}) is the {EDGE_ESCALATION_SHARE:.0%}
  quantile of its max-probability on the training split, a starting point until
  `edge-agent calibrate` fits one.
- **Intended use**: demonstrations and tests of the router, not digit recognition in earnest.
- Built with scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__},
  onnxruntime {ort.__version__}, Python {platform.python_version()}.
"""
    (DEMO / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    print(f"edge {edge_acc:.4f}  cloud {cloud_acc:.4f}  threshold {threshold}")


if __name__ == "__main__":
    # One BLAS thread: multi-threaded sums round differently from run to run, and the MLP's
    # weights (so its ONNX bytes) would differ between rebuilds.
    with threadpool_limits(1):
        main()
