"""`edge-agent config check` and `config show`: validate the settings as `serve` would, before a
restart, and list every setting there is.

`check` prints the settings in force (the --config file < EDGE_AGENT_* environment) as TOML,
never a key's content, or one line per problem naming its key, with exit code 2.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import tomli_w
import typer

from edge_agent.credentials import CredentialsError, DeviceKeyFileError, read_device_key
from edge_agent.settings import (
    AgentSettings,
    SettingsError,
    load_settings,
    settings_warnings,
)
from model_runtime import ModelLoadError, ModelRepository
from model_runtime.command_line import (
    EXIT_CODES_HELP,
    EXIT_FAILURE,
    EXIT_USAGE,
    AllSettingsOption,
    command_flags,
    format_settings,
    setting_rows,
)
from model_runtime.logs import redact
from model_runtime.metrics_endpoint import metrics_tls_context, read_metrics_token
from model_runtime.private_files import SecretFileError

__all__ = ["config_app", "printable"]

config_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Settings: check them before a restart, list every setting.",
    rich_markup_mode=None,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file of settings, as given to serve --config."),
]


@config_app.command("check", epilog=EXIT_CODES_HELP)
def check(
    config: ConfigOpt = None,
    models: Annotated[
        bool, typer.Option(help="Also load the model repository and its model configs.")
    ] = True,
    probe_cloud: Annotated[
        bool,
        typer.Option(
            help="Also test the link to cloud_url: resolve, connect, authenticate; "
            "one line per step (exit code 1 when a step fails)."
        ),
    ] = False,
) -> None:
    """Validate the settings as serve would (--config file < EDGE_AGENT_* environment) and
    what start-up would trip on; print the settings in force as TOML."""
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        _fail(exc.problems)
    problems = _check_paths(settings)
    if models and not problems:
        problems += _check_models(settings)
    if problems:
        _fail(problems)
    for warning in settings_warnings(settings):
        typer.echo(f"edge-agent: warning: {warning}", err=True)
    source = f"{config} and the environment" if config is not None else "the environment"
    typer.echo(f"# edge-agent settings in force with {source}")
    typer.echo(tomli_w.dumps(printable(settings)), nl=False)
    if probe_cloud and not _probe_cloud(settings):
        raise typer.Exit(EXIT_FAILURE)


@config_app.command("show", epilog=EXIT_CODES_HELP)
def show(config: ConfigOpt = None, all_settings: AllSettingsOption = False) -> None:
    """Print the settings in force as TOML, or with --all every setting there is."""
    if all_settings:
        from edge_agent.cli import app  # the command this one belongs to

        rows = setting_rows(AgentSettings, command_flags(app, "serve", AgentSettings))
        typer.echo(format_settings("edge-agent", rows), nl=False)
        return
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        _fail(exc.problems)
    typer.echo(tomli_w.dumps(printable(settings)), nl=False)


def printable(settings: AgentSettings) -> dict[str, Any]:
    """The settings as TOML-ready values; a password in the cloud URL is masked."""
    values = settings.model_dump(mode="json", exclude_none=True)
    if "cloud_url" in values:
        values["cloud_url"] = redact(values["cloud_url"])
    return values


def _check_paths(settings: AgentSettings) -> list[str]:
    """What start-up would trip on in the file system, each naming its key."""
    problems = []
    if not settings.model_repository.is_dir():
        problems.append(f"model_repository: {settings.model_repository} is not a directory")
    key_file = settings.device_key_file
    if key_file is not None:
        try:
            # Read to see that it can be, and holds one clean line; the key is never shown.
            read_device_key(key_file)
        except DeviceKeyFileError as exc:
            problems.append(f"device_key_file: {key_file} {exc.problem}")
        except CredentialsError as exc:
            problems.append(f"device_key_file: {exc}")
    if settings.metrics_token_file is not None:
        try:
            read_metrics_token(settings.metrics_token_file)
        except SecretFileError as exc:
            problems.append(f"metrics_token_file: {exc}")
    cert, key = settings.metrics_tls_cert_file, settings.metrics_tls_key_file
    if cert is not None and key is not None:
        try:
            metrics_tls_context(cert, key)
        except SecretFileError as exc:
            problems.append(f"metrics_tls_key_file: {exc}")
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


def _probe_cloud(settings: AgentSettings) -> bool:
    """One line per step of reaching the cloud; True when every step passed."""
    from router.link_check import check_link

    if settings.cloud_url is None:
        typer.echo("edge-agent: --probe-cloud: no cloud_url is set; nothing to probe", err=True)
        return False
    key = None
    if settings.device_key_file is not None:
        key = read_device_key(settings.device_key_file)[0]
    steps = asyncio.run(
        check_link(settings.cloud_url, key, timeout_s=settings.probe_timeout_seconds)
    )
    for step in steps:
        typer.echo(f"cloud: {step.line()}", err=True)
    return all(step.ok for step in steps)


def _fail(problems: list[str]) -> NoReturn:
    for problem in problems:
        typer.echo(f"edge-agent: {problem}", err=True)
    raise typer.Exit(EXIT_USAGE)
