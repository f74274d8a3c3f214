"""The v2 JSON codec: orjson's speed, the standard library's answers."""

from __future__ import annotations

import json
import math

import pytest

from model_runtime import json_codec


def test_bodies_parse_as_the_standard_library_parses_them() -> None:
    body = b'{"id": "r-1", "inputs": [{"name": "X", "shape": [1, 2], "data": [0.1, 2]}]}'
    assert json_codec.loads(body) == json.loads(body)


@pytest.mark.parametrize(
    "body", [b'{"data": [NaN, Infinity]}', b"[1e400]", b'{"n": 123456789012345678901234567890}']
)
def test_what_only_the_standard_library_accepts_is_still_accepted(body: bytes) -> None:
    # NaN then meets the tensor checks, which name the tensor; big integers the dtype checks.
    parsed = json_codec.loads(body)
    assert repr(parsed) == repr(json.loads(body))


def test_broken_bodies_raise_the_standard_errors() -> None:
    with pytest.raises(json.JSONDecodeError) as error:
        json_codec.loads(b'{"inputs": [')
    assert error.value.msg == "Expecting value"
    with pytest.raises(UnicodeDecodeError):
        json_codec.loads(b'{"id": "\xc3\x28"}')


def test_answers_are_compact_json_with_their_strings_intact() -> None:
    document = {"model_name": "null-model", "outputs": [{"data": [0.25, 1, "null"]}]}
    text = json_codec.dumps(document)
    assert b" " not in text
    assert json.loads(text) == document


def test_an_answer_holding_nan_is_refused_not_sent_as_null() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        json_codec.dumps({"outputs": [{"data": [math.nan]}]})


@pytest.mark.parametrize("digits", ["9223372036854775807", "-9223372036854775808", "1" * 30])
def test_long_integers_stay_exact_integers(digits: str) -> None:
    # Read as a float, an integer past 64 bits would reach an INT64 tensor as garbage.
    parsed = json_codec.loads(f'{{"data": [{digits}, 1.5]}}'.encode())
    assert parsed == {"data": [int(digits), 1.5]}
    assert isinstance(parsed["data"][0], int)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested more than 1024 levels"),
        (b"[" * 2_000 + b"]" * 2_000, "nested more than 1024 levels"),
        (b'{"data": [' + b"7" * 5_000 + b"]}", "more than 4300 digits"),
    ],
)
def test_bodies_no_parser_should_chase_are_one_clear_error(body: bytes, words: str) -> None:
    # Before issue 12: RecursionError and the stdlib's digit-limit ValueError, i.e. a 500.
    with pytest.raises(json_codec.JsonTooComplex) as error:
        json_codec.loads(body)
    assert words in error.value.msg
    assert "\n" not in error.value.msg
    assert isinstance(error.value, json.JSONDecodeError)  # refused wherever broken JSON is
