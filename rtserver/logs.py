"""One log format for the server, uvicorn and Litestar, optionally JSON, with the request id.

Each HTTP request and WebSocket gets an id (the client's `x-request-id` when it sends a sane
one, else a new one), answered in the `x-request-id` header and carried by every log line the
request causes, including the tasks it starts (a context variable, copied into new tasks).
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import os
import re
import secrets
import time

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Lines from the inference thread name their job's request in `extra`.
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


# Set in a request's task when the server ends its response body early on purpose (a limit,
# a client that stopped reading); the reason is logged where it happens.
stream_cut: contextvars.ContextVar[bool] = contextvars.ContextVar("stream_cut", default=False)


class _ExpectedCut(logging.Filter):
    """uvicorn logs any response body that ends early as an ERROR; one the server cut on
    purpose is not an error, and already has its own warning line. Nor is cancelling, after
    the drain, the connections whose clients took nothing: a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Cancel ") and "graceful shutdown exceeded" in message:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return not (stream_cut.get() and message.startswith("ASGI callable returned"))


class _QueryNamesOnly(logging.Filter):
    """Access lines keep a query's parameter names, not their values: upstream's
    /inference_sft takes the text to speak there, and a log is no place for what users say."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and "?" in str(args[2]):
            path, _, query = str(args[2]).partition("?")
            names = [part.partition("=")[0][:32] + "=..." for part in query.split("&") if part]
            shown = "&".join(names[:8]) + ("&..." if len(names) > 8 else "")
            record.args = (*args[:2], f"{path}?{shown}", *args[3:])
        return True


FLOOD_LINES_S = 20  # lines a second of one logger that counts what clients do (_Flood)


class _Flood(logging.Filter):
    """At most FLOOD_LINES_S lines a second of refusals from the loggers that write one per
    request or connection (uvicorn's access log, its lines of a status of 400 or more; the
    connection's refusals): a client flooding the server with refused requests wrote a line
    for each, 1,500 a second, 0.7 GB an hour. Past it, lines are counted, and the count is
    said in the next refusal's line in a later second. Answered requests are all logged."""

    def __init__(self) -> None:
        super().__init__()
        self._second, self._lines, self._left_out = 0, 0, 0

    def counts(self, record: logging.LogRecord) -> bool:
        """Whether the line is one of those bounded (else it is always written)."""
        args = record.args  # an access line: (client, method, path, version, status)
        access = isinstance(args, tuple) and len(args) == 5 and isinstance(args[4], int)
        return not (access and args[4] < 400)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.counts(record):
            return True
        second = int(record.created)
        if second != self._second:
            if self._left_out:
                record.msg = f"[{self._left_out} lines like this left out] {record.msg}"
            self._second, self._lines, self._left_out = second, 0, 0
        self._lines += 1
        if self._lines <= FLOOD_LINES_S:
            return True
        self._left_out += 1
        return False


class _ProtocolFlood(_Flood):
    """uvicorn's own lines about what one connection sent (a request it cannot parse, an
    upgrade it does not support, a WebSocket handshake's answer) come from its protocol
    modules, below ERROR: a client sending garbage on new connections wrote 2,100 a second.
    The application's errors on that logger are all written."""

    def counts(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and _PROTOCOLS in record.pathname


_PROTOCOLS = os.path.join("uvicorn", "protocols", "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def log_config(level: str, fmt: str) -> dict:
    """dictConfig for the root logger and uvicorn's, so every line has one shape."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "main",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    quiet = {"handlers": ["main"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "request_id": {"()": _WithRequestId},
            "cut": {"()": _ExpectedCut},
            "query": {"()": _QueryNamesOnly},
            "flood_access": {"()": _Flood},
            "flood_connection": {"()": _Flood},
            "flood_protocol": {"()": _ProtocolFlood},
        },
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "root": {"handlers": ["main"], "level": level.upper()},
        "loggers": {
            "uvicorn": quiet,
            "uvicorn.access": {**quiet, "filters": ["flood_access", "query"]},
            "rtserver.access": {**quiet, "filters": ["flood_access", "query"]},  # Ray replicas'
            "uvicorn.error": {**quiet, "filters": ["cut", "flood_protocol"]},
            "rtserver.connection": {"filters": ["flood_connection"]},
        },
    }


def with_request_id(app: ASGIApp) -> ASGIApp:
    """Middleware: give the request its id and answer it in `x-request-id`."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.fullmatch(given) else secrets.token_hex(8)
        token = request_id.set(rid)
        try:
            await app(scope, receive, with_header(send, b"x-request-id", rid.encode()))
        finally:
            request_id.reset(token)

    return wrapped


def with_header(send: Send, name: bytes, value: bytes) -> Send:
    """`send`, adding a header to the response start (HTTP) or the accept or refusal
    (WebSocket)."""

    async def sending(message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.accept",
                               "websocket.http.response.start"):  # fmt: skip
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return sending
