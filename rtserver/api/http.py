"""HTTP routes: the CosyVoice SFT-mode API (MP3, PCM), upstream-compatible /inference_sft and
the routes that speak in the voice of a recording sent with the request (zero-shot,
cross-lingual, instruct2), speakers, probes."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import logging
import re
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
from litestar import Request, delete, get, post, route
from litestar.connection import ASGIConnection
from litestar.datastructures import FormMultiDict, UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, MethodNotAllowedException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import RequestBody
from litestar.params import Parameter
from litestar.response import Response, Stream
from litestar.types import ASGIApp, Empty, Message, Receive, Scope, Send

from rtserver.api.connection import GONE, attach, client_key
from rtserver.api.docs import BINARY, L16, audio_operation, body_operation, error_docs, form_body
from rtserver.api.errors import ErrorBody, field_of, invalid, refusal
from rtserver.engine import Speaker
from rtserver.logs import stream_cut
from rtserver.metrics import ANSWERED
from rtserver.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from rtserver.protocol import Seed, SpeakerInfo, Speed, TTSRequest
from rtserver.service import (
    SHUTTING_DOWN,
    ClientGone,
    ShuttingDown,
    SynthesisFailed,
    TextRejected,
    TTSService,
    UnknownSpeaker,
    UnsupportedFormat,
    echoed,
)
from rtserver.session import Audio, Cancelled, Failed, SegmentEnd, SessionEvent

log = logging.getLogger("rtserver.api")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # text that came as bytes or escapes it was not
MAX_FORM_FIELDS = 1000  # as Litestar's multipart parser's part limit


def _escaped(raw: bytes) -> str:
    """``raw`` as UTF-8, each byte that is not part of UTF-8 text kept as a lone surrogate."""
    return raw.decode(errors="surrogateescape")


F = TypeVar("F", bound=msgspec.Struct)  # an upstream route's form fields
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # a 30 s prompt as 48 kHz stereo WAV is 5.8 MB

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_SPEAKING = {  # what any route that speaks may answer
    400: "Unknown spk_id (extra.valid_speakers lists the valid ones), or a body that is not "
    "UTF-8 JSON.",
    413: "Text longer than the server's limit, or a body over the route's limit (1 MiB; 8 MiB "
    "with a recording).",
    422: "Schema violation: missing field, wrong type, speed outside [0.25, 4], blank text, "
    "text with nothing to speak, control characters.",
    429: "This client address already has its limit of streams open.",
    500: "Synthesis failed before the first audio.",
    503: "At capacity; retry after Retry-After seconds.",
}
_UPLOADS = {  # the routes that take a recording
    408: "The upload was too slow while others waited for a place (or not in within "
    "--request-timeout-s).",
    503: "At capacity, or the line of uploads is full; retry after Retry-After seconds.",
}
_ADMIN = {403: "The server has admin keys and this is not one."}
_NOT_STORED = {507: "The server's speaker folder is read-only or full (its log says which)."}
JSON_ERRORS = error_docs(
    ErrorBody,
    {**_SPEAKING, 415: "A content type other than application/json, or a compressed body."},
)
FORM_ERRORS = error_docs(ErrorBody, {
    **_SPEAKING,
    413: f"{_SPEAKING[413]} Or a form of more than 1000 parts.",
    415: "A body that is no form (these routes take a form, multipart or the query string, as "
    "upstream's), or a compressed one.",
})  # fmt: skip
RECORDING_ERRORS = {**FORM_ERRORS, **error_docs(ErrorBody, _UPLOADS)}
REGISTER_ERRORS = error_docs(ErrorBody, {
    400: "The recording is not audio, too short or long, or below 16 kHz; an invalid name; an "
    "engine without zero-shot speakers.",
    **_ADMIN,
    409: "The id is in use (delete it first), or --max-speakers are registered.",
    413: "prompt_text over 1000 characters, or a body over 8 MiB.",
    415: "A body that is not a form, or a compressed one.",
    422: "A field missing or empty, or the recording sent as text (not a file part).",
    **_UPLOADS,
    **_NOT_STORED,
})  # fmt: skip
DELETE_ERRORS = error_docs(ErrorBody, {
    400: "A built-in speaker (only registered ones can be deleted), or an engine without "
    "registered speakers.",
    **_ADMIN,
    404: "No speaker by that id.",
    **_NOT_STORED,
})  # fmt: skip


class _Ours(msgspec.Struct, kw_only=True):
    """The fields every upstream route takes here beside upstream's own."""

    seed: Seed = 0  # upstream draws one: the same seed, the same audio
    speed: Speed = 1.0  # upstream's server has none (its model call does)


class SftForm(_Ours):
    """Upstream's /inference_sft fields (form, multipart or query string)."""

    tts_text: Annotated[str, msgspec.Meta(min_length=1)]
    spk_id: Annotated[str, msgspec.Meta(min_length=1)]


class InstructForm(_Ours):
    """Upstream's /inference_instruct (CosyVoice-300M-Instruct): a speaker and an instruction."""

    tts_text: Annotated[str, msgspec.Meta(min_length=1)]
    spk_id: Annotated[str, msgspec.Meta(min_length=1)]
    instruct_text: Annotated[str, msgspec.Meta(min_length=1)]


class ZeroShotForm(_Ours):
    """Upstream's /inference_zero_shot text fields; the recording comes as the file part
    `prompt_wav` (so on the two routes below)."""

    tts_text: Annotated[str, msgspec.Meta(min_length=1)]
    prompt_text: Annotated[str, msgspec.Meta(min_length=1)]


class CrossLingualForm(_Ours):
    """Upstream's /inference_cross_lingual: no transcript, the LLM hears no prompt."""

    tts_text: Annotated[str, msgspec.Meta(min_length=1)]


class Instruct2Form(_Ours):
    """Upstream's /inference_instruct2 (CosyVoice2/3): an instruction instead of a transcript."""

    tts_text: Annotated[str, msgspec.Meta(min_length=1)]
    instruct_text: Annotated[str, msgspec.Meta(min_length=1)]


def _info(s: Speaker) -> SpeakerInfo:
    return SpeakerInfo(id=s.id, language=s.language, sample_rate=s.sample_rate, engine=s.engine,
                       instructions=s.instructions)  # fmt: skip


class StreamAborted(Exception):
    """The stream ended early after its headers were sent: the body must break, so the client
    can tell. `abort_quietly` turns it into one log line instead of a traceback."""


def abort_quietly(app: ASGIApp, draining: Callable[[], bool] = lambda: False) -> ASGIApp:
    """Wrap the ASGI app: a stream that ends early (a limit, a client that stopped reading) is
    an expected event, not a server error; so is a connection uvicorn cancels once the drain
    is over (``draining()``): a client that took nothing of what was sent, or still sends."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, watched if scope["type"] == "http" else send)
        except asyncio.CancelledError:
            if scope["type"] == "lifespan" or not draining():
                raise
            stream_cut.set(True)
            log.warning("%s %s: cut at shutdown (its client was not reading or still sending)",
                        scope.get("method", "WEBSOCKET"), scope.get("path"))  # fmt: skip
            # Its body was still coming, and the connection had not refused it already
            if scope["type"] == "http" and not started and ANSWERED not in scope:
                await _shutting_down(scope, send)
        except Exception as exc:
            aborted = _find_abort(exc)
            if aborted is None:
                raise
            stream_cut.set(True)  # uvicorn's own line about the cut body is not an error
            log.warning("%s %s: stream ended early (%s)", scope.get("method"), scope.get("path"),
                        aborted)  # fmt: skip

    return wrapped


async def _shutting_down(scope: Scope, send: Send) -> None:
    """Answer a request cut at the drain's end before it had a response as every request the
    drain refuses is answered, 503 (uvicorn sent a plain-text 500). Within a second: the
    client may not be reading either."""
    body = msgspec.json.encode(refusal(scope["path"], 503, SHUTTING_DOWN))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"retry-after", b"1"), (b"connection", b"close")]  # fmt: skip
    with contextlib.suppress(Exception, asyncio.CancelledError):
        async with asyncio.timeout(1):
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})


HEAD = "rtserver.head"  # in the scope of a GET that head_as_get made of a HEAD


def head_as_get(app: ASGIApp) -> ASGIApp:
    """Wrap the ASGI app: answer HEAD as GET, with its status and headers but no body, as RFC
    9110 asks wherever GET works (uptime checkers send HEAD). Litestar routes HEAD only to
    handlers declared for it, and answered 405 on every other GET route. A route whose GET
    does work that HEAD must not start refuses it with the `no_head` guard."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await app(scope, receive, send)
            return

        # a copy: the server reads the method from its own scope to send no body to a HEAD
        inner = {**scope, "method": "GET", HEAD: True}

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.start" and "path_template" in inner:
                scope["path_template"] = inner["path_template"]  # for the request counter
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await app(inner, receive, headers_only)

    return wrapped


def no_head(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: refuse a HEAD (405) before the route reads its input: its GET starts a job."""
    if connection.scope.get(HEAD):
        raise MethodNotAllowedException(
            "HEAD is not answered here: its GET synthesizes audio", headers={"Allow": "GET, POST"}
        )


def _find_abort(exc: BaseException | None) -> StreamAborted | None:
    """StreamAborted inside what the framework made of it (a task group's exception group,
    wrapped in 'exception caught after response started')."""
    while exc is not None:
        if isinstance(exc, StreamAborted):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            return next(filter(None, map(_find_abort, exc.exceptions)), None)
        exc = exc.__cause__
    return None


def client_of(connection: ASGIConnection) -> str:
    """The client that per-client quotas count against: its address (an IPv6 one's /64)."""
    return client_key(connection.client.host) if connection.client else "unknown"


def gone_of(request: Request) -> asyncio.Event | None:
    """Set once the request's connection is lost (rtserver.api.connection.GONE); None under
    another server (Ray Serve's proxy)."""
    return request.scope.get(GONE)


def refuse_coded_body(request: Request) -> None:
    """Every route's first look (Litestar's before_request): a body in a content coding
    (Content-Encoding: gzip) was read as it came, its compressed bytes as JSON or a form, and
    answered "not valid JSON"; say what is not taken (RFC 9110 15.5.16: 415 and the codings
    that are)."""
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity") and _has_body(request):
        raise HTTPException(
            status_code=415,
            detail=f"send the body without a content coding, not {echoed(coding)!r}",
            headers={"Accept-Encoding": "identity"},
        )


async def strict_json(request: Request) -> None:
    """Before a JSON body is parsed: a JSON content type, UTF-8, and a sane nesting depth, so
    bad bytes get a 4xx that says what is wrong instead of a parser's internals."""
    refuse_coded_body(request)  # (a route's own hook replaces the app's)
    media_type = request.content_type[0]
    if media_type != "application/json" and not media_type.endswith("+json"):
        sent = f"not {echoed(media_type)!r}" if media_type else "it had no Content-Type"
        raise HTTPException(status_code=415, detail=f"send the body as application/json, {sent}")
    body = await request.body()  # cached: the route's own parsing reads it again
    if not body.strip():  # said as "not valid JSON: Input data was truncated"
        raise HTTPException(status_code=400, detail="the body is empty: send a JSON object")
    if body.startswith(codecs.BOM_UTF8):  # RFC 8259: JSON text has none; say so, not "invalid"
        raise HTTPException(status_code=400, detail="the body starts with a byte order mark")
    try:
        msgspec.json.decode(body)
    except UnicodeDecodeError as exc:
        raise HTTPException(status_code=400, detail="the body is not valid UTF-8") from exc
    except RecursionError as exc:
        raise HTTPException(status_code=400, detail="the JSON is nested too deeply") from exc
    except msgspec.DecodeError as exc:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON: {exc}") from exc


async def open_stream(
    request: Request,
    service: TTSService,
    text: str,
    spk_id: str | Speaker,
    fmt: str,
    *,
    rate_out: int | None = None,
    speed: float = 1.0,
    seed: int = 0,
    stream: bool = False,
    instructions: str | None = None,
    field: str = "tts_text",
    speaker_field: str = "spk_id",
    rate_field: str = "sample_rate",
) -> tuple[AsyncIterator[bytes], int]:
    """Check, admit and start a whole-text session; returns its encoded audio and rate once
    the first audio exists, so a failure before it (or text the voice says nothing for) is
    still an HTTP error. ``field``, ``speaker_field``, ``rate_field``: the request's names of
    the text, the speaker and what chose the rate, for its errors."""
    service.check_whole_text(text, field)
    try:
        session = await service.open_session(
            spk_id, client_of(request), fmt, rate_out,
            speed=speed, seed=seed, stream=stream, instructions=instructions,
        )  # fmt: skip
    except UnsupportedFormat as exc:  # the rate asked for, or else the speaker's own
        raise invalid(rate_field if rate_out else speaker_field, str(exc)) from exc
    attach(session, request.scope)
    session.say(text)  # cannot refuse: the text is checked
    events = session.events()
    first = await _until_disconnect(request, _first_output(events))
    if isinstance(first, Failed | Cancelled) or not session.samples:
        await events.aclose()  # releases the session now, not when collected
        if isinstance(first, Failed):
            if first.code == "unknown_speaker":  # deleted while it waited: a 400
                name = spk_id if isinstance(spk_id, str) else spk_id.id  # (OpenAI's: a Speaker)
                valid = sorted(s.id for s in service.speakers())
                raise UnknownSpeaker(name, valid, field=speaker_field)
            if first.code == "shutting_down":  # still queued at the drain's end: a 503
                raise ShuttingDown(first.message)
            raise SynthesisFailed(first.message)
        if isinstance(first, Cancelled):
            raise ClientGone()
        # Letters and digits it has no reading for (①, ٣): an empty 200 body is no answer.
        raise TextRejected(
            "no_speakable_text", f"{field}: the voice has nothing to say for it", field=field
        )
    return _audio(first, events), session.sample_rate


async def _first_output(events: AsyncIterator[SessionEvent]) -> SessionEvent:
    """The first event that is not a segment's end (those carry no audio for the body)."""
    while isinstance(event := await anext(events), SegmentEnd):
        pass
    return event


async def _until_disconnect(request: Request, waiting: Awaitable[SessionEvent]) -> SessionEvent:
    """Await the first event; a client that leaves first cancels its job, so a request
    abandoned in the queue never costs any synthesis."""
    first = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # (also when this handler is cancelled, as at the server's exit)
        gone.cancel()
        left = not first.done()
        if left:
            first.cancel()  # runs the session's cleanup: the job is cancelled
    if left:
        raise ClientGone()
    return first.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _audio(first: SessionEvent, events: AsyncGenerator[SessionEvent]) -> AsyncIterator[bytes]:
    """The body: encoded audio only. A failure after the headers breaks the body, so the
    client sees an incomplete stream rather than a clean end."""
    try:
        event = first
        while True:
            if isinstance(event, Audio):
                yield event.data
            elif isinstance(event, Failed):
                raise StreamAborted(f"{event.code}: {event.message}")
            elif not isinstance(event, SegmentEnd):
                return
            event = await anext(events)
    finally:
        await events.aclose()  # early exit (client gone): the session cancels its job


async def _speak(request: Request, service: TTSService, req: TTSRequest, fmt: str):
    return await open_stream(
        request, service, req.tts_text, req.spk_id, fmt, rate_out=req.sample_rate,
        speed=req.speed, seed=req.seed, stream=req.stream, instructions=req.instructions,
    )  # fmt: skip


# Raw sample encodings of the PCM routes: (format, media type, bits per sample).
ENCODINGS = {"s16le": ("pcm", L16, 16), "mulaw": ("mulaw", "audio/PCMU", 8),
             "alaw": ("alaw", "audio/PCMA", 8)}  # fmt: skip


def pcm_headers(rate: int, encoding: str = "s16le") -> dict[str, str]:
    _, media_type, bits = ENCODINGS[encoding]
    return {
        # The route's static media type documents the endpoint; the real one has the rate.
        "content-type": f"{media_type};rate={rate};channels=1",
        "X-Sample-Rate": str(rate), "X-Channels": "1", "X-Bit-Depth": str(bits),
        "X-Encoding": encoding, **STREAM_HEADERS,
    }  # fmt: skip


@post(
    "/tts",
    summary="Speak text as a streamed MP3",
    media_type="audio/mpeg",
    response_description="One continuous MP3 stream (mono, the speaker's rate).",
    operation_class=audio_operation({"audio/mpeg": BINARY}),
    responses=JSON_ERRORS,
    status_code=200,
    before_request=strict_json,
)
async def tts_mp3(request: Request, data: TTSRequest, service: TTSService) -> Stream:
    if data.encoding != "s16le":
        raise invalid("encoding", "/tts is MP3; mulaw and alaw are for /tts/pcm")
    body, _ = await _speak(request, service, data, "mp3")
    return Stream(
        body,
        media_type="audio/mpeg",
        headers={"Content-Disposition": "attachment; filename=tts.mp3", **STREAM_HEADERS},
    )


@post(
    "/tts/pcm",
    summary="Speak text as streamed raw PCM (s16le mono; or G.711 mu-law/A-law)",
    media_type=L16,
    response_description="Raw mono samples: s16le (little-endian) by default; `encoding` "
    "mulaw or alaw gives 8-bit G.711 at 8 kHz. Rate in X-Sample-Rate.",
    operation_class=audio_operation(
        {L16: BINARY, "audio/PCMU": BINARY, "audio/PCMA": BINARY}, pcm_headers=True
    ),
    responses=JSON_ERRORS,
    status_code=200,
    before_request=strict_json,
)
async def tts_pcm(request: Request, data: TTSRequest, service: TTSService) -> Stream:
    body, rate = await _speak(request, service, data, ENCODINGS[data.encoding][0])
    disposition = {"Content-Disposition": "attachment; filename=tts.pcm"}
    return Stream(body, headers={**disposition, **pcm_headers(rate, data.encoding)})


CLOSE = {"Connection": "close"}  # the body was not read to its end: the connection ends


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def _read_form(request: Request) -> None:
    """Parse the form through FormRequest before Litestar's multipart extractor, which parses
    it on its own (letting a decoding error out) unless the request already holds it; at most
    MAX_UPLOADS bodies at a time, and one too slow while others wait is cut (408). A body
    that is no form is refused unread (415): read later, 40 JSON bodies of 8 MiB were held
    with no upload place (335 MB). (Not closed after the answer: uvicorn reads the rest of
    the body and drops it, under the request deadline; a close with body bytes unread reset
    the connection, and a client still sending never read its 415.)"""
    refuse_coded_body(request)
    media_type = request.content_type[0]
    if media_type not in FORM_TYPES and _has_body(request):
        raise HTTPException(
            status_code=415,
            detail=f"{request.url.path} takes a multipart form (the recording as a file part), "
            f"not {echoed(media_type)!r}",
        )
    service: TTSService = request.app.state.service
    client = client_of(request)
    async with service.receiving_upload(client, gone_of(request)):
        meter = _BodyMeter(request)
        reading = asyncio.ensure_future(request.form())
        try:
            while not (await asyncio.wait({reading}, timeout=0.5))[0]:
                held = time.monotonic() - meter.since
                if why := service.slow_upload(client, held, meter.received):
                    raise HTTPException(status_code=408, detail=why, headers=CLOSE)
            if not isinstance(reading.result().get("prompt_wav"), UploadFile):
                raise invalid("prompt_wav", "send the recording as a file part")
        finally:
            reading.cancel()


def _has_body(request: Request) -> bool:
    headers = request.headers
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return True
    try:
        return int(headers.get("content-length", "0")) > 0
    except ValueError:  # (the parser refuses such a request before the app sees it)
        return True


class _BodyMeter:
    """Counts the body bytes a request's reader takes (put in front of its receive)."""

    def __init__(self, request: Request) -> None:
        self.received = 0
        self.since = time.monotonic()
        self._receive = request.receive
        request.receive = self  # type: ignore[method-assign]

    async def __call__(self) -> Message:
        message = await self._receive()
        self.received += len(message.get("body", b""))
        return message


def _pcm_route(
    path: str, summary: str, description: str, body: RequestBody,
    errors: dict[int, ResponseSpec] = FORM_ERRORS, **more: Any,
):  # fmt: skip
    """An upstream route: GET or POST with form fields, headerless PCM back."""
    return route(
        path,
        http_method=["GET", "POST"],
        summary=f"Upstream CosyVoice {summary}: headerless s16le PCM",
        description=f"{description} Sentence-level chunks.",
        media_type=L16,
        response_description="Headerless s16le mono PCM at the model's rate.",
        operation_class=audio_operation({L16: BINARY}, pcm_headers=True, body=body),
        responses=errors,
        status_code=200,
        guards=[no_head],
        **more,
    )


TextField = Annotated[str | None, Parameter(description="Text to speak (or in the form).")]
SpkIdField = Annotated[str | None, Parameter(description="Speaker id (or in the form).")]
SeedField = Annotated[int | None, Parameter(description="0: a random one (or in the form).")]
SpeedField = Annotated[
    float | None, Parameter(description="0.25-4, 1 as recorded (or in the form).")
]


@_pcm_route(
    "/inference_sft",
    "SFT endpoint",
    "Fields `tts_text` and `spk_id` from a url-encoded or multipart body (a file part is read "
    "as UTF-8 text), or the query string (upstream's client sends GET with a form body); "
    "`seed` (not upstream's; 0, the default, draws one) makes the audio reproducible; "
    "`speed` (not upstream's server's; 0.25-4) as on `/tts`.",
    form_body(SftForm),
)
async def inference_sft(
    request: Request,
    service: TTSService,
    tts_text: TextField = None,
    spk_id: SpkIdField = None,
    seed: SeedField = None,
    speed: SpeedField = None,
) -> Stream:
    return await _speak_form(request, service, await _form_fields(request, SftForm))


@_pcm_route(
    "/inference_instruct",
    "instruct endpoint",
    "`/inference_sft` with `instruct_text` (how to speak, or a character to play; at most 1000 "
    "characters; `<endofprompt>` is added), for CosyVoice-300M-Instruct: a model dir whose "
    "name says `-Instruct`, as upstream tells it. On CosyVoice2/3 a registered speaker is "
    "steered as by `/inference_instruct2`; a model without an instruct mode answers 400.",
    form_body(InstructForm),
)
async def inference_instruct(
    request: Request,
    service: TTSService,
    tts_text: TextField = None,
    spk_id: SpkIdField = None,
    instruct_text: Annotated[
        str | None, Parameter(description="How to speak (or in the form).")
    ] = None,
    seed: SeedField = None,
    speed: SpeedField = None,
) -> Stream:
    form = await _form_fields(request, InstructForm)
    service.check_instructions(form.instruct_text)
    return await _speak_form(request, service, form)


async def _speak_form(
    request: Request, service: TTSService, form: SftForm | InstructForm
) -> Stream:
    req = TTSRequest(tts_text=form.tts_text, spk_id=form.spk_id, seed=form.seed,
                     speed=form.speed, instructions=getattr(form, "instruct_text", None))  # fmt: skip
    body, rate = await _speak(request, service, req, "pcm")
    return Stream(body, headers=pcm_headers(rate))


PROMPT_WAV = "1-30 s of speech as wav, flac, mp3, ogg or m4a; at most 8 MiB"


def _prompted_route(path: str, summary: str, fields: str, mode: str, form: type[_Ours]):
    """An upstream route that speaks in the voice of a recording sent with the request."""
    return _pcm_route(
        path,
        f"{summary} in a recording's voice",
        f"Multipart fields {fields} and the file `prompt_wav` ({PROMPT_WAV}), as upstream's "
        f"client sends them (GET or POST). {mode} The recording is analysed for this request "
        "alone (nothing is kept): to speak in one voice often, register it once "
        "(`POST /speakers`). `seed` and `speed` as on `/inference_sft`.",
        form_body(form, {"prompt_wav": PROMPT_WAV}),
        RECORDING_ERRORS,
        request_max_body_size=MAX_UPLOAD_BYTES,
        before_request=_read_form,
    )


@_prompted_route(
    "/inference_zero_shot",
    "zero-shot endpoint",
    "`tts_text`, `prompt_text` (what the recording says, at most 1000 characters)",
    "CosyVoice engines only.",
    ZeroShotForm,
)
async def inference_zero_shot(request: Request, service: TTSService) -> Stream:
    return await _speak_prompted(request, service, ZeroShotForm)


@_prompted_route(
    "/inference_cross_lingual",
    "cross-lingual endpoint",
    "`tts_text`",
    "CosyVoice engines only; the LLM hears no prompt, so the text may be in another language "
    "than the recording (CosyVoice-300M: begin it with a language tag such as `<|en|>`).",
    CrossLingualForm,
)
async def inference_cross_lingual(request: Request, service: TTSService) -> Stream:
    return await _speak_prompted(request, service, CrossLingualForm)


@_prompted_route(
    "/inference_instruct2",
    "instruct2 endpoint",
    "`tts_text`, `instruct_text` (how to speak: a dialect, an emotion, a speed; at most 1000 "
    "characters; `<|endofprompt|>` is added where it is missing)",
    "CosyVoice2 and CosyVoice3 (CosyVoice-300M-Instruct too, in its instruction format).",
    Instruct2Form,
)
async def inference_instruct2(request: Request, service: TTSService) -> Stream:
    return await _speak_prompted(request, service, Instruct2Form)


async def _speak_prompted(
    request: Request,
    service: TTSService,
    form_type: type[ZeroShotForm | CrossLingualForm | Instruct2Form],
) -> Stream:
    form = await _form_fields(request, form_type)
    service.check_whole_text(form.tts_text, "tts_text")  # before the recording's analysis
    audio = await _recording(request)
    speaker = await service.prompt_speaker(
        audio,
        getattr(form, "prompt_text", None),
        getattr(form, "instruct_text", None),
        client_of(request),
        gone_of(request),
    )
    body, rate = await open_stream(
        request, service, form.tts_text, speaker, "pcm", seed=form.seed, speed=form.speed
    )
    return Stream(body, headers=pcm_headers(rate))


async def _recording(request: Request) -> bytes:
    """The form's `prompt_wav` (a file: _read_form saw to it; of two, the first). The form's
    files (on disk past 1 MB) go now, not after the stream."""
    parts = await request.form()
    audio = await parts["prompt_wav"].read()
    await parts.close()
    return audio


async def _form_fields(request: Request, form_type: type[F]) -> F:
    """An upstream route's text fields from a url-encoded or multipart body (a file part read
    as UTF-8 text: curl -F tts_text=@article.txt) over the query string. GET handlers cannot
    declare a body in Litestar, so the form is read by hand."""
    media_type = request.content_type[0]
    if media_type not in FORM_TYPES and _has_body(request):  # was "missing tts_text"
        json = media_type == "application/json" or media_type.endswith("+json")
        where = (
            "JSON goes to POST /tts/pcm (PCM) or /tts (MP3)"
            if json
            else (f"not {echoed(media_type)!r}" if media_type else "a body needs its Content-Type")
        )
        raise HTTPException(
            status_code=415,
            detail=f"{request.url.path} takes its fields as a form, multipart or the query "
            f"string, as upstream's; {where}",
        )
    # The query's fields as checked (not Litestar's query_params: a second parse of the same
    # string); a name given twice keeps its first value, as there.
    query = dict(reversed(_form_pairs(_escaped(request.scope["query_string"]), "query")))
    fields: dict[str, str] = dict(query)
    form = await request.form()
    for k, v in form.items():
        if isinstance(v, UploadFile) and k in form_type.__struct_fields__:
            v = await _text_part(k, v)
        if isinstance(v, str):
            fields[k] = v
    try:
        return msgspec.convert(  # not strict: a form's numbers come as text
            {k: fields[k] for k in form_type.__struct_fields__ if k in fields}, form_type,
            strict=False,
        )  # fmt: skip
    except msgspec.ValidationError as exc:
        key = field_of(str(exc))
        # where it came from, or (missing) where the client sent the rest
        in_query = key in query if key in fields else not form
        source = "query" if in_query and key not in form else "body"
        raise invalid(key, str(exc), source) from exc


def _form_pairs(encoded: str, source: str) -> list[tuple[str, str]]:
    """A query string's or url-encoded body's fields (``encoded`` as UTF-8 with its other
    bytes escaped, raw or percent-encoded alike), at most MAX_FORM_FIELDS of them, each UTF-8
    text: Litestar read raw bytes as Latin-1 (curl -d 'tts_text=你好' came out garbled) and
    decoded escapes that are not UTF-8 with replacement characters."""
    try:
        pairs = parse_qsl(encoded, keep_blank_values=True, encoding="utf-8",
                          errors="surrogateescape", max_num_fields=MAX_FORM_FIELDS)  # fmt: skip
    except ValueError:
        raise HTTPException(
            status_code=413, detail=f"the form has too many fields (at most {MAX_FORM_FIELDS})"
        ) from None
    for name, value in pairs:
        if LONE_SURROGATE.search(name) or LONE_SURROGATE.search(value):
            key = name.encode(errors="surrogateescape").decode(errors="replace")
            raise invalid(key, "not UTF-8 text (send UTF-8, percent-encoded or raw)", source)
    return pairs


class FormRequest(Request):
    """Litestar's request, with a form field that is not text in its part's charset (or names
    a charset Python does not know) refused as bad input: Litestar's parser lets the decoding
    error out, a 500 for any client that sends it (/inference_sft, POST /speakers)."""

    async def form(self) -> FormMultiDict:
        state = self._connection_state
        if state.form is Empty and self.content_type[0] == RequestEncodingType.URL_ENCODED:
            body = _escaped(await self.body())
            # 8 MiB of escapes take ~1 s to decode: in a thread, the event loop goes on
            parse = functools.partial(_form_pairs, body, "body")
            pairs = await asyncio.to_thread(parse) if len(body) > 65536 else parse()
            fields: defaultdict[str, list[str]] = defaultdict(list)
            for name, value in pairs:
                fields[name].append(value)
            state.form = {k: v if len(v) > 1 else v[0] for k, v in fields.items()}  # as Litestar's
        try:
            return await super().form()
        except (UnicodeError, LookupError) as exc:
            if isinstance(exc, KeyError | IndexError):  # a LookupError, but a bug: not input
                raise
            raise invalid("body", f"a field is not text in its charset ({exc})") from exc


async def _text_part(name: str, part: UploadFile) -> str:
    """A field sent as a file part: its bytes as UTF-8 text (the form's size bound applies;
    a byte-order mark, as Notepad writes, is not text)."""
    try:
        return (await part.read()).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise invalid(name, f"not UTF-8 text ({exc})") from exc


@get("/speakers", summary="Speakers this server can use")
async def speakers(service: TTSService) -> list[SpeakerInfo]:
    return [_info(s) for s in service.speakers()]


class SpeakerForm(msgspec.Struct):
    spk_id: str
    prompt_text: str


@post(
    "/speakers",
    summary="Register a zero-shot speaker from a prompt recording and its transcript",
    description="Multipart fields: `spk_id`, `prompt_text` (what the recording says, at most "
    "1000 characters) and "
    "`prompt_wav` (1-30 s of speech as wav, flac, mp3, ogg or m4a; at most 8 MiB). CosyVoice "
    "engines only; needs the admin key when the server has one. Registered speakers are saved "
    "and survive a restart. Concurrent registrations of one name: one wins, the others 409.",
    operation_class=body_operation(form_body(SpeakerForm, {"prompt_wav": PROMPT_WAV})),
    responses=REGISTER_ERRORS,
    status_code=201,
    request_max_body_size=MAX_UPLOAD_BYTES,
    before_request=_read_form,
)
async def register_speaker(service: TTSService, request: Request) -> SpeakerInfo:
    """The form read as the recording routes read theirs (a field as a file part is its text;
    of two recordings the first), not by Litestar's extractor, which refused both with a type
    name (422 "Unsupported type: <class 'list'>")."""
    form = await _form_fields(request, SpeakerForm)
    audio = await _recording(request)
    s = await service.register_speaker(
        form.spk_id, audio, form.prompt_text, client_of(request), gone_of(request)
    )
    return _info(s)


@delete(
    "/speakers/{spk_id:str}",
    summary="Delete a registered speaker",
    status_code=204,
    responses=DELETE_ERRORS,
)
async def delete_speaker(spk_id: str, service: TTSService) -> None:
    await service.delete_speaker(spk_id)


OPEN: list[dict[str, list[str]]] = [{}]  # no key needed (OpenAPI's empty requirement)


@get("/healthz", summary="Liveness and live scheduler counters", security=OPEN)
async def healthz(service: TTSService) -> dict[str, object]:
    return service.health()


class Readiness(msgspec.Struct):
    ready: bool
    reason: str


@get(
    "/readyz",
    summary="Readiness: 503 while shutting down, stalled or full",
    security=OPEN,
    responses={503: ResponseSpec(data_container=Readiness, description="Not ready now.")},
)
async def readyz(service: TTSService) -> Response[Readiness]:
    ready, reason = service.readiness()
    return Response(Readiness(ready, reason), status_code=200 if ready else 503)


@get("/metrics", summary="Prometheus metrics", media_type=METRICS_CONTENT_TYPE)
async def metrics(service: TTSService) -> Response[bytes]:
    body = service.scheduler.metrics.render()
    return Response(body, media_type=METRICS_CONTENT_TYPE)


ROUTES = [
    tts_mp3, tts_pcm, inference_sft, inference_zero_shot, inference_cross_lingual,
    inference_instruct, inference_instruct2, speakers, register_speaker, delete_speaker, healthz,
    readyz, metrics,
]  # fmt: skip
