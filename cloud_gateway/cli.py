"""The `cloud-gateway` command: serve the v2 REST API, manage device keys, check the settings.

Every command builds GatewaySettings once (defaults < --config TOML < CLOUD_GATEWAY_* env <
flags) and hands them down; a bad setting stops it with exit code 2, naming the key.
Exit codes, for every command: 0 done; 1 failed while running; 2 usage or configuration error.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Annotated, Any, NoReturn

import tomli_w
import typer

from cloud_gateway.errors import InvalidDeviceName
from cloud_gateway.keys import KeyStore
from cloud_gateway.server import run
from cloud_gateway.settings import (
    FAULT_POINTS,
    FAULTS_VARIABLE,
    GatewaySettings,
    SettingsError,
    load_settings,
)
from model_runtime.command_line import (
    EXIT_CODES_HELP,
    EXIT_FAILURE,
    EXIT_USAGE,
    AllSettingsOption,
    MetricsInsecureOption,
    MetricsTlsCertFileOption,
    MetricsTlsKeyFileOption,
    MetricsTokenFileOption,
    StartupError,
    command_flags,
    daemon_app,
    exit_usage,
    fault_plan,
    format_settings,
    run_daemon,
    setting_rows,
)

__all__ = ["app", "main"]

PROGRAM = "cloud-gateway"

app = daemon_app(
    "The cloud gateway: the Open Inference Protocol v2 over REST for edge devices, "
    "one model run per request."
)
keys_app = typer.Typer(
    no_args_is_help=True, help="Device keys: add, list, revoke.", rich_markup_mode=None
)
config_app = typer.Typer(
    no_args_is_help=True,
    help="Settings: check them before a restart, list every setting.",
    rich_markup_mode=None,
)
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file of settings (`config show --all` lists the keys)."),
]
StateDirOpt = Annotated[
    Path | None, typer.Option(help="Directory of the SQLite files [default: var/cloud-gateway].")
]
KeyDbOpt = Annotated[
    Path | None, typer.Option(help="Device key database [default: <state-dir>/keys.sqlite3].")
]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"{PROGRAM}: {message}", err=True)
    raise typer.Exit(code)


def _settings(
    config: Path | None, flags_of: dict[str, str] | None = None, **flags: Any
) -> GatewaySettings:
    try:
        return load_settings(config, flags, flags_of=flags_of)
    except SettingsError as exc:
        exit_usage(PROGRAM, exc.problems)


def _key_store(settings: GatewaySettings) -> KeyStore:
    try:
        return KeyStore(settings.key_db_path)
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _fail(f"cannot open the key database {settings.key_db_path}: {reason}", EXIT_USAGE)


@app.command(epilog=EXIT_CODES_HELP)
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="API address [default: 127.0.0.1].")] = None,
    port: Annotated[
        int | None, typer.Option(help="API port; 0 = any free [default: 8000].")
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(help="/metrics address [default: 127.0.0.1]; beyond it, a token or opt-out."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="/metrics port; 0 = any free [default: 9102].")
    ] = None,
    metrics_token_file: MetricsTokenFileOption = None,
    metrics_insecure: MetricsInsecureOption = None,
    metrics_tls_cert_file: MetricsTlsCertFileOption = None,
    metrics_tls_key_file: MetricsTlsKeyFileOption = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [default: 1].")] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository [default: the bundled large model].")
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="Forward inference to this v2 REST server instead.")
    ] = None,
    upstream_timeout_s: Annotated[
        float | None,
        typer.Option("--upstream-timeout", help="Seconds an upstream call may take [default: 30]."),
    ] = None,
    idempotency_store: Annotated[
        str | None, typer.Option(help="'sqlite' or a redis:// URL shared by replicas.")
    ] = None,
    state_dir: StateDirOpt = None,
    key_db: KeyDbOpt = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error or critical, in any case.")
    ] = None,
    access_log: Annotated[
        bool | None, typer.Option("--access-log/--no-access-log", help="One line per request.")
    ] = None,
    port_file: Annotated[
        Path | None,
        typer.Option(help='Once bound, write {"http": port, "metrics": port} here (atomically).'),
    ] = None,
) -> None:
    """Serve the Open Inference Protocol v2 REST API (the bundled large model by default).

    The flags below are the common settings. Every setting (rate limits, body sizes,
    idempotency retention...) can be given in the --config file or as CLOUD_GATEWAY_<KEY>:
    `cloud-gateway config show --all` lists them all, with defaults and meanings.
    """
    settings = _settings(
        config,
        serve_flags(),
        host=host,
        port=port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_token_file=metrics_token_file,
        metrics_insecure=metrics_insecure,
        metrics_tls_cert_file=metrics_tls_cert_file,
        metrics_tls_key_file=metrics_tls_key_file,
        workers=workers,
        model_repository=model_repository,
        upstream=upstream,
        upstream_timeout_s=upstream_timeout_s,
        idempotency_store=idempotency_store,
        state_dir=state_dir,
        key_db=key_db,
        log_level=log_level,
        access_log=access_log,
    )
    if port_file is not None and not port_file.parent.is_dir():
        _fail(f"port_file: its directory {port_file.parent} does not exist", EXIT_USAGE)
    faults = fault_plan(PROGRAM, FAULTS_VARIABLE, FAULT_POINTS)
    try:
        code = run(settings, port_file=port_file, faults=faults)
    except StartupError as exc:
        _fail(str(exc), EXIT_USAGE)
    raise typer.Exit(code)


@keys_app.command("add", epilog=EXIT_CODES_HELP)
def keys_add(
    device: Annotated[str, typer.Argument(help="Name of the device (site, box or app).")],
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    key_db: KeyDbOpt = None,
) -> None:
    """Create a key for DEVICE and print it. It is shown this once and stored only as a hash."""
    settings = _settings(config, state_dir=state_dir, key_db=key_db)
    store = _key_store(settings)
    try:
        new = store.add(device)
    except InvalidDeviceName as exc:
        _fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    typer.echo(new.token)
    typer.echo(
        f"key {new.key_id} for device '{device}'; it cannot be shown again. "
        f"Give it to the device as: Authorization: Bearer <key>",
        err=True,
    )


@keys_app.command("list", epilog=EXIT_CODES_HELP)
def keys_list(
    config: ConfigOpt = None, state_dir: StateDirOpt = None, key_db: KeyDbOpt = None
) -> None:
    """List device keys (ids and dates, never the keys)."""
    settings = _settings(config, state_dir=state_dir, key_db=key_db)
    store = _key_store(settings)
    try:
        rows = store.list()
    finally:
        store.close()
    typer.echo(f"{'device':<32} {'key id':<16} {'created (UTC)':<20} status")
    for row in rows:
        status = "active" if row.revoked_at is None else f"revoked {_when(row.revoked_at)}"
        typer.echo(f"{row.device:<32} {row.key_id:<16} {_when(row.created_at):<20} {status}")


@keys_app.command("revoke", epilog=EXIT_CODES_HELP)
def keys_revoke(
    device: Annotated[str, typer.Argument(help="Device whose keys to revoke.")],
    key_id: Annotated[str | None, typer.Option(help="Revoke only this key.")] = None,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    key_db: KeyDbOpt = None,
) -> None:
    """Revoke DEVICE's active keys (or one of them); running gateways refuse them within
    `key_cache_s` seconds."""
    settings = _settings(config, state_dir=state_dir, key_db=key_db)
    store = _key_store(settings)
    try:
        count = store.revoke(device, key_id)
    finally:
        store.close()
    if count == 0:
        _fail(f"device '{device}' has no active key{' ' + key_id if key_id else ''}", EXIT_FAILURE)
    typer.echo(f"revoked {count} key(s) of device '{device}'")


@config_app.command("check", epilog=EXIT_CODES_HELP)
def config_check(config: ConfigOpt = None) -> None:
    """Validate the settings as serve would (--config file < CLOUD_GATEWAY_* environment);
    print the settings in force as TOML."""
    settings = _settings(config)
    source = f"{config} and the environment" if config is not None else "the environment"
    typer.echo(f"# cloud-gateway settings in force with {source}")
    typer.echo(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)), nl=False)


@config_app.command("show", epilog=EXIT_CODES_HELP)
def config_show(config: ConfigOpt = None, all_settings: AllSettingsOption = False) -> None:
    """Print the settings in force as TOML, or with --all every setting there is."""
    if all_settings:
        rows = setting_rows(GatewaySettings, serve_flags())
        typer.echo(format_settings("cloud-gateway", rows), nl=False)
        return
    settings = _settings(config)
    typer.echo(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)), nl=False)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def serve_flags() -> dict[str, str]:
    return command_flags(app, "serve", GatewaySettings)


def main() -> None:
    run_daemon(app, PROGRAM)
