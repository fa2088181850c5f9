"""OpenAPI details Litestar cannot infer from a streaming handler: the audio media types of
the 200 answer and its headers, each with a schema (the document validates)."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIType, Operation, Schema

BINARY = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format="binary"))
PCM_HEADERS = {
    "X-Sample-Rate": "Samples per second.",
    "X-Channels": "Always 1.",
    "X-Bit-Depth": "16: signed 16-bit little-endian samples (s16le); 8 for mulaw/alaw.",
}
L16 = "audio/L16"  # RFC 2586's name; the real header adds `;rate=R;channels=1`


def audio_operation(media_types: dict[str, OpenAPIMediaType], pcm_headers: bool = False):
    """An Operation class whose 200 answer is documented as `media_types`."""

    @dataclass
    class AudioOperation(Operation):
        def __post_init__(self) -> None:
            ok = self.responses["200"]
            ok.content = dict(media_types)
            if pcm_headers:
                ok.headers = {
                    name: OpenAPIHeader(schema=Schema(type=OpenAPIType.INTEGER), description=text)
                    for name, text in PCM_HEADERS.items()
                }

    return AudioOperation
