"""The model repository: what loads, and how each broken entry is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from model_runtime import InvalidInput, ModelLoadError, ModelNotFound, ModelRepository
from model_runtime.demo import EDGE_REPOSITORY, HELDOUT
from model_runtime.repository import parse_version


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(EDGE_REPOSITORY, root)
    return root


def test_bundled_repository_loads_with_graph_metadata() -> None:
    repository = ModelRepository.load(EDGE_REPOSITORY)
    model = repository.get("digits")
    assert model.version == 1
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("X", "FP32", (-1, 64))]
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [
        ("label", "INT64", (-1,)),
        ("probabilities", "FP32", (-1, 10)),
    ]
    assert model.config.cloud_model == "digits-large"


def test_batch_of_n_gives_n_answers_and_confidences() -> None:
    model = ModelRepository.load(EDGE_REPOSITORY).get("digits")
    X = np.load(HELDOUT)["X"][:5]
    prediction = model.predict({"X": X})
    assert prediction.outputs["label"].shape == (5,)
    assert prediction.confidence.shape == (5,)
    np.testing.assert_allclose(
        prediction.confidence, prediction.outputs["probabilities"].max(axis=1), rtol=1e-6
    )


def test_versions_and_lookup(repo: Path) -> None:
    shutil.copytree(repo / "digits" / "1", repo / "digits" / "3")
    repository = ModelRepository.load(repo)
    assert repository.versions("digits") == [1, 3]
    assert repository.get("digits").version == 3
    assert repository.get("digits", "1").version == 1
    with pytest.raises(ModelNotFound, match="model 'digits' version '2'"):
        repository.get("digits", "2")
    with pytest.raises(ModelNotFound, match="model 'other'"):
        repository.get("other")


def _break(repo: Path, how: str) -> None:
    model = repo / "digits"
    if how == "missing file":
        (model / "1" / "model.onnx").unlink()
    elif how == "invalid onnx":
        (model / "1" / "model.onnx").write_bytes(b"this is not a protobuf")
    elif how == "bad toml":
        (model / "config.toml").write_text("threshold = [", encoding="utf-8")
    elif how == "bad value":
        (model / "config.toml").write_text("threshold = 1.5\n", encoding="utf-8")
    elif how == "unknown key":
        (model / "config.toml").write_text("treshold = 0.5\n", encoding="utf-8")
    elif how == "unknown output":
        (model / "config.toml").write_text('output = "logits"\n', encoding="utf-8")
    elif how == "label count":
        (model / "config.toml").write_text('labels = ["a", "b"]\n', encoding="utf-8")
    elif how == "bad version":
        (model / "1").rename(model / "latest")
    elif how == "no versions":
        shutil.rmtree(model / "1")


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("missing file", "version 1 has no model.onnx"),
        ("invalid onnx", "model.onnx is not a loadable ONNX model"),
        ("bad toml", "config.toml is not valid TOML"),
        ("bad value", "config.toml: threshold: must be at most 1"),
        ("unknown key", "config.toml: treshold: Extra inputs are not permitted"),
        ("unknown output", "config output 'logits' is not an output of the graph"),
        ("label count", "config has 2 labels but output 'probabilities' has 10 classes"),
        ("bad version", "version directory 'latest' is not a positive integer"),
        ("no versions", "no version directories"),
    ],
)
def test_broken_entry_is_named(repo: Path, how: str, words: str) -> None:
    _break(repo, how)
    with pytest.raises(ModelLoadError) as info:
        ModelRepository.load(repo)
    assert info.value.model == "digits"
    assert str(info.value).startswith("model 'digits': ")
    assert words in str(info.value)


def test_empty_or_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds no model directories"):
        ModelRepository.load(tmp_path)
    with pytest.raises(ModelLoadError, match="is not a directory"):
        ModelRepository.load(tmp_path / "absent")


@pytest.mark.parametrize("version", ["01", " +1", "+1", "1 ", "\u0661", "1_0", "0", "-1", "1e3"])
def test_only_canonical_decimal_versions_are_read(version: str) -> None:
    # int() reads every one of these but the last four as a version (issue 12).
    with pytest.raises(InvalidInput) as err:
        parse_version(version)
    assert err.value.field == "version"
    assert parse_version("") is None
    assert parse_version("12") == 12
