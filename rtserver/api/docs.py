"""OpenAPI details Litestar cannot infer from a streaming handler: the audio media types of
the 200 answer and its headers, each with a schema (the document validates)."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)

BINARY = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format="binary"))
PCM_HEADERS = {  # sent with headerless audio: PCM, G.711 (mulaw, alaw)
    "X-Sample-Rate": (OpenAPIType.INTEGER, "Samples per second (with PCM, mulaw, alaw)."),
    "X-Channels": (OpenAPIType.INTEGER, "Always 1."),
    "X-Bit-Depth": (OpenAPIType.INTEGER, "16: signed 16-bit little-endian samples (s16le); 8 "
                    "for mulaw/alaw."),
    "X-Encoding": (OpenAPIType.STRING, "s16le, mulaw or alaw."),
}  # fmt: skip
L16 = "audio/L16"  # RFC 2586's name; the real header adds `;rate=R;channels=1`


_FIELD_TYPES = {
    msgspec.inspect.StrType: OpenAPIType.STRING,
    msgspec.inspect.IntType: OpenAPIType.INTEGER,
    msgspec.inspect.FloatType: OpenAPIType.NUMBER,
}


def _bare(t: msgspec.inspect.Type) -> msgspec.inspect.Type:
    while isinstance(t, msgspec.inspect.Metadata):  # Annotated[..., Meta(...)]
        t = t.type
    return t


def form_body(form: type[msgspec.Struct], files: dict[str, str] | None = None) -> RequestBody:
    """A form body of ``form``'s fields and the file parts ``files`` (name: what it is), for a
    route that reads its form by hand (upstream's send it with GET too). Without files the
    body may be url-encoded, or left out for the query string."""
    fields = msgspec.inspect.type_info(form).fields  # type: ignore[union-attr]
    props = {f.name: Schema(type=_FIELD_TYPES[type(_bare(f.type))]) for f in fields}
    props |= {name: Schema(type=OpenAPIType.STRING, format="binary", description=text)
              for name, text in (files or {}).items()}  # fmt: skip
    required = [f.name for f in fields if f.required] + list(files or {})
    media = OpenAPIMediaType(schema=Schema(type=OpenAPIType.OBJECT, properties=props,
                                           required=required))  # fmt: skip
    types = ["multipart/form-data"] + ([] if files else ["application/x-www-form-urlencoded"])
    return RequestBody(content=dict.fromkeys(types, media), required=bool(files))


def error_docs(body: type, described: dict[int, str]) -> dict[int, ResponseSpec]:
    """The error answers a route documents: status -> what makes it, each a ``body``."""
    return {
        status: ResponseSpec(data_container=body, description=what, generate_examples=False)
        for status, what in described.items()
    }


def body_operation(body: RequestBody):
    """An Operation class whose request body is documented as ``body`` (a form read by hand)."""

    @dataclass
    class BodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return BodyOperation


def audio_operation(
    media_types: dict[str, OpenAPIMediaType],
    pcm_headers: bool = False,
    body: RequestBody | None = None,
):
    """An Operation class whose 200 answer is documented as `media_types` (and its request
    body as ``body``)."""

    @dataclass
    class AudioOperation(Operation):
        def __post_init__(self) -> None:
            if body is not None:
                self.request_body = body
            ok = self.responses["200"]
            ok.content = dict(media_types)
            if pcm_headers:
                ok.headers = {
                    name: OpenAPIHeader(schema=Schema(type=kind), description=text)
                    for name, (kind, text) in PCM_HEADERS.items()
                }

    return AudioOperation
