"""GzipWhenAsked: gzip for the clients that accept it, plain answers with the right Vary."""

from __future__ import annotations

import gzip

import pytest
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from cloud_gateway.compression import GzipWhenAsked

BIG = b'{"outputs":[' + b"0.125," * 200 + b"1]}"
SMALL = b'{"outputs":[1]}'


def app_answering(body: bytes) -> GzipWhenAsked:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await Response(body, media_type="application/json")(scope, receive, send)

    return GzipWhenAsked(app, minimum_size=512, compresslevel=6)


async def call(app: GzipWhenAsked, accept: bytes | None) -> tuple[dict[bytes, bytes], bytes]:
    headers = [(b"accept-encoding", accept)] if accept is not None else []
    scope: Scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert start["status"] == 200
    return {k: v for k, v in start["headers"]}, body


async def test_clients_that_accept_gzip_get_it() -> None:
    headers, body = await call(app_answering(BIG), b"br, gzip")
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"vary"] == b"Accept-Encoding"
    assert gzip.decompress(body) == BIG


@pytest.mark.parametrize("accept", [None, b"identity", b"br"])
async def test_others_get_the_plain_answer_saying_it_could_vary(accept: bytes | None) -> None:
    headers, body = await call(app_answering(BIG), accept)
    assert body == BIG
    assert b"content-encoding" not in headers
    assert headers[b"vary"] == b"Accept-Encoding"
    assert int(headers[b"content-length"]) == len(BIG)


async def test_small_answers_are_never_compressed_and_do_not_vary() -> None:
    for accept in (None, b"gzip"):
        headers, body = await call(app_answering(SMALL), accept)
        assert body == SMALL
        assert b"content-encoding" not in headers
        assert b"vary" not in headers
