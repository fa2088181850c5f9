"""A LiveKit Agents TTS plugin for rtserver: `pip install "rtserver-client[livekit]"`.

`stream()` opens one server context per stream and sends text as the agent's LLM produces it
(the server cuts sentences itself; if the LLM pauses past the server's context timeout, the
next text goes on in a new context, in the same segment); `flush()` of the input is a `flush`
(speak what is buffered now) and the end of input a `close`. Closing a stream early
(barge-in) sends `cancel`, so the server stops synthesizing at once. `synthesize()` is the
one-shot form. The streams of a TTS share one WebSocket (the protocol multiplexes contexts on
it), and another once that one has the server's `max_contexts` open. `conn_options.timeout`
bounds connecting, and how long the server may stay silent while a stream waits on it (it may
be slow to answer while streams queue for a slot: silence alone is no error; a socket that
then leaves a ping unanswered too is dropped, with APITimeoutError). With
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
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import websockets
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    APITimeoutError,
    tts,
    utils,
)
from livekit.agents.types import TimedString

from rtserver_client.client import (
    Connection,
    Context,
    Event,
    HandshakeRefused,
    ServerError,
    TTSClient,
)
from rtserver_client.protocol import Done, Error, Words

__all__ = ["TTS", "ChunkedStream", "SynthesizeStream"]

logger = logging.getLogger("rtserver_client.livekit")

# Older 1.x releases have no aligned transcripts; there the plugin streams audio only.
_ALIGNED = "aligned_transcript" in {f.name for f in dataclasses.fields(tts.TTSCapabilities)}

# Refusals a retry can get past: a server at capacity, a socket or address at its limit (the
# retry finds room, or another socket), a server going away (the retry opens a new socket, to
# another replica or the restarted server), a socket lost.
_RETRYABLE = frozenset(
    {"busy", "too_many_streams", "too_many_contexts", "shutting_down", "connection_closed"}
)

T = TypeVar("T")


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
        text_streaming: feed the model text as it arrives instead of by sentence
            (CosyVoice2/3 only; other engines refuse the stream): speech starts after a
            few words.
        seed: sampling seed (CosyVoice); 0 draws a random one per stream.
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
        text_streaming: bool = False,
        seed: int = 0,
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
        self.text_streaming = text_streaming
        self.seed = seed
        self._client = TTSClient(base_url, api_key=api_key)
        self._conns: list[Connection] = []
        # Context ids a `start` is on its way for, per socket: they count against the
        # socket's max_contexts before the client has registered them.
        self._claims: dict[Connection, set[str]] = {}
        self._conn_lock = asyncio.Lock()
        self._prewarm: asyncio.Future[Connection] | None = None

    @property
    def provider(self) -> str:
        return "rtserver"

    async def _connection(self, timeout: float, claim: str | None = None) -> Connection:
        """A socket with room for one more context (claimed for `claim`): the shared one,
        another when it has the server's max_contexts open or the server is draining it, a
        new one after it dropped."""
        try:
            async with asyncio.timeout(timeout), self._conn_lock:
                self._conns = [c for c in self._conns if not c.closed]
                conn = next((c for c in self._conns if self._has_room(c)), None)
                if conn is None:
                    conn = await self._open()
                if claim:
                    self._claims.setdefault(conn, set()).add(claim)
                return conn
        except TimeoutError as e:  # ours, or websockets' own open_timeout
            raise APITimeoutError(f"rtserver did not accept a connection in {timeout} s") from e

    def _has_room(self, conn: Connection) -> bool:
        assert conn.ready is not None
        held = conn.contexts.keys() | self._claims.get(conn, set())
        return not conn.draining and len(held) < conn.ready.max_contexts

    async def _open(self) -> Connection:
        try:
            conn = await self._client.open()
        except HandshakeRefused as e:
            raise _refused(e) from e
        except (OSError, websockets.InvalidHandshake) as e:
            raise APIConnectionError(f"rtserver unreachable: {e}") from e
        self._conns.append(conn)
        return conn

    async def _start(self, timeout: float, text: str = "") -> Context:
        context_id = f"lk-{utils.shortuuid()}"
        conn = await self._connection(timeout, claim=context_id)
        start = conn.start(
            spk_id=self.voice,
            format="pcm",
            context_id=context_id,
            sample_rate=self.sample_rate,
            speed=self.speed,
            instructions=self.instructions,
            text=text,
            timestamps=self.word_timestamps,
            text_streaming=self.text_streaming,
            seed=self.seed,
        )
        try:
            return await _live(conn, start, timeout)
        except ServerError as e:
            # `busy` and friends pass; a bad voice or format does not.
            raise APIError(str(e), retryable=e.error.code in _RETRYABLE) from e
        finally:
            claims = self._claims.get(conn, set())
            claims.discard(context_id)
            if not claims:
                self._claims.pop(conn, None)

    def prewarm(self) -> None:
        # Kept: the event loop holds only a weak reference to a task.
        self._prewarm = asyncio.ensure_future(self._connection(DEFAULT_API_CONNECT_OPTIONS.timeout))

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> SynthesizeStream:
        return SynthesizeStream(tts=self, conn_options=conn_options)

    async def aclose(self) -> None:
        conns, self._conns = self._conns, []
        self._claims.clear()
        for conn in conns:
            await conn.aclose()
        await self._client.http.aclose()


def _refused(refusal: HandshakeRefused) -> APIStatusError:
    """The server answered the upgrade with a refusal: a key or origin it does not accept is
    refused again on a retry (APIStatusError makes 4xx final, 429 and 5xx retryable)."""
    return APIStatusError(
        str(refusal),
        status_code=refusal.response.status_code,
        request_id=refusal.response.headers.get("x-request-id"),
        body=refusal.detail or None,
    )


async def _live(conn: Connection, waiting: Awaitable[T], timeout: float) -> T:
    """What `waiting` gives, while the socket stays alive. A server may keep a context silent
    for long (queued for a slot, or waiting for the agent's text), so silence alone is no
    error; after `timeout` / 2 of it the socket is pinged, and one whose server does not
    answer within the other half is dropped (its contexts end): APITimeoutError."""
    task = asyncio.ensure_future(waiting)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=timeout / 2)
            if not task.done() and not await _answers_ping(conn, timeout / 2):
                if task.done():
                    break
                conn.abort()
                raise APITimeoutError(f"rtserver did not answer in {timeout} s")
        return task.result()
    finally:
        task.cancel()


async def _answers_ping(conn: Connection, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await (await conn.ws.ping())
        return True
    except TimeoutError:
        return False
    except websockets.ConnectionClosed:
        return True  # not stalled but gone: its reader ends what is waited on


async def _next_event(ctx: Context, timeout: float) -> Event:
    if not ctx.queue.empty():  # the common case, audio arriving: no task, no timer
        return ctx.queue.get_nowait()
    return await _live(ctx.conn, ctx.queue.get(), timeout)


@contextlib.contextmanager
def _unless_gone() -> Iterator[None]:
    """For a send: a socket that has dropped raises, but the context's reader says so too (it
    ends the context with `connection_closed`, retryable), and that is what the stream
    reports."""
    try:
        yield
    except ServerError as e:
        if e.error.code != "connection_closed":
            raise


def _lapsed(ctx: Context) -> bool:
    """Whether the server ended the context for having nothing to say (the agent's LLM
    paused longer than its context timeout): the stream goes on in a new context."""
    return isinstance(ctx.ending, Error) and ctx.ending.code == "context_timeout"


async def _relay(
    ctx: Context, emitter: tts.AudioEmitter, words: bool, start_s: float, timeout: float
) -> float:
    """Pass a context's audio and word timings to the emitter until it ends; its audio starts
    `start_s` into the segment. Returns the seconds of audio passed."""
    audio = 0
    while True:
        item = await _next_event(ctx, timeout)
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
        if item is ctx.ending:  # done, cancelled or an ending error: the last event
            break
    if not isinstance(ctx.ending, Done) and not _lapsed(ctx):
        code = ctx.ending.code if isinstance(ctx.ending, Error) else None
        raise APIError(f"rtserver ended the context: {ctx.ending!r}", retryable=code in _RETRYABLE)
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
        timeout = self._conn_options.timeout
        ctx = await self._rt._start(timeout, text=self.input_text)
        output_emitter.initialize(
            request_id=ctx.id,
            sample_rate=self._rt.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        try:
            with _unless_gone():
                await ctx.close()
            await _relay(ctx, output_emitter, self._rt.word_timestamps, 0.0, timeout)
        finally:
            await _cancel_if_open(ctx)


class SynthesizeStream(tts.SynthesizeStream):
    """`stream()`: text goes to the server as it is pushed, in one context (one segment)."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._rt: TTS = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        timeout = self._conn_options.timeout
        ctx = await self._rt._start(timeout)
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
                with _unless_gone():
                    async for data in self._input_ch:
                        if isinstance(data, self._FlushSentinel):
                            if ctx.ending is None:
                                await ctx.flush()
                            continue
                        self._mark_started()
                        if _lapsed(ctx):
                            ctx = await self._rt._start(timeout)
                            contexts.put_nowait(ctx)
                        await ctx.send(data)
                    if ctx.ending is None:
                        await ctx.close()
            finally:
                contexts.put_nowait(None)

        async def relay() -> None:
            start_s = 0.0
            words = self._rt.word_timestamps
            while (each := await contexts.get()) is not None:
                start_s += await _relay(each, output_emitter, words, start_s, timeout)
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
