"""HTTP routes: the CosyVoice SFT-mode API (MP3, PCM, upstream-compatible /inference_sft)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Request, delete, get, post, route
from litestar.datastructures import ResponseHeader, UploadFile
from litestar.enums import RequestEncodingType
from litestar.exceptions import ValidationException
from litestar.openapi import ResponseSpec
from litestar.params import Body
from litestar.response import Stream

from rtserver.audio import Mp3Encoder, PcmEncoder
from rtserver.engine import Speaker
from rtserver.protocol import SpeakerInfo, TTSRequest
from rtserver.service import TTSService

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PCM_DOC_HEADERS = [
    ResponseHeader(
        name="X-Sample-Rate", documentation_only=True, description="Samples per second."
    ),
    ResponseHeader(name="X-Channels", documentation_only=True, description="Always 1."),
    ResponseHeader(name="X-Bit-Depth", documentation_only=True, description="Always 16 (s16le)."),
]


class ErrorBody(msgspec.Struct):
    status_code: int
    detail: str  # what was wrong, for a person
    extra: dict | list | None = None


ERROR_DOCS = {
    code: ResponseSpec(data_container=ErrorBody, description=what, generate_examples=False)
    for code, what in {
        400: "Unknown spk_id (extra.valid_speakers lists the valid ones) or an illegal value.",
        413: "Text longer than the server's limit.",
        422: "Schema violation: missing field, wrong type, speed <= 0, empty text.",
        500: "Synthesis failed before the first audio.",
        503: "At capacity; retry after Retry-After seconds.",
    }.items()
}


class SftForm(msgspec.Struct):
    """Upstream's /inference_sft fields (form, multipart or query string)."""

    tts_text: Annotated[str, msgspec.Meta(min_length=1)]
    spk_id: Annotated[str, msgspec.Meta(min_length=1)]


def _info(s: Speaker) -> SpeakerInfo:
    return SpeakerInfo(id=s.id, language=s.language, sample_rate=s.sample_rate, engine=s.engine)


def _validated_text(text: str) -> str:
    if not text.strip():
        raise ValidationException(
            "tts_text is blank", extra=[{"key": "tts_text", "message": "must contain text"}]
        )
    return text


async def _start(service: TTSService, req: TTSRequest, encoder_cls: type) -> tuple[Stream, int]:
    speaker = service.speaker(req.spk_id)
    job = service.synthesize(
        _validated_text(req.tts_text), speaker, req.speed, req.seed, req.stream
    )
    first = await service.first_event(job)
    encoder = encoder_cls(speaker.sample_rate)
    return service.encoded(job, encoder, first), speaker.sample_rate


def _pcm_headers(rate: int) -> dict[str, str]:
    return {"X-Sample-Rate": str(rate), "X-Channels": "1", "X-Bit-Depth": "16", **STREAM_HEADERS}


@post(
    "/tts",
    summary="Speak text as a streamed MP3",
    media_type="audio/mpeg",
    response_description="One continuous MP3 stream (mono, the speaker's rate).",
    responses=ERROR_DOCS,
    status_code=200,
)
async def tts_mp3(data: TTSRequest, service: TTSService) -> Stream:
    body, _ = await _start(service, data, Mp3Encoder)
    return Stream(
        body,
        media_type="audio/mpeg",
        headers={"Content-Disposition": "attachment; filename=tts.mp3", **STREAM_HEADERS},
    )


@post(
    "/tts/pcm",
    summary="Speak text as streamed raw PCM (s16le mono)",
    media_type="audio/L16",
    response_description="Raw s16le mono PCM; rate in X-Sample-Rate.",
    responses=ERROR_DOCS,
    response_headers=PCM_DOC_HEADERS,
    status_code=200,
)
async def tts_pcm(data: TTSRequest, service: TTSService) -> Stream:
    body, rate = await _start(service, data, PcmEncoder)
    return Stream(
        body,
        headers={
            # The route's static media type documents the endpoint; the real one has the rate.
            "content-type": f"audio/L16;rate={rate};channels=1",
            "Content-Disposition": "attachment; filename=tts.pcm",
            **_pcm_headers(rate),
        },
    )


@route(
    "/inference_sft",
    http_method=["GET", "POST"],
    summary="Upstream CosyVoice SFT endpoint: headerless s16le PCM",
    description="Fields `tts_text` and `spk_id` from a url-encoded or multipart body, or the "
    "query string (upstream's client sends GET with a form body). Sentence-level chunks.",
    media_type="audio/pcm",
    response_description="Headerless s16le mono PCM at the model's rate.",
    responses=ERROR_DOCS,
    response_headers=PCM_DOC_HEADERS,
    status_code=200,
)
async def inference_sft(request: Request, service: TTSService) -> Stream:
    # GET handlers cannot declare a body in Litestar, so read the form by hand.
    fields: dict[str, str] = dict(request.query_params)
    form = await request.form()
    fields.update({k: v for k, v in form.items() if isinstance(v, str)})
    try:
        sft = msgspec.convert(
            {k: fields[k] for k in ("tts_text", "spk_id") if k in fields}, SftForm
        )
    except msgspec.ValidationError as exc:
        raise ValidationException(str(exc), extra=[{"key": "form", "message": str(exc)}]) from exc
    req = TTSRequest(tts_text=sft.tts_text, spk_id=sft.spk_id)
    body, rate = await _start(service, req, PcmEncoder)
    return Stream(body, media_type="audio/pcm", headers=_pcm_headers(rate))


@get("/speakers", summary="Speakers this server can use")
async def speakers(service: TTSService) -> list[SpeakerInfo]:
    return [_info(s) for s in service.speakers()]


class RegisteredSpeaker(msgspec.Struct):
    spk_id: str
    prompt_text: str
    prompt_wav: UploadFile


@post(
    "/speakers",
    summary="Register a zero-shot speaker from a prompt recording and its transcript",
    description="Multipart fields: `spk_id`, `prompt_text` (what the recording says) and "
    "`prompt_wav` (1-30 s of speech, any common audio format). CosyVoice engines only. "
    "Registered speakers are saved and survive a restart.",
    responses=ERROR_DOCS,
    status_code=201,
)
async def register_speaker(
    data: Annotated[RegisteredSpeaker, Body(media_type=RequestEncodingType.MULTI_PART)],
    service: TTSService,
) -> SpeakerInfo:
    audio = await data.prompt_wav.read()
    s = await service.register_speaker(data.spk_id, audio, data.prompt_text)
    return _info(s)


@delete("/speakers/{spk_id:str}", summary="Delete a registered speaker", status_code=204)
async def delete_speaker(spk_id: str, service: TTSService) -> None:
    await service.delete_speaker(spk_id)


@get("/healthz", summary="Liveness and live scheduler counters")
async def healthz(service: TTSService) -> dict[str, object]:
    return service.health()


ROUTES = [tts_mp3, tts_pcm, inference_sft, speakers, register_speaker, delete_speaker, healthz]
