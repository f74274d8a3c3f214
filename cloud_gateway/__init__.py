"""The cloud side: an authenticated, idempotent Open Inference Protocol v2 REST endpoint that runs
the large model once per device request, embedded (onnxruntime) or on an upstream v2 server.
"""

from cloud_gateway.app import create_app
from cloud_gateway.auth import Authenticator
from cloud_gateway.backends import Backend, EmbeddedBackend, UpstreamBackend
from cloud_gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidDeviceName,
    RateLimited,
    StoreUnavailable,
    UnsupportedEncoding,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from cloud_gateway.idempotency import (
    IdempotencyGuard,
    IdempotencyPolicy,
    IdempotencyStore,
    RedisIdempotencyStore,
    SqliteIdempotencyStore,
)
from cloud_gateway.keys import KeyStore
from cloud_gateway.limits import RateLimiter
from cloud_gateway.metrics import GatewayMetrics
from cloud_gateway.service import GatewayService, InferOutcome
from cloud_gateway.settings import GatewaySettings, SettingsError, load_settings
from model_runtime.http_body import BodyLimits

__all__ = [
    "AuthenticationFailed",
    "Authenticator",
    "Backend",
    "BodyLimits",
    "EmbeddedBackend",
    "GatewayError",
    "GatewayMetrics",
    "GatewayService",
    "GatewaySettings",
    "IdempotencyGuard",
    "IdempotencyInProgress",
    "IdempotencyKeyReused",
    "IdempotencyPolicy",
    "IdempotencyStore",
    "InferOutcome",
    "InvalidDeviceName",
    "KeyStore",
    "RateLimited",
    "RateLimiter",
    "RedisIdempotencyStore",
    "SettingsError",
    "SqliteIdempotencyStore",
    "StoreUnavailable",
    "UnsupportedEncoding",
    "UpstreamBackend",
    "UpstreamBadResponse",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "create_app",
    "load_settings",
]
