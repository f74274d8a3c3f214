"""AgentSettings: every knob of `edge-agent serve`, built once at start-up and passed down.

Precedence, highest first: command-line flags, environment (EDGE_AGENT_<FIELD>), the TOML
config file (--config), then the defaults below, which work on a fresh machine.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from model_runtime.demo import EDGE_REPOSITORY
from model_runtime.layered_settings import LayeredSettings, LogLevel, SettingsError, load_layers
from model_runtime.metrics_endpoint import check_metrics_bind, check_metrics_tls, metrics_warning
from model_runtime.sockets import is_loopback
from router.decision import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY_LEVELS,
    MAX_TTL_SECONDS,
    PRIORITY_LEVELS,
)

__all__ = [
    "DEFAULT_DEVICE",
    "FAULTS_VARIABLE",
    "AgentSettings",
    "SettingsError",
    "is_loopback",
    "load_settings",
    "settings_warnings",
]

DEFAULT_DEVICE = "edge-agent"
FAULTS_VARIABLE = "EDGE_AGENT_FAULTS"
"""The tests' fault switch (model_runtime.fault_points): not a setting, never in a file or a
flag; read once beside the settings by `edge-agent serve`."""
# Site and device ids become Prometheus label values and log fields: short, printable, no spaces.
_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,62}")


_MAX_SOCKET_PATH = 107  # sun_path of struct sockaddr_un holds 108 bytes with its final NUL

# A web origin as browsers send it in the Origin header: scheme, host, optional port; no path.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def _host_name() -> str:
    """The host name, made a valid site id, so the default never stops a start-up."""
    name = re.sub(r"[^A-Za-z0-9._:-]", "-", socket.gethostname()).lstrip("._:-")[:63]
    return name or "unknown"


class AgentSettings(LayeredSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT_", extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    site: str = Field(default_factory=_host_name)
    """Where this agent runs (a clinic, a kiosk's location): the `site` label of
    edge_agent_info on /metrics and a field of every log line. Default: the host name."""
    device: str = DEFAULT_DEVICE
    """Which agent of the site this is, when a site has several."""
    model_repository: Path = EDGE_REPOSITORY
    """Directory of models: <model>/<version>/model.onnx and <model>/config.toml."""

    # -- who may call the gRPC API (edge_agent.access) ---------------------------------------
    token_file: Path | None = None
    """File of bearer tokens, one `<name> <token>` per line: every call but health checks must
    carry `authorization: Bearer <token>` metadata, and sees only its own results."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) of the gRPC API: it then speaks TLS only. With tls_key_file."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mTLS), which names them.
    Needs tls_cert_file and tls_key_file."""
    insecure: bool = False
    """Serve the gRPC API beyond loopback with no token or client certificate: anyone who can
    reach the port may call it and read every result. Logged as a warning at every start."""
    host: str = Field(default="127.0.0.1", validate_default=True)
    """Address the gRPC API listens on. Beyond loopback it needs token_file or
    tls_client_ca_file, or insecure = true."""
    port: int = Field(default=8001, ge=0, le=65535)
    """gRPC port; 0 picks a free one (see port_file)."""
    tcp_enabled: bool = True
    """Serve the gRPC API on host:port. Off, it is served on the Unix socket (uds) only."""
    uds: Path | None = Field(default=None, validate_default=True)
    """A Unix-domain socket the gRPC API listens on too (clients dial `unix:<path>`), for apps
    on the same device: it skips TCP. Made with mode 0660, so that the agent's group can use
    it (every other file the agent makes is private to it); a socket file left by an agent
    that died is replaced, one in use is not. Local like loopback: callers there follow the
    API's own rules (token_file, mTLS), nothing more."""
    metrics_token_file: Path | None = None
    """File holding one bearer token (whitespace trimmed; `openssl rand -hex 32`): every
    request to /metrics must then carry `Authorization: Bearer <token>`, on loopback too;
    others get 401. Prometheus sends it with `authorization: {credentials_file: <file>}`.
    Read once at start-up, never logged; refused if others may write it."""
    metrics_insecure: bool = False
    """Serve /metrics beyond loopback without metrics_token_file: anyone who can reach the
    port may read the traffic, queue depth, link state and device ids it shows. Logged as a
    warning at every start."""
    metrics_tls_cert_file: Path | None = None
    """PEM certificate (chain) of /metrics: it then speaks HTTPS only, so the token does not
    cross the network in clear (Prometheus: `scheme: https`, `tls_config`). With
    metrics_tls_key_file."""
    metrics_tls_key_file: Path | None = Field(default=None, validate_default=True)
    """PEM private key of metrics_tls_cert_file; refused if others may write it."""
    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus /metrics endpoint. Beyond loopback it needs
    metrics_token_file, or metrics_insecure = true."""
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
    log_level: LogLevel = "info"
    """debug, info, warning, error or critical, in any case. At debug each call is one line."""
    port_file: Path | None = None
    """If set, {"grpc": port, "rest": port, "metrics": port} is written here once all are bound
    ("rest" only while the REST API is on, "grpc" only while tcp_enabled)."""
    max_watchers: int = Field(default=1024, ge=1)
    """WatchResults streams open at once; one more is refused with RESOURCE_EXHAUSTED."""

    # -- v2 REST, for web pages (browser kiosks) ---------------------------------------------
    rest_enabled: bool = True
    """Serve the v2 REST API, the tickets over HTTP and the kiosk page beside gRPC."""
    rest_host: str = Field(default="127.0.0.1", validate_default=True)
    """Address the REST API listens on. As for host: beyond loopback it needs token_file
    (callers send `Authorization: Bearer <token>`) or tls_client_ca_file, or insecure = true.
    With tls_cert_file it speaks HTTPS only, with the gRPC API's certificate and client CA."""
    rest_port: int = Field(default=8002, ge=0, le=65535)
    """REST port; 0 picks a free one (see port_file). 8002 keeps clear of the agent's gRPC
    (8001) and metrics (9101) and the gateway's API (8000) and metrics (9102)."""
    rest_cors_origins: list[str] = Field(default_factory=list)
    """Web origins (`https://kiosk.example.org`, `http://127.0.0.1:5173`) whose pages may call
    the REST API from a browser; "*" allows any page. None by default: only pages the agent
    serves itself (the kiosk page) can call it."""
    rest_header_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    """A REST connection whose request line and headers are not complete this long after it
    opened (or after a later request's first bytes) is closed without an answer: a client that
    connects and sends nothing, or half a header, cannot hold a connection. With HTTPS, its TLS
    handshake gets as long again."""
    rest_max_connections: int = Field(default=256, ge=1, le=65536)
    """REST connections open at once; one more gets 503 with Retry-After and is closed. Lowered
    at start to leave 384 file descriptors under the open-files limit (ulimit -n, LimitNOFILE)
    for the gRPC API, the queue and the cloud link."""

    # -- escalation to the cloud (router) ---------------------------------------------------
    allow_plain_http: bool = False
    """Let cloud_url be http:// to a host beyond loopback: patients' data would cross the
    network unencrypted. Off: such a URL is refused; use https://."""
    cloud_url: str | None = None
    """Base URL of the cloud's v2 REST endpoint (the cloud gateway, or any v2 server). Unset:
    every request is answered at the edge, and responses say so (reason no_cloud_configured).
    No user:password@ in it (refused): the device key authenticates the agent."""
    device_key_file: Path | None = Field(default=None, validate_default=True)
    """File holding this device's key for the cloud (`cloud-gateway keys add`); read once.
    Refused if others may write it, a warning if others may read it."""
    cloud_ca_file: Path | None = None
    """PEM bundle of the CAs that sign the cloud's certificate, instead of the system's (a
    private CA). Only for an https:// cloud_url."""
    cloud_client_cert: Path | None = None
    """PEM certificate (chain) this device presents to the cloud (mTLS), with
    cloud_client_key. Only for an https:// cloud_url."""
    cloud_client_key: Path | None = Field(default=None, validate_default=True)
    """PEM private key of cloud_client_cert."""
    state_dir: Path = Path("var/edge-agent")
    """Where the durable queue, results and data-budget counters are kept."""
    queue_cap_bytes: int = Field(default=256 * 2**20, ge=0)
    """Disk the queue may use; 0 means no cap."""
    queue_full_policy: str = Field(default="refuse", pattern="^(refuse|drop_oldest_lowest)$")
    """At the cap: refuse new requests (RESOURCE_EXHAUSTED) or drop the lowest-priority oldest."""
    default_ttl_seconds: float = Field(default=24 * 3600.0, gt=0, le=MAX_TTL_SECONDS)
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
    probe_budget_share: float = Field(default=0.1, gt=0.0, le=1.0)
    """With a data budget, probes spend at most this share of what is left of each period,
    spread over the rest of it (slower as it runs low; none once a probe no longer fits)."""
    recovery_probe_cap_seconds: float = Field(default=10.0, gt=0)
    """While items wait for a down link, probes are at most this far apart, so delivery starts
    within about this long of the link's return (a probe that cannot connect costs no bytes)."""
    link_backoff_seconds: float = Field(default=1.0, gt=0)
    """First wait between probes of a down link; then x1.6 per failure, ±20 %."""
    link_backoff_cap_seconds: float = Field(default=120.0, gt=0)
    """Longest wait between probes of a down link that no item waits for."""
    breaker_failures: int = Field(default=3, ge=1, le=100)
    """Failed calls or probes in a row that take the link down (the circuit breaker opens)."""
    degraded_rtt_seconds: float = Field(default=2.0, gt=0)
    """A round-trip time above this marks the link degraded."""

    # -- the queue and its delivery ------------------------------------------------------------
    priority_levels: int = Field(default=PRIORITY_LEVELS, ge=1, le=MAX_PRIORITY_LEVELS)
    """Priority levels as Triton numbers them: 1 is the most urgent, this the least."""
    default_priority: int = Field(default=DEFAULT_PRIORITY, ge=1)
    """The level of a request that sends priority 0 or none; at most priority_levels (so with
    fewer than 5 levels, set it too)."""
    queue_ageing_seconds: float = Field(default=600.0, ge=0)
    """A waiting item moves one priority level up per this many seconds, so a stream of urgent
    items cannot starve older ones; 0 turns ageing off."""
    queue_lease_seconds: float = Field(default=300.0, gt=0)
    """An item being sent whose outcome is not recorded within this long is sent again."""
    results_retention_seconds: float = Field(default=7 * 86400.0, gt=0)
    """How long an ended ticket, with the cloud's answer, stays readable (GetResult, Watch)."""
    drain_batch_items: int = Field(default=16, ge=1, le=10_000)
    """Items the forwarder claims from the queue at once."""
    drain_batch_bytes: int = Field(default=1 << 20, ge=1)
    """Payload bytes the forwarder claims at once (at least one item)."""
    drain_group_items: int = Field(default=64, ge=1, le=10_000)
    """Queued items sent together in one request when the cloud takes groups (its infer_group
    extension: one set of headers, one gzip); 1: one request per item, as to any v2 server."""
    drain_group_bytes: int = Field(default=64 * 1024, ge=1)
    """A group's items' bytes at most, before gzip; a larger item goes alone."""
    drain_concurrency: int = Field(default=4, ge=1, le=256)
    """Deliveries in flight at once. To fill a bandwidth cap they must cover cap x a call's
    duration: e.g. 20 kB/s x 0.4 s / 600-byte requests = 14."""
    drain_timeout_seconds: float = Field(default=30.0, gt=0)
    """Time limit of one delivery (one attempt: the queue retries it later)."""
    bandwidth_burst_seconds: float = Field(default=0.25, gt=0)
    """The bandwidth cap's bucket holds this many seconds of it (at least one request)."""
    failure_backoff_seconds: float = Field(default=0.5, gt=0)
    """The forwarder's pause after a failed delivery; x1.6 per failure in a row."""
    failure_backoff_cap_seconds: float = Field(default=60.0, gt=0)
    """Longest pause after failed deliveries."""
    setup_backoff_seconds: float = Field(default=30.0, gt=0)
    """Pause after the cloud refuses the device or model (401, 403, 404)."""

    # -- the cloud's limits and the calls to it -------------------------------------------------
    cloud_requests_per_s: float = Field(default=40.0, ge=0)
    """Calls started per second at most, live and queued together; each 429 halves it until
    it grows back. 0: no rate of the agent's own (the cloud's Retry-After still holds)."""
    cloud_burst: int = Field(default=10, ge=1)
    """Calls that may start at once before cloud_requests_per_s applies."""
    cloud_rate_recovery_seconds: float = Field(default=60.0, gt=0)
    """How long the rate takes to grow back to cloud_requests_per_s after a 429 halved it."""
    cloud_max_connections: int = Field(default=4, ge=1, le=256)
    """Connections kept to the cloud for live calls (deliveries have drain_concurrency)."""
    cloud_gzip: bool = True
    """Send request bodies gzip-compressed (Content-Encoding: gzip)."""
    live_retry_attempts: int = Field(default=4, ge=1, le=20)
    """Attempts of a live call in all, within the caller's deadline."""

    # -- field quality: audits and hard examples --------------------------------------------
    audit_share: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of confident answers also sent to the cloud in the background (lowest priority,
    within the data budget) to measure how often the edge model agrees with it; 0 is off.
    Off by default: it spends metered data and sends inputs that would have stayed here."""
    hard_examples_retention_days: float = Field(default=0.0, ge=0.0, le=3650.0)
    """Keep escalated inputs with the cloud's answers this many days, for retraining
    (`edge-agent export-hard-examples`); 0 is off, and deletes what was kept before."""
    hard_examples_cap_bytes: int = Field(default=64 * 2**20, ge=0)
    """Disk the hard examples may take; beyond it new ones are not kept. 0 means no cap."""
    audit_max_waiting: int = Field(default=100, ge=1)
    """Audits waiting for the cloud at most; more are skipped (counted as backlog)."""

    # -- patient data at rest ---------------------------------------------------------------
    encryption_key_file: Path | None = None
    """File of a 32-byte key, base64 (`openssl rand -base64 32`): queued requests, delivered
    answers and hard examples are stored encrypted with it (AES-256-GCM). Unset: in clear."""
    encryption_old_key_files: list[Path] = Field(default_factory=list)
    """Keys used before encryption_key_file, still needed to read what they encrypted (a
    rotation); the agent refuses to start while data needs a key not listed."""

    @field_validator("site", "device")
    @classmethod
    def _identity(cls, value: str) -> str:
        if not _IDENTITY.fullmatch(value):
            raise ValueError(
                f"must be 1-63 of A-Z a-z 0-9 . _ : - starting with a letter or digit, got {value!r}"
            )
        return value

    @field_validator("host")
    @classmethod
    def _authenticated_beyond_loopback(cls, value: str, info: ValidationInfo) -> str:
        data = info.data
        cert, key = data.get("tls_cert_file"), data.get("tls_key_file")
        if (cert is None) != (key is None):
            raise ValueError("tls_cert_file and tls_key_file go together; give both or neither")
        if data.get("tls_client_ca_file") is not None and cert is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        _authenticated_beyond_loopback_or_insecure(value, data)
        return value

    @field_validator("metrics_tls_key_file")
    @classmethod
    def _metrics_tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        check_metrics_tls(info.data.get("metrics_tls_cert_file"), value)
        return value

    @field_validator("metrics_host")
    @classmethod
    def _metrics_authenticated_beyond_loopback(cls, value: str, info: ValidationInfo) -> str:
        data = info.data
        check_metrics_bind(
            value,
            token_file=data.get("metrics_token_file"),
            insecure=bool(data.get("metrics_insecure")),
        )
        return value

    @field_validator("uds")
    @classmethod
    def _socket_path(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            if not info.data.get("tcp_enabled", True):
                raise ValueError("tcp_enabled is off: give a Unix socket path to serve on")
            return value
        if len(str(value).encode()) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"a Unix socket path holds at most {_MAX_SOCKET_PATH} bytes; "
                f"this one has {len(str(value).encode())}"
            )
        return value

    @field_validator("rest_host")
    @classmethod
    def _rest_authenticated_beyond_loopback(cls, value: str, info: ValidationInfo) -> str:
        data = info.data
        if not data.get("rest_enabled", True):
            return value
        _authenticated_beyond_loopback_or_insecure(value, data)
        return value

    @field_validator("rest_cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: give scheme://host[:port] with no path, "
                    'such as "https://kiosk.example.org", or "*"'
                )
        return value

    @field_validator("cloud_url")
    @classmethod
    def _http_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
            if "@" in parts.netloc:
                # httpx would send them as Basic auth, beside or instead of the device key.
                # Never quoted back: this message reaches the terminal and the log.
                raise ValueError(
                    "must not carry a user name or password (user:password@): the agent "
                    "authenticates with its device key (device_key_file); remove them from the URL"
                )
            if (
                parts.scheme == "http"
                and not is_loopback(parts.hostname or "")
                and not info.data.get("allow_plain_http")
            ):
                raise ValueError(
                    "http:// to a host beyond loopback would send patients' data unencrypted; "
                    "use https://, or set allow_plain_http = true"
                )
        return value

    @field_validator("cloud_client_key")
    @classmethod
    def _cloud_tls(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        data = info.data
        if (data.get("cloud_client_cert") is None) != (value is None):
            raise ValueError("cloud_client_cert and cloud_client_key go together")
        given = value is not None or data.get("cloud_ca_file") is not None
        if given and not str(data.get("cloud_url") or "").startswith("https://"):
            raise ValueError("cloud_ca_file and cloud_client_* are for an https:// cloud_url")
        return value

    @field_validator("default_priority")
    @classmethod
    def _within_levels(cls, value: int, info: ValidationInfo) -> int:
        levels = info.data.get("priority_levels")
        if levels is not None and value > levels:
            raise ValueError(f"must be at most priority_levels ({levels}), got {value}")
        return value

    @field_validator("link_backoff_cap_seconds")
    @classmethod
    def _cap_above_first(cls, value: float, info: ValidationInfo) -> float:
        first = info.data.get("link_backoff_seconds")
        if first is not None and value < first:
            raise ValueError(f"must be at least link_backoff_seconds ({first:g}), got {value:g}")
        return value

    @field_validator("port_file")
    @classmethod
    def _writable_place(cls, value: Path | None) -> Path | None:
        # Found now, not after the server started listening (the port file is written then).
        if value is not None and not value.parent.is_dir():
            raise ValueError(f"its directory {value.parent} does not exist")
        return value

    @field_validator("device_key_file")
    @classmethod
    def _key_with_cloud(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Checked here rather than at router start-up, so the error names the setting.
        if value is None and info.data.get("cloud_url") is not None:
            raise ValueError("required when cloud_url is set")
        return value


def _authenticated_beyond_loopback_or_insecure(host: str, data: dict[str, Any]) -> None:
    """The rule of both APIs' addresses: beyond loopback, callers must authenticate."""
    authenticated = data.get("token_file") is not None or data.get("tls_client_ca_file")
    if not is_loopback(host) and not authenticated and not data.get("insecure"):
        raise ValueError(
            f"{host} is beyond loopback: give token_file or tls_client_ca_file (mTLS) so "
            "callers must authenticate, or insecure = true (--insecure) to let anyone who "
            "can reach the port call it"
        )


def load_settings(
    config_file: Path | None = None, *, flags_of: Mapping[str, str] | None = None, **flags: Any
) -> AgentSettings:
    """Merge flags (None means not given), environment and the config file into AgentSettings;
    SettingsError names each problem on a line of its own (and the flag for it, from
    `flags_of`: setting -> flag)."""
    return load_layers(AgentSettings, config_file, flags, flags_of=flags_of)


def settings_warnings(settings: AgentSettings) -> list[str]:
    """Settings that are valid but probably not what was meant; logged at start-up and printed
    by `config check`."""
    warnings = []
    if settings.device_key_file is not None and settings.cloud_url is None:
        warnings.append(
            "device_key_file is set but cloud_url is not: the key is not used, and every "
            "request is answered here (set cloud_url to escalate)"
        )
    metrics_open = metrics_warning(
        settings.metrics_host,
        token_file=settings.metrics_token_file,
        insecure=settings.metrics_insecure,
        tls=settings.metrics_tls_cert_file is not None,
    )
    if metrics_open is not None:
        warnings.append(metrics_open)
    return warnings
