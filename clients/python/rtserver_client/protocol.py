"""The /ws/tts wire types: every JSON message on the socket, as msgspec Structs.

They live in the client package so the server (which re-exports them from
`rtserver.protocol`) and every client validate against one definition. Each message is tagged
by its `type` field. Audio never travels as JSON: it goes out as binary frames
`[u32 little-endian stream id][payload]`, where the stream id is the number the server assigned
to the context in its `started` event and the payload is s16le mono PCM (an even number of
bytes), G.711 bytes, or a slice of one continuous compressed stream.
"""

from __future__ import annotations

import struct
from typing import Annotated, Literal

import msgspec

__all__ = [
    "ENDING_ERRORS",
    "ERROR_CODES",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "SOCKET_ENDING_ERRORS",
    "AppendText",
    "Cancel",
    "Cancelled",
    "ClientMessage",
    "Close",
    "ContextId",
    "Done",
    "Error",
    "Flush",
    "Flushed",
    "Format",
    "Ping",
    "Pong",
    "Ready",
    "SampleRate",
    "Seed",
    "Segment",
    "ServerMessage",
    "Speed",
    "Start",
    "Started",
    "Word",
    "Words",
    "decode_server_frame",
    "json_schema",
]

# pcm: s16le; mulaw/alaw: G.711 bytes for phone lines (8 kHz unless sample_rate says 16000);
# mp3, opus (Ogg), aac (ADTS), flac: one continuous stream per context.
Format = Literal["pcm", "mp3", "opus", "aac", "flac", "mulaw", "alaw"]

# Shared constraints, so HTTP and WebSocket validate the same way.
Speed = Annotated[
    float, msgspec.Meta(ge=0.25, le=4.0, description="Speaking rate, 1.0 = normal (as OpenAI's).")
]
Seed = Annotated[
    int,
    msgspec.Meta(
        ge=0, le=2**63 - 1, description="Sampling seed; 0 draws a random one per request."
    ),
]
Instructions = Annotated[
    str | None,
    msgspec.Meta(
        description="How to speak (a dialect, an emotion, a speed): the instruct mode of "
        "CosyVoice2/3 and CosyVoice-300M-Instruct; other models ignore it. At most 1000 "
        "characters."
    ),
]
ContextId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000  # what a request may ask to be resampled to
SampleRate = Annotated[int, msgspec.Meta(ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)]


# ---- client -> server -------------------------------------------------------------------
# omit_defaults: a client that leaves an option at its default does not send it, so a newer
# client keeps working against a server that predates the option (the server forbids unknown
# fields).


class Start(
    msgspec.Struct, tag="start", tag_field="type", forbid_unknown_fields=True, omit_defaults=True
):
    """Open a context. Text may follow in `text` messages; `close` ends it."""

    context_id: ContextId
    spk_id: Annotated[str, msgspec.Meta(min_length=1)]
    format: Format = "pcm"
    sample_rate: SampleRate | None = None  # None: the engine's own rate
    speed: Speed = 1.0
    seed: Seed = 0
    instructions: Instructions = None
    text: str = ""  # optional first fragment, same as a `text` message
    # CosyVoice2/3: fragments feed one running LLM as they arrive (bistream) instead of
    # waiting for sentence ends; a flush ends the piece. Raw text: no text normalization.
    text_streaming: bool = False
    # Word timings: a `words` event right before each `segment` event.
    timestamps: bool = False


class AppendText(
    msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True, omit_defaults=True
):
    """Append a fragment (any size, even one token). Spaces are the client's to send."""

    context_id: ContextId
    text: str
    flush: bool = False


class Flush(msgspec.Struct, tag="flush", tag_field="type", forbid_unknown_fields=True):
    """Synthesize everything buffered now; answered by `flushed` once its audio is sent."""

    context_id: ContextId


class Close(msgspec.Struct, tag="close", tag_field="type", forbid_unknown_fields=True):
    """No more text: speak what is buffered, then send `done`."""

    context_id: ContextId


class Cancel(msgspec.Struct, tag="cancel", tag_field="type", forbid_unknown_fields=True):
    """Barge-in: stop now. After `cancelled` no audio of this context is ever sent."""

    context_id: ContextId


class Ping(msgspec.Struct, tag="ping", tag_field="type", forbid_unknown_fields=True):
    """Keepalive; answered by `pong`. Any message resets the idle timer."""


ClientMessage = Start | AppendText | Flush | Close | Cancel | Ping


# ---- server -> client -------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready", tag_field="type"):
    server: str
    version: str
    engine: str
    sample_rate: int
    formats: list[str]
    speakers: list[str]
    max_contexts: int
    max_message_bytes: int
    idle_timeout_s: float
    context_idle_timeout_s: float
    max_audio_s: float
    min_sentence_chars: int
    auto_flush_ms: int
    # while streams wait for a slot, a context that has held one this long ends at its next
    # pause (None: a server from before the lease)
    slot_lease_s: float | None = None
    # characters one context may send in all (its start's text and every `text`); None: a
    # server from before it was said here
    max_text_chars: int | None = None


class Started(msgspec.Struct, tag="started", tag_field="type"):
    context_id: str
    stream: int  # the u32 that prefixes this context's binary audio frames
    format: str
    sample_rate: int


class Word(msgspec.Struct):
    """One spoken word and where it sits in the context's audio."""

    word: str
    start_ms: float
    end_ms: float


class Words(msgspec.Struct, tag="words", tag_field="type"):
    """The words of the next segment with their times (`start` with `timestamps: true`);
    sent right before that segment's `segment` event, in order."""

    context_id: str
    index: int  # the segment's index
    words: list[Word]
    estimated: bool = False  # True: spread over the segment's audio, not aligned by the model


class Segment(msgspec.Struct, tag="segment", tag_field="type"):
    """One synthesized sentence and where it sits in the context's audio (sent after its audio).
    truncated: its speech ended at a limit of the model before all of its text was spoken."""

    context_id: str
    index: int
    text: str
    start_ms: float
    end_ms: float
    truncated: bool = False


class Flushed(msgspec.Struct, tag="flushed", tag_field="type"):
    context_id: str
    flush_id: int


class Cancelled(msgspec.Struct, tag="cancelled", tag_field="type"):
    context_id: str


class Done(msgspec.Struct, tag="done", tag_field="type"):
    context_id: str
    ttfa_ms: float | None  # from the first text to the first audio frame; None if no audio
    audio_ms: float
    processing_ms: float
    rtf: float  # processing time / audio time
    segments: int


class Error(msgspec.Struct, tag="error", tag_field="type"):
    code: str
    message: str
    context_id: str | None = None


class Pong(msgspec.Struct, tag="pong", tag_field="type"):
    pass


ServerMessage = Ready | Started | Words | Segment | Flushed | Cancelled | Done | Error | Pong

# Error codes sent in `error` events.
ERROR_CODES: dict[str, str] = {
    "invalid_json": "the text frame is not valid JSON",
    "invalid_message": "unknown `type`, missing or ill-typed field",
    "binary_not_accepted": "clients send JSON text frames only",
    "message_too_large": "the frame exceeds max_message_bytes",
    "unknown_context": "no open context has this context_id",
    "duplicate_context": "a context with this context_id is already open",
    "context_closed": "text, flush or close for a context after its `close` (or after it finished)",
    "unknown_speaker": (
        "spk_id is not one of the server's speakers (or was deleted while the context waited "
        "for a slot: then it has ended)"
    ),
    "unsupported_format": "the format cannot be encoded at the requested sample_rate",
    "unsupported_option": "the loaded model cannot do this (text_streaming needs CosyVoice2/3)",
    "too_many_contexts": "the socket already has max_contexts open contexts",
    "too_many_streams": "this client address already has its limit of streams open",
    "too_many_sockets": "this client address already has its limit of sockets open; closed",
    "text_too_long": "the context's text exceeds the server's limit; the fragment is dropped",
    "invalid_text": "the fragment contains a control character; it is dropped",
    "too_many_flushes": (
        "a flush that adds no text while 256 of the context's flushes wait for their audio; "
        "it is dropped"
    ),
    "busy": "the server is at capacity; retry later",
    "synthesis_failed": "the engine failed on this context",
    "audio_limit": "the context reached max_audio_s of audio; it has ended",
    "read_timeout": "the client read none of this context's audio for too long; it has ended",
    "context_timeout": (
        "the context had nothing to say for context_idle_timeout_s (5 s while others wait for "
        "a slot), or held its slot slot_lease_s while others waited; it has ended"
    ),
    "internal_error": "a server bug ended this context, or its `start` (it is logged)",
    "shutting_down": "the server is shutting down: the context has ended (or cannot start)",
    "idle_timeout": "no message and no audio for idle_timeout_s; the socket is closed",
}


# The error codes that end the context they name (the others only refuse one message).
ENDING_ERRORS = frozenset(
    {
        "synthesis_failed",
        "unknown_speaker",
        "audio_limit",
        "read_timeout",
        "context_timeout",
        "internal_error",
        "shutting_down",
    }
)

# The error codes after which the server closes the socket (the others leave it open).
SOCKET_ENDING_ERRORS = frozenset({"idle_timeout", "too_many_sockets"})

_decode = msgspec.json.Decoder(ServerMessage).decode


def decode_server_frame(frame: str | bytes) -> tuple[int, bytes] | ServerMessage:
    """One frame from the server: `(stream, payload)` for audio, else the decoded event.

    The one place that knows the frame layout, for the client and the framework plugins."""
    if isinstance(frame, bytes):
        (stream,) = struct.unpack_from("<I", frame)
        return stream, frame[4:]
    return _decode(frame)


def json_schema() -> dict[str, object]:
    """JSON Schema of both directions (OpenAPI cannot describe WebSocket messages)."""
    return {
        "client_message": msgspec.json.schema(ClientMessage),
        "server_message": msgspec.json.schema(ServerMessage),
    }
