"""One /ws/tts connection: contexts with incremental text, flush, close, cancel.

The receive loop never waits on synthesis: each context has a pump task that moves its job's
audio to the socket. A client that stops reading blocks only its own pumps (the socket's send
waits), its jobs' backlogs fill, and the scheduler stops producing for them.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect

from rtserver import __version__
from rtserver.audio import Encoder, make_encoder
from rtserver.engine import Cancelled, Chunk, Done, Failed, Job
from rtserver.protocol import (
    AppendText,
    Cancel,
    ClientMessage,
    Close,
    Flush,
    Flushed,
    Ping,
    Pong,
    Ready,
    Segment,
    Start,
    Started,
)
from rtserver.protocol import Cancelled as CancelledMsg
from rtserver.protocol import Done as DoneMsg
from rtserver.protocol import Error as ErrorMsg
from rtserver.service import Busy, TTSService, UnknownSpeaker
from rtserver.text import Segmenter

log = logging.getLogger("rtserver.ws")

_decoder = msgspec.json.Decoder(ClientMessage)
_encoder = msgspec.json.Encoder()
_FINISHED_MEMORY = 64  # recently finished context ids, so a late cancel is acknowledged


@dataclass(eq=False)
class Context:
    id: str
    stream: int
    job: Job
    encoder: Encoder
    segmenter: Segmenter
    texts: list[str] = field(default_factory=list)  # segment texts, by segment index
    chars: int = 0
    first_text_at: float | None = None
    first_audio_at: float | None = None
    samples: int = 0  # engine-rate samples sent so far
    segments_done: int = 0
    flushes: deque[tuple[int, int]] = field(default_factory=deque)  # (flush_id, segment count)
    flush_count: int = 0
    cancelled: bool = False
    closed: bool = False  # `close` received: no more text
    pump: asyncio.Task | None = None
    auto_flush: asyncio.TimerHandle | None = None


class WsSession:
    def __init__(self, socket: WebSocket, service: TTSService) -> None:
        self.socket = socket
        self.service = service
        self.settings = service.settings
        self.contexts: dict[str, Context] = {}
        self.finished: deque[str] = deque(maxlen=_FINISHED_MEMORY)
        self._next_stream = 1
        self._send_lock = asyncio.Lock()
        self._closed = False

    # ---- transport ------------------------------------------------------------------------

    async def _send(self, msg: msgspec.Struct) -> None:
        if self._closed:
            return
        async with self._send_lock:
            await self.socket.send_text(_encoder.encode(msg).decode())

    async def _send_audio(self, ctx: Context, data: bytes) -> None:
        if self._closed:
            return
        async with self._send_lock:
            if ctx.cancelled:  # the ack may have been decided while we waited
                return
            await self.socket.send_bytes(struct.pack("<I", ctx.stream) + data)

    async def _error(self, code: str, message: str, context_id: str | None = None) -> None:
        await self._send(ErrorMsg(code=code, message=message, context_id=context_id))

    # ---- main loop ------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        speakers = [sp.id for sp in self.service.speakers()]
        try:
            await self._send(
                Ready(
                    server="rtserver",
                    version=__version__,
                    engine=self.service.engine.name,
                    sample_rate=self.service.sample_rate,
                    formats=["pcm", "mp3"],
                    speakers=speakers,
                    max_contexts=s.max_contexts,
                    max_message_bytes=s.max_message_bytes,
                    idle_timeout_s=s.ws_idle_timeout_s,
                    min_sentence_chars=s.min_sentence_chars,
                    auto_flush_ms=s.auto_flush_ms,
                )
            )
            await self._receive_loop()
        except (WebSocketDisconnect, ConnectionError):
            pass
        finally:
            self._closed = True
            for ctx in list(self.contexts.values()):
                self._drop(ctx)

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await asyncio.wait_for(
                    self.socket.receive(), timeout=self.settings.ws_idle_timeout_s
                )
            except TimeoutError:
                if self.contexts:  # still speaking: not idle
                    continue
                await self._error(
                    "idle_timeout", f"no message for {self.settings.ws_idle_timeout_s}s"
                )
                await self.socket.close(code=1000, reason="idle timeout")
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await self._error(
                    "binary_not_accepted", "send JSON text frames; audio only flows to you"
                )
                continue
            await self._handle_text(message.get("text") or "")

    async def _handle_text(self, raw: str) -> None:
        if len(raw.encode()) > self.settings.max_message_bytes:
            await self._error(
                "message_too_large",
                f"frame of {len(raw.encode())} bytes exceeds {self.settings.max_message_bytes}",
            )
            return
        try:
            msg = _decoder.decode(raw)
        except msgspec.ValidationError as exc:
            await self._error("invalid_message", str(exc))
            return
        except msgspec.DecodeError as exc:
            await self._error("invalid_json", f"not valid JSON: {exc}")
            return
        if isinstance(msg, Ping):
            await self._send(Pong())
        elif isinstance(msg, Start):
            await self._start(msg)
        else:
            ctx = self.contexts.get(msg.context_id)
            if ctx is None:
                if msg.context_id in self.finished:
                    if isinstance(msg, Cancel):  # the race of barge-in with the last audio
                        await self._send(CancelledMsg(context_id=msg.context_id))
                    else:
                        await self._error(
                            "context_closed",
                            f"context {msg.context_id!r} has finished",
                            msg.context_id,
                        )
                    return
                await self._error(
                    "unknown_context", f"no open context {msg.context_id!r}", msg.context_id
                )
                return
            if ctx.closed and isinstance(msg, AppendText | Flush | Close):
                await self._error(
                    "context_closed", f"context {ctx.id!r} was closed; open a new one", ctx.id
                )
            elif isinstance(msg, AppendText):
                await self._append(ctx, msg.text)
                if msg.flush:
                    await self._flush(ctx)
            elif isinstance(msg, Flush):
                await self._flush(ctx)
            elif isinstance(msg, Close):
                await self._close(ctx)
            elif isinstance(msg, Cancel):
                self._cancel(ctx)

    # ---- context operations ---------------------------------------------------------------

    async def _start(self, msg: Start) -> None:
        cid = msg.context_id
        if cid in self.contexts:
            await self._error("duplicate_context", f"context {cid!r} is already open", cid)
            return
        if len(self.contexts) >= self.settings.max_contexts:
            await self._error(
                "too_many_contexts",
                f"{self.settings.max_contexts} contexts already open on this socket",
                cid,
            )
            return
        try:
            speaker = self.service.speaker(msg.spk_id)
            job = self.service.open_job(speaker, msg.speed, msg.seed, stream=True)
        except UnknownSpeaker as exc:
            await self._error("unknown_speaker", str(exc), cid)
            return
        except Busy as exc:
            await self._error("busy", str(exc), cid)
            return
        ctx = Context(
            id=cid,
            stream=self._next_stream,
            job=job,
            encoder=make_encoder(msg.format, speaker.sample_rate, msg.sample_rate),
            segmenter=self.service.segmenter(stream=True, incremental=True),
        )
        self._next_stream += 1
        self.contexts[cid] = ctx
        await self._send(
            Started(
                context_id=cid,
                stream=ctx.stream,
                format=msg.format,
                sample_rate=ctx.encoder.sample_rate,
            )  # fmt: skip
        )
        ctx.pump = asyncio.create_task(self._pump(ctx), name=f"pump-{cid}")
        if msg.text:
            await self._append(ctx, msg.text)

    async def _append(self, ctx: Context, text: str) -> None:
        if ctx.chars + len(text) > self.settings.max_text_chars:
            await self._error(
                "text_too_long",
                f"context text would exceed {self.settings.max_text_chars} characters; fragment dropped",
                ctx.id,
            )
            return
        ctx.chars += len(text)
        if ctx.first_text_at is None and text.strip():
            ctx.first_text_at = time.monotonic()
        self._submit(ctx, ctx.segmenter.push(text))
        self._stop_auto_flush(ctx)
        if ctx.segmenter.pending.strip():
            loop = asyncio.get_running_loop()
            ctx.auto_flush = loop.call_later(
                self.settings.auto_flush_ms / 1000, self._auto_flush, ctx
            )

    @staticmethod
    def _stop_auto_flush(ctx: Context) -> None:
        if ctx.auto_flush:
            ctx.auto_flush.cancel()
            ctx.auto_flush = None

    def _auto_flush(self, ctx: Context) -> None:
        ctx.auto_flush = None
        if self.contexts.get(ctx.id) is ctx and not ctx.cancelled:
            self._submit(ctx, ctx.segmenter.flush())

    def _submit(self, ctx: Context, segments: list[str], close: bool = False) -> None:
        ctx.texts.extend(segments)
        self.service.add_text(ctx.job, segments, close=close)

    async def _flush(self, ctx: Context) -> None:
        self._submit(ctx, ctx.segmenter.flush())
        ctx.flush_count += 1
        ctx.flushes.append((ctx.flush_count, len(ctx.texts)))
        await self._settle_flushes(ctx)

    async def _settle_flushes(self, ctx: Context) -> None:
        while ctx.flushes and ctx.flushes[0][1] <= ctx.segments_done:
            flush_id, _ = ctx.flushes.popleft()
            await self._send(Flushed(context_id=ctx.id, flush_id=flush_id))

    async def _close(self, ctx: Context) -> None:
        ctx.closed = True
        self._stop_auto_flush(ctx)
        self._submit(ctx, ctx.segmenter.flush(), close=True)

    def _cancel(self, ctx: Context) -> None:
        # Stop forwarding now; the ack is sent once the scheduler has dropped the job.
        ctx.cancelled = True
        self._stop_auto_flush(ctx)
        self.service.cancel(ctx.job)

    def _drop(self, ctx: Context) -> None:
        """The socket is gone: free everything of this context."""
        ctx.cancelled = True
        self._stop_auto_flush(ctx)
        self.service.cancel(ctx.job)
        if ctx.pump and ctx.pump is not asyncio.current_task():
            ctx.pump.cancel()
        self.contexts.pop(ctx.id, None)

    def _finish(self, ctx: Context) -> None:
        self.contexts.pop(ctx.id, None)
        self.finished.append(ctx.id)

    # ---- audio pump -----------------------------------------------------------------------

    async def _pump(self, ctx: Context) -> None:
        rate = ctx.job.speaker.sample_rate
        try:
            while True:
                event = await ctx.job.channel.get()
                if isinstance(event, Chunk):
                    if ctx.cancelled:
                        continue
                    data = ctx.encoder.encode(event.audio)
                    start_ms = ctx.samples * 1000 / rate
                    ctx.samples += len(event.audio)
                    if data:
                        if ctx.first_audio_at is None:
                            ctx.first_audio_at = time.monotonic()
                        await self._send_audio(ctx, data)
                    if event.segment_end:
                        ctx.segments_done = event.segment + 1
                        await self._send(
                            Segment(
                                context_id=ctx.id,
                                index=event.segment,
                                text=ctx.texts[event.segment],
                                start_ms=round(start_ms, 1),
                                end_ms=round(ctx.samples * 1000 / rate, 1),
                            )  # fmt: skip
                        )
                        await self._settle_flushes(ctx)
                elif isinstance(event, Done):
                    tail = ctx.encoder.finish()
                    if tail:
                        await self._send_audio(ctx, tail)
                    self._finish(ctx)
                    await self._send(self._done(ctx))
                    return
                elif isinstance(event, Failed):
                    self._finish(ctx)
                    await self._error("synthesis_failed", event.message, ctx.id)
                    return
                elif isinstance(event, Cancelled):
                    self._finish(ctx)
                    await self._send(CancelledMsg(context_id=ctx.id))
                    return
        except (WebSocketDisconnect, ConnectionError, RuntimeError) as exc:
            log.info("context %s: socket gone (%s)", ctx.id, exc)
            self._drop(ctx)

    def _done(self, ctx: Context) -> DoneMsg:
        job = ctx.job
        audio_ms = ctx.samples * 1000 / job.speaker.sample_rate
        processing_ms = job.processing_seconds * 1000
        ttfa = None
        if ctx.first_audio_at is not None and ctx.first_text_at is not None:
            ttfa = round((ctx.first_audio_at - ctx.first_text_at) * 1000, 1)
        return DoneMsg(
            context_id=ctx.id,
            ttfa_ms=ttfa,
            audio_ms=round(audio_ms, 1),
            processing_ms=round(processing_ms, 1),
            rtf=round(processing_ms / audio_ms, 4) if audio_ms else 0.0,
            segments=len(ctx.texts),
        )
