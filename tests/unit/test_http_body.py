"""Request bodies parsed as JSON with errors that name the body (model_runtime.http_body; its
body limits and gzip are tested through the gateway, in test_gateway_limits.py)."""

from __future__ import annotations

import pytest

from model_runtime import InvalidInput
from model_runtime.http_body import parse_json_body


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs": [', "is not valid JSON"),
        (b'"\xff"', "is not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nest"),
    ],
)
def test_a_body_that_is_not_json_names_the_body(body: bytes, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_json_body(body)
    assert err.value.field == "body"
    assert words in err.value.problem


def test_a_json_body_is_parsed() -> None:
    assert parse_json_body(b'{"id": "a", "inputs": []}') == {"id": "a", "inputs": []}
