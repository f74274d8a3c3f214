"""What the command lines of both daemons share: the top command and its entry point, exit codes,
usage errors, the start-up error, and the listing of every setting that `config show --all` prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
import typer.main
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from model_runtime.fault_points import FaultPlan, FaultSpecError
from model_runtime.private_files import restrict_umask

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "AllSettingsOption",
    "MetricsInsecureOption",
    "MetricsTlsCertFileOption",
    "MetricsTlsKeyFileOption",
    "MetricsTokenFileOption",
    "StartupError",
    "command_flags",
    "daemon_app",
    "exit_usage",
    "fault_plan",
    "format_settings",
    "run_command_line",
    "run_daemon",
    "setting_rows",
]

EXIT_FAILURE = 1
"""Something failed while running: the cloud or a peer could not be reached, nothing to do."""
EXIT_USAGE = 2
"""A usage or configuration error: a restart with the same command line would fail again."""

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 failed while running (a peer could not be reached, nothing to do); "
    "2 usage or configuration error (a bad flag, setting, file or path, a model repository "
    "that does not load, a port in use): a restart will not help."
)


AllSettingsOption = Annotated[
    bool,
    typer.Option("--all", help="Every setting with its default, environment variable and meaning."),
]
"""The `--all` of `config show`."""

MetricsTokenFileOption = Annotated[
    Path | None,
    typer.Option(help="File of the bearer token every /metrics request must carry."),
]
"""`serve --metrics-token-file` of both daemons (model_runtime.metrics_endpoint)."""

MetricsInsecureOption = Annotated[
    bool | None,
    typer.Option(
        "--metrics-insecure",
        help="Serve /metrics beyond loopback without a token: anyone who reaches the port "
        "may read it.",
    ),
]
"""`serve --metrics-insecure` of both daemons."""

MetricsTlsCertFileOption = Annotated[
    Path | None,
    typer.Option(help="PEM certificate of /metrics: it then speaks HTTPS only."),
]
"""`serve --metrics-tls-cert-file` of both daemons."""

MetricsTlsKeyFileOption = Annotated[
    Path | None, typer.Option(help="PEM key of --metrics-tls-cert-file.")
]
"""`serve --metrics-tls-key-file` of both daemons."""


def daemon_app(help: str) -> typer.Typer:
    """The top command of a daemon: its help ends with the exit codes, in plain text, and a
    usage error is one line (see run_command_line)."""
    return typer.Typer(
        no_args_is_help=True,
        add_completion=False,
        help=help,
        epilog=EXIT_CODES_HELP,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain help, and click's one-line usage errors
    )


def exit_usage(program: str, problems: Sequence[str]) -> NoReturn:
    """Each problem on a line of its own (`program: problem`), then exit code EXIT_USAGE."""
    for problem in problems:
        typer.echo(f"{program}: {problem}", err=True)
    raise typer.Exit(EXIT_USAGE)


def fault_plan(program: str, variable: str, points: Mapping[str, bool]) -> FaultPlan | None:
    """The faults the environment variable `variable` asks for (tests only, RELIABILITY.md:
    crash or fail a write at the k-th hit of a named point); a bad one is a usage error."""
    try:
        return FaultPlan.from_environ(os.environ, variable, points)
    except FaultSpecError as exc:
        exit_usage(program, [str(exc)])


class StartupError(Exception):
    """Start-up cannot go on (the settings or the machine do not allow it); the message is the
    one line the operator sees, and the exit code is EXIT_USAGE."""


def command_flags(
    app: typer.Typer, command: str, settings_cls: type[BaseSettings]
) -> dict[str, str]:
    """Setting -> the flag of `command` that sets it (the others: --config file or environment)."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return {
        p.name: p.opts[0]
        for p in group.commands[command].params
        if p.name in settings_cls.model_fields
    }


def setting_rows(cls: type[BaseSettings], flags_of: Mapping[str, str]) -> list[dict[str, str]]:
    """One row per field of `cls`: key, default, environment variable, flag (if any), meaning.

    Built from the settings model itself, so every setting appears, with no list to keep up.
    """
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows = []
    for key, field in cls.model_fields.items():
        rows.append(
            {
                "key": key,
                "default": _default_text(field.default, field.default_factory is not None),
                "env": f"{prefix}{key.upper()}",
                "flag": flags_of.get(key, ""),
                "meaning": " ".join((field.description or "").split()),
            }
        )
    return rows


def _default_text(default: Any, computed: bool) -> str:
    if computed:
        return "(computed at start-up)"
    if default is PydanticUndefined or default is None:
        return "(unset)"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return json.dumps(default)
    return str(default)


def format_settings(program: str, rows: list[dict[str, str]]) -> str:
    """The listing of `config show --all`: each setting with its default, then where it can
    be given and what it means, indented."""
    lines = [
        f"# Every setting of {program}: in the --config TOML file as `key = value`, in the "
        "environment, or as a flag where it has one; flags win over the environment, which wins "
        "over the file.",
        "",
    ]
    for row in rows:
        lines.append(f"{row['key']} = {row['default']}")
        where = row["env"] + (f", {row['flag']}" if row["flag"] else "")
        lines.append(f"    {where}")
        if row["meaning"]:
            lines.append(f"    {row['meaning']}")
    return "\n".join(lines) + "\n"


# Typer raises click's exceptions, from the click it vendors (newer typer) or from click itself.
_CLICK_ERRORS: Any = sys.modules[typer.BadParameter.__module__]


def run_command_line(app: typer.Typer, program: str, args: list[str] | None = None) -> int:
    """Run `app`; a usage error is one line in the project's words (and a pointer to --help),
    with exit code 2. Returns the exit code."""
    try:
        result = typer.main.get_command(app).main(
            args=args, prog_name=program, standalone_mode=False
        )
    except typer.Abort:
        typer.echo("", err=True)
        return EXIT_FAILURE
    except _CLICK_ERRORS.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # no subcommand given: the help
            exc.show()
            return EXIT_USAGE
        name = exc.ctx.command_path if exc.ctx is not None else program
        typer.echo(f"{program}: {_usage_words(exc)} (see `{name} --help`)", err=True)
        return EXIT_USAGE
    except _CLICK_ERRORS.ClickException as exc:
        typer.echo(f"{program}: {exc.format_message()}", err=True)
        return int(exc.exit_code)
    return result if isinstance(result, int) else 0


_VALUE_WORDS = (
    ("valid integer", "must be a whole number"),
    ("valid number", "must be a number"),
    ("valid boolean", "must be true or false"),
)


def _usage_words(exc: Any) -> str:
    if isinstance(exc, typer.BadParameter) and exc.param is not None:
        opts = getattr(exc.param, "opts", None) or [exc.param.name]
        message = str(exc.message)
        for theirs, ours in _VALUE_WORDS:
            if theirs in message:
                return f"{opts[0]}: {ours}"
        return f"{opts[0]}: {message}"
    return str(exc.format_message())


def run_daemon(app: typer.Typer, program: str) -> NoReturn:
    """A daemon's console script: every file and directory it makes is its own (0600 / 0700),
    then `app` runs and its exit code ends the process."""
    restrict_umask()
    raise SystemExit(run_command_line(app, program))
