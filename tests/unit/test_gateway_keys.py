"""Device keys: random, stored only as hashes, checked in constant time, revocable, cached briefly."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_gateway import keys
from cloud_gateway.auth import Authenticator
from cloud_gateway.errors import AuthenticationFailed, InvalidDeviceName
from cloud_gateway.idempotency import SqliteIdempotencyStore
from cloud_gateway.keys import KeyStore


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite3")


def reason(excinfo: pytest.ExceptionInfo[AuthenticationFailed]) -> str:
    return excinfo.value.reason


def test_a_new_key_authenticates_its_device(store: KeyStore) -> None:
    new = store.add("clinic-1")
    assert new.token.startswith(f"cgk_{new.key_id}.")
    assert store.authenticate(new.token) == "clinic-1"


def test_keys_are_random_and_the_file_holds_no_secret(store: KeyStore, tmp_path: Path) -> None:
    tokens = {store.add("clinic-1").token for _ in range(20)}
    assert len(tokens) == 20
    store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for token in tokens:
        secret = token.split(".", 1)[1]
        assert secret.encode() not in stored


@pytest.mark.parametrize(
    ("mangle", "why"),
    [
        (lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "unknown"),  # wrong secret
        (lambda t: "cgk_0000000000000000." + t.split(".")[1], "unknown"),  # unknown id
        (lambda t: t.replace("cgk_", "key_"), "malformed"),
        (lambda t: t + "x", "malformed"),
        (lambda t: "", "malformed"),
    ],
)
def test_bad_keys_are_refused(store: KeyStore, mangle: Callable[[str], str], why: str) -> None:
    token = store.add("clinic-1").token
    with pytest.raises(AuthenticationFailed) as err:
        store.authenticate(mangle(token))
    assert reason(err) == why


def test_revoke_all_or_one_key(store: KeyStore) -> None:
    a, b = store.add("clinic-1"), store.add("clinic-1")
    other = store.add("clinic-2")
    assert store.revoke("clinic-1", a.key_id) == 1
    with pytest.raises(AuthenticationFailed) as err:
        store.authenticate(a.token)
    assert reason(err) == "revoked"
    assert store.authenticate(b.token) == "clinic-1"
    assert store.revoke("clinic-1") == 1
    assert store.revoke("clinic-1") == 0
    assert store.authenticate(other.token) == "clinic-2"
    listed = {(k.device, k.key_id): k.revoked_at is not None for k in store.list()}
    assert listed == {
        ("clinic-1", a.key_id): True,
        ("clinic-1", b.key_id): True,
        ("clinic-2", other.key_id): False,
    }


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "x" * 129, "naïve"])
def test_device_names_are_checked(store: KeyStore, name: str) -> None:
    with pytest.raises(InvalidDeviceName):
        store.add(name)
    assert store.list() == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_authenticator_reads_the_bearer_header(store: KeyStore) -> None:
    token = store.add("clinic-1").token
    auth = Authenticator(store, cache_s=0)
    assert await auth.device(f"Bearer {token}") == "clinic-1"
    assert await auth.device(f"bearer  {token} ") == "clinic-1"
    for header, why in [(None, "missing"), ("", "missing"), (f"Basic {token}", "malformed")]:
        with pytest.raises(AuthenticationFailed) as err:
            await auth.device(header)
        assert reason(err) == why


async def test_revocation_takes_effect_when_the_cache_entry_ends(store: KeyStore) -> None:
    new = store.add("clinic-1")
    clock = Clock()
    auth = Authenticator(store, cache_s=2.0, monotonic=clock)
    assert await auth.device(f"Bearer {new.token}") == "clinic-1"
    store.revoke("clinic-1")
    clock.now += 1.0
    assert await auth.device(f"Bearer {new.token}") == "clinic-1"  # still cached
    clock.now += 1.5
    with pytest.raises(AuthenticationFailed) as err:
        await auth.device(f"Bearer {new.token}")
    assert reason(err) == "revoked"


async def test_the_cache_still_checks_the_secret(store: KeyStore) -> None:
    new = store.add("clinic-1")
    auth = Authenticator(store, cache_s=60.0)
    assert await auth.device(f"Bearer {new.token}") == "clinic-1"
    forged = new.token[:-1] + ("A" if new.token[-1] != "A" else "B")
    with pytest.raises(AuthenticationFailed):
        await auth.device(f"Bearer {forged}")


def test_an_unknown_key_id_costs_a_hash_and_a_comparison_as_a_wrong_secret_does(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The code path, not a timing: both refusals hash the guess and compare it, in constant
    # time, with a digest of the same length (issue 12: they differed by 4-11 µs).
    compared: list[tuple[int, int]] = []
    real = keys.hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", recording)
    token = store.add("clinic-1").token
    key_id, secret = token.removeprefix("cgk_").split(".")
    wrong_secret = f"cgk_{key_id}.{'A' * 43}"
    unknown_id = f"cgk_{'0' * 16}.{secret}"
    for bad in (wrong_secret, unknown_id):
        with pytest.raises(AuthenticationFailed) as err:
            store.authenticate(bad)
        assert err.value.reason == "unknown"  # the caller cannot tell them apart either
    assert compared == [(32, 32), (32, 32)]


def test_threads_that_come_and_go_share_connections_instead_of_leaking_one_each(
    tmp_path: Path,
) -> None:
    # Found by the soak (issue 13): a worker thread pool replaces idle threads, and each new
    # thread opened a connection of its own that stayed open: 113 in one gateway worker
    # after 40 minutes, and as many for the idempotency store.
    store = KeyStore(tmp_path / "keys.sqlite3")
    idempotency = SqliteIdempotencyStore(tmp_path / "idempotency.sqlite3")
    token = store.add("clinic-1").token
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        thread = threading.Thread(
            target=lambda: (store.authenticate(token), idempotency.record("scope"))
        )
        thread.start()
        thread.join()
    assert len(os.listdir("/proc/self/fd")) <= fds + 4  # a connection and its WAL, each
    store.close()
    asyncio.run(idempotency.aclose())
