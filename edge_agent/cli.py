"""The `edge-agent` command and its subcommands. Builds the settings once and hands them down.

Exit codes, for every command: 0 done; 1 failed while running; 2 usage or configuration error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_agent.calibrate import calibrate_command
from edge_agent.config_cli import config_app
from edge_agent.export_cli import export_hard_examples_command
from edge_agent.queue_cli import queue_app
from edge_agent.settings import FAULTS_VARIABLE, AgentSettings, SettingsError, load_settings
from edge_agent.settings_flags import ROUTER_FLAGS, with_setting_flags
from model_runtime.command_line import (
    EXIT_CODES_HELP,
    MetricsInsecureOption,
    MetricsTlsCertFileOption,
    MetricsTlsKeyFileOption,
    MetricsTokenFileOption,
    command_flags,
    daemon_app,
    exit_usage,
    fault_plan,
    run_daemon,
)
from router.config import FAULT_POINTS

PROGRAM = "edge-agent"

app = daemon_app(
    "The edge agent: serve a model repository over the Open Inference Protocol (gRPC), "
    "escalate unsure requests to the cloud."
)


@app.command(epilog=EXIT_CODES_HELP)
@with_setting_flags(ROUTER_FLAGS)
def serve(
    config: Annotated[
        Path | None, typer.Option(help="TOML file of settings; flags and EDGE_AGENT_* win over it.")
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository directory (default: bundled demo).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="gRPC address (default: 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="gRPC port; 0 picks one (default: 8001).")
    ] = None,
    tcp_enabled: Annotated[
        bool | None,
        typer.Option(
            "--tcp/--no-tcp", help="Serve gRPC on --host:--port (default: on); off needs --uds."
        ),
    ] = None,
    uds: Annotated[
        Path | None,
        typer.Option(
            help="Serve gRPC on this Unix socket too (mode 0660; clients dial unix:<path>)."
        ),
    ] = None,
    rest_enabled: Annotated[
        bool | None,
        typer.Option("--rest/--no-rest", help="Serve v2 REST and the kiosk page (default: on)."),
    ] = None,
    rest_host: Annotated[
        str | None,
        typer.Option(help="REST address (default: 127.0.0.1); beyond it, as for --host."),
    ] = None,
    rest_port: Annotated[
        int | None, typer.Option(help="REST port; 0 picks one (default: 8002).")
    ] = None,
    rest_cors_origins: Annotated[
        list[str] | None,
        typer.Option(
            "--rest-cors-origin",
            help="A web origin whose pages may call the REST API; repeat for more.",
        ),
    ] = None,
    metrics_host: Annotated[
        str | None,
        typer.Option(help="/metrics address (default: 127.0.0.1); beyond it, a token or opt-out."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="/metrics port; 0 picks one (default: 9101).")
    ] = None,
    metrics_token_file: MetricsTokenFileOption = None,
    metrics_insecure: MetricsInsecureOption = None,
    metrics_tls_cert_file: MetricsTlsCertFileOption = None,
    metrics_tls_key_file: MetricsTlsKeyFileOption = None,
    onnx_threads: Annotated[
        int | None, typer.Option(help="onnxruntime threads per model (default: 1).")
    ] = None,
    max_message_bytes: Annotated[
        int | None, typer.Option(help="Largest request accepted (default: 4 MiB).")
    ] = None,
    grace_seconds: Annotated[
        float | None, typer.Option(help="On SIGTERM, time for calls in flight (default: 10).")
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error or critical, in any case.")
    ] = None,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound ports here as JSON once serving.")
    ] = None,
    cloud_url: Annotated[
        str | None, typer.Option(help="The cloud's v2 REST URL; unset: answer everything here.")
    ] = None,
    device_key_file: Annotated[
        Path | None, typer.Option(help="File holding this device's key for the cloud.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Queue and counters live here (default: var/edge-agent).")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="Bearer tokens callers must present ('<name> <token>' lines)."),
    ] = None,
    tls_cert_file: Annotated[
        Path | None, typer.Option(help="PEM certificate of the gRPC API (TLS).")
    ] = None,
    tls_key_file: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert-file.")] = None,
    tls_client_ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle clients' certificates must chain to (mTLS).")
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure",
            help="Serve beyond loopback without authentication: anyone who reaches the port "
            "may call it and read every result.",
        ),
    ] = None,
    cloud_ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle to check the cloud's certificate with.")
    ] = None,
    cloud_client_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate this device shows the cloud (mTLS).")
    ] = None,
    cloud_client_key: Annotated[
        Path | None, typer.Option(help="PEM key of --cloud-client-cert.")
    ] = None,
    allow_plain_http: Annotated[
        bool | None,
        typer.Option(
            "--allow-plain-http", help="Allow an http:// cloud URL beyond loopback (unencrypted)."
        ),
    ] = None,
    **router: Any,  # a flag per router setting (edge_agent.settings_flags)
) -> None:
    """Serve the model repository over the Open Inference Protocol (gRPC and REST).

    The flags below are the common settings. Every setting (queue cap and full policy, TTLs,
    data budgets, probes...) can be given in the --config file or as EDGE_AGENT_<KEY>:
    `edge-agent config show --all` lists them all, with defaults and meanings.
    """
    # grpc-core reads this once, at import: its own log lines would repeat, in another format,
    # what the agent reports itself. GRPC_VERBOSITY=ERROR in the environment brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from edge_agent.app import run  # keeps `edge-agent --help` free of onnxruntime's import time

    try:
        settings = load_settings(
            config,
            flags_of=command_flags(app, "serve", AgentSettings),
            model_repository=model_repository,
            host=host,
            port=port,
            tcp_enabled=tcp_enabled,
            uds=uds,
            rest_enabled=rest_enabled,
            rest_host=rest_host,
            rest_port=rest_port,
            rest_cors_origins=rest_cors_origins or None,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            metrics_token_file=metrics_token_file,
            metrics_insecure=metrics_insecure,
            metrics_tls_cert_file=metrics_tls_cert_file,
            metrics_tls_key_file=metrics_tls_key_file,
            onnx_threads=onnx_threads,
            max_message_bytes=max_message_bytes,
            grace_seconds=grace_seconds,
            log_level=log_level,
            port_file=port_file,
            cloud_url=cloud_url,
            device_key_file=device_key_file,
            state_dir=state_dir,
            token_file=token_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            tls_client_ca_file=tls_client_ca_file,
            insecure=insecure,
            cloud_ca_file=cloud_ca_file,
            cloud_client_cert=cloud_client_cert,
            cloud_client_key=cloud_client_key,
            allow_plain_http=allow_plain_http,
            **router,
        )
    except SettingsError as exc:
        exit_usage(PROGRAM, exc.problems)
    raise typer.Exit(run(settings, fault_plan(PROGRAM, FAULTS_VARIABLE, FAULT_POINTS)))


@app.command(epilog=EXIT_CODES_HELP)
def demo(
    web: Annotated[
        bool,
        typer.Option(
            "--web", help="Serve the kiosk page instead; Enter takes the cloud away and back."
        ),
    ] = False,
) -> None:
    """Start a cloud gateway and an agent, replay the held-out set with an outage, show the table."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    if web:
        from edge_agent.web_demo import run_web_demo

        raise typer.Exit(run_web_demo())
    from rich.console import Console

    from edge_agent.demo import run_demo

    raise typer.Exit(run_demo(Console()))


# Each command lives beside what it drives; this module only gathers them.
app.command("calibrate", epilog=EXIT_CODES_HELP)(calibrate_command)
app.command("export-hard-examples", epilog=EXIT_CODES_HELP)(export_hard_examples_command)
app.add_typer(queue_app, name="queue")
app.add_typer(config_app, name="config")


def main() -> None:
    run_daemon(app, PROGRAM)
