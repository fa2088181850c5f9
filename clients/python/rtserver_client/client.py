"""An async Python client for rtserver: /ws/tts contexts and the HTTP routes.

async with TTSClient("http://127.0.0.1:50000") as client:
    async with client.connect() as ws:
        ctx = await ws.start(spk_id="joe", format="pcm", timestamps=True)
        for word in "Hello there, how are you?".split():
            await ctx.send(word + " ")
        await ctx.close()
        result = await ctx.collect()      # audio bytes, segments, word timings, the done event

    speech = client.tts("Hello.", "joe", fmt="pcm")
    async for piece in speech:
        ...                               # s16le mono at speech.sample_rate
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import websockets
from websockets.http11 import Response
from websockets.protocol import State

from rtserver_client.protocol import (
    ENDING_ERRORS,
    SOCKET_ENDING_ERRORS,
    AppendText,
    Cancel,
    Cancelled,
    Close,
    Done,
    Error,
    Flush,
    Format,
    Ping,
    Ready,
    Segment,
    ServerMessage,
    Start,
    Started,
    Word,
    Words,
    decode_server_frame,
)

_encode = msgspec.json.Encoder().encode
__all__ = [
    "Connection",
    "Context",
    "Event",
    "HandshakeRefused",
    "Result",
    "ServerError",
    "ServerStatusError",
    "Speech",
    "TTSClient",
    "auth_headers",
    "ws_url",
]

Event = bytes | ServerMessage  # what a context yields: audio payloads and its events

_ids = itertools.count(1)


def ws_url(base_url: str) -> str:
    """The /ws/tts URL of a server given by its HTTP base URL (http -> ws, https -> wss)."""
    return "ws" + base_url.rstrip("/").removeprefix("http") + "/ws/tts"


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header a server started with --api-key wants on every route and the upgrade."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def connect_ws(
    url: str, connect: Callable[..., Awaitable[websockets.ClientConnection]] | None = None,
    **kwargs: Any,
) -> websockets.ClientConnection:  # fmt: skip
    """Open a WebSocket (with `connect`, default websockets.connect); a refused upgrade
    raises HandshakeRefused, which says the server's reason."""
    try:
        return await (connect or websockets.connect)(url, **kwargs)
    except websockets.InvalidStatus as e:
        raise HandshakeRefused(e.response) from e


class ServerError(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error


class ServerStatusError(httpx.HTTPStatusError):
    """An HTTP route refused the request; `detail` is the server's own reason (the JSON
    body's `detail`, or `error.message` under /v1/), which httpx's message leaves out."""

    def __init__(self, response: httpx.Response) -> None:
        self.detail = _detail(response)
        message = f"HTTP {response.status_code} from {response.request.url.path}: {self.detail}"
        super().__init__(message, request=response.request, response=response)


class HandshakeRefused(websockets.InvalidStatus):
    """The server refused the WebSocket upgrade (a key it does not take, an origin);
    `detail` is its reason, from the response's body, which websockets' message leaves out.
    Still a websockets.InvalidStatus (`response` holds the status)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response)
        self.detail = _reason(response.body.decode(errors="replace") if response.body else "")

    def __str__(self) -> str:
        status = self.response.status_code
        return f"rtserver refused the connection (HTTP {status}): {self.detail}".rstrip(": ")


def _detail(response: httpx.Response) -> str:
    return _reason(response.text)


def _reason(text: str) -> str:
    """The reason an error response's body gives: rtserver's `{status_code, detail,
    extra?}`, OpenAI's `{error: {message}}`, or the start of a body that is neither."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "detail" in body:
            extra = body.get("extra")
            return f"{body['detail']} {extra}" if extra else str(body["detail"])
    return text[:200]


def _raise_for_status(response: httpx.Response) -> None:
    """Raise ServerStatusError (an httpx.HTTPStatusError) for any status but a 2xx, as httpx's
    raise_for_status; the body must have been read."""
    if not response.is_success:
        raise ServerStatusError(response)


@dataclass
class Result:
    audio: bytes = b""
    segments: list[Segment] = field(default_factory=list)
    # With timestamps=True, from the server's `words` events (none from a server without them).
    words: list[Word] = field(default_factory=list)
    events: list[ServerMessage] = field(default_factory=list)
    done: Done | None = None
    cancelled: bool = False


def _json_size(text: str) -> int:
    """The bytes `text` takes inside a JSON string: UTF-8, with escapes (quotes, controls)."""
    return len(_encode(text)) - 2


def _cut(text: str, room: int) -> list[str]:
    """`text` in pieces that each take at most `room` bytes as a JSON string, cut between
    characters (never inside one's UTF-8 bytes or escape)."""
    if _json_size(text) <= room:
        return [text]
    pieces, begin, used = [], 0, 0
    for i, char in enumerate(text):
        size = _json_size(char)
        if used + size > room and i > begin:
            pieces.append(text[begin:i])
            begin, used = i, 0
        used += size
    pieces.append(text[begin:])
    return pieces


def _ends(item: object) -> bool:
    """Whether this ends its context (`connection_closed`: the client's own, socket gone)."""
    if isinstance(item, Error):
        return item.code in ENDING_ERRORS or item.code == "connection_closed"
    return isinstance(item, Done | Cancelled)


class Context:
    """One context of a socket: send text, read its audio and events in order."""

    def __init__(self, conn: Connection, context_id: str) -> None:
        self.conn = conn
        self.id = context_id
        self.started: Started | None = None
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        # What ended it (done, cancelled, an ending error), as soon as that arrives: the
        # reader of events() may not have reached it yet.
        self.ending: Event | None = None

    @property
    def sample_rate(self) -> int:
        assert self.started is not None
        return self.started.sample_rate

    async def send(self, text: str, flush: bool = False) -> None:
        """Append a fragment. One larger than the server takes in a frame (a frame over
        ready.max_message_bytes is refused, its text lost) goes in several, cut between
        characters: the server joins a context's fragments, so the cuts are not heard."""
        *pieces, last = _cut(text, self.conn.text_room(self.id))
        for piece in pieces:
            await self.conn.send(AppendText(context_id=self.id, text=piece))
        await self.conn.send(AppendText(context_id=self.id, text=last, flush=flush))

    async def flush(self) -> None:
        await self.conn.send(Flush(context_id=self.id))

    async def close(self) -> None:
        await self.conn.send(Close(context_id=self.id))

    async def cancel(self) -> None:
        await self.conn.send(Cancel(context_id=self.id))

    async def events(self) -> AsyncIterator[Event]:
        """Audio (bytes) and events of this context until done, cancelled or an error."""
        while True:
            item = await self.queue.get()
            yield item
            if _ends(item):
                return

    async def collect(self) -> Result:
        result = Result()
        async for item in self.events():
            if isinstance(item, bytes):
                result.audio += item
                continue
            result.events.append(item)
            if isinstance(item, Segment):
                result.segments.append(item)
            elif isinstance(item, Words):
                result.words.extend(item.words)
            elif isinstance(item, Done):
                result.done = item
            elif isinstance(item, Cancelled):
                result.cancelled = True
            elif _ends(item):  # an error that ended the context
                raise ServerError(item)
        return result


class Connection:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.ready: Ready | None = None
        self.contexts: dict[str, Context] = {}
        self.streams: dict[int, Context] = {}
        # Errors without a context (a frame the server could not read, the socket's end),
        # for the caller to look at: no start waits on them (see start).
        self.errors: asyncio.Queue[Error] = asyncio.Queue()
        # The server said it is shutting down (`shutting_down`): its contexts end or finish,
        # but a new one belongs on a new socket (another replica, or the restarted server).
        self.draining = False
        self._reader: asyncio.Task[None] | None = None
        self._closing = False  # aclose() or abort(): the client, not the server, ended it
        # The error the server sent before closing the socket (idle_timeout, ...): the socket
        # is done from then, though its close frame may still be on the way.
        self._closed_by: Error | None = None

    async def _open(self) -> None:
        first = decode_server_frame(await self.ws.recv())
        assert isinstance(first, Ready), first
        self.ready = first
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self._route(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            # Every awaitable ends: whatever is still open learns the socket is gone.
            gone = self._gone()
            for ctx in list(self.contexts.values()):
                ctx.ending = Error(gone.code, gone.message, ctx.id)
                ctx.queue.put_nowait(ctx.ending)
            self.contexts.clear()
            self.errors.put_nowait(gone)

    def _gone(self) -> Error:
        """The error a context, or a start, gets when the socket is gone."""
        return Error(code="connection_closed", message=self._why_gone())

    def _why_gone(self) -> str:
        """Who ended the socket: only a close frame from the server (or the error it sends
        first) says the server did (a keepalive timeout, a reset, a stalled server are the
        connection lost)."""
        if self._closing:
            return "the client closed the socket"
        if self._closed_by is not None:
            why = self._closed_by
            return f"the server closed the socket ({why.code}: {why.message})"
        rcvd, sent = self.ws.protocol.close_rcvd, self.ws.protocol.close_sent
        if rcvd is not None:
            return f"the server closed the socket ({rcvd})"
        # e.g. "1011 (internal error) keepalive ping timeout": why websockets gave up on it
        return f"the connection was lost ({sent})" if sent else "the connection was lost"

    def _route(self, frame: str | bytes) -> None:
        msg = decode_server_frame(frame)
        if isinstance(msg, tuple):
            stream, payload = msg
            if ctx := self.streams.get(stream):
                ctx.queue.put_nowait(payload)
            return
        context_id = getattr(msg, "context_id", None)
        if isinstance(msg, Error) and msg.code == "shutting_down":
            self.draining = True
        if isinstance(msg, Error) and msg.code in SOCKET_ENDING_ERRORS:
            self._closed_by = msg
        ctx = self.contexts.get(context_id or "")
        if ctx is None:
            # One about a context that has ended (text crossed its end) is no news.
            if isinstance(msg, Error) and not context_id:
                self.errors.put_nowait(msg)
            return
        if isinstance(msg, Started):
            ctx.started = msg
            self.streams[msg.stream] = ctx
        ctx.queue.put_nowait(msg)
        if _ends(msg):
            ctx.ending = msg
            self._release(ctx)  # finished: nothing more comes for it

    def _release(self, ctx: Context) -> None:
        self.contexts.pop(ctx.id, None)
        if ctx.started:
            self.streams.pop(ctx.started.stream, None)

    @property
    def closed(self) -> bool:
        """Whether the socket is gone (the reader has ended), or going: closed by the client,
        or by the server (its error saying so, or its close frame, has come)."""
        if self._closing or self._closed_by is not None or self.ws.state is not State.OPEN:
            return True
        return self._reader is not None and self._reader.done()

    async def aclose(self) -> None:
        """Close the socket; every context still open ends with `connection_closed`."""
        self._closing = True
        if self._reader:
            self._reader.cancel()
        await self.ws.close()

    def abort(self) -> None:
        """Drop the socket at once, without the closing handshake a stalled server would
        never answer; every context still open ends with `connection_closed`."""
        self._closing = True
        if self._reader:
            self._reader.cancel()
        self.ws.transport.abort()

    async def send(self, msg: msgspec.Struct) -> None:
        """Send a frame; raises ServerError ``connection_closed`` (saying why, as a context's
        end does) once the socket is gone: a start, text, flush or cancel alike."""
        if self.closed:
            raise ServerError(self._gone())
        try:
            await self.ws.send(_encode(msg).decode())
        except websockets.ConnectionClosed:
            raise ServerError(self._gone()) from None

    async def start(
        self,
        spk_id: str,
        format: Format = "pcm",
        context_id: str | None = None,
        sample_rate: int | None = None,
        speed: float = 1.0,
        seed: int = 0,
        text: str = "",
        text_streaming: bool = False,
        timestamps: bool = False,
        instructions: str | None = None,
    ) -> Context:
        """Open a context; raises ServerError if the server refuses it. ``text_streaming``:
        fragments feed the model as they arrive (CosyVoice2/3), a flush ends the piece.
        ``timestamps``: ask for a `words` event (word timings) before each `segment`.
        ``instructions``: how to speak (the instruct mode of CosyVoice2/3 and
        CosyVoice-300M-Instruct; others ignore it)."""
        cid = context_id or f"ctx-{next(_ids)}"
        if cid in self.contexts:  # the server's refusal would carry the open context's id
            raise ValueError(f"context {cid!r} is open on this connection")
        start = Start(context_id=cid, spk_id=spk_id, format=format, sample_rate=sample_rate,
                      speed=speed, seed=seed, text=text, text_streaming=text_streaming,
                      timestamps=timestamps, instructions=instructions)  # fmt: skip
        # A frame over max_message_bytes is refused without a context id, as is any frame
        # the server cannot read: such an error cannot be told from one about an earlier
        # frame. A start that fits is always answered with its id (or its context ends with
        # the socket), so its text goes on after it when it would not fit.
        rest = ""
        if not self._fits(start):
            start, rest = msgspec.structs.replace(start, text=""), text
        ctx = Context(self, cid)
        self.contexts[cid] = ctx
        try:
            await self.send(start)
            first = await ctx.queue.get()
        except BaseException:
            # Given up on (a caller's timeout, the socket gone): the context is not ours any more.
            self._release(ctx)
            raise
        if isinstance(first, Error):
            self._release(ctx)
            raise ServerError(first)
        if rest:
            await ctx.send(rest)
        return ctx

    def text_room(self, context_id: str) -> int:
        """The bytes of text (as a JSON string) one `text` frame of this context may carry."""
        assert self.ready is not None
        frame = _encode(AppendText(context_id=context_id, text="", flush=True))
        return self.ready.max_message_bytes - len(frame)

    def _fits(self, msg: msgspec.Struct) -> bool:
        """Whether the server takes this message in one frame (ready.max_message_bytes)."""
        assert self.ready is not None
        return len(_encode(msg)) <= self.ready.max_message_bytes

    async def ping(self) -> None:
        await self.send(Ping())


class TTSClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:50000",
        timeout: float = 120,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = auth_headers(api_key)
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=self.headers)

    async def __aenter__(self) -> TTSClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def open(self, **kwargs: Any) -> Connection:
        """A socket that stays open until its `aclose()` (a plugin keeps one for many turns:
        the protocol multiplexes contexts, so one socket serves every concurrent turn)."""
        kwargs.setdefault("additional_headers", self.headers)
        ws = await connect_ws(ws_url(self.base_url), compression=None, max_size=None, **kwargs)
        conn = Connection(ws)
        try:
            await conn._open()
        except BaseException:
            # No closing handshake: a server that sent no `ready` (stalled, or a caller's
            # timeout) would not answer it either.
            conn.abort()
            raise
        return conn

    @asynccontextmanager
    async def connect(self, **kwargs: Any) -> AsyncIterator[Connection]:
        conn = await self.open(**kwargs)
        try:
            yield conn
        finally:
            await conn.aclose()

    async def speakers(self) -> list[dict[str, object]]:
        r = await self.http.get("/speakers")
        _raise_for_status(r)
        return r.json()

    def tts(
        self, text: str, spk_id: str, fmt: str = "mp3", stream: bool = False,
        speed: float = 1.0, seed: int = 0,
    ) -> Speech:  # fmt: skip
        """Stream `POST /tts` (``fmt="mp3"``) or `POST /tts/pcm` (``fmt="pcm"``, s16le mono):
        iterate the result for the audio; its `sample_rate` is PCM's rate once the first
        piece has come. Raises ServerStatusError (an httpx.HTTPStatusError carrying the
        server's reason)."""
        paths = {"mp3": "/tts", "pcm": "/tts/pcm"}
        if fmt not in paths:  # any other name used to get PCM without a word
            raise ValueError(f"fmt must be 'mp3' or 'pcm', not {fmt!r}")
        body = {"tts_text": text, "spk_id": spk_id, "stream": stream, "speed": speed, "seed": seed}
        return Speech(self.http, paths[fmt], body)


class Speech(AsyncIterator[bytes]):
    """The audio of one HTTP synthesis (TTSClient.tts), as it streams in. `sample_rate`: the
    rate of PCM (the response's X-Sample-Rate), set before the first piece is yielded; None
    for MP3 (its frames say it) or before the response has come."""

    def __init__(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        self.sample_rate: int | None = None
        self._pieces = self._stream(http, path, body)

    async def _stream(
        self, http: httpx.AsyncClient, path: str, body: dict[str, Any]
    ) -> AsyncGenerator[bytes, None]:
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                _raise_for_status(r)
            rate = r.headers.get("x-sample-rate")
            self.sample_rate = int(rate) if rate else None
            async for piece in r.aiter_raw():
                yield piece

    def __anext__(self) -> Awaitable[bytes]:
        return self._pieces.__anext__()

    async def aclose(self) -> None:
        """Stop reading (the response is closed), as an async generator's aclose()."""
        await self._pieces.aclose()
