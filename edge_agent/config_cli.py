"""`edge-agent config check FILE`: validate a settings file as `serve` would, before a restart.

Prints the settings in force (FILE < EDGE_AGENT_* environment) as TOML, never a key's content,
or one line per problem naming its key, with exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import tomli_w
import typer

from edge_agent.settings import AgentSettings, SettingsError, load_settings
from model_runtime import ModelLoadError, ModelRepository
from model_runtime.logs import redact
from model_runtime.private_files import SecretFileError, read_secret_text

__all__ = ["config_app"]

config_app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Settings: check a config file."
)


@config_app.command("check")
def check(
    file: Annotated[
        Path, typer.Argument(help="TOML file of settings, as given to serve --config.")
    ],
    models: Annotated[
        bool, typer.Option(help="Also load the model repository and its model configs.")
    ] = True,
) -> None:
    """Validate FILE (with EDGE_AGENT_* from the environment); print the settings in force."""
    try:
        settings = load_settings(config_file=file)
    except SettingsError as exc:
        _fail(file, [_where(line, file) for line in exc.problems])
    problems = _check_paths(settings)
    if models and not problems:
        problems += _check_models(settings)
    if problems:
        _fail(file, problems)
    typer.echo(f"# edge-agent settings in force with {file} and the environment")
    typer.echo(tomli_w.dumps(printable(settings)), nl=False)


def printable(settings: AgentSettings) -> dict[str, Any]:
    """The settings as TOML-ready values; a password in the cloud URL is masked."""
    values = settings.model_dump(mode="json", exclude_none=True)
    if "cloud_url" in values:
        values["cloud_url"] = redact(values["cloud_url"])
    return values


def _where(problem: str, file: Path) -> str:
    key, sep, what = problem.partition(": ")
    if not sep or not key.isidentifier():  # a problem of the file itself (missing, not TOML)
        return problem
    if what == "unknown setting":
        return f"{key}: unknown setting in {file} (`edge-agent serve --help` lists them)"
    return f"{problem} (set as '{key}' in {file} or EDGE_AGENT_{key.upper()})"


def _check_paths(settings: AgentSettings) -> list[str]:
    """What start-up would trip on in the file system, each naming its key."""
    problems = []
    if not settings.model_repository.is_dir():
        problems.append(f"model_repository: {settings.model_repository} is not a directory")
    key_file = settings.device_key_file
    if key_file is not None:
        try:
            # Read to see that it can be, and is not empty; the key itself is never shown.
            if not read_secret_text(key_file, "device key file")[0]:
                problems.append(f"device_key_file: {key_file} is empty")
        except SecretFileError as exc:
            problems.append(f"device_key_file: {exc}")
    state = settings.state_dir
    existing = next((p for p in (state, *state.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        problems.append(f"state_dir: {existing} is not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"state_dir: {existing} is not writable by this user")
    return problems


def _check_models(settings: AgentSettings) -> list[str]:
    try:
        ModelRepository.load(settings.model_repository, threads=1)
    except ModelLoadError as exc:
        return [f"model_repository: {exc}"]
    return []


def _fail(file: Path, problems: list[str]) -> NoReturn:
    for problem in problems:
        typer.echo(f"edge-agent: {file}: {problem}", err=True)
    raise typer.Exit(2)
