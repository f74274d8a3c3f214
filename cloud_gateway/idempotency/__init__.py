"""Idempotency: run the model once per device and Idempotency-Key, replay the answer to repeats."""

from cloud_gateway.idempotency.base import Existing, IdempotencyStore, StoreBounds, scope_id
from cloud_gateway.idempotency.guard import (
    AFTER_RUN_BEFORE_STORE,
    ClientCheck,
    IdempotencyGuard,
    IdempotencyPolicy,
    Outcome,
)
from cloud_gateway.idempotency.redis_store import RedisIdempotencyStore
from cloud_gateway.idempotency.sqlite_store import SqliteIdempotencyStore

__all__ = [
    "AFTER_RUN_BEFORE_STORE",
    "ClientCheck",
    "Existing",
    "IdempotencyGuard",
    "IdempotencyPolicy",
    "IdempotencyStore",
    "Outcome",
    "RedisIdempotencyStore",
    "SqliteIdempotencyStore",
    "StoreBounds",
    "scope_id",
]
