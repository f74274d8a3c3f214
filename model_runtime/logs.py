"""Logging for both daemons: JSON lines for machines, plain text on a terminal. Never payloads
or keys: callers log what identifies a call and how it ended, not its tensors.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["JsonFormatter", "configure_logging"]


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
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(level: str, **identity: str) -> None:
    """JSON lines carrying `identity` (e.g. site=..., device=...), or plain text on a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(identity))
    logging.basicConfig(level=level, handlers=[handler], force=True)
