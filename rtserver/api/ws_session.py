"""One /ws/tts connection: contexts with incremental text, flush, close, cancel.

Each context is a Session. The receive loop never waits on synthesis: each context has a pump
task that moves its session's events to the socket. A client that stops reading blocks only its
own pumps (the socket's send waits), its jobs' backlogs fill, the scheduler stops producing for
them and, after its read timeout, drops them. A watchdog ends contexts that have nothing to say
and sockets that are idle, so nothing idle holds a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import struct
import time
import typing
from collections import deque
from dataclasses import dataclass, field

import msgspec
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect

from rtserver import __version__
from rtserver.api.connection import READ_METER, ReadMeter, attach
from rtserver.api.http import client_of
from rtserver.protocol import (
    AppendText,
    Cancel,
    ClientMessage,
    Close,
    Flush,
    Flushed,
    Format,
    Ping,
    Pong,
    Ready,
    Segment,
    Start,
    Started,
    Word,
    Words,
)
from rtserver.protocol import Cancelled as CancelledMsg
from rtserver.protocol import Done as DoneMsg
from rtserver.protocol import Error as ErrorMsg
from rtserver.service import (
    Busy,
    ShuttingDown,
    TextRejected,
    TooManyForClient,
    TTSService,
    UnknownSpeaker,
    UnsupportedFormat,
    UnsupportedOption,
)
from rtserver.session import Audio, Cancelled, Failed, Finished, SegmentEnd, Session, speakable
from rtserver.text import estimate_words

log = logging.getLogger("rtserver.ws")

_decoder = msgspec.json.Decoder(ClientMessage)


class _Addressed(msgspec.Struct):
    context_id: str | None = None


_addressed = msgspec.json.Decoder(_Addressed)


def _context_of(raw: str | bytes) -> str | None:
    """The context an ill-formed message names, if it names one: its error says so, as a
    refused `start`'s does (a client waits on that context)."""
    try:
        return _addressed.decode(raw).context_id
    except (msgspec.DecodeError, RecursionError):  # not an object, or no string id
        return None


# A JSON escape: a whole surrogate pair, half of one, or any other (matched so that the
# backslash of an escaped backslash is not read as starting an escape).
_ESCAPE = re.compile(
    r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # a pair, kept
    r"|(?P<half>u[dD][89a-fA-F][0-9a-fA-F]{2})"  # half of one, dropped
    r"|.)",
    re.DOTALL,
)


def _mend_split_characters(raw: str) -> str | None:
    """The frame without the escaped halves of surrogate pairs, as JavaScript's JSON.stringify
    writes a string cut inside an emoji (JSON's grammar allows the escapes; msgspec refuses
    them as not text). Mended in the text, so the rest reaches the decoder as the client sent
    it (a parse and a rewrite turned a number out of range into Infinity). None where the frame
    has no such half."""
    mended = _ESCAPE.sub(lambda m: "" if m["half"] else m[0], raw)
    return mended if mended != raw else None


_encoder = msgspec.json.Encoder()
_FINISHED_MEMORY = 64  # recently finished context ids, so a late cancel is acknowledged
# One client address's sockets together may keep the event loop busy this share of the time
# (bursts of up to _BURST_S): 5000 one-character messages a second of "Mr. " (each rereads a
# pending sentence) kept /healthz waiting 4.7 s; a share per socket let 8 sockets flooding
# pings hold it 4-5 s. Agents sending an LLM's tokens use a fraction of a percent.
_LOOP_SHARE = 0.2
# While streams wait for a slot, a context with nothing to say gives its slot up after this
# (else --context-idle-timeout-s): one socket sending "Hm. " every 20 s held six for good.
_CONTENDED_IDLE_S = 5.0
_BURST_S = 0.5
_GONE = (WebSocketDisconnect,)  # the socket closed (under a send: see _write)
_CANCEL_WAIT_S = 5.0  # longer than an engine step; a start at the limit waits no longer
# Flushes of one context that wait for their audio (an agent flushing each sentence has one a
# sentence: their number is bounded by the text) past which one that adds no text is refused:
# each is a `flushed` to send later, outside the socket's loop share, and a client sending
# empty flushes as fast as it could while its context waited for a slot held a million.
_MAX_PENDING_FLUSHES = 256

_START_ERRORS = {
    UnknownSpeaker: "unknown_speaker",
    UnsupportedFormat: "unsupported_format",
    UnsupportedOption: "unsupported_option",
    TooManyForClient: "too_many_streams",
    Busy: "busy",
    ShuttingDown: "shutting_down",
}


@dataclass(eq=False)
class Context:
    id: str
    stream: int
    session: Session
    last_active: float = field(default_factory=time.monotonic)  # last message or audio
    last_audio: float = field(default_factory=time.monotonic)  # or the start
    flushes: deque[tuple[int, int]] = field(default_factory=deque)  # (flush_id, segments)
    flush_count: int = 0
    cancelled: bool = False
    muted: bool = False  # the client cancelled: none of its audio is sent from then on
    closed: bool = False  # `close` received: no more text
    timestamps: bool = False  # send `words` before each `segment`
    pump: asyncio.Task | None = None
    auto_flush: asyncio.TimerHandle | None = None


class LoopShare:
    """A client's share of the event loop: the time its messages take to handle is paid back
    by not reading the next one until the balance is positive again (reading pauses, and TCP
    slows the client down). A client within `share` never waits. Its sockets share one: each
    waits out the debt all of them ran up."""

    def __init__(self, share: float, burst_s: float, now: float) -> None:
        self.share, self.burst_s = share, burst_s
        self.balance, self.since = burst_s, now

    def spend(self, seconds: float, now: float) -> float:
        """Charge `seconds` of handling; returns how long to wait before reading on."""
        earned = (now - self.since) * self.share
        self.balance = min(self.burst_s, self.balance + earned) - seconds
        self.since = now
        return max(0.0, -self.balance / self.share)


class WsSession:
    def __init__(self, socket: WebSocket, service: TTSService) -> None:
        self.socket = socket
        self.service = service
        self.settings = service.settings
        self.client = client_of(socket)
        self.contexts: dict[str, Context] = {}
        self.finished: deque[str] = deque(maxlen=_FINISHED_MEMORY)
        self.last_active = time.monotonic()  # last client message or audio sent
        self._next_stream = 1
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._share = self._client_share()
        self._receiver: asyncio.Task | None = None  # the task reading the client's messages
        self._waited = 0.0  # the time its handlers waited off the loop (socket, worker thread)
        # what uvicorn's protocol tells of the socket (none behind another server: Ray's proxy)
        self._meter: ReadMeter | None = (socket.scope.get("extensions") or {}).get(READ_METER)

    def _client_share(self) -> LoopShare:
        new = LoopShare(_LOOP_SHARE, _BURST_S, time.perf_counter())
        return self.service.loop_shares.setdefault(self.client, new)

    # ---- transport ------------------------------------------------------------------------

    async def _send(self, msg: msgspec.Struct) -> None:
        await self._write(_encoder.encode(msg).decode())

    async def _send_audio(self, ctx: Context, data: bytes) -> None:
        if await self._write(struct.pack("<I", ctx.stream) + data, ctx):
            ctx.last_audio = ctx.last_active = self.last_active = time.monotonic()

    async def _write(self, frame: str | bytes, ctx: Context | None = None) -> bool:
        """One frame, in order with the others; whether it went (not to a closed socket,
        nor for a context muted while it waited)."""
        if self._closed:
            return False
        start = time.perf_counter()
        async with self._send_lock:
            if ctx is not None and ctx.muted:  # the ack may have been decided while we waited
                return False
            if self._meter is not None:  # a client reading audio at real time keeps the
                await self._meter.writable.wait()  # buffer full for seconds: not loop time
            sending = time.perf_counter()
            try:
                if isinstance(frame, bytes):
                    await self.socket.send_bytes(frame)
                else:
                    await self.socket.send_text(frame)
            except (RuntimeError, OSError) as exc:  # uvicorn's to a send after the close
                raise WebSocketDisconnect(detail=str(exc)) from exc
        if asyncio.current_task() is self._receiver:
            # Waiting behind another frame, or for the buffer to drain, is off the loop; the
            # send is the socket's loop time where the protocol says when it may wait (it then
            # does not), else all of it is taken for waiting.
            off = (sending if self._meter is not None else time.perf_counter()) - start
            self._waited += off
        return True

    def _waited_for(self, seconds: float) -> None:
        """A handler waited this long off the loop (a worker thread): not the socket's loop
        time."""
        self._waited += seconds

    async def _close_socket(self, code: int, reason: str) -> None:
        """Close the socket, if it is still open (a close after the close is RuntimeError)."""
        with contextlib.suppress(*_GONE, RuntimeError, OSError):
            await self.socket.close(code=code, reason=reason)

    async def _error(self, code: str, message: str, context_id: str | None = None) -> None:
        await self._send(ErrorMsg(code=code, message=message, context_id=context_id))

    # ---- main loop ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            release = self.service.client_sockets.acquire(self.client)
        except TooManyForClient as exc:
            await self._refuse("too_many_sockets", str(exc))
            return
        watchdog = asyncio.create_task(self._watchdog(), name="ws-watchdog")
        self.service.sockets.add(self)
        try:
            await self._send(self._ready())
            await self._receive_loop()
        except _GONE:
            pass
        finally:
            self.service.sockets.discard(self)
            self._closed = True
            watchdog.cancel()
            for ctx in list(self.contexts.values()):
                self._drop(ctx)
            release()

    async def shutdown(self) -> None:
        """The server is going away: every open context ends with `shutting_down`, then the
        socket closes (1001, going away)."""
        with contextlib.suppress(*_GONE):
            for ctx in list(self.contexts.values()):
                self._drop(ctx)
                message = "the server is shutting down; start the context again elsewhere"
                await self._error("shutting_down", message, ctx.id)
        await self._close_socket(1001, "server shutting down")

    async def _refuse(self, code: str, message: str) -> None:
        with contextlib.suppress(*_GONE):
            await self._error(code, message)
        await self._close_socket(1008, code)

    def _ready(self) -> Ready:
        s = self.settings
        return Ready(
            server="rtserver",
            version=__version__,
            engine=self.service.engine.name,
            sample_rate=self.service.sample_rate,
            formats=list(typing.get_args(Format)),
            speakers=[sp.id for sp in self.service.speakers()],
            max_contexts=s.max_contexts,
            max_message_bytes=s.max_message_bytes,
            idle_timeout_s=s.ws_idle_timeout_s,
            context_idle_timeout_s=s.context_idle_timeout_s,
            max_audio_s=s.max_audio_s,
            min_sentence_chars=s.min_sentence_chars,
            auto_flush_ms=s.auto_flush_ms,
            slot_lease_s=s.slot_lease_s,
            max_text_chars=s.max_text_chars,
        )

    async def _receive_loop(self) -> None:
        """Each message is charged to its client's share of the loop: its handling (less what
        it waited for off the loop), its replies, and (under uvicorn, which meters them: see
        ReadMeter) the parsing of its bytes and a receive that did not have to wait."""
        self._receiver = asyncio.current_task()
        meter = self._meter
        parsed = 0.0  # the meter's parse time charged so far
        while True:
            start, queued = time.perf_counter(), meter is not None and meter.queued
            message = await self.socket.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.last_active = time.monotonic()
            if not queued:
                start = time.perf_counter()  # the receive waited for the client
            waited = self._waited
            if message.get("bytes") is not None:
                await self._error(
                    "binary_not_accepted", "send JSON text frames; audio only flows to you"
                )
            else:
                await self._handle_safely(message.get("text") or "")
            now = time.perf_counter()
            spent = max(0.0, now - start - (self._waited - waited))
            if meter is not None:
                spent, parsed = spent + meter.parse_s - parsed, meter.parse_s
            if (wait := self._share.spend(spent, now)) > 0:
                await asyncio.sleep(wait)

    async def _watchdog(self) -> None:
        """End contexts with nothing to say, and the socket when nothing at all happens."""
        with contextlib.suppress(*_GONE):
            await self._watch()

    async def _watch(self) -> None:
        s = self.settings
        period = min(1.0, s.context_idle_timeout_s / 4, s.ws_idle_timeout_s / 4)
        while not self._closed:
            await asyncio.sleep(period)
            now = time.monotonic()
            contended = self.service.scheduler.contended
            for ctx in list(self.contexts.values()):
                if not ctx.closed and not ctx.cancelled:
                    self._check_idle(ctx, now, contended)
            if any(not ctx.session.idle for ctx in self.contexts.values()):
                self.last_active = now  # its contexts wait for a slot or for synthesis
            if now - self.last_active > s.ws_idle_timeout_s:
                message = f"no message and no audio for {s.ws_idle_timeout_s:g}s"
                await self._error("idle_timeout", message)
                await self._close_socket(1000, "idle timeout")
                return

    def _check_idle(self, ctx: Context, now: float, contended: bool) -> None:
        """End a context that holds its slot without use. While others wait for a slot, the
        use that counts is audio, and a slot is lent for a while: see _contended."""
        limit = self.settings.context_idle_timeout_s
        admitted = ctx.session.job.admitted_at  # None: queued, it holds no slot
        if contended and admitted is not None and self._paused(ctx, now):
            if self._contended(ctx, admitted, now):
                return
            limit = min(limit, _CONTENDED_IDLE_S)
        if ctx.session.idle and now - ctx.last_active > limit:
            why = f"nothing to say for {limit:g}s"
            self._cancel(ctx, self._timed_out(why, limit < self.settings.context_idle_timeout_s))

    @staticmethod
    def _paused(ctx: Context, now: float) -> bool:
        """Not speaking: the engine has no text of it to speak without more from the client,
        and a listener playing its audio in real time has played it all. (A text-streaming
        piece still taking text is spoken as it comes, ahead of its listener.)"""
        return not ctx.session.working and ctx.session.job.plays_until <= now

    def _contended(self, ctx: Context, admitted: float, now: float) -> bool:
        """At a pause while others wait: a context that has held its slot slot_lease_s ends, one
        with no audio for _CONTENDED_IDLE_S has the text it holds spoken as it stands (text
        that never made a sentence, a letter a second, held a slot for hours). Whether it
        acted."""
        lease = self.settings.slot_lease_s  # a short reply every second held a slot for good
        if now - admitted > lease:
            self._cancel(ctx, self._timed_out(f"held a slot for {lease:g}s", True))
            return True
        if now - max(ctx.last_audio, admitted) > _CONTENDED_IDLE_S and ctx.session.pending_text:
            self._stop_auto_flush(ctx)
            ctx.session.flush()
            return True
        return False

    async def _handle_safely(self, raw: str) -> None:
        """A message; a server bug handling it ends the context it names (its pump sends the
        error, after the audio made) and is logged, and the socket's other contexts go on."""
        try:
            await self._handle_text(raw)
        except _GONE:
            raise
        except Exception:
            log.exception("failed on a message")
            why = "the server failed on a message of this context (it is logged)"
            cid = _context_of(raw)
            if (ctx := self.contexts.get(cid or "")) is not None and not ctx.cancelled:
                self._cancel(ctx, Failed(why, code="internal_error"))
            elif ctx is None:  # not open (a `start` that failed): the client waits on its id
                await self._error("internal_error", why, cid)

    async def _handle_text(self, raw: str) -> None:
        size = len(raw.encode())
        if size > self.settings.max_message_bytes:
            # Its context named, if it has one (up to 4 MiB to scan): a client library
            # then reports the text it lost where it was sent, not as the socket's.
            await self._error(
                "message_too_large",
                f"frame of {size} bytes exceeds {self.settings.max_message_bytes}: dropped;"
                " send the text in smaller pieces",
                _context_of(raw),
            )
            return
        try:
            try:
                msg = _decoder.decode(raw)
            except (msgspec.DecodeError, RecursionError):
                if (mended := _mend_split_characters(raw)) is None:
                    raise
                msg = _decoder.decode(raw := mended)  # (half an emoji is nothing to speak)
        except msgspec.ValidationError as exc:
            await self._error("invalid_message", str(exc), _context_of(raw))
            return
        except (msgspec.DecodeError, RecursionError) as exc:
            await self._error("invalid_json", f"not valid JSON: {exc}")
            return
        if isinstance(msg, Ping):
            await self._send(Pong())
        elif isinstance(msg, Start):
            await self._start(msg)
        elif (ctx := self.contexts.get(msg.context_id)) is None:
            await self._no_context(msg)
        else:
            await self._on_context(ctx, msg)

    async def _no_context(self, msg: AppendText | Flush | Close | Cancel) -> None:
        cid = msg.context_id
        if cid not in self.finished:
            await self._error("unknown_context", f"no open context {cid!r}", cid)
        elif isinstance(msg, Cancel):  # the race of barge-in with the last audio
            await self._send(CancelledMsg(context_id=cid))
        else:
            await self._error("context_closed", f"context {cid!r} has finished", cid)

    async def _on_context(self, ctx: Context, msg: AppendText | Flush | Close | Cancel) -> None:
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
            self._close(ctx)
        elif isinstance(msg, Cancel):
            self._cancel(ctx)

    # ---- context operations ---------------------------------------------------------------

    async def _start(self, msg: Start) -> None:
        cid = msg.context_id
        await self._let_cancelled_end(cid)
        if cid in self.contexts:
            await self._error("duplicate_context", f"context {cid!r} is already open", cid)
            return
        if len(self.contexts) >= self.settings.max_contexts:
            limit = self.settings.max_contexts
            await self._error("too_many_contexts", f"{limit} contexts already open", cid)
            return
        try:
            session = await self.service.open_session(
                msg.spk_id, self.client, msg.format, msg.sample_rate,
                speed=msg.speed, seed=msg.seed, stream=True, incremental=True,
                text_streaming=msg.text_streaming, instructions=msg.instructions,
                waited=self._waited_for,
            )  # fmt: skip
        except TextRejected as exc:  # the instructions
            await self._error(exc.code, str(exc), cid)
            return
        except tuple(_START_ERRORS) as exc:
            code = next(c for cls, c in _START_ERRORS.items() if isinstance(exc, cls))
            await self._error(code, str(exc), cid)
            return
        attach(session, self.socket.scope)
        ctx = Context(id=cid, stream=self._next_stream, session=session, timestamps=msg.timestamps)
        self._next_stream += 1
        self.contexts[cid] = ctx
        await self._send(
            Started(
                context_id=cid,
                stream=ctx.stream,
                format=msg.format,
                sample_rate=session.sample_rate,
            )  # fmt: skip
        )
        ctx.pump = asyncio.create_task(self._pump(ctx), name=f"pump-{cid}")
        if msg.text:
            await self._append(ctx, msg.text)

    async def _let_cancelled_end(self, cid: str) -> None:
        """Barge-in sends `cancel` and a new `start` at once. A cancelled context ends (and
        gives back its stream) once the scheduler has dropped its job, within a step: a start
        at the limit, or reusing a cancelled context's id, waits for that (up to
        _CANCEL_WAIT_S) instead of being refused. The socket's later messages wait with it,
        in order; the wait is not the socket's loop time."""
        began = time.perf_counter()
        deadline = began + _CANCEL_WAIT_S
        while (left := deadline - time.perf_counter()) > 0:
            old = self.contexts.get(cid)
            full = len(self.contexts) >= self.settings.max_contexts
            waits_on = [old] if old is not None else list(self.contexts.values()) if full else []
            ending = [c.pump for c in waits_on if c.cancelled and c.pump and not c.pump.done()]
            if not ending:
                break
            await asyncio.wait(ending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        self._waited += time.perf_counter() - began

    async def _append(self, ctx: Context, text: str) -> None:
        if not text:
            return  # nothing to add (their number is not bounded: they must cost nothing)
        try:
            ctx.session.push(text)
        except TextRejected as exc:
            await self._error(exc.code, f"{exc}; fragment dropped", ctx.id)
            return
        if speakable(text):
            # Only text to say keeps an idle context (and its scheduler slot), or puts off
            # the auto-flush: flushes, blank or refused fragments sent forever would
            # otherwise hold it for good.
            ctx.last_active = time.monotonic()
            self._stop_auto_flush(ctx)
        if ctx.auto_flush is None and ctx.session.pending_text:
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
            ctx.session.flush()

    async def _flush(self, ctx: Context) -> None:
        self._stop_auto_flush(ctx)  # nothing is left for it
        submitted = ctx.session.flush()
        waiting = ctx.flushes
        if len(waiting) >= _MAX_PENDING_FLUSHES and waiting[-1][1] == submitted:
            message = f"{len(waiting)} flushes already wait for their audio; flush dropped"
            await self._error("too_many_flushes", message, ctx.id)
            return
        if tail := ctx.session.drain_if_spoken():  # all spoken before the flush came
            await self._send_audio(ctx, tail)
        ctx.flush_count += 1
        ctx.flushes.append((ctx.flush_count, submitted))
        await self._settle_flushes(ctx)

    async def _settle_flushes(self, ctx: Context) -> None:
        while ctx.flushes and ctx.flushes[0][1] <= ctx.session.segments_done:
            flush_id, _ = ctx.flushes.popleft()
            await self._send(Flushed(context_id=ctx.id, flush_id=flush_id))

    def _close(self, ctx: Context) -> None:
        ctx.closed = True
        self._stop_auto_flush(ctx)
        ctx.session.close()

    def _cancel(self, ctx: Context, why: Failed | None = None) -> None:
        # The ack (or `why`) is sent once the scheduler has dropped the job. The client's own
        # cancel stops its audio now; audio made before the server ends it (`why`) still goes.
        ctx.cancelled, ctx.muted = True, ctx.muted or why is None
        self._stop_auto_flush(ctx)
        ctx.session.cancel(why)

    @staticmethod
    def _timed_out(why: str, contended: bool) -> Failed:
        if contended:
            why += " while others waited for a slot"
        return Failed(f"{why}; the context has ended", code="context_timeout")

    def _drop(self, ctx: Context) -> None:
        """The socket is gone: free everything of this context."""
        self._cancel(ctx)
        ctx.session.end()
        if ctx.pump and ctx.pump is not asyncio.current_task():
            ctx.pump.cancel()
        self.contexts.pop(ctx.id, None)

    def _finish(self, ctx: Context) -> None:
        self.contexts.pop(ctx.id, None)
        self.finished.append(ctx.id)

    # ---- audio pump -----------------------------------------------------------------------

    async def _pump(self, ctx: Context) -> None:
        """The session's events to the socket; every context ends with exactly one of `done`,
        `cancelled` or `error`, whatever happens."""
        try:
            async for event in ctx.session.events():
                if isinstance(event, Audio):
                    await self._send_audio(ctx, event.data)
                elif isinstance(event, SegmentEnd):
                    await self._segment_end(ctx, event)
                else:
                    self._finish(ctx)
                    await self._send(self._last_message(ctx, event))
        except _GONE as exc:
            log.info("context %s: socket gone (%s)", ctx.id, exc)
            self._drop(ctx)
        except Exception:
            log.exception("context %s: pump failed", ctx.id)
            self._drop(ctx)
            with contextlib.suppress(*_GONE):
                await self._error("internal_error", "the server failed on this context", ctx.id)

    async def _segment_end(self, ctx: Context, event: SegmentEnd) -> None:
        if ctx.muted:
            return
        if ctx.timestamps:
            start, end = event.voiced_ms or (event.start_ms, event.end_ms)
            words = [Word(w, s, e) for w, s, e in estimate_words(event.text, start, end)]
            await self._send(
                Words(context_id=ctx.id, index=event.index, words=words, estimated=True)
            )
        await self._send(
            Segment(
                context_id=ctx.id,
                index=event.index,
                text=event.text,
                start_ms=event.start_ms,
                end_ms=event.end_ms,
                truncated=event.truncated,
            )  # fmt: skip
        )
        await self._settle_flushes(ctx)

    def _last_message(self, ctx: Context, event: Finished | Cancelled | Failed) -> msgspec.Struct:
        if isinstance(event, Finished):
            return DoneMsg(context_id=ctx.id, **dataclasses.asdict(event))
        if isinstance(event, Failed):
            return ErrorMsg(code=event.code, message=event.message, context_id=ctx.id)
        return CancelledMsg(context_id=ctx.id)
