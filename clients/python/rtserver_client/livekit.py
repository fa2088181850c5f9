"""A LiveKit Agents TTS plugin for rtserver: `pip install "rtserver-client[livekit]"`.

`stream()` opens one server context per stream and sends text as the agent's LLM produces it
(the server cuts sentences itself; if the LLM pauses past the server's context timeout, the
next text goes on in a new context, in the same segment); `flush()` of the input is a `flush`
(speak what is buffered now) and the end of input a `close`. Closing a stream early
(barge-in) sends `cancel`, so the server stops synthesizing at once. `synthesize()` is the
one-shot form. All streams of a TTS share one WebSocket: the protocol multiplexes contexts on
it. With
`word_timestamps`, the server's `words` events become LiveKit timed transcripts (aligned
transcripts, where the installed livekit-agents has them).

    from rtserver_client.livekit import TTS
    session = AgentSession(tts=TTS(base_url="http://127.0.0.1:50000", voice="joe"), ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import websockets
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    tts,
    utils,
)
from livekit.agents.types import TimedString
from websockets.http11 import Response

from rtserver_client.client import Connection, Context, ServerError, TTSClient
from rtserver_client.protocol import Done, Error, Words

__all__ = ["TTS", "ChunkedStream", "SynthesizeStream"]

logger = logging.getLogger("rtserver_client.livekit")

# Older 1.x releases have no aligned transcripts; there the plugin streams audio only.
_ALIGNED = "aligned_transcript" in {f.name for f in dataclasses.fields(tts.TTSCapabilities)}


class TTS(tts.TTS):
    """LiveKit Agents TTS on rtserver's /ws/tts.

    Args:
        base_url: the server's HTTP base URL.
        voice: the speaker id (`GET /speakers`).
        api_key: for a server started with `--api-key`.
        sample_rate: output rate (the server resamples), 24 kHz by default.
        speed: speaking rate, 1.0 normal.
        instructions: how to speak, e.g. a dialect or an emotion (CosyVoice2/3's instruct
            mode; other engines ignore it).
        word_timestamps: ask for `words` events and pass them on as timed transcripts.
    """

    def __init__(
        self,
        *,
        base_url: str = "http://127.0.0.1:50000",
        voice: str = "joe",
        api_key: str | None = None,
        sample_rate: int = 24000,
        speed: float = 1.0,
        instructions: str | None = None,
        word_timestamps: bool = True,
    ) -> None:
        aligned = word_timestamps and _ALIGNED
        caps = (
            tts.TTSCapabilities(streaming=True, aligned_transcript=aligned)
            if _ALIGNED
            else tts.TTSCapabilities(streaming=True)
        )
        super().__init__(capabilities=caps, sample_rate=sample_rate, num_channels=1)
        self.voice = voice
        self.speed = speed
        self.instructions = instructions
        self.word_timestamps = aligned
        self._client = TTSClient(base_url, api_key=api_key)
        self._conn: Connection | None = None
        self._conn_lock = asyncio.Lock()
        self._prewarm: asyncio.Future[Connection] | None = None

    @property
    def provider(self) -> str:
        return "rtserver"

    async def _connection(self) -> Connection:
        """The shared socket, opened on first use and again after it dropped."""
        async with self._conn_lock:
            if self._conn is None or self._conn.closed:
                try:
                    self._conn = await self._client.open()
                except websockets.InvalidStatus as e:
                    raise _refused(e.response) from e
                except (OSError, websockets.InvalidHandshake) as e:
                    raise APIConnectionError(f"rtserver unreachable: {e}") from e
            return self._conn

    async def _start(self, text: str = "") -> Context:
        conn = await self._connection()
        try:
            return await conn.start(
                spk_id=self.voice,
                format="pcm",
                sample_rate=self.sample_rate,
                speed=self.speed,
                instructions=self.instructions,
                text=text,
                timestamps=self.word_timestamps,
            )
        except ServerError as e:
            # `busy` and friends pass; a bad voice or format does not.
            retryable = e.error.code in {"busy", "too_many_streams", "connection_closed"}
            raise APIError(str(e), retryable=retryable) from e

    def prewarm(self) -> None:
        # Kept: the event loop holds only a weak reference to a task.
        self._prewarm = asyncio.ensure_future(self._connection())

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()
            self._conn = None
        await self._client.http.aclose()


def _refused(response: Response) -> APIStatusError:
    """The server answered the upgrade with a refusal: a key or origin it does not accept is
    refused again on a retry (APIStatusError makes 4xx final, 429 and 5xx retryable)."""
    detail = response.body.decode(errors="replace")[:200] if response.body else ""
    return APIStatusError(
        f"rtserver refused the connection (HTTP {response.status_code}) {detail}".strip(),
        status_code=response.status_code,
        request_id=response.headers.get("x-request-id"),
        body=detail or None,
    )


def _lapsed(ctx: Context) -> bool:
    """Whether the server ended the context for having nothing to say (the agent's LLM
    paused longer than its context timeout): the stream goes on in a new context."""
    return isinstance(ctx.ending, Error) and ctx.ending.code == "context_timeout"


async def _relay(ctx: Context, emitter: tts.AudioEmitter, words: bool, start_s: float) -> float:
    """Pass a context's audio and word timings to the emitter until it ends; its audio starts
    `start_s` into the segment. Returns the seconds of audio passed."""
    audio = 0
    async for item in ctx.events():  # ends after done, cancelled or an ending error
        if isinstance(item, bytes):
            emitter.push(item)
            audio += len(item)
        elif isinstance(item, Words) and words:
            emitter.push_timed_transcript(
                [
                    TimedString(
                        w.word + " ",
                        start_time=start_s + w.start_ms / 1e3,
                        end_time=start_s + w.end_ms / 1e3,
                    )
                    for w in item.words
                ]
            )
        elif isinstance(item, Error) and not _lapsed(ctx):
            logger.warning("rtserver %s: %s", item.code, item.message)
    if not isinstance(ctx.ending, Done) and not _lapsed(ctx):
        raise APIError(f"rtserver ended the context: {ctx.ending!r}", retryable=False)
    return audio / (2 * ctx.sample_rate)  # s16le mono


async def _cancel_if_open(ctx: Context) -> None:
    """A stream closed before its context ended (barge-in) cancels it on the server."""
    if ctx.ending is None and not ctx.conn.closed:
        with contextlib.suppress(Exception):
            await ctx.cancel()


class ChunkedStream(tts.ChunkedStream):
    """`synthesize()`: the whole text in one context."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._rt: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        ctx = await self._rt._start(text=self.input_text)
        output_emitter.initialize(
            request_id=ctx.id,
            sample_rate=self._rt.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        try:
            await ctx.close()
            await _relay(ctx, output_emitter, self._rt.word_timestamps, 0.0)
        finally:
            await _cancel_if_open(ctx)


class SynthesizeStream(tts.SynthesizeStream):
    """`stream()`: text goes to the server as it is pushed, in one context (one segment)."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._rt: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        ctx = await self._rt._start()
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=self._rt.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        output_emitter.start_segment(segment_id=ctx.id)
        # The contexts the segment's audio comes from, in order: one, unless the server ends
        # one for idling while the LLM pauses; then the next text opens another.
        contexts: asyncio.Queue[Context | None] = asyncio.Queue()
        contexts.put_nowait(ctx)

        async def send_text() -> None:
            nonlocal ctx
            try:
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        if ctx.ending is None:
                            await ctx.flush()
                        continue
                    self._mark_started()
                    if _lapsed(ctx):
                        ctx = await self._rt._start()
                        contexts.put_nowait(ctx)
                    await ctx.send(data)
                if ctx.ending is None:
                    await ctx.close()
            finally:
                contexts.put_nowait(None)

        async def relay() -> None:
            start_s = 0.0
            while (each := await contexts.get()) is not None:
                start_s += await _relay(each, output_emitter, self._rt.word_timestamps, start_s)
                if not _lapsed(each):
                    return

        sender = asyncio.create_task(send_text(), name="rtserver.send_text")
        try:
            await relay()
            await sender  # surfaces a failed send
        finally:
            await utils.aio.cancel_and_wait(sender)
            await _cancel_if_open(ctx)
        output_emitter.end_segment()
