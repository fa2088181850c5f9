"""OpenAI-compatible speech routes, so voice-agent frameworks plug in by base_url.

`POST /v1/audio/speech` takes OpenAI's body (model, input, voice, response_format, speed,
stream_format), `GET /v1/audio/voices` lists what `voice` accepts and `GET /v1/models` the
model names (tools list them before they offer a model). OpenAI's own voice
names are accepted, since frameworks such as Pipecat refuse other names: `--voice-alias
alloy=SPEAKER` maps one to a speaker, the others speak as the first speaker. `pcm` is 24 kHz
s16le mono and `opus` 48 kHz Ogg, as OpenAI sends them; the other formats keep the speaker's
rate (`mulaw`/`alaw`, for phone lines, are 8 kHz). `model` is accepted and ignored;
`instructions` steer CosyVoice2/3 and CosyVoice-300M-Instruct (their instruct mode: dialect,
emotion, speed, a character) and are ignored elsewhere, as OpenAI's tts-1 ignores them. Errors
come in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) so the SDKs show the
message.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Schema
from litestar.response import Stream

from rtserver.api.docs import BINARY, L16, audio_operation, error_docs
from rtserver.api.errors import ErrorBody, OpenAIError, invalid, openai_error, under_openai
from rtserver.api.http import STREAM_HEADERS, open_stream, pcm_headers, strict_json
from rtserver.audio import MUXED
from rtserver.engine import Speaker
from rtserver.protocol import Seed, Speed, Text
from rtserver.service import TextRejected, TTSService, UnknownSpeaker, echoed

OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova",
                 "onyx", "sage", "shimmer", "verse")  # fmt: skip
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # all speak with the one engine
OPENAI_PCM_RATE = 24000
RAW_ENCODINGS = {"pcm": "s16le", "mulaw": "mulaw", "alaw": "alaw"}  # response_format -> ours
# Each server-sent event: `data` is JSON, {"type": "speech.audio.delta", "audio": base64} and
# a last {"type": "speech.audio.done"}, as OpenAI streams it.
SSE = OpenAPIMediaType(
    schema=Schema(
        type=OpenAPIType.OBJECT,
        properties={"data": Schema(type=OpenAPIType.STRING, description="one JSON event")},
        required=["data"],
    )
)
MEDIA_TYPES = {
    "mp3": "audio/mpeg", "pcm": L16, "wav": "audio/wav",
    **{name: spec.media_type for name, spec in MUXED.items()},
}  # fmt: skip


OPENAI_ERROR_DOCS = error_docs(OpenAIError, {
    400: "Invalid input (OpenAI answers it all with 400; `param` names the field): an unknown "
    "voice, a field missing or out of range, input too long (code `text_too_long`), a body "
    "over 1 MiB, a body that is not JSON.",
    415: "A content type other than application/json, or a compressed body.",
    429: "This client address already has its limit of streams open.",
    500: "Synthesis failed before the first audio.",
    503: "At capacity; retry after Retry-After seconds.",
})  # fmt: skip


class Model(msgspec.Struct):
    id: str
    created: int  # when this server started (unix seconds)
    object: str = "model"
    owned_by: str = "rtserver"


class ModelList(msgspec.Struct):
    data: list[Model]
    object: str = "list"


class SpeechRequest(msgspec.Struct):
    input: Text
    voice: str
    model: str = "tts-1"
    response_format: str = "mp3"
    speed: Speed = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    seed: Seed = 0  # not OpenAI's (the SDKs send it in extra_body): the same seed, the same audio


def _speaker(service: TTSService, voice: str, by_id: dict[str, Speaker] | None = None) -> Speaker:
    """The speaker a voice name reaches, among ``by_id`` (in the service's order; default:
    the service's speakers now)."""
    if by_id is None:
        by_id = {s.id: s for s in service.speakers()}
    found, alias = _target(service, voice, by_id)
    if found is not None:
        return found
    # An alias to a missing speaker is not another speaker's voice in its stead: the
    # operator chose.
    note = f" (--voice-alias maps it to speaker {alias!r}, which is not there)" if alias else ""
    raise UnknownSpeaker(voice, _accepted(service, by_id), field="voice", note=note)


def _target(
    service: TTSService, voice: str, by_id: dict[str, Speaker]
) -> tuple[Speaker | None, str | None]:
    """The speaker a voice name reaches (None: none does), and the `--voice-alias` target
    it names, if it is an alias. An OpenAI voice no alias maps speaks as the first speaker."""
    alias = voice_aliases(tuple(service.settings.voice_alias)).get(voice.lower())
    found = by_id.get(alias or voice)
    if found is None and alias is None and by_id and voice.lower() in OPENAI_VOICES:
        found = next(iter(by_id.values()))
    return found, alias


@functools.cache  # parsed once, not on every request
def voice_aliases(pairs: tuple[str, ...]) -> dict[str, str]:
    """`--voice-alias alloy=joe` pairs as {openai voice, lowercase: speaker id}."""
    return {name.lower(): spk for name, spk in (pair.split("=", 1) for pair in pairs)}


@post(
    "/v1/audio/speech",
    summary="OpenAI-compatible speech",
    description="Body as OpenAI's: `input`, `voice`, `response_format` (mp3, opus, aac, flac, "
    "wav, pcm; also mulaw and alaw at 8 kHz), `speed` (0.25-4), `stream_format` (audio or "
    "sse), `instructions` (CosyVoice2/3 and CosyVoice-300M-Instruct: how to speak, e.g. a "
    "dialect or an emotion; at most 1000 characters; ignored by other models), and `seed` "
    "(not OpenAI's; 0 draws one). "
    "Errors in OpenAI's shape.",
    responses=OPENAI_ERROR_DOCS,
    status_code=200,
    before_request=strict_json,
    operation_class=audio_operation(
        {**dict.fromkeys(MEDIA_TYPES.values(), BINARY), "text/event-stream": SSE},
        pcm_headers=True,  # with pcm, mulaw and alaw (headerless: the rate is in them)
    ),
)
async def speech(request: Request, data: SpeechRequest, service: TTSService) -> Stream:
    if data.response_format not in MEDIA_TYPES:
        raise invalid(
            "response_format",
            f"{echoed(data.response_format)!r} is not supported; use one of "
            f"{', '.join(MEDIA_TYPES)}",
        )
    speaker = _speaker(service, data.voice)
    rate_out = OPENAI_PCM_RATE if data.response_format == "pcm" else None  # opus: 48 kHz
    body, rate = await open_stream(
        request, service, data.input, speaker, data.response_format,
        rate_out=rate_out, speed=data.speed, seed=data.seed, stream=True,
        instructions=data.instructions, field="input", speaker_field="voice",
        rate_field="response_format",
    )  # fmt: skip
    raw = RAW_ENCODINGS.get(data.response_format)  # headerless: the rate goes in headers
    headers = pcm_headers(rate, raw) if raw else STREAM_HEADERS
    if data.stream_format == "sse":  # (the X- headers too: its deltas are as headerless)
        sse = {k: v for k, v in headers.items() if k != "content-type"}
        return Stream(_sse(body), media_type="text/event-stream", headers=sse)
    return Stream(body, media_type=MEDIA_TYPES[data.response_format], headers=headers)


async def _sse(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for piece in body:
        event = {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}
        yield b"data: " + msgspec.json.encode(event) + b"\n\n"
    yield b'data: {"type":"speech.audio.done"}\n\n'


@get("/v1/audio/voices", summary="Voices /v1/audio/speech accepts")
async def voices(service: TTSService) -> dict[str, list[str]]:
    """Speaker ids, and the other names that reach a speaker now: OpenAI's voices and
    `--voice-alias` names; none whose alias names a speaker that is not there (400)."""
    by_id = {s.id: s for s in service.speakers()}  # one look for every name
    accepted = _accepted(service, by_id)
    return {"voices": [n for n in accepted if n in by_id],
            "aliases": [n for n in accepted if n not in by_id]}  # fmt: skip


def _accepted(service: TTSService, by_id: dict[str, Speaker]) -> list[str]:
    """The names `voice` reaches a speaker by now: speaker ids, then OpenAI's voices and
    `--voice-alias` names (no alias of a speaker that is not there)."""
    aliases = voice_aliases(tuple(service.settings.voice_alias))
    names = dict.fromkeys([*by_id, *OPENAI_VOICES, *aliases])
    return [n for n in names if _target(service, n, by_id)[0] is not None]


def _models(service: TTSService) -> dict[str, Model]:
    created = int(service.started_at)
    names = (service.engine.name, *OPENAI_MODELS)  # `model` is ignored: any of them speaks
    return {name: Model(id=name, created=created) for name in names}


@get("/v1/models", summary="Model names /v1/audio/speech accepts (all use the one engine)")
async def models(service: TTSService) -> ModelList:
    return ModelList(data=list(_models(service).values()))


@get(
    "/v1/models/{model_id:str}",
    summary="One model name",
    responses=error_docs(OpenAIError, {404: "No such model (code `model_not_found`)."}),
)
async def model(model_id: str, service: TTSService) -> Model:
    found = _models(service).get(model_id)
    if found is None:
        raise NotFoundException(
            f"the model {echoed(model_id)!r} does not exist", extra={"code": "model_not_found"}
        )
    return found


def by_path(handler: Callable[[Request, Exception], Response]):
    """Our error answer; under /v1/ reshaped as OpenAI's, so the SDKs show its message. At the
    app, not on the router: routing errors (405 for GET /v1/audio/speech) never reach a
    router's handlers."""

    def answer(request: Request, exc: Exception) -> Response:
        ours = handler(request, exc)
        if not under_openai(request.url.path):
            return ours
        body, status = ours.content, ours.status_code
        assert isinstance(body, ErrorBody)  # every handler's
        extra = body.extra
        code = extra.get("code") if isinstance(extra, dict) else None
        param = extra[0].get("key") if isinstance(extra, list) and extra else None
        param = None if param == "body" else param  # the whole body: no one parameter
        if isinstance(exc, UnknownSpeaker | TextRejected) and exc.field:
            param = exc.field
        error = openai_error(status, body.detail, param, code)
        # OpenAI answers invalid input (too long too) with 400: its SDKs' BadRequestError.
        status = 400 if status in (413, 422) else status
        return Response(error, status_code=status, headers=dict(ours.headers))

    return answer


ROUTES = [speech, voices, models, model]
