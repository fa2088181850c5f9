"""The connection under the app: the bounds uvicorn's protocols leave out.

uvicorn parses requests without a cap on the header block or on pipelined requests, gives a
request's headers and body no deadline, keeps a connection that never sends a byte, takes
connections until the process runs out of file handles, and waits for ever on a client that
stops reading (a response, a WebSocket, or the last bytes before a close). Each of those let
one client hold the server's memory, sockets or stream quota (docs/deploy.md). The protocol
classes made here are uvicorn's own (httptools for HTTP/1.1, websockets' sans-I/O for
WebSockets) with these bounds:

- at most `max_connections` connections (HTTP and WebSocket) at once, and
  `max_client_connections` per client address, a WebSocket counted until its socket closes
  (a trusted proxy, whose clients are told apart by X-Forwarded-For, is exempt); beyond them
  a new connection gets 503 or 429 and is closed before it can send anything;
- a request's header block (request line and a chunked body's trailers included) is at most
  `max_header_bytes`: 431;
- at most `MAX_PIPELINED` requests wait behind the one being answered on a connection;
- a connection must deliver a request's headers and body within `request_timeout_s` of its
  first byte (or of connecting, for the first request): 408 and closed;
- a socket that takes none of what the server writes for `write_timeout_s` (a response or
  WebSocket the client stopped reading, or a close waiting to flush) is aborted, so the
  handler's send returns, the stream ends and its quota is released;
- a WebSocket sends at most `FRAME_RATE` frames a second (`FRAME_BURST` at once) that the app
  never sees: pings, pongs, and the fragments of a message before its last. uvicorn answers
  each ping at once, and neither kind reaches the app's share of the event loop, so a ping or
  fragment flood slowed every other client by seconds: past the rate the socket is closed
  with 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import resource
import select
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import msgspec
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import CloseCode, Frame
from websockets.http11 import Request
from websockets.protocol import State

from rtserver.api.errors import refusal
from rtserver.engine import Failed
from rtserver.metrics import ANSWERED
from rtserver.session import ClientQuota, Session, TooManyForClient

log = logging.getLogger("rtserver.connection")

FD_RESERVE = 256  # file handles beyond the sockets: model files, threads' pipes, logs
MAX_PIPELINED = 16  # requests queued behind the one being answered (browsers send none)
# Unsent bytes the kernel may queue for a socket before it stops taking more. Linux lets a
# send buffer grow to 4 MB and wakes the writer only when a third of it has drained: a client
# reading audio at real time then left writing paused for up to 30 s (seen as "stuck"), and a
# client that reads nothing parked megabytes in the kernel. With this the writer wakes, and a
# stalled client is seen, within a few seconds of audio.
NOTSENT_LOWAT = 128 * 1024
# Frames a WebSocket client sends that the app never sees (see the module's docstring). A
# keepalive pings every few seconds, and a fragmented message is rare (browsers never send
# one): these leave room for both, and cut a flood after a fraction of a second.
FRAME_RATE = 50.0
FRAME_BURST = 200
# A request's scope key: an asyncio.Event set when its connection is lost. The app learns of
# that from `receive` only once it has read the whole body; a request waiting for a place to
# read its body in would hold its turn in the queue until its wait ran out.
GONE = "rtserver.gone"
# How often a connection whose body reading is paused is looked at for a peer that left.
PEER_CHECK_S = 0.5
# A connection whose request head began this recently is not closed for a new one at the
# limit (a client sends its head at once; one still sending it later is idling).
HEAD_GRACE_S = 2.0
# A scope key: why the write watch aborted the connection of the request (or WebSocket) it
# carried. Its stream then ends as the limit it ran into (counted as dropped, like the
# scheduler's read timeout), not as a client that left.
STALLED = "rtserver.stalled"
# A scope key: its connection's `acked` (bytes written that reached the client).
ACKED = "rtserver.acked"
# Where struct tcp_info (linux/tcp.h) holds tcpi_bytes_acked, a u64, and its size up to it.
_BYTES_ACKED = 120
_TCP_INFO_LEN = _BYTES_ACKED + 8


def stall_of(scope: dict) -> Failed | None:
    """The end of a stream whose connection the write watch aborted, if it did."""
    why = scope.get(STALLED)
    return None if why is None else Failed(why, code="read_timeout")


def attach(session: Session, scope: dict) -> None:
    """Tell a session what the connection carrying it (a request's or WebSocket's scope)
    knows: why the write watch cut it off, and how much of its audio reached the client
    (counted from now: a WebSocket's other streams, its events, and a response's framing
    count too, so a little more than its own)."""
    session.cut_by = functools.partial(stall_of, scope)
    acked = scope.get(ACKED)
    if acked is not None and sys.platform == "linux" and (start := acked()) is not None:
        # A count that never moves is unknown, not nothing reached: a kernel that returns
        # tcp_info without filling it (older gVisor) would have every listener dropped.
        session.acked = lambda: n - start if (n := acked()) is not None and n > start else None


def trusted_hosts(spec: str | list[str]) -> Callable[[str], bool]:
    """uvicorn's `forwarded_allow_ips` (a comma list or a list of addresses and networks,
    `*` for all) as a test of one peer address."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    if "*" in items:
        return lambda host: True
    nets = []
    for item in filter(None, items):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue  # a unix socket path or a name: never a TCP peer's address

    def trusted(host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in nets)

    return trusted


@dataclass
class ConnectionLimits:
    max_connections: int = 0  # 0: no limit
    max_client_connections: int = 0
    request_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024  # nginx's largest default header buffers total 32 KiB
    trusted: Callable[[str], bool] = lambda host: False
    per_client: ClientQuota = field(init=False)  # open HTTP connections by address
    # HTTP connections with no request under way, the longest idle first: at the limit a new
    # connection closes the first (GuardedHttp._evict)
    idle: OrderedDict[asyncio.Protocol, None] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.per_client = ClientQuota("connections", self.max_client_connections)

    def admit(self, host: str | None) -> Callable[[], None] | None:
        """Count a connection from `host`: its (idempotent) release, or None when the address
        holds its limit. A trusted proxy's connections are not counted."""
        if host is None or self.trusted(host):
            return _nothing
        try:
            return self.per_client.acquire(client_key(host))
        except TooManyForClient:
            return None


def _nothing() -> None:
    pass


def client_key(host: str) -> str:
    """What per-client limits count an address as: an IPv6 address by its /64, the block one
    subscriber is given (each of its 2^64 addresses was a new client, with a fresh quota), an
    IPv4-mapped one as the IPv4 address; anything else (a name, "unknown") as it is."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return host


class _StopParsing(Exception):
    """Raised from a parser callback: httptools stops, and uvicorn calls send_400_response."""


_RETRY = (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE)


def _response(status: HTTPStatus, text: str, path: str = "") -> bytes:
    """An error in the app's shape, or OpenAI's under its prefix (Retry-After on 429 and
    503), written before the app has the request (``path``: its path, where known)."""
    body = msgspec.json.encode(refusal(path, status.value, text))
    retry = "retry-after: 1\r\n" if status in _RETRY else ""
    return (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"{retry}content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _sockopt(transport: asyncio.Transport, level: int, name: int, value: int | bytes) -> None:
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(AttributeError, OSError):  # not a TCP socket, or not Linux
        sock.setsockopt(level, name, value)


# POLLRDHUP: the peer shut its side down (Linux; elsewhere only a reset or hang-up shows)
_PEER_GONE = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _peer_left(transport: asyncio.Transport) -> bool:
    """Whether the peer closed or reset the connection, looked at without reading (what it
    sent before its close stays unread): for a socket whose reading is paused, which asyncio
    no longer watches."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poll = select.poll()
    poll.register(sock.fileno(), _PEER_GONE)
    return bool(poll.poll(0))


def _linger(transport: asyncio.Transport, seconds: int | None) -> None:
    """SO_LINGER: with 0, a close resets the connection and drops what it had left to send;
    None, the default (a close sends all, then FIN)."""
    value = struct.pack("ii", 0, 0) if seconds is None else struct.pack("ii", 1, seconds)
    _sockopt(transport, socket.SOL_SOCKET, socket.SO_LINGER, value)


def _abort(transport: asyncio.Transport) -> None:
    """Drop the connection and what it had left to send: with SO_LINGER 0 the kernel resets
    it and frees its send buffer now, instead of retrying to a peer that reads nothing."""
    _linger(transport, 0)
    transport.abort()


class _WriteWatch:
    """Mixin for a uvicorn protocol: abort its socket once it has taken none of what the
    server writes for `write_timeout_s`: writing paused (its buffer over the high mark), or a
    close waiting to flush, while the bytes waiting in the buffer do not move. Any byte taken
    is progress: a client reading audio at real time drains a paused buffer slowly but never
    stops (with NOTSENT_LOWAT the kernel takes bytes as the client reads them). Checked a few
    times per timeout."""

    limits: ConnectionLimits
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._paused = False
        self._resumed = False  # writing resumed since the last check: bytes were taken
        self._unmoved_since: float | None = None  # bytes waiting, none taken since then
        self._waiting = 0  # bytes waiting at the last check
        self._watch: asyncio.TimerHandle | None = None
        self._rewatch()
        self._sock = transport.get_extra_info("socket")

    def connection_lost(self, exc: Exception | None) -> None:
        self._sock = None  # (its descriptor may be another socket's soon)
        self._unwatch()
        super().connection_lost(exc)  # type: ignore[misc]

    def acked(self) -> int | None:
        """Bytes of all written to the socket that the client's kernel has acknowledged
        (TCP_INFO's tcpi_bytes_acked, Linux 4.1+), None where unknown. What the server wrote
        that still sits in its own buffers, or waits in uvicorn's send for room, is not: a
        client that stops reading leaves seconds of audio there. Called from the scheduler's
        thread (a syscall on the socket's descriptor, like uvloop's own getsockopt)."""
        if self._sock is None:
            return None
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except (AttributeError, OSError, ValueError):  # closed meanwhile (uvloop: ValueError)
            return None
        return (
            struct.unpack_from("Q", info, _BYTES_ACKED)[0] if len(info) >= _TCP_INFO_LEN else None
        )

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._paused = True

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._paused = False
        self._resumed = True

    def _rewatch(self) -> None:
        self._watch = self.loop.call_later(self.limits.write_timeout_s / 4, self._check)

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _check(self) -> None:
        now, t = self.loop.time(), self.transport
        waiting = t.get_write_buffer_size() if self._paused or t.is_closing() else 0
        # Only bytes taken are progress: a buffer that grows (uvicorn writes each ping's pong
        # even while writing is paused) must not pass for a client that reads.
        if not waiting:
            self._unmoved_since = None
        elif waiting < self._waiting or self._resumed or self._unmoved_since is None:
            self._unmoved_since = now
        self._waiting, self._resumed = waiting, False
        if (
            self._unmoved_since is not None
            and now - self._unmoved_since >= self.limits.write_timeout_s
        ):
            why = f"the client took none of what was written for {self.limits.write_timeout_s:g} s"
            peer = t.get_extra_info("peername")
            log.warning("%s: %s; connection aborted", peer[0] if peer else "?", why)
            for scope in self._carried():
                scope[STALLED] = why
            self._watch = None
            _abort(t)
        else:
            self._rewatch()

    def _carried(self) -> list[dict]:
        """The scopes of the streams on this connection (the WebSocket's own, once it has one)."""
        scope = getattr(self, "scope", None)
        return [scope] if scope is not None else []


READ_METER = "rtserver.read_meter"  # the scope extension that holds a socket's ReadMeter


class ReadMeter:
    """What reading a WebSocket costs the event loop below the app, for the app to charge to
    its client's share of the loop (ws_session.LoopShare): the time its bytes took to parse
    into messages (a third of the loop under a flood of tiny ones), and whether a message is
    queued already (the app's next receive then runs without waiting: all of it loop time).
    ``writable``: the protocol's own event, clear while a send would wait for the client to
    read (so a send's wait can be told from its work)."""

    def __init__(self, queue: asyncio.Queue, writable: asyncio.Event) -> None:
        self.parse_s = 0.0
        self.writable = writable
        self._queue = queue

    @property
    def queued(self) -> bool:
        return not self._queue.empty()


class GuardedWebSocket(_WriteWatch, WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with the write watch and the frame rate; subclassed with
    its `limits` by :func:`guarded_websocket` (uvicorn makes the protocol from a class)."""

    # The per-client connection count, handed over by the HTTP protocol at the upgrade:
    # given back only when the socket closes, so one address cannot park sockets (a
    # refused one waits for its close handshake) beyond its share of max_connections.
    release: Callable[[], None] = staticmethod(_nothing)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.read_meter = ReadMeter(self.queue, self.writable)
        self._unseen_allowed = float(FRAME_BURST)  # a token bucket: see FRAME_RATE
        self._unseen_at = self.loop.time()
        self._flooded = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        super().connection_lost(exc)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # (the app's task runs from the next iteration)
            self.scope["extensions"][READ_METER] = self.read_meter
            self.scope[ACKED] = self.acked

    def handle_ping(self) -> None:
        if self._unseen_frame():
            super().handle_ping()

    def handle_pong(self, event: Frame) -> None:
        if self._unseen_frame():
            super().handle_pong(event)

    def handle_cont(self, event: Frame) -> None:
        if event.fin or self._unseen_frame():
            super().handle_cont(event)

    def _unseen_frame(self) -> bool:
        """Take one frame the app will not see from the bucket; past FRAME_RATE, close
        the socket (once) and handle nothing more it sent."""
        if self._flooded:
            return False
        now = self.loop.time()
        refill = (now - self._unseen_at) * FRAME_RATE
        self._unseen_allowed = min(FRAME_BURST, self._unseen_allowed + refill)
        self._unseen_at = now
        if self._unseen_allowed >= 1:
            self._unseen_allowed -= 1
            return True
        self._flooded = True
        peer = self.transport.get_extra_info("peername")
        log.warning("%s: over %g pings, pongs or fragments a second; WebSocket closed",
                    peer[0] if peer else "?", FRAME_RATE)  # fmt: skip
        if self.conn.state is State.OPEN:
            self.conn.send_close(CloseCode.POLICY_VIOLATION, "too many control frames or fragments")
        self.transport.write(b"".join(self.conn.data_to_send()))
        # As uvicorn's own closes do: no second close at shutdown (websockets raised, and
        # the server's exit crashed), and the app hears of it now, not at the reset.
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008})
        self.transport.close()  # the write watch aborts it if the close never flushes
        return False

    def data_received(self, data: bytes) -> None:
        start = time.perf_counter()
        super().data_received(data)
        self.read_meter.parse_s += time.perf_counter() - start
        # A handshake websockets cannot parse gets a 4xx (a header line over 8 KiB, over
        # 128 headers) or an end of stream (a body) it only queues: uvicorn, waiting for a
        # request that never comes, neither sent it nor closed, so the socket stayed open.
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()


def guarded_websocket(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's WebSocket protocol with the write watch (pass it as uvicorn.Config(ws=...))."""
    return type(GuardedWebSocket.__name__, (GuardedWebSocket,), {"limits": limits})


class _UntilClose(RequestResponseCycle):
    """An HTTP/1.0 request's answer. HTTP/1.0 has no chunked encoding, but uvicorn sends a
    response of unknown length chunked to it all the same: the client (or a proxy speaking
    1.0 upstream, as nginx does by default) took the chunk sizes for audio. Such a response
    ends where the connection closes instead (1.0 connections close after one answer), so
    until its last part is sent a close is a reset: a stream the server cuts short (a
    limit, a failure, the drain) must not look whole, as a missing last chunk shows in 1.1."""

    _open_ended = False  # a response without Content-Length is under way

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            if b"content-length" not in names and b"transfer-encoding" not in names:
                self._open_ended = True  # uvicorn adds no framing to a length it thinks known
                self.chunked_encoding, self.expected_content_length = False, sys.maxsize
                self.keep_alive = False  # the close is the end (1.0 closes anyway: explicit)
                _linger(self.transport, 0)
        elif self._open_ended and not message.get("more_body", False):
            self.expected_content_length = len(message.get("body", b""))  # the end: no "short"
            _linger(self.transport, None)
        await super().send(message)


class GuardedHttp(_WriteWatch, HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds in the module's docstring; subclassed with
    its `limits` by :func:`guarded_protocol`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._host: str | None = None  # the peer's address, for the log
        self._release: Callable[[], None] = _nothing  # its per-client count
        self._deadline: asyncio.TimerHandle | None = None  # the request being read
        self._in_head = True  # reading a request line and headers
        self._head_bytes = 0  # read since the head began (an unfinished head's size)
        self._refused: tuple[HTTPStatus | None, str] | None = None  # by a callback
        self._peer_watch: asyncio.TimerHandle | None = None  # while body reading is paused
        self.url = b""  # the request's target, as uvicorn's parser gathers it (none yet)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _sockopt(transport, socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self._answering: RequestResponseCycle | None = None
        self._host = self.client[0] if self.client else None
        self._head_at: float | None = None  # when the head being read began
        full = self.limits.max_connections and len(self.connections) > self.limits.max_connections
        # Counted first: a client at its own cap must not close another's idle connection.
        if (release := self.limits.admit(self._host)) is None:
            self._refuse(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from you")
        elif full and not self._evict():
            release()
            self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry")
        else:
            self._release = release
            self._arm_deadline()
            self._idle()

    def _idle(self) -> None:
        """No request of this connection is under way now: it may be closed for a new one."""
        self.limits.idle[self] = None

    def _busy(self) -> None:
        self.limits.idle.pop(self, None)

    def _evict(self) -> bool:
        """At the server's limit, close the connection idle longest (kept alive between
        requests, or one that sent nothing, or only part of a head for HEAD_GRACE_S) for this
        one: else idle connections from many addresses, each under its own cap, kept every
        other client out (503) until the request deadline closed them, again and again.
        Whether there was one: requests under way are never cut for a new connection."""
        idle, now = self.limits.idle, self.loop.time()
        for _ in range(len(idle)):
            oldest, _ = idle.popitem(last=False)
            if oldest is self or oldest.transport.is_closing():
                continue
            if oldest._head_at is not None and now - oldest._head_at < HEAD_GRACE_S:
                idle[oldest] = None  # a request on its way (a client sends a head at once)
                continue
            log.info("%s: idle connection closed for a new one at the limit", oldest._host)
            oldest._let_go()
            if oldest.transport.get_write_buffer_size():
                _abort(oldest.transport)  # a close would wait for a client that reads nothing
            else:
                oldest.transport.close()
            return True
        return False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        answering = self._answering  # (a pipelined request's, if one has started)
        if not self.transport.is_closing() and (answering is None or answering.response_complete):
            self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._busy()
        self._let_go()
        # uvicorn tells only the newest request; the one being answered and those queued
        # behind it must also stop writing to the closed socket.
        for cycle in (self._answering, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
                if (gone := cycle.scope.get(GONE)) is not None:
                    gone.set()
        super().connection_lost(exc)

    def _carried(self) -> list[dict]:
        cycles = (self._answering, *(c for c, _ in self.pipeline))
        return [c.scope for c in cycles if c is not None and not c.response_complete]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app) -> None:
        if cycle.scope["http_version"] == "1.0":
            cycle.__class__ = _UntilClose  # (uvicorn makes the cycle; its class is fixed)
        self._answering, self._head_at = cycle, None
        self._busy()
        cycle.scope[GONE] = asyncio.Event()
        cycle.scope[ACKED] = self.acked
        super()._start_asgi_task(cycle, app)

    def handle_websocket_upgrade(self) -> None:
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            # Pipelined behind a response under way (no browser does this): handed over,
            # the socket would orphan that response, whose stream went on unwatched and
            # held its slot for minutes after the client left. Dropped, it ends with it.
            log.warning("%s: WebSocket upgrade behind a response; aborted", self._host)
            self._drop()
            return
        # The WebSocket protocol takes the socket over, with its own watch and this
        # connection's per-client count.
        self._busy()
        self._cancel_deadline()
        self._unwatch()
        self._unwatch_peer()
        super().handle_websocket_upgrade()
        if isinstance(ws := self.transport.get_protocol(), _WriteWatch) and ws is not self:
            ws.release, self._release = self._release, _nothing  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still unfinished after all this data: httptools buffers it whole.
        closing = self.transport.is_closing()  # refused while parsing
        if self._in_head and not closing and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(*self._head_too_large())
        elif self.flow.read_paused and self._peer_watch is None and not closing:
            self._peer_watch = self.loop.call_later(PEER_CHECK_S, self._check_peer)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_at = self.loop.time()
        self._arm_deadline()
        self._header_size = 16  # the request line's method and version, about

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_header(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted as each arrives, so a chunked body's trailers, which the parser adds to
        # the request's headers after on_headers_complete, are bounded with the rest.
        super().on_header(name, value)
        self._count_header(name, value, b": \r\n")
        if name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # httptools frames the body by a final `chunked` and ignores the codings before
            # it (`gzip, chunked`): a proxy in front that reads them otherwise frames the body
            # differently, and a request smuggled in its tail (RFC 9112 6.1: 501).
            self._stop(HTTPStatus.NOT_IMPLEMENTED, "only the chunked transfer coding is taken")

    def _count_header(self, *parts: bytes) -> None:
        """Add to the block as sent (an empty header line is 4 bytes of it, not 0)."""
        self._header_size += sum(map(len, parts))
        if self._header_size > self.limits.max_header_bytes:
            self._stop(*self._head_too_large())

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        super().on_headers_complete()
        if len(self.pipeline) > MAX_PIPELINED:  # no answer: responses are under way
            log.warning("%s: over %d pipelined requests; aborted", self._host, MAX_PIPELINED)
            self._stop(None, "too many pipelined requests")

    def _check_peer(self) -> None:
        """uvicorn stops reading a body 64 KiB ahead of the app (an upload waiting for its
        place reads none), or behind a pipelined request; then a client that leaves goes
        unseen: no connection_lost, no GONE, its turn kept until its wait ran out. While
        reading stays paused, the socket is looked at without reading; a peer that closed or
        reset is dropped (and so seen). (uvicorn closes on a half-close it reads, too.) A
        close stuck behind body bytes the kernel's buffers cannot take never arrives: that
        client keeps its turn until its wait ends."""
        self._peer_watch = None
        if self.transport.is_closing() or not self.flow.read_paused:
            return
        if _peer_left(self.transport):
            log.info("%s: left while its request's body waited to be read", self._host)
            self._drop()
        else:
            self._peer_watch = self.loop.call_later(PEER_CHECK_S, self._check_peer)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._cancel_deadline()

    def _stop(self, status: HTTPStatus | None, text: str) -> None:
        self._refused = (status, text)
        raise _StopParsing(text)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error, which includes our own refusals."""
        refused, self._refused = self._refused, None
        if refused is None and self._may_answer():
            super().send_400_response(msg)
        elif refused is None:
            self.transport.close()  # a malformed request behind one being answered
        elif refused[0] is None:
            self._drop()
        else:
            self._refuse(*refused)

    def _head_too_large(self) -> tuple[HTTPStatus, str]:
        log.warning("%s: header block over %d bytes; closed", self._host,
                    self.limits.max_header_bytes)  # fmt: skip
        return (HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the header block is over {self.limits.max_header_bytes} bytes")  # fmt: skip

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.request_timeout_s, self._read_late)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_late(self) -> None:
        self._deadline = None
        if self._in_head and self._head_bytes == 0:
            self.transport.close()  # an idle connection: nothing to answer
            return
        log.warning("%s: request not received within %g s; closed", self._host,
                    self.limits.request_timeout_s)  # fmt: skip
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive in time")

    def _may_answer(self) -> bool:
        """Whether a status line may be written now: no response is under way, and the
        request being read has not been answered already (an early 404, say)."""
        if self.cycle is None:
            return True
        if self._in_head:  # a new request: its predecessor must be fully answered
            return self.cycle.response_complete
        return not self.cycle.response_started

    def _refuse(self, status: HTTPStatus, text: str) -> None:
        """Answer `status` when a status line may be written, and close."""
        if self._may_answer():
            path = self.url.partition(b"?")[0].decode("latin-1")
            self.transport.write(_response(status, text, path))
            if self.cycle is not None and not self._in_head:
                # The app reading this request will answer a closed connection; the
                # request count must have this status, the one the client got.
                self.cycle.scope[ANSWERED] = status.value
        self._let_go()
        self.transport.close()  # the write watch aborts it if the client never reads

    def _drop(self) -> None:
        """Reset the connection now, with no answer, and give back its count."""
        self._let_go()
        _abort(self.transport)

    def _let_go(self) -> None:
        """Stop the request deadline and the peer watch, give back the per-client count
        (idempotent)."""
        self._cancel_deadline()
        self._unwatch_peer()
        self._release()

    def _unwatch_peer(self) -> None:
        if self._peer_watch is not None:
            self._peer_watch.cancel()
            self._peer_watch = None


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol under `limits` (pass it as uvicorn.Config(http=...))."""
    return type(GuardedHttp.__name__, (GuardedHttp,), {"limits": limits})


def raise_fd_limit(connections: int) -> int:
    """Lift the soft limit on open files so `connections` sockets fit beside the server's own
    files; returns how many connections fit (fewer when the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return max(0, max(soft, want) - FD_RESERVE)
