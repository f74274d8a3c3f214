"""The model repository: `<repo>/<model>/<version>/model.onnx` plus `<repo>/<model>/config.toml`.

Loaded whole at start-up; a broken entry stops the load with a ModelLoadError naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from model_runtime.errors import InvalidInput, ModelLoadError, ModelNotFound
from model_runtime.model_config import CONFIG_FILE, load_model_config
from model_runtime.onnx_model import OnnxModel

__all__ = ["MODEL_FILE", "ModelRepository", "parse_version"]

MODEL_FILE = "model.onnx"
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def parse_version(version: str) -> int | None:
    """A requested model version as a number; None for "" (the newest).

    Only canonical decimal numerals: `int()` would also read "01", " +1" and an Arabic-Indic one as 1, so one
    version would answer to many names (and an Idempotency-Key's fingerprint differ for them).
    """
    if not version:
        return None
    if not _VERSION.fullmatch(version):
        raise InvalidInput(
            "version", f"{version!r} is not a version: use a positive number without leading zeros"
        )
    return int(version)


class ModelRepository:
    """Every version of every model in a directory, loaded and warmed."""

    def __init__(self, root: Path, models: dict[str, dict[int, OnnxModel]]) -> None:
        self.root = root
        self._models = models

    @classmethod
    def load(cls, root: Path, *, threads: int = 1, inline_budget_s: float = 0.0) -> ModelRepository:
        if not root.is_dir():
            raise ModelLoadError("*", f"model repository {root} is not a directory")
        models: dict[str, dict[int, OnnxModel]] = {}
        for model_dir in sorted(
            p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            models[model_dir.name] = _load_versions(model_dir, threads, inline_budget_s)
        if not models:
            raise ModelLoadError("*", f"model repository {root} holds no model directories")
        return cls(root, models)

    def get(self, name: str, version: str = "") -> OnnxModel:
        """The named version, or the newest one when version is empty."""
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(name)
        number = parse_version(version)
        if number is None:
            return versions[max(versions)]
        try:
            return versions[number]
        except KeyError:
            raise ModelNotFound(name, version) from None

    def versions(self, name: str) -> list[int]:
        if name not in self._models:
            raise ModelNotFound(name)
        return sorted(self._models[name])

    def __iter__(self) -> Iterator[OnnxModel]:
        for versions in self._models.values():
            yield from versions.values()

    def names(self) -> list[str]:
        return list(self._models)

    def reload_configs(self) -> list[str]:
        """Re-read every model's config.toml and put it in force; returns the models changed.

        All configs are read and checked before any is applied, so one bad file changes
        nothing (ModelLoadError names it).
        """
        staged = []
        for name, versions in self._models.items():
            config = load_model_config(name, self.root / name / CONFIG_FILE)
            for model in versions.values():
                if model.config != config:
                    model.check_config(config)  # raises before anything changes
                    staged.append((model, config))
        for model, config in staged:
            model.reconfigure(config)
        return sorted({model.name for model, _ in staged})


def _load_versions(model_dir: Path, threads: int, inline_budget_s: float) -> dict[int, OnnxModel]:
    name = model_dir.name
    config = load_model_config(name, model_dir / CONFIG_FILE)
    versions: dict[int, OnnxModel] = {}
    for entry in sorted(
        p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        if not (entry.name.isascii() and entry.name.isdigit()) or int(entry.name) < 1:
            raise ModelLoadError(
                name, f"version directory '{entry.name}' is not a positive integer"
            )
        onnx_file = entry / MODEL_FILE
        if not onnx_file.is_file():
            raise ModelLoadError(name, f"version {entry.name} has no {MODEL_FILE}")
        model = OnnxModel(name, int(entry.name), onnx_file, config, threads, inline_budget_s)
        model.warm_up()
        versions[model.version] = model
    if not versions:
        raise ModelLoadError(name, f"no version directories (expected {name}/1/{MODEL_FILE})")
    return versions
