"""Logging: human-readable or JSON lines, each carrying the request id of the call it belongs to.

The request id comes from the caller's ``x-request-id`` metadata (or is generated) and lives in
a context variable, so every line logged while serving that call, including the selector's
decisions and the runtimes' messages, carries it without passing it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Callable
from typing import Any


class DeferredId:
    """A request id worked out the first time a log line asks for it, then kept: most calls
    log nothing, and reading a call's metadata for its id costs more CPU than the rest of a
    small call's bookkeeping together."""

    __slots__ = ("_argument", "_resolve", "_value")

    def __init__(self, resolve: Callable[[Any], str], argument: Any) -> None:
        self._resolve = resolve
        self._argument = argument
        self._value: str | None = None

    def __str__(self) -> str:
        if self._value is None:
            self._value = self._resolve(self._argument)
            self._argument = None
        return self._value


request_id_var: contextvars.ContextVar[str | DeferredId] = contextvars.ContextVar(
    "request_id", default="-")


_base_factory = logging.getLogRecordFactory()


def _record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    request_id = request_id_var.get()
    record.request_id = request_id if type(request_id) is str else str(request_id)
    return record


# Every record gets the request id, whichever handler (ours, pytest's, an embedding app's)
# formats it.
if getattr(_base_factory, "__name__", "") != "_record_with_request_id":
    logging.setLogRecordFactory(_record_with_request_id)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def console_line(message: str, fmt: str, *, logger: str = "tensorline") -> str:
    """``message`` as the server prints it to its console (stdout): as is for ``text``, a JSON
    log entry for ``json``, so that a log collector reading the server's output parses every
    line."""
    if fmt != "json":
        return message
    record = logging.LogRecord(logger, logging.INFO, __file__, 0, message, None, None)
    return JsonFormatter().format(record)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Install one handler on the root logger (replacing earlier ones from this function)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_tensorline", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._tensorline = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
