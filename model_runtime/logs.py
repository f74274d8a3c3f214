"""Logging for both daemons: JSON lines for machines, plain text on a terminal. Never payloads
or keys: callers log what identifies a call and how it ended, not its tensors; and a filter on
every handler masks credentials in URLs, whichever library's logger wrote them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "RedactSecrets", "configure_logging", "redact"]

# user:password@ (or a bare token@) after a URL scheme, and secret-looking query parameters.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:(?P<user>[^\s/@:'\"<>]*):)?[^\s/@'\"<>]*@"
)
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|secret|key|api_key)=)[^&;#\s'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it masked: `https://ops:pw@host` becomes
    `https://ops:***@host`, `https://token@host` becomes `https://***@host`, `?password=pw`
    becomes `?password=***`."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_QUERY.sub(r"\g<key>***", text)


def _mask_userinfo(match: re.Match[str]) -> str:
    user = match["user"]
    return f"{match['scheme']}{user}:***@" if user is not None else f"{match['scheme']}***@"


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact_arg(value: Any) -> Any:
    if value is None or isinstance(value, int | float | bool):
        return value
    text = str(value)
    cleaned = redact(text)
    return value if cleaned == text else cleaned


class RedactSecrets(logging.Filter):
    """Masks URL credentials in a record's message, structured fields and traceback. Installed
    on handlers rather than loggers, so it sees the records of every library (httpx, httpcore,
    uvicorn, redis) that reach them."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Argument by argument, so formatters that read record.args (uvicorn's access log) keep
        # working; an object argument (httpx's URL) is replaced by its masked text if need be.
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        else:
            record.msg = redact(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = _redact_value(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, identity: dict[str, str] | None = None) -> None:
        """`identity` (site, device) is put on every line, so a fleet's logs can be merged."""
        super().__init__()
        self.identity = identity or {}

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            **self.identity,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        event.update(getattr(record, "fields", {}))
        if record.exc_text:
            event["exc"] = record.exc_text
        elif record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(level: str, **identity: str) -> None:
    """JSON lines carrying `identity` (e.g. site=..., device=...), or plain text on a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(identity))
    handler.addFilter(RedactSecrets())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # httpx logs every request at INFO; per-call lines belong to DEBUG here.
    per_call = logging.NOTSET if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(per_call)
