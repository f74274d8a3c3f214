"""The agent's security rules as pure logic: settings that refuse an unsafe deployment, tokens,
owners of results, secret files' modes, masked URLs, and the keyring's seals and rotation."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from edge_agent.access import (
    ANONYMOUS,
    AccessDenied,
    AccessPolicy,
    Caller,
    TokenFileError,
    check_client_id,
    read_token_file,
)
from edge_agent.credentials import DeviceKeyFileError, read_device_key
from edge_agent.settings import SettingsError, is_loopback, load_settings
from model_runtime import InvalidInput
from model_runtime.encryption import DataKey, DataKeyError, Keyring, UnknownDataKey
from model_runtime.logs import redact
from model_runtime.private_files import InsecureSecretFile, check_secret_file

TOKEN = "0123456789abcdef0123"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
     ("agent.clinic", False)],
)  # fmt: skip
def test_loopback_is_recognised(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_beyond_loopback_the_api_needs_authentication_or_an_explicit_insecure(
    tmp_path: Path,
) -> None:
    with pytest.raises(SettingsError, match=r"host: .*0\.0\.0\.0 is beyond loopback"):
        load_settings(host="0.0.0.0")
    assert load_settings(host="0.0.0.0", insecure=True).insecure
    assert load_settings(host="0.0.0.0", token_file=tmp_path / "tokens").host == "0.0.0.0"
    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    assert (
        load_settings(
            host="10.0.0.5", tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca
        ).tls_client_ca_file
        == ca
    )
    with pytest.raises(SettingsError, match="tls_cert_file and tls_key_file go together"):
        load_settings(tls_cert_file=cert)
    with pytest.raises(SettingsError, match="needs tls_cert_file"):
        load_settings(tls_client_ca_file=ca)


def test_plain_http_to_a_remote_cloud_is_refused_unless_allowed(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    with pytest.raises(SettingsError, match=r"cloud_url: .*http:// to a host beyond loopback"):
        load_settings(cloud_url="http://gateway.example.org", device_key_file=key)
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "https://gateway.example.org"):
        assert load_settings(cloud_url=url, device_key_file=key).cloud_url == url
    allowed = load_settings(
        cloud_url="http://gateway.example.org", device_key_file=key, allow_plain_http=True
    )
    assert allowed.allow_plain_http


def test_cloud_tls_files_go_with_https_and_in_pairs(tmp_path: Path) -> None:
    key, pem = tmp_path / "device.key", tmp_path / "x.pem"
    https = {"cloud_url": "https://gw", "device_key_file": key}
    assert load_settings(**https, cloud_ca_file=pem).cloud_ca_file == pem
    with pytest.raises(SettingsError, match="cloud_client_cert and cloud_client_key go together"):
        load_settings(**https, cloud_client_cert=pem)
    with pytest.raises(SettingsError, match="for an https:// cloud_url"):
        load_settings(cloud_url="http://127.0.0.1:1", device_key_file=key, cloud_ca_file=pem)


def test_token_file_gives_names_and_refuses_weak_or_duplicate_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# apps of the clinic\nkiosk-1 {TOKEN}\n\nscreen.2 {TOKEN}x\n")
    path.chmod(0o600)
    assert read_token_file(path) == ({"kiosk-1": TOKEN, "screen.2": TOKEN + "x"}, None)
    for text, problem in (
        ("kiosk short\n", "at least 16"),
        (f"kiosk {TOKEN}\nkiosk {TOKEN}y\n", "given twice"),
        (f"a {TOKEN}\nb {TOKEN}\n", "two names"),
        (f"{TOKEN}\n", "expected '<name> <token>'"),
        ("# nothing\n", "has no tokens"),
    ):
        path.write_text(text)
        with pytest.raises(TokenFileError, match=problem):
            read_token_file(path)
    path.write_text(f"kiosk {TOKEN}\n")
    path.chmod(0o620)
    with pytest.raises(TokenFileError, match="writable by its group"):
        read_token_file(path)
    path.chmod(0o640)
    assert "readable by its group" in str(read_token_file(path)[1])


def test_callers_are_named_by_their_token_or_certificate() -> None:
    policy = AccessPolicy({"kiosk-1": TOKEN}, client_certificates=True)
    auth = policy.authenticate
    assert auth(authorization=f"Bearer {TOKEN}", certificate_name=None) == Caller("token:kiosk-1")
    assert auth(authorization=f"bearer  {TOKEN} ", certificate_name="x") == Caller("token:kiosk-1")
    assert auth(authorization=None, certificate_name="kiosk-7") == Caller("cert:kiosk-7")
    for authorization, reason in (
        (None, "missing"),
        ("Bearer nope", "unknown"),
        (TOKEN, "malformed"),
    ):
        with pytest.raises(AccessDenied) as denied:
            auth(authorization=authorization, certificate_name=None)
        assert denied.value.reason == reason
    # With nothing to ask for, every caller is the same anonymous one.
    assert AccessPolicy().authenticate(authorization="junk", certificate_name=None) is ANONYMOUS


def test_owners_keep_callers_and_client_ids_apart() -> None:
    assert ANONYMOUS.owner() == ""  # what results queued before owners existed have
    owners = {
        ANONYMOUS.owner("screen-1"),
        Caller("token:a").owner(),
        Caller("token:a").owner("b"),
        Caller("cert:a/b").owner(),
        Caller("cert:a").owner("b"),
    }
    assert len(owners) == 5
    assert check_client_id(None) == check_client_id("") == ""
    assert check_client_id("kiosk-7:screen.2") == "kiosk-7:screen.2"
    for bad in ("has space", "x" * 129, 7):
        with pytest.raises(InvalidInput, match=r"^client_id: must be 1-128"):
            check_client_id(bad)


def test_secret_files_others_may_write_are_refused_readable_ones_warned(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_text("k")
    for mode, outcome in ((0o600, None), (0o400, None), (0o640, "readable"), (0o604, "readable")):
        path.chmod(mode)
        warning = check_secret_file(path, "device key file")
        assert (warning is None) if outcome is None else (outcome in str(warning))
    for mode in (0o666, 0o620, 0o602):
        path.chmod(mode)
        with pytest.raises(InsecureSecretFile, match="chmod 600"):
            check_secret_file(path, "device key file")


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("serving https://ops:s3cret@gw:8443/v2", "serving https://ops:***@gw:8443/v2"),
        ("redis://:s3cret@10.0.0.2:6379/0", "redis://:***@10.0.0.2:6379/0"),
        ("unix://:s3cret@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("https://s3cret@gw/", "https://***@gw/"),
        ("rediss://gw/0?db=1&password=s3cret", "rediss://gw/0?db=1&password=***"),
        ("http://gw/v2/models/digits/infer", "http://gw/v2/models/digits/infer"),
    ],
)
def test_urls_lose_their_credentials_in_logs(text: str, masked: str) -> None:
    assert redact(text) == masked


def _key_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def test_sealed_data_is_bound_to_its_row_and_readable_after_a_rotation(tmp_path: Path) -> None:
    old_file, new_file = _key_file(tmp_path, "old.key"), _key_file(tmp_path, "new.key")
    old, _ = Keyring.load(old_file)
    sealed = old.seal(b'{"inputs": [1.5]}', b"queue.payload\x00t1")
    assert b"1.5" not in sealed
    assert old.open(sealed, b"queue.payload\x00t1") == b'{"inputs": [1.5]}'
    with pytest.raises(DataKeyError, match="integrity"):
        old.open(sealed, b"queue.payload\x00t2")  # copied into another row
    rotated, _ = Keyring.load(new_file, [old_file])
    assert rotated.open(sealed, b"queue.payload\x00t1") == b'{"inputs": [1.5]}'
    resealed = rotated.seal(b"x", b"c")
    assert resealed[5:13] == DataKey.load(new_file)[0].id  # sealed with the current key
    with pytest.raises(UnknownDataKey, match=DataKey.load(old_file)[0].id_hex):
        Keyring.load(new_file)[0].open(sealed, b"queue.payload\x00t1")
    # Rows written before encryption was on are read as they are.
    assert rotated.open(b'{"plain": 1}', b"c") == b'{"plain": 1}'
    assert Keyring().seal(b"clear", b"c") == b"clear"


def test_bad_key_files_are_refused_with_their_name(tmp_path: Path) -> None:
    path = tmp_path / "data.key"
    for text, problem in (
        ("not base64!", "not base64"),
        (base64.b64encode(b"short").decode(), "32 bytes"),
    ):
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(DataKeyError, match=problem) as caught:
            Keyring.load(path)
        assert str(path) in str(caught.value)
    _key_file(tmp_path, "data.key").chmod(0o666)
    with pytest.raises(DataKeyError, match="writable"):
        Keyring.load(path)


def test_a_calibration_backup_is_private_whatever_the_umask(tmp_path: Path) -> None:
    from model_runtime.model_config import ModelConfig, write_model_config

    path = tmp_path / "config.toml"
    path.write_text("threshold = 0.5\n")
    path.chmod(0o644)  # the config itself stays readable by the agent's user
    previous = os.umask(0o022)
    try:
        backup = write_model_config(path, ModelConfig(threshold=0.7))
    finally:
        os.umask(previous)
    assert backup is not None
    assert backup.stat().st_mode & 0o777 == 0o600
    assert backup.read_text() == "threshold = 0.5\n"
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "url",
    ["http://user:s3cret-pw@127.0.0.1:8000", "https://user:s3cret-pw@gateway.example.org",
     "https://:s3cret-pw@gateway.example.org", "https://user@gateway.example.org"],
)  # fmt: skip
def test_a_cloud_url_with_credentials_is_refused_without_echoing_them(
    url: str, tmp_path: Path
) -> None:
    # httpx would send them as Basic auth, beside or instead of the device's Bearer key.
    with pytest.raises(SettingsError) as refused:
        load_settings(cloud_url=url, device_key_file=tmp_path / "device.key")
    message = str(refused.value)
    assert message.startswith("cloud_url: ")
    assert "user name or password" in message
    assert "s3cret-pw" not in message
    assert "user@" not in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [("K3Y-abc\n", None), ("K3Y-abc\r\n", None), ("K3Y-abc", None), ("", "is empty"),
     ("\n", "is empty"), (" \n", "is empty"), ("\tK3Y-abc\n", "has whitespace before the key"),
     ("K3Y-abc \n", "has whitespace after the key"), ("K3Y-abc\n\n", "has whitespace after the key"),
     ("K3Y\nabc\n", "has more than one line"), ("K3Y abc\n", "has whitespace inside the key"),
     ("K3Y\x00abc", "has a character that is not printable")],
)  # fmt: skip
def test_the_device_key_file_holds_the_key_alone_on_one_line(
    text: str, problem: str | None, tmp_path: Path
) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(text.encode())
    path.chmod(0o600)
    if problem is None:
        assert read_device_key(path) == ("K3Y-abc", None)
        return
    with pytest.raises(DeviceKeyFileError) as refused:
        read_device_key(path)
    assert refused.value.problem == problem
    assert str(refused.value).startswith(f"device key file {path} {problem}")
    assert "K3Y" not in str(refused.value)
