"""Wire types: HTTP request bodies here, the /ws/tts message schema from the client package.

The /ws/tts messages are defined once, in `rtserver_client.protocol` (the installable client
distribution in clients/python), and re-exported here so the server validates exactly what
clients send and decode. Audio never travels as JSON: it goes out as binary frames
`[u32 little-endian stream id][payload]`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from rtserver_client import protocol as _wire
from rtserver_client.protocol import *  # noqa: F403 - the /ws/tts types, re-exported whole
from rtserver_client.protocol import Instructions, SampleRate, Seed, Speed, json_schema

__all__ = [*_wire.__all__, "SpeakerInfo", "TTSRequest", "Text"]

Text = Annotated[str, msgspec.Meta(min_length=1, description="Text to speak.")]


class TTSRequest(msgspec.Struct, forbid_unknown_fields=False):
    """Body of POST /tts and POST /tts/pcm (the CosyVoice SFT-mode request)."""

    tts_text: Text
    spk_id: Annotated[str, msgspec.Meta(min_length=1)]
    stream: bool = False
    speed: Speed = 1.0
    seed: Seed = 0
    instructions: Instructions = None
    sample_rate: SampleRate | None = None  # resample to this; None: the speaker's rate
    # /tts/pcm only: G.711 for phone lines (8 kHz unless sample_rate says 16000).
    encoding: Literal["s16le", "mulaw", "alaw"] = "s16le"


class SpeakerInfo(msgspec.Struct):
    id: str
    language: str
    sample_rate: int
    engine: str
    instructions: bool = False  # whether `instructions` steer this speaker (an instruct mode)


if __name__ == "__main__":  # python -m rtserver.protocol > schema.json
    import json

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
