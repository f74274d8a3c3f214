"""The `cloud-gateway` command: serve the v2 REST API, manage device keys, check the settings.

Every command builds GatewaySettings once (defaults < --config TOML < CLOUD_GATEWAY_* env <
flags) and hands them down; a bad setting stops it with exit code 2, naming the key.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, NoReturn

import tomli_w
import typer

from cloud_gateway.errors import InvalidDeviceName
from cloud_gateway.keys import KeyStore
from cloud_gateway.server import run
from cloud_gateway.settings import GatewaySettings, SettingsError, load_settings
from model_runtime import ModelLoadError
from model_runtime.private_files import restrict_umask

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Device keys: add, list, revoke.")
config_app = typer.Typer(no_args_is_help=True, help="Settings: show what a serve would use.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file of settings (keys as in GatewaySettings)."),
]
StateDirOpt = Annotated[
    Path | None, typer.Option(help="Directory of the SQLite files [default: var/cloud-gateway].")
]
KeyDbOpt = Annotated[
    Path | None, typer.Option(help="Device key database [default: <state-dir>/keys.sqlite3].")
]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"cloud-gateway: {message}", err=True)
    raise typer.Exit(code)


def _settings(config: Path | None, **flags: Any) -> GatewaySettings:
    try:
        return load_settings(config, flags)
    except SettingsError as exc:
        _fail(str(exc), 2)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="API address [default: 127.0.0.1].")] = None,
    port: Annotated[
        int | None, typer.Option(help="API port; 0 = any free [default: 8000].")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="/metrics address.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="/metrics port; 0 = any free [default: 9102].")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [default: 1].")] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository [default: the bundled large model].")
    ] = None,
    upstream: Annotated[
        str | None, typer.Option(help="Forward inference to this v2 REST server instead.")
    ] = None,
    upstream_timeout: Annotated[
        float | None, typer.Option(help="Seconds an upstream call may take [default: 30].")
    ] = None,
    idempotency_store: Annotated[
        str | None, typer.Option(help="'sqlite' or a redis:// URL shared by replicas.")
    ] = None,
    state_dir: StateDirOpt = None,
    key_db: KeyDbOpt = None,
    log_level: Annotated[str | None, typer.Option(help="critical|error|warning|info|debug")] = None,
    access_log: Annotated[
        bool | None, typer.Option("--access-log/--no-access-log", help="One line per request.")
    ] = None,
    port_file: Annotated[
        Path | None,
        typer.Option(help='Once bound, write {"http": port, "metrics": port} here (atomically).'),
    ] = None,
) -> None:
    """Serve the Open Inference Protocol v2 REST API (the bundled large model by default)."""
    settings = _settings(
        config,
        host=host,
        port=port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        workers=workers,
        model_repository=model_repository,
        upstream=upstream,
        upstream_timeout_s=upstream_timeout,
        idempotency_store=idempotency_store,
        state_dir=state_dir,
        key_db=key_db,
        log_level=log_level,
        access_log=access_log,
    )
    try:
        code = run(settings, port_file=port_file)
    except ModelLoadError as exc:
        _fail(str(exc), 1)
    except OSError as exc:  # the port is taken, the state directory is not writable...
        _fail(str(exc), 1)
    raise typer.Exit(code)


@keys_app.command("add")
def keys_add(
    device: Annotated[str, typer.Argument(help="Name of the device (site, box or app).")],
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    key_db: KeyDbOpt = None,
) -> None:
    """Create a key for DEVICE and print it. It is shown this once and stored only as a hash."""
    settings = _settings(config, state_dir=state_dir, key_db=key_db)
    store = KeyStore(settings.key_db_path)
    try:
        new = store.add(device)
    except InvalidDeviceName as exc:
        _fail(str(exc), 2)
    finally:
        store.close()
    typer.echo(new.token)
    typer.echo(
        f"key {new.key_id} for device '{device}'; it cannot be shown again. "
        f"Give it to the device as: Authorization: Bearer <key>",
        err=True,
    )


@keys_app.command("list")
def keys_list(
    config: ConfigOpt = None, state_dir: StateDirOpt = None, key_db: KeyDbOpt = None
) -> None:
    """List device keys (ids and dates, never the keys)."""
    settings = _settings(config, state_dir=state_dir, key_db=key_db)
    store = KeyStore(settings.key_db_path)
    try:
        rows = store.list()
    finally:
        store.close()
    typer.echo(f"{'device':<32} {'key id':<16} {'created (UTC)':<20} status")
    for row in rows:
        status = "active" if row.revoked_at is None else f"revoked {_when(row.revoked_at)}"
        typer.echo(f"{row.device:<32} {row.key_id:<16} {_when(row.created_at):<20} {status}")


@keys_app.command("revoke")
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
    store = KeyStore(settings.key_db_path)
    try:
        count = store.revoke(device, key_id)
    finally:
        store.close()
    if count == 0:
        _fail(f"device '{device}' has no active key{' ' + key_id if key_id else ''}", 1)
    typer.echo(f"revoked {count} key(s) of device '{device}'")


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the settings from --config and the environment; print them as TOML."""
    settings = _settings(config)
    values = settings.model_dump(mode="json", exclude_none=True)
    typer.echo(tomli_w.dumps(values), nl=False)


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def main() -> None:
    restrict_umask()  # every file and directory the gateway makes is its own (0600 / 0700)
    app(prog_name="cloud-gateway")
