"""AgentSettings: every knob of `edge-agent serve`, built once at start-up and passed down.

Precedence, highest first: command-line flags, environment (EDGE_AGENT_<FIELD>), the TOML
config file (--config), then the defaults below, which work on a fresh machine.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from model_runtime.demo import EDGE_REPOSITORY
from model_runtime.model_config import describe_validation_error

__all__ = ["AgentSettings", "SettingsError", "load_settings"]


class SettingsError(Exception):
    """The settings are invalid; the message names each key and its problem."""


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGE_AGENT_", extra="forbid", frozen=True)

    model_repository: Path = EDGE_REPOSITORY
    """Directory of models: <model>/<version>/model.onnx and <model>/config.toml."""
    host: str = "127.0.0.1"
    """Address the gRPC API listens on."""
    port: int = Field(default=8001, ge=0, le=65535)
    """gRPC port; 0 picks a free one (see port_file)."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint; 0 picks a free one."""
    onnx_threads: int = Field(default=1, ge=1, le=64)
    """onnxruntime intra-op threads per session. 1 suits small models: concurrency comes from
    serving many requests at once, not from splitting one."""
    inline_run_budget_us: float = Field(default=200.0, ge=0.0)
    """Batches estimated to run within this many microseconds run on the event loop's thread;
    longer ones go to a worker thread. 0 sends every run to a worker thread."""
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request accepted; larger ones get RESOURCE_EXHAUSTED."""
    grace_seconds: float = Field(default=10.0, ge=0.0)
    """On SIGTERM, how long calls in flight may take to finish before they are cancelled."""
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    port_file: Path | None = None
    """If set, {"grpc": port, "metrics": port} is written here once both are bound."""

    # -- escalation to the cloud (router) ---------------------------------------------------
    cloud_url: str | None = None
    """Base URL of the cloud's v2 REST endpoint (the cloud gateway, or any v2 server). Unset:
    every request is answered at the edge, and responses say so (reason no_cloud_configured)."""
    device_key_file: Path | None = None
    """File holding this device's key for the cloud (`cloud-gateway keys add`); read once."""
    state_dir: Path = Path("var/edge-agent")
    """Where the durable queue, results and data-budget counters are kept."""
    queue_cap_bytes: int = Field(default=256 * 2**20, ge=0)
    """Disk the queue may use; 0 means no cap."""
    queue_full_policy: str = Field(default="refuse", pattern="^(refuse|drop_oldest_lowest)$")
    """At the cap: refuse new requests (RESOURCE_EXHAUSTED) or drop the lowest-priority oldest."""
    default_ttl_seconds: float = Field(default=24 * 3600.0, gt=0)
    """How long a queued request waits for the link before it expires, unless the caller says."""
    budget_day_bytes: int = Field(default=0, ge=0)
    """Bytes the agent may send to the cloud per UTC day; 0 means unlimited."""
    budget_month_bytes: int = Field(default=0, ge=0)
    """Bytes the agent may send to the cloud per UTC month; 0 means unlimited."""
    budget_mode: str = Field(default="queue", pattern="^(queue|edge)$")
    """Once the budget is spent, unsure requests are queued for the next period, or answered
    at the edge only."""
    bandwidth_cap_bytes_per_s: int = Field(default=0, ge=0)
    """The queue drains at most this fast; 0 means no cap."""
    live_timeout_seconds: float = Field(default=2.0, gt=0)
    """Time limit of a live escalation when the caller sets no gRPC deadline."""
    probe_interval_seconds: float = Field(default=30.0, gt=0)
    """While the link works, its health is probed when the cloud was silent this long. Each
    probe costs a few hundred bytes: shorter finds a dead link sooner, longer spends less."""
    probe_timeout_seconds: float = Field(default=5.0, gt=0)
    """A probe slower than this counts as failed."""


def load_settings(config_file: Path | None = None, **flags: Any) -> AgentSettings:
    """Merge flags (None means not given), environment and the config file into AgentSettings."""
    if config_file is not None:
        try:
            tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {config_file} is not valid TOML: {exc}") from None

    class _FromSources(AgentSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if config_file is not None:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=config_file),)
            return sources

    try:
        merged = _FromSources(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, "settings")) from None
    return AgentSettings.model_construct(**merged.model_dump())
