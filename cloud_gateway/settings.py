"""GatewaySettings: every knob of `cloud-gateway`, from defaults < TOML file < env < flags.

Built once by the CLI and handed to constructors; nothing below the CLI reads the environment.
Environment variables are the field names in capitals with the prefix CLOUD_GATEWAY_.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from model_runtime.demo import CLOUD_REPOSITORY
from model_runtime.layered_settings import LayeredSettings, LogLevel, SettingsError, load_layers
from model_runtime.metrics_endpoint import check_metrics_bind, check_metrics_tls

__all__ = [
    "ENV_PREFIX",
    "FAULTS_VARIABLE",
    "FAULT_POINTS",
    "GatewaySettings",
    "SettingsError",
    "load_settings",
]

ENV_PREFIX = "CLOUD_GATEWAY_"
FAULTS_VARIABLE = "CLOUD_GATEWAY_FAULTS"
"""The tests' fault switch (model_runtime.fault_points): not a setting, never in a file or a
flag; read once beside the settings by `cloud-gateway serve`."""
FAULT_POINTS = {
    "gateway.after_run_before_store": False,
    "gateway.worker_start": False,
    "idempotency.mid_checkpoint": False,
    "idempotency.commit": True,
}
"""The gateway's fault points, and whether each is a write (takes eio and enospc)."""
MiB = 1024 * 1024
DAY_S = 86_400.0


class GatewaySettings(LayeredSettings):
    """Settings of `cloud-gateway serve` and `cloud-gateway keys`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    host: str = "127.0.0.1"
    """Address the v2 REST API listens on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port of the v2 REST API; 0 picks a free one (see `--port-file`)."""
    metrics_token_file: Path | None = None
    """File holding one bearer token (whitespace trimmed; `openssl rand -hex 32`): every
    request to `/metrics` must then carry `Authorization: Bearer <token>`, on loopback too;
    others get 401. Prometheus sends it with `authorization: {credentials_file: <file>}`.
    Read once at start-up, never logged; refused if others may write it."""
    metrics_insecure: bool = False
    """Serve `/metrics` beyond loopback without metrics_token_file: anyone who can reach the
    port may read the traffic and device names it shows. Logged as a warning at every start."""
    metrics_tls_cert_file: Path | None = None
    """PEM certificate (chain) of `/metrics`: it then speaks HTTPS only, so the token does not
    cross the network in clear (Prometheus: `scheme: https`, `tls_config`). With
    metrics_tls_key_file."""
    metrics_tls_key_file: Path | None = Field(default=None, validate_default=True)
    """PEM private key of metrics_tls_cert_file; refused if others may write it."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus `/metrics` endpoint, kept apart from the API. Beyond loopback
    it needs metrics_token_file, or metrics_insecure = true."""
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    """Port of `/metrics`; 0 picks a free one."""
    workers: int = Field(default=1, ge=1, le=64)
    """Worker processes sharing the API socket."""
    blocking_threads: int = Field(default=8, ge=1, le=256)
    """Threads each worker runs its blocking work on (model runs, key lookups, SQLite waits,
    large bodies' parsing): all started with the worker and kept, never more; more jobs at
    once wait for one. Each SQLite file also gets this many connections per worker."""
    log_level: LogLevel = "info"
    """debug, info, warning, error or critical, in any case."""
    access_log: bool = False
    """Log one line per request (method, path, status; never headers or bodies)."""

    model_repository: Path = CLOUD_REPOSITORY
    """Model repository served by the embedded onnxruntime (default: the bundled large model)."""
    onnx_threads: int = Field(default=1, ge=1, le=64)
    """onnxruntime intra-op threads per model session."""
    inline_run_budget_us: float = Field(default=100.0, ge=0)
    """Model runs known to take less than this run on the event loop instead of a worker
    thread, whose round trip costs more than a tiny model's run. 0 always uses a thread."""
    upstream: str | None = None
    """Base URL of a v2 REST server to forward inference to, instead of the embedded runtime."""
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    """Whole-call limit for an upstream request; past it the device gets 504."""
    retry_after_s: float = Field(default=5.0, gt=0)
    """Retry-After sent with 503 when the upstream or the idempotency store is down."""

    state_dir: Path = Path("var/cloud-gateway")
    """Directory of the gateway's SQLite files (device keys, idempotency records)."""
    key_db: Path | None = None
    """Device key database; default `<state_dir>/keys.sqlite3`."""
    key_cache_s: float = Field(default=2.0, ge=0)
    """How long a worker trusts a verified key before checking the database again; a revoked
    key stops working within this time. 0 checks every request."""

    idempotency_store: str = "sqlite"
    """`sqlite` (one host, shared by its workers) or a Redis URL (`redis://`, `rediss://`,
    `unix://`) shared by several replicas."""
    idempotency_db: Path | None = None
    """SQLite idempotency file; default `<state_dir>/idempotency.sqlite3`."""
    idempotency_retention_s: float = Field(default=7 * DAY_S, gt=0)
    """How long answers are kept for replay: longer than any edge queue TTL plus its retry
    horizon, since clinics stay offline for days."""
    idempotency_pending_ttl_s: float = Field(default=3.0, gt=0)
    """An in-progress mark lapses this long after its worker stops renewing it (it died); a
    live worker renews it four times as often, however long the run takes."""
    idempotency_wait_s: float = Field(default=60.0, gt=0)
    """How long a duplicate waits for the first request before answering 409."""
    idempotency_max_bytes: int = Field(default=1024 * MiB, ge=8 * MiB)
    """The most the idempotency store may hold: its files with SQLite (the WAL gets an eighth,
    1-64 MiB), the answers' bytes with Redis. A new request is admitted only with room for a
    `max_answer_bytes` answer; expired answers are deleted, oldest first, to make it, and if
    none has expired the request gets 503 with Retry-After (until the oldest expires)."""
    idempotency_cleanup_interval_s: float = Field(default=3600.0, gt=0)
    """How often expired records are deleted from the SQLite store (Redis expires its own)."""

    header_timeout_s: float = Field(default=10.0, gt=0)
    """A connection whose request headers are not complete this long after it opened (or
    after its previous answer) is closed: silent and half-sent requests cannot hold it open."""
    max_connections: int = Field(default=4096, ge=1)
    """Open connections per worker; one more gets 503 with Retry-After and is closed. Lowered
    at start to leave 384 file descriptors under the open-files limit (see LimitNOFILE)."""

    max_body_bytes: int = Field(default=2 * MiB, ge=1024)
    """Largest request body on the wire; larger ones get 413 while they are being read."""
    max_decompressed_bytes: int = Field(default=2 * MiB, ge=1024)
    """Largest request body once decompressed (and so the most JSON one request makes the
    gateway parse); past it, 413 and decompression stops. 2 MiB holds 1,024 items of 64 values
    with room to spare, and parses in ~10-20 ms."""
    max_items_per_request: int = Field(default=1024, ge=1)
    """Items (rows: the first dimension of each input) in one request; more get 413 before
    any value is converted."""
    max_tensor_elements: int = Field(default=262_144, ge=1)
    """Values in one input tensor (1 MiB of FP32); more get 413 before any is converted."""
    max_answer_bytes: int = Field(default=1 * MiB, ge=1024)
    """Largest v2 JSON answer, which is also what the idempotency store keeps per request. A
    request whose answer could be larger (from the model's declared outputs and its item
    count) gets 413 before the model runs; with undeclared outputs, after it."""
    max_in_flight_per_device: int = Field(default=8, ge=1)
    """Requests one device may have in flight in one worker; one more gets 429."""
    max_in_flight: int = Field(default=64, ge=1)
    """Requests in flight in one worker from all devices; one more gets 503."""
    rate_limit_per_s: float = Field(default=50.0, gt=0)
    """Sustained requests per second per device: shared by every worker and replica through Redis
    with the Redis store, kept by each worker with SQLite."""
    rate_limit_burst: int = Field(default=100, ge=1)
    """Requests a device may send at once before the rate applies."""
    gzip_min_bytes: int = Field(default=512, ge=0)
    """Responses at least this large are gzipped for clients that accept gzip."""

    @field_validator("metrics_tls_key_file")
    @classmethod
    def _metrics_tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        check_metrics_tls(info.data.get("metrics_tls_cert_file"), value)
        return value

    @field_validator("metrics_host")
    @classmethod
    def _metrics_authenticated_beyond_loopback(cls, value: str, info: ValidationInfo) -> str:
        check_metrics_bind(
            value,
            token_file=info.data.get("metrics_token_file"),
            insecure=bool(info.data.get("metrics_insecure")),
        )
        return value

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("idempotency_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value == "sqlite" or urlsplit(value).scheme in ("redis", "rediss", "unix"):
            return value
        raise ValueError("must be 'sqlite' or a redis://, rediss:// or unix:// URL")

    @property
    def key_db_path(self) -> Path:
        return self.key_db or self.state_dir / "keys.sqlite3"

    @property
    def idempotency_db_path(self) -> Path:
        return self.idempotency_db or self.state_dir / "idempotency.sqlite3"


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    flags_of: Mapping[str, str] | None = None,
) -> GatewaySettings:
    """Defaults < `config_file` (TOML) < CLOUD_GATEWAY_* env < `overrides` (flags; None = unset).
    SettingsError names each problem on a line of its own; `flags_of` maps a setting to the
    flag that sets it, for those lines."""
    return load_layers(GatewaySettings, config_file, overrides or {}, flags_of=flags_of)
