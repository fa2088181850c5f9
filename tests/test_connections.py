"""Hostile connections below the HTTP request: an endless header, headers or a body sent a
byte at a time, sockets that never send, and more sockets than a client (or the server) may
hold. Each is bounded by the server itself, and ordinary clients never notice the bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import websockets
from audio_check import assert_speech, decode_pcm
from serverproc import ServerProcess, cpu_s, eventually, rss_mb
from test_http_api import LONG_TEXT

# 127.0.0.1 is a proxy uvicorn trusts for X-Forwarded-For, so it is exempt from the
# per-address connection cap; Linux answers all of 127/8, so 127.0.0.2 is an ordinary client.
STRANGER = "127.0.0.2"


@pytest.fixture(scope="module")
def guarded():
    srv = ServerProcess(
        "--request-timeout-s", "2", "--read-timeout-s", "2", "--max-client-connections", "3",
        "--max-connections", "12", "--max-text-chars", "100000", "--no-warmup",
    ).wait_ready()  # fmt: skip
    yield srv
    srv.stop()


def dial(srv: ServerProcess, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), source_address=(source, 0))
    s.settimeout(15)
    return s


def answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    try:
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


# A WebSocket upgrade's head, without the blank line that ends it.
UPGRADE = (
    b"GET /ws/tts HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def health_status(srv: ServerProcess, source: str = "127.0.0.1") -> int | None:
    """GET /healthz on a new connection from `source`: the status it gets."""
    s = dial(srv, source)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return status_of(answer(s))
    finally:
        s.close()


def status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Pad: " + b"a" * 40_000 + b"\r\n",  # one long value
        b"A:\r\n" * 9_000,  # 36 KB of lines whose names and values are 9 KB
        b"Ab: c\r\n" * 5_000,  # 35 KB: the separators count too
    ],
)
def test_a_header_block_over_the_cap_in_one_piece_gets_431(guarded, headers):
    s = dial(guarded)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    reply = answer(s)
    assert status_of(reply) == 431, reply[:200]


def test_trailers_count_toward_the_header_cap(guarded):
    """A chunked body's trailers join the request's headers: 40 KB of them get 431 too."""
    s = dial(guarded)
    head = b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = b'{"tts_text": "Hi.", "spk_id": "joe"}'
    chunked = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n" % (len(body), body)
    s.sendall(head + chunked + b"a: b\r\n" * 6_000 + b"\r\n")
    reply = answer(s)
    assert status_of(reply) == 431, reply[:200]


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity"])
def test_a_transfer_coding_other_than_chunked_gets_501(guarded, coding):
    """httptools framed `gzip, chunked` as chunked and ignored the gzip: a proxy in front that
    reads the codings otherwise frames the body differently (request smuggling)."""
    s = dial(guarded)
    body = b'{"tts_text": "Hi.", "spk_id": "joe"}'
    s.sendall(b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (coding, len(body), body))  # fmt: skip
    reply = answer(s)
    assert status_of(reply) == 501, reply[:200]


def test_a_websocket_handshake_websockets_cannot_parse_is_answered_and_closed(guarded):
    """A header line over websockets' 8 KiB (well under the server's 32 KiB cap): answered
    431 and closed at once (the socket used to stay open, unanswered, for good)."""
    s = dial(guarded)
    s.settimeout(10)
    s.sendall(UPGRADE + b"Cookie: " + b"c" * 9_000 + b"\r\n\r\n")
    reply = answer(s)
    assert status_of(reply) == 431, reply[:200]


def test_an_upgrade_pipelined_behind_a_stream_drops_the_connection(guarded):
    """A WebSocket upgrade sent behind a long request on one socket: the socket cannot be
    both. It was handed over (101) and the request's stream, orphaned, went on unwatched (an
    attack round held every slot for minutes with such sockets, already closed). Now the
    connection is dropped, and the stream ends with it."""
    body = json.dumps({"tts_text": LONG_TEXT * 40, "spk_id": "joe"}).encode()  # ~1 min of work
    s = dial(guarded, STRANGER)
    s.sendall(
        b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body) + UPGRADE + b"\r\n"
    )
    reply = answer(s)
    assert b"101 Switching Protocols" not in reply, reply[:200]
    guarded.wait_log("WebSocket upgrade behind a response; aborted", timeout=10)
    guarded.assert_idle(timeout=10)


def test_a_header_block_just_under_the_cap_is_served(guarded):
    s = dial(guarded)
    s.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + b"Ab: c\r\n" * 4_000
        + b"\r\n"
    )
    reply = answer(s)
    assert status_of(reply) == 200, reply[:200]


def test_a_pipelining_flood_is_cut_and_a_short_pipeline_is_served(guarded):
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    base = rss_mb(guarded.proc.pid)
    s = dial(guarded)
    try:
        for _ in range(200):  # 400 000 requests if nothing stopped them
            s.sendall(one * 2000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answered = answer(s).count(b"HTTP/1.1 200")
    assert answered < 100, f"{answered} pipelined requests answered"
    assert rss_mb(guarded.proc.pid) - base < 30
    short = dial(guarded)
    short.sendall(one * 3 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer(short).count(b"HTTP/1.1 200") == 4


def test_a_websocket_that_stops_reading_is_let_go(guarded):
    """Its job is dropped after --read-timeout-s, and its socket, which the client still
    holds, is aborted: the socket and stream quota come back."""

    async def go() -> None:
        async with websockets.connect(
            f"{guarded.ws_url}/ws/tts", compression=None, max_queue=1
        ) as lazy:
            await lazy.send(json.dumps({"type": "start", "context_id": "lazy", "spk_id": "joe",
                                        "text": LONG_TEXT * 20}))  # fmt: skip
            await lazy.send(json.dumps({"type": "close", "context_id": "lazy"}))
            await asyncio.sleep(1)
            assert guarded.healthz()["sockets_open"] == 1
            await asyncio.to_thread(guarded.assert_idle, 30)

    asyncio.run(asyncio.wait_for(go(), 60))
    guarded.wait_log("took none of what was written", timeout=5)


def ws_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (the payload goes as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


def ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The server's frames in `data` as (opcode, payload); a cut-off last one left out."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            n, i = int.from_bytes(data[i : i + width], "big"), i + width
        if i + n > len(data):
            break
        frames.append((opcode, data[i : i + n]))
        i += n
    return frames


def ws_open(srv: ServerProcess, rcvbuf: int | None = None) -> tuple[socket.socket, bytes]:
    """A WebSocket on a bare socket from STRANGER: the socket and what came after the 101."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((STRANGER, 0))
    s.connect(("127.0.0.1", srv.port))
    s.settimeout(15)
    s.sendall(UPGRADE + b"\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    head, _, rest = got.partition(b"\r\n\r\n")
    assert b" 101 " in head, head
    return s, rest


PING, PONG, CLOSE, TEXT, BINARY, CONT = 0x9, 0xA, 0x8, 0x1, 0x2, 0x0


@pytest.mark.parametrize("flood", ["ping", "fragment"])
def test_a_websocket_flooding_frames_the_app_never_sees_is_closed(guarded, flood):
    """Pings (uvicorn answers each at once) and the fragments of a message never finished
    do not reach the app's share of the event loop: a flood of either slowed every other
    client by seconds (an attack: first audio 0.2 -> 15 s, /healthz 3 ms -> 5 s). A burst of
    150 pings is answered; past 50 such frames a second the socket is closed with 1008."""
    since = guarded.log_end()
    s, got = ws_open(guarded)
    s.sendall(ws_frame(PING, b"p") * 150)
    while sum(op == PONG for op, _ in ws_frames(got)) < 150:
        got += s.recv(1 << 16)
    if flood == "ping":
        s.sendall(ws_frame(PING, b"p") * 5000)
    else:
        s.sendall(ws_frame(TEXT, b"{", fin=False) + ws_frame(CONT, fin=False) * 5000)
    closes = [p for op, p in ws_frames(answer(s)) if op == CLOSE]  # (or reset: not read)
    assert not closes or int.from_bytes(closes[0][:2], "big") == 1008, closes
    guarded.wait_log("pings, pongs or fragments a second; WebSocket closed", 5, since)
    guarded.assert_idle(timeout=10)


def loop_cpu_s(pid: int) -> float:
    """CPU seconds of the server's main thread, which runs the event loop."""
    return cpu_s(pid, thread=pid)


@pytest.mark.parametrize(("message", "sockets"), [(TEXT, 1), (BINARY, 1), (TEXT, 3)])
def test_a_websocket_flooding_messages_gets_its_share_of_the_loop_and_no_more(
    guarded, message, sockets
):
    """App messages answered at once (a JSON ping's pong, a binary frame's error) as fast as a
    client can send them: only the handlers' time was charged to the socket's share of the
    loop, not the replies' sends nor uvicorn's parsing, and one socket kept the loop 99% busy
    (another client's first audio 0.16 -> 1.7 s). The socket's reading now pauses once it is
    past its share (0.2), so the loop stays mostly free. The share is the client address's,
    not each socket's: 8 sockets of one address, each within a share of its own, held
    /healthz 4-5 s."""
    opened = [ws_open(guarded)[0] for _ in range(sockets)]
    payload = b'{"type":"ping"}' if message == TEXT else b"x"
    flood = ws_frame(message, payload) * 20_000
    stop = time.monotonic() + 4.0

    def send(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while time.monotonic() < stop:
                s.sendall(flood)

    def drain(s: socket.socket) -> None:  # the replies are read: a full buffer slows nothing
        with contextlib.suppress(OSError):
            while time.monotonic() < stop + 1 and s.recv(1 << 20):
                pass

    with ThreadPoolExecutor(2 * sockets) as pool:
        jobs = [pool.submit(f, s) for s in opened for f in (send, drain)]
        time.sleep(1.0)  # past the burst allowance (0.5 s)
        t0, cpu0 = time.monotonic(), loop_cpu_s(guarded.proc.pid)
        time.sleep(2.0)
        busy = (loop_cpu_s(guarded.proc.pid) - cpu0) / (time.monotonic() - t0)
        for job in jobs:
            job.result()
    for s in opened:
        s.close()
    assert busy < 0.6, f"the event loop was {busy:.0%} busy with {sockets} sockets' messages"
    guarded.assert_idle(timeout=10)


def test_a_websocket_that_reads_nothing_but_pings_is_let_go(guarded):
    """A client that stops reading its audio and pings under the rate: uvicorn writes each
    pong though writing is paused, and the write watch took the growing buffer for a client
    reading, so the socket stayed open for as long as the pings went on. Only bytes taken are
    progress now: it is aborted."""
    since = guarded.log_end()
    s, _ = ws_open(guarded, rcvbuf=4096)
    start = {"type": "start", "context_id": "p", "spk_id": "joe", "text": LONG_TEXT * 20}
    s.sendall(ws_frame(TEXT, json.dumps(start).encode()))
    aborted = False
    deadline = time.monotonic() + 20
    while not aborted and time.monotonic() < deadline:
        try:
            s.sendall(ws_frame(PING, b"x" * 125))
        except OSError:  # reset: the server aborted the connection
            aborted = True
        time.sleep(0.1)
    s.close()
    assert aborted
    guarded.wait_log("took none of what was written", 5, since)
    guarded.assert_idle(timeout=10)


def test_an_endless_header_gets_431_without_growing_the_server(guarded):
    base = rss_mb(guarded.proc.pid)
    s = dial(guarded)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    sent = 0
    try:
        while sent < 64 << 20:  # the server must stop this long before 64 MB
            s.sendall(b"a" * (1 << 16))
            sent += 1 << 16
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = answer(s)
    assert status_of(reply) == 431, reply[:200]
    assert sent < 8 << 20, f"the server read {sent} bytes of one header"
    assert rss_mb(guarded.proc.pid) - base < 30
    assert httpx.get(f"{guarded.base_url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_deadline(guarded, phase):
    s = dial(guarded)
    body = json.dumps({"tts_text": "Hello there.", "spk_id": "joe"}).encode()
    head = (
        b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )  # fmt: skip
    trickled, start = (head, b"") if phase == "headers" else (body, head)
    s.sendall(start)
    began = time.monotonic()
    try:
        for byte in trickled:  # one byte every 0.4 s: each alone keeps a connection busy
            s.sendall(bytes([byte]))
            time.sleep(0.4)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = answer(s)
    took = time.monotonic() - began
    assert took < 10, f"the server waited {took:.1f} s for one request"
    assert status_of(reply) == 408, reply[:200]
    guarded.assert_idle()


JSON = b"Content-Type: application/json"


def test_openai_routes_get_the_connections_refusals_in_openais_shape(guarded):
    """Refused before the app routes it (a header block over the cap, a body too slow), a
    request under /v1/ is answered in OpenAI's error shape, as the routes' own errors are:
    its SDKs read `error.message`. (Ours elsewhere; a connection refused before its request
    line has no path, so it gets ours.)"""
    client = openai.OpenAI(base_url=f"{guarded.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.audio.speech.create(
            model="tts-1", voice="joe", input="Hello.", extra_headers={"X-Pad": "a" * 40_000}
        )
    assert refused.value.status_code == 431
    assert "header block" in refused.value.body["message"], refused.value.body

    s = dial(guarded)
    body = json.dumps({"model": "tts-1", "voice": "joe", "input": "Hello there."}).encode()
    s.sendall(
        b"POST /v1/audio/speech?x=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5]
    )  # fmt: skip
    reply = answer(s)
    assert status_of(reply) == 408, reply[:200]
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error["type"] == "invalid_request_error" and "in time" in error["message"], error
    s = dial(guarded)
    s.sendall(b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n" + JSON + b"\r\n\r\nab")
    reply = answer(s)
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["status_code"] == 408, reply
    guarded.assert_idle()


def test_a_request_answered_before_its_body_gets_no_second_answer(guarded):
    s = dial(guarded)
    s.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    reply = answer(s)  # the deadline closes the connection: the 404 is its only answer
    assert status_of(reply) == 404 and reply.count(b"HTTP/1.1 ") == 1, reply[:300]


def test_an_http_1_0_client_gets_the_stream_unchunked(guarded):
    """HTTP/1.0 has no chunked encoding (nginx speaks 1.0 to its upstreams by default): the
    audio ends where the connection closes, with no chunk sizes in it."""
    s = dial(guarded)
    try:
        body = json.dumps({"tts_text": "Hello there.", "spk_id": "joe"}).encode()
        s.sendall(b"POST /tts/pcm HTTP/1.0\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        head, _, audio = answer(s).partition(b"\r\n\r\n")
    finally:
        s.close()
    assert status_of(head) == 200, head
    assert b"transfer-encoding" not in head.lower()
    assert len(audio) % 2 == 0
    assert_speech(decode_pcm(audio), 22050, min_seconds=0.5, max_gap_s=0.5)


def test_an_http_1_0_stream_cut_short_ends_in_a_reset(make_server):
    """Unchunked, a 1.0 answer ends where the connection closes: one the server cuts short
    (here at its audio limit) is reset, or it looked whole (a 200 and a clean close)."""
    srv = make_server("--max-audio-s", "2", "--max-text-chars", "100000", "--no-warmup")
    s = dial(srv)
    try:
        body = json.dumps({"tts_text": LONG_TEXT * 4, "spk_id": "joe"}).encode()
        s.sendall(b"POST /tts/pcm HTTP/1.0\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 16):
                pass
    finally:
        s.close()
    srv.assert_idle()


def test_an_idle_socket_is_closed(guarded):
    s = dial(guarded)
    began = time.monotonic()
    assert answer(s) == b""
    assert time.monotonic() - began < 10


def test_connections_per_client_address_are_capped(guarded):
    held = [dial(guarded, STRANGER) for _ in range(3)]
    try:
        refused = dial(guarded, STRANGER)
        reply = answer(refused)
        assert status_of(reply) == 429, reply[:200]
        # Other addresses are not affected, and a trusted proxy's address is not capped.
        local = [dial(guarded) for _ in range(4)]
        assert [health_status(guarded) for _ in local] == [200] * 4
        held.pop().close()
        # A closed one gives its place back (once the server has seen it close).
        assert eventually(lambda: health_status(guarded, STRANGER), lambda c: c == 200) == 200
        for s in local:
            s.close()
    finally:
        for s in held:
            s.close()


def test_websockets_count_against_the_per_address_cap(guarded):
    """An upgraded connection keeps its place in its address's count until it closes: one
    address parking sockets (a refused one waits seconds for its close handshake) once held
    connections beyond its cap, up to the whole server's."""

    async def go() -> int | None:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):  # --max-client-connections 3
                url = f"{guarded.ws_url}/ws/tts"
                ws = await stack.enter_async_context(
                    websockets.connect(url, local_addr=(STRANGER, 0))
                )
                await ws.recv()  # ready
            return await asyncio.to_thread(health_status, guarded, STRANGER)

    assert asyncio.run(asyncio.wait_for(go(), 30)) == 429
    # Closed, they give their places back.
    assert eventually(lambda: health_status(guarded, STRANGER), lambda c: c == 200) == 200


def _busy(srv: ServerProcess) -> socket.socket:
    """A connection whose request is under way: its body is still to come."""
    s = dial(srv)
    s.sendall(b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{")  # fmt: skip
    return s


def test_connections_beyond_the_server_limit_get_503(guarded):
    time.sleep(0.5)  # earlier tests' sockets are closed
    held = [_busy(guarded) for _ in range(12)]
    try:
        reply = answer(dial(guarded))
        assert status_of(reply) == 503, reply[:200]
        # In the app's shape: JSON and Retry-After, as its own 503 at capacity (it was text).
        head, body = reply.split(b"\r\n\r\n", 1)
        assert b"\r\nretry-after: 1\r\n" in head.lower(), head
        assert json.loads(body) == {"status_code": 503, "detail": "too many connections; retry"}
    finally:
        for s in held:
            s.close()
    # The held ones give their places back once the server has seen them close.
    assert eventually(lambda: health_status(guarded), lambda c: c == 200) == 200


def test_at_the_limit_a_new_connection_closes_the_one_idle_longest(guarded):
    """Idle connections (nothing sent yet, or kept alive between requests) from many
    addresses, each under its own cap, kept every other client out until the request
    deadline closed them. At the limit a new connection closes the one idle longest; one
    whose request is under way is never cut for it."""
    time.sleep(0.5)  # earlier tests' sockets are closed
    busy = _busy(guarded)
    idle = [dial(guarded) for _ in range(11)]
    try:
        time.sleep(0.2)  # (accepted in order)
        assert health_status(guarded) == 200  # in place of the first idle one
        assert answer(idle[0]) == b""  # closed without a word
        idle[1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            idle[1].recv(1)  # the others are still open
        busy.sendall(b"x" * 99)  # the request under way was not cut: it is answered
        assert status_of(answer(busy)) in (400, 422), "the busy connection was cut"
    finally:
        for s in (busy, *idle):
            s.close()


def test_a_client_at_its_cap_closes_no_one_elses_idle_connection(guarded):
    """At the limit, a connection its own address may not open (429) must not first close
    another client's idle one: one address would close everyone's as fast as it connects."""
    time.sleep(0.5)  # earlier tests' sockets are closed
    others = [dial(guarded) for _ in range(9)]
    mine = [dial(guarded, STRANGER) for _ in range(3)]  # its cap; the server is full now
    try:
        time.sleep(0.2)
        assert status_of(answer(dial(guarded, STRANGER))) == 429
        others[0].settimeout(0.3)
        with pytest.raises(TimeoutError):
            others[0].recv(1)  # still open
    finally:
        for s in (*others, *mine):
            s.close()


def test_a_pipelined_request_under_way_is_not_closed_for_a_new_connection(guarded):
    """A connection whose pipelined request is being answered is busy, not idle: at the limit
    a new connection closes a connection idle longer instead of cutting that stream."""
    time.sleep(0.5)  # earlier tests' sockets are closed
    body = json.dumps({"tts_text": LONG_TEXT, "spk_id": "joe"}).encode()
    streaming = dial(guarded)
    streaming.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(answer, streaming)  # read as it comes (the write watch is 2 s)
        time.sleep(0.5)  # the first answered, the pipelined stream under way
        idle = [dial(guarded) for _ in range(11)]
        try:
            time.sleep(0.2)
            assert health_status(guarded) == 200
            got = reply.result(timeout=60)
        finally:
            for s in (streaming, *idle):
                s.close()
    assert got.count(b"HTTP/1.1 200") == 2 and got.endswith(b"0\r\n\r\n"), got[-200:]


def test_long_streams_and_sockets_outlive_the_request_deadline(guarded):
    """The deadline covers receiving a request, not answering it: a stream that takes many
    times --request-timeout-s, kept-alive requests after it, and a WebSocket all go on."""
    with httpx.Client(base_url=guarded.base_url, timeout=60) as client:
        with client.stream(
            "POST", "/tts/pcm", json={"tts_text": LONG_TEXT * 3, "spk_id": "joe"}
        ) as r:
            assert r.status_code == 200
            rate = int(r.headers["X-Sample-Rate"])
            pcm = b""
            began = time.monotonic()
            for chunk in r.iter_bytes():
                pcm += chunk
                # A steady reader at 3x real time: the stream lasts past the deadline however
                # fast the machine makes the audio.
                heard = len(pcm) / 2 / rate
                time.sleep(max(0.0, began + heard / 3 - time.monotonic()))
        assert_speech(decode_pcm(pcm), rate, min_seconds=15)
        assert time.monotonic() - began > 4
        time.sleep(2.5)  # idle between requests, longer than the request deadline
        assert client.get("/healthz").status_code == 200

    async def socket_session() -> int:
        async with websockets.connect(f"{guarded.ws_url}/ws/tts", compression=None) as ws:
            await asyncio.sleep(3)  # quiet past the request deadline
            await ws.send(json.dumps({"type": "start", "context_id": "a", "spk_id": "joe",
                                      "text": "Still here."}))  # fmt: skip
            await ws.send(json.dumps({"type": "close", "context_id": "a"}))
            got = 0
            async for msg in ws:
                if isinstance(msg, bytes):
                    got += len(msg)
                elif json.loads(msg)["type"] == "done":
                    return got
        return got

    assert asyncio.run(asyncio.wait_for(socket_session(), 60)) > 0
    guarded.assert_idle()


def test_a_slow_reader_gets_the_whole_response_after_the_server_is_done(make_server):
    """A client reading far slower than the server writes (but reading) is never cut: not
    while the response is written, nor while the last bytes drain after the server closes.
    (The kernel hands a socket more bytes only once half of what it queued has gone, so a
    slow reader moves the server's buffer every few seconds, not continuously.)"""
    srv = make_server("--read-timeout-s", "8", "--no-warmup")
    s = dial(srv)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"tts_text": LONG_TEXT[:250], "spk_id": "joe"}).encode()
    s.sendall(
        b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )  # fmt: skip
    got = b""
    began = time.monotonic()
    while chunk := s.recv(16384):
        got += chunk
        time.sleep(0.25)  # at most 64 KB/s: the server writes many times faster
    head, _, rest = got.partition(b"\r\n\r\n")
    assert status_of(head) == 200
    assert rest.endswith(b"0\r\n\r\n"), "the body was cut before its end"
    assert time.monotonic() - began > 10  # longer than --read-timeout-s


def test_a_listener_reading_at_playback_speed_is_not_taken_for_a_stalled_one(make_server):
    """A client reading PCM at real time leaves seconds of audio in the sockets' buffers and
    reads no new piece for as long as they play: longer than --read-timeout-s here. It must
    still be sent audio (it was dropped ~12 s in, with --read-timeout-s 5)."""
    srv = make_server("--read-timeout-s", "5", "--max-text-chars", "100000", "--no-warmup")
    body = {"tts_text": LONG_TEXT * 8, "spk_id": "joe"}  # minutes: more than any buffer holds
    with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=60) as r:
        rate = int(r.headers["X-Sample-Rate"])
        pcm, began = b"", time.monotonic()
        for piece in r.iter_raw(4096):
            pcm += piece
            heard = len(pcm) / 2 / rate
            if heard > 30:
                break
            time.sleep(max(0.0, began + heard - time.monotonic()))
        assert srv.healthz()["dropped"] == 0
    assert_speech(decode_pcm(pcm), rate, min_seconds=30)
    srv.assert_idle()


def test_an_ipv6_client_is_counted_by_its_64():
    """Per-client limits count an IPv6 address by its /64 (a subscriber's block: each of its
    2^64 addresses was a new client with a fresh quota), an IPv4-mapped one as IPv4."""
    from rtserver.api.connection import client_key

    assert client_key("2001:db8:1:2:3:4:5:6") == client_key("2001:db8:1:2::9")
    assert client_key("2001:db8:1:2::9") != client_key("2001:db8:1:3::9")
    assert client_key("::ffff:10.0.0.1") == client_key("10.0.0.1") == "10.0.0.1"
    assert client_key("10.0.0.2") != client_key("10.0.0.1")
