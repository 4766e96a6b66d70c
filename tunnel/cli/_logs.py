"""Logs of the programs: one line per life-cycle event, for people or machines.

``event(log, "tunnel_opened", "tunnel opened", key=..., peer=...)`` writes
one record whose fields travel in ``extra``; the text format renders them
as ``key=value`` after the message, the JSON format as members of one
object per line (``{"time", "level", "logger", "event", "message", ...}``).

Records of the library (logger ``tunnel``: a device's "reconnecting in
N s", say) go through the same handler; ``context_fields`` adds fields of
the task that logs them (the agent's router address) to every record, so
the library's lines say which router they are about.

Secrets never reach a log: the programs log a token's grant name, never the
token, and no setting that holds a secret is logged.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["context_fields", "event", "setup_logging"]

#: Fields added to every record logged from the current task.
context_fields: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "grpctunnel_log_fields", default=None
)


def event(
    log: logging.Logger, name: str, message: str, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one life-cycle event with its fields."""
    log.log(level, message, extra={"event": name, "fields": fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = dict(context_fields.get() or {})
    fields.update(getattr(record, "fields", None) or {})
    return fields


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2025-01-02T03:04:05.678Z INFO  tunnel opened key=kitchen peer=...``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = _timestamp(record)
        line = f"{stamp} {record.levelname:<5} {record.getMessage()}"
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            document.setdefault(key, value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def setup_logging(log_format: str, level: str) -> None:
    """Send every record (the programs' and the library's) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would be one line per scrape of /metrics.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
