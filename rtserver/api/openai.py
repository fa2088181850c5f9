"""OpenAI-compatible speech routes, so voice-agent frameworks plug in by base_url.

`POST /v1/audio/speech` takes OpenAI's body (model, input, voice, response_format, speed,
stream_format) and `GET /v1/audio/voices` lists what `voice` accepts. OpenAI's own voice
names are accepted as aliases of the server's first speaker, since frameworks such as Pipecat
refuse other names. `pcm` is 24 kHz s16le mono, as OpenAI sends it; `mp3` and `wav` keep the
speaker's rate. `model` and `instructions` are accepted and ignored.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Literal

import msgspec
from litestar import Request, get, post
from litestar.exceptions import ValidationException
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Schema
from litestar.response import Stream

from rtserver.api.docs import BINARY, audio_operation
from rtserver.api.http import ERROR_DOCS, STREAM_HEADERS, open_stream, strict_json
from rtserver.engine import Speaker
from rtserver.protocol import Speed, Text
from rtserver.service import TTSService, UnknownSpeaker

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse")  # fmt: skip
OPENAI_PCM_RATE = 24000
SSE = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))
MEDIA_TYPES = {"mp3": "audio/mpeg", "pcm": "audio/pcm", "wav": "audio/wav"}


class SpeechRequest(msgspec.Struct):
    input: Text
    voice: str
    model: str = "tts-1"
    response_format: str = "mp3"
    speed: Speed = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None


def _speaker(service: TTSService, voice: str) -> Speaker:
    try:
        return service.speaker(voice)
    except UnknownSpeaker as exc:
        if voice.lower() in OPENAI_VOICES:
            return service.speakers()[0]
        raise UnknownSpeaker(voice, [*exc.valid, *OPENAI_VOICES]) from None


@post(
    "/v1/audio/speech",
    summary="OpenAI-compatible speech",
    description="Body as OpenAI's: `input`, `voice`, `response_format` (mp3, pcm, wav), "
    "`speed` (0.25-4), `stream_format` (audio or sse).",
    responses=ERROR_DOCS,
    status_code=200,
    before_request=strict_json,
    operation_class=audio_operation(
        {**dict.fromkeys(MEDIA_TYPES.values(), BINARY), "text/event-stream": SSE}
    ),
)
async def speech(request: Request, data: SpeechRequest, service: TTSService) -> Stream:
    if data.response_format not in MEDIA_TYPES:
        raise ValidationException(
            f"response_format {data.response_format!r} is not supported; use one of "
            f"{', '.join(MEDIA_TYPES)}",
            extra=[
                {"key": "response_format", "message": f"unsupported; use {', '.join(MEDIA_TYPES)}"}
            ],
        )
    speaker = _speaker(service, data.voice)
    rate_out = OPENAI_PCM_RATE if data.response_format == "pcm" else None
    body, _ = await open_stream(
        request, service, data.input, speaker.id, data.response_format,
        rate_out=rate_out, speed=data.speed, stream=True, field="input",
    )  # fmt: skip
    if data.stream_format == "sse":
        return Stream(_sse(body), media_type="text/event-stream", headers=STREAM_HEADERS)
    return Stream(body, media_type=MEDIA_TYPES[data.response_format], headers=STREAM_HEADERS)


async def _sse(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for piece in body:
        event = {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}
        yield b"data: " + msgspec.json.encode(event) + b"\n\n"
    yield b'data: {"type":"speech.audio.done"}\n\n'


@get("/v1/audio/voices", summary="Voices /v1/audio/speech accepts")
async def voices(service: TTSService) -> dict[str, list[str]]:
    return {"voices": [s.id for s in service.speakers()], "aliases": list(OPENAI_VOICES)}


ROUTES = [speech, voices]
