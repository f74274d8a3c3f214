"""`edge-agent export-hard-examples`: the kept hard examples of one model, written atomically to an
.npz file, to distil a smaller model from the cloud's answers (router.hard_examples keeps them).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import typer

from edge_agent.settings import SettingsError, load_settings
from model_runtime.encryption import DataKeyError, Keyring
from router.config import HARD_EXAMPLES_FILE
from router.hard_examples import HardExamples, HardExamplesError, NoHardExamples, load_hard_examples

__all__ = ["export_hard_examples_command", "hard_example_arrays", "write_npz"]


def hard_example_arrays(examples: HardExamples) -> dict[str, npt.NDArray[np.generic]]:
    """The arrays of the file: `X` (or `X_<input>` each, for a model of several inputs),
    `cloud_pred`, `cloud_scores` when the cloud gave class scores, `created_at` (Unix time),
    `source` (live or queued), and `model`, `cloud_model` as 0-d text."""
    inputs = examples.inputs
    if len(inputs) == 1:
        arrays = {"X": next(iter(inputs.values()))}
    else:
        arrays = {f"X_{name}": a for name, a in inputs.items()}
    arrays["cloud_pred"] = examples.cloud_pred
    if examples.cloud_scores is not None:
        arrays["cloud_scores"] = examples.cloud_scores
    arrays["created_at"] = examples.created_at
    arrays["source"] = examples.source
    arrays["model"] = np.asarray(examples.model, dtype=np.str_)
    arrays["cloud_model"] = np.asarray(examples.cloud_model, dtype=np.str_)
    return arrays


def write_npz(path: Path, arrays: dict[str, npt.NDArray[np.generic]]) -> None:
    """Write `arrays` to `path` atomically: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def export_hard_examples_command(
    out: Annotated[Path, typer.Option(help="The .npz file to write (replaced atomically).")],
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="The agent's state directory, where hard_examples.sqlite is kept "
            "[default: the agent's, from --config and EDGE_AGENT_*]."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="The agent's settings file: its state_dir and encryption keys."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="The edge model whose examples to export (needed if several have some)."),
    ] = None,
) -> None:
    """Write the kept hard examples (escalated inputs with the cloud's answers) to an .npz file.

    For distilling a smaller model from the cloud's answers: `cloud_pred` is the cloud's class,
    not a true label, so the file is no input for `edge-agent calibrate` until a `y` is added.
    Exit code 1 when there is nothing to export, 2 when the file cannot be read or written.
    """
    try:
        settings = load_settings(config)
        keyring, _ = Keyring.load(settings.encryption_key_file, settings.encryption_old_key_files)
    except (SettingsError, DataKeyError) as exc:
        typer.echo(f"edge-agent export-hard-examples: {exc}", err=True)
        raise typer.Exit(2) from None
    directory = state_dir if state_dir is not None else settings.state_dir
    try:
        examples = load_hard_examples(directory / HARD_EXAMPLES_FILE, model, keyring)
        arrays = hard_example_arrays(examples)
        write_npz(out, arrays)
    except NoHardExamples as exc:
        typer.echo(f"edge-agent export-hard-examples: {exc}", err=True)
        raise typer.Exit(1) from None
    except HardExamplesError as exc:
        typer.echo(f"edge-agent export-hard-examples: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"edge-agent export-hard-examples: {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    shapes = ", ".join(
        f"{name} {list(a.shape)} {a.dtype}" for name, a in arrays.items() if name.startswith("X")
    )
    typer.echo(
        f"wrote {len(examples.cloud_pred)} hard examples of {examples.model} "
        f"(answered by {examples.cloud_model}) to {out}: {shapes}"
    )
