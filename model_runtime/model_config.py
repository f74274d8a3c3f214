"""The per-model config file, `<repository>/<model>/config.toml`: what the ONNX graph can't say.

Input and output names, datatypes and shapes come from the graph itself; this file says how to
read the answer (labels, which output, probabilities or logits) and when to escalate it.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_runtime.confidence import ConfidenceMethod, OutputKind
from model_runtime.errors import ModelLoadError
from model_runtime.layered_settings import problem_words
from model_runtime.private_files import write_private_bytes

__all__ = [
    "CONFIG_FILE",
    "BatchingConfig",
    "ModelConfig",
    "describe_validation_error",
    "load_model_config",
    "write_model_config",
]

CONFIG_FILE = "config.toml"


class BatchingConfig(BaseModel):
    """Dynamic batching, as Triton's dynamic batcher: concurrent requests for the model are run
    as one onnxruntime batch. Off unless the model's config has a [batching] table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(ge=2, le=1024)
    """Most items (rows) in one run; a request of this many items or more runs alone."""
    max_queue_delay_us: int = Field(ge=0, le=1_000_000)
    """Longest a request waits for others to join its batch, in microseconds; a request with a
    deadline waits at most half the time it had left when it arrived."""


class ModelConfig(BaseModel):
    """Settings of one classifier in the model repository."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str] = Field(default_factory=list)
    """Class names in output order; empty means the class index is the label."""
    output: str | None = None
    """Name of the output holding probabilities or logits; default: the only float output of
    shape (N, K)."""
    output_kind: OutputKind = OutputKind.PROBABILITIES
    confidence_method: ConfidenceMethod = ConfidenceMethod.MAX_PROBABILITY
    temperature: float = Field(default=1.0, gt=0.0)
    """Divides the logits before the softmax; fitted by `edge-agent calibrate`."""
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    """Items whose confidence is below this are escalated; 0 never escalates."""
    cloud_model: str | None = None
    """Name of the model in the cloud that unsure items escalate to."""
    batching: BatchingConfig | None = None
    """Dynamic batching ([batching] table); None: every request runs alone."""


def describe_validation_error(exc: ValidationError, whole: str = "config") -> str:
    """One line naming each offending key and its problem: `threshold: must be at most 1`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or whole}: {problem_words(err)}"
        for err in exc.errors()
    )


def load_model_config(model: str, path: Path) -> ModelConfig:
    """Read and validate a config file; a missing file means all defaults."""
    if not path.exists():
        return ModelConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(model, f"{path.name} is not valid TOML: {exc}") from None
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(model, f"{path.name}: {describe_validation_error(exc)}") from None


def write_model_config(path: Path, config: ModelConfig) -> Path | None:
    """Replace the config atomically, keeping the previous file as `<name>.bak`.

    Returns the backup's path, or None when there was no previous file. The new file is
    written beside the old one, fsynced, then renamed over it, so a reader or a power cut
    sees either the old config or the new one, never half of one.
    """
    body = tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
    backup: Path | None = None
    if path.exists():
        backup = path.with_suffix(path.suffix + ".bak")
        write_private_bytes(backup, path.read_bytes())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return backup
