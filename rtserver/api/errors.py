"""Every error is JSON with a human-readable `detail`, and the right status code."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from rtserver.service import (
    Busy,
    ClientGone,
    ShuttingDown,
    SpeakerRefused,
    SynthesisFailed,
    TextRejected,
    TooManyForClient,
    UnknownSpeaker,
)

log = logging.getLogger("rtserver.api")


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Every error's body (OpenAI's routes reshape it: rtserver.api.openai)."""

    status_code: int
    detail: str  # what was wrong, for a person
    extra: dict | list | None = None


def invalid(key: str, message: str, source: str = "body") -> ValidationException:
    """A 422 for one field's problem, shaped as Litestar's own (``key``, ``message``,
    ``source``: where the field came from)."""
    return ValidationException(message, extra=[{"message": message, "key": key, "source": source}])


OPENAI_PREFIX = "/v1/"  # errors under it come in OpenAI's shape, so its SDKs show them


def under_openai(path: str) -> bool:
    """Whether ``path`` is one of OpenAI's routes' (the router takes //v1/... as /v1/...)."""
    return ("/" + path.lstrip("/")).startswith(OPENAI_PREFIX)


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str  # invalid_request_error or server_error
    param: str | None = None
    code: str | None = None


class OpenAIError(msgspec.Struct):
    error: OpenAIErrorDetail


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> OpenAIError:
    """An error body in OpenAI's shape (also for refusals made before routing: a key missing)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        code = "invalid_api_key"  # as OpenAI answers a key missing or wrong
    return OpenAIError(OpenAIErrorDetail(message, kind, param, code))


def refusal(path: str, status: int, detail: str) -> ErrorBody | OpenAIError:
    """The body of a refusal made before the app routes the request (a key missing, a
    request too slow or too large): OpenAI's shape under its prefix, ours elsewhere."""
    return openai_error(status, detail) if under_openai(path) else ErrorBody(status, detail)


# msgspec names the field a problem is in: "missing required field `x`", "... - at `$.x`".
_FIELD = re.compile(r"missing required field `([^`]+)`|at `\$\.([^`.\[]+)")


def field_of(message: str) -> str:
    """The field a msgspec validation message names; `body` where it names none (an array
    sent for an object is the whole body's problem)."""
    m = _FIELD.search(message)
    return (m.group(1) or m.group(2)) if m else "body"


def _keyed(problem: object) -> object:
    """A body field's problem under that field's key: Litestar files it under the handler's
    parameter name (`data`), which names no field a client sent or could send."""
    if not isinstance(problem, dict) or problem.get("key") not in (None, "data"):
        return problem
    return {**problem, "key": field_of(str(problem.get("message", "")))}


def validation_error(_: Request, exc: ValidationException) -> Response:
    # Litestar answers 400 for schema violations; the API promises 422 (as FastAPI does).
    problems = [_keyed(p) for p in exc.extra] if isinstance(exc.extra, list) else []
    if not problems:  # one about the body as a whole (a multipart type without a boundary)
        problems = [{"message": str(exc.detail), "key": "body", "source": "body"}]
    messages = [
        f"{p.get('key') or 'body'}: {p.get('message')}" if isinstance(p, dict) else str(p)
        for p in problems
    ]
    detail = "; ".join(messages)
    return Response(ErrorBody(422, f"invalid request: {detail}", problems), status_code=422)


# Litestar's multipart parser refuses a form of more than 1000 parts with this 400.
_TOO_MANY_PARTS = (400, "Request Entity Too Large")
_BODY_TOO_LARGE = (413, "Request Entity Too Large")


def http_error(request: Request, exc: HTTPException) -> Response:
    status, detail = exc.status_code, str(exc.detail)
    if (status, detail) == _TOO_MANY_PARTS:
        status, detail = (
            413,
            "the form has too many parts (at most 1000), or a part's headers are too long",
        )
    elif (status, detail) == _BODY_TOO_LARGE:  # Litestar's words name no limit
        most = request.route_handler.resolve_request_max_body_size() or 0
        detail = f"the request body is over {most / 1024 / 1024:g} MiB, this route's limit"
    return Response(
        ErrorBody(status, detail, exc.extra or None), status_code=status, headers=exc.headers
    )


def unknown_speaker(_: Request, exc: UnknownSpeaker) -> Response:
    return Response(ErrorBody(400, str(exc), {"valid_speakers": exc.valid}), status_code=400)


def text_rejected(_: Request, exc: TextRejected) -> Response:
    return Response(ErrorBody(exc.status, str(exc), {"code": exc.code}), status_code=exc.status)


def _plain(status: int, retry: bool = False) -> Callable[[Request, Exception], Response]:
    """A handler that answers `status` with the exception's message (Retry-After: 1 where
    trying again soon can succeed)."""
    headers = {"Retry-After": "1"} if retry else None

    def handler(_: Request, exc: Exception) -> Response:
        return Response(ErrorBody(status, str(exc)), status_code=status, headers=headers)

    return handler


def client_gone(_: Request, exc: ClientGone) -> Response:
    # Nobody reads this; answering (instead of raising) keeps a normal event out of the logs.
    return Response(ErrorBody(499, "client closed the request"), status_code=499)


def synthesis_failed(_: Request, exc: SynthesisFailed) -> Response:
    return Response(ErrorBody(500, f"synthesis failed: {exc}"), status_code=500)


def speaker_refused(_: Request, exc: SpeakerRefused) -> Response:
    return Response(ErrorBody(exc.status, str(exc)), status_code=exc.status)


def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(ErrorBody(500, f"internal error: {type(exc).__name__}"), status_code=500)


EXCEPTION_HANDLERS = {
    ValidationException: validation_error,
    HTTPException: http_error,
    UnknownSpeaker: unknown_speaker,
    TextRejected: text_rejected,
    Busy: _plain(503, retry=True),
    TooManyForClient: _plain(429, retry=True),
    ShuttingDown: _plain(503, retry=True),
    ClientGone: client_gone,
    SynthesisFailed: synthesis_failed,
    SpeakerRefused: speaker_refused,
    Exception: internal_error,
}
