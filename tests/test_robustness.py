"""Bad, idle and hostile clients against real server processes: each case is one that took the
server down (or held its slots) before, and every one ends with the scheduler's active and
queued counters back at zero."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import websockets
from audio_check import assert_speech, decode_pcm
from serverproc import ServerProcess, cpu_s, eventually, rss_mb
from test_connections import STRANGER
from test_http_api import LONG_TEXT, error, message

from rtserver import memory

# A server with small limits, so each one is quick to reach.
TIGHT = (
    "--max-streams", "2", "--max-queue", "2", "--max-audio-s", "4",
    "--read-timeout-s", "2", "--context-idle-timeout-s", "1", "--ws-idle-timeout-s", "3",
    "--max-client-streams", "3", "--max-client-sockets", "4", "--max-text-chars", "100000",
)  # fmt: skip


@pytest.fixture(scope="module")
def tight():
    srv = ServerProcess(*TIGHT).wait_ready()
    yield srv
    srv.stop()


def assert_idle(srv: ServerProcess, timeout: float = 15) -> dict:
    return srv.assert_idle(timeout)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def recv_json(ws) -> dict:
    while isinstance(msg := await ws.recv(), bytes):
        pass
    return json.loads(msg)


async def until(ws, *types: str) -> dict:
    """The next JSON event of one of `types` (audio and other events skipped)."""
    while (event := await recv_json(ws))["type"] not in types:
        pass
    return event


def connect(srv: ServerProcess):
    return websockets.connect(f"{srv.ws_url}/ws/tts", compression=None, max_size=None)


async def send(ws, **msg) -> None:
    await ws.send(json.dumps(msg))


# ---- admission: nothing that fails while opening keeps a slot ------------------------------


def test_unencodable_start_takes_no_slot(tight):
    async def one(fmt: str) -> dict:
        async with connect(tight) as ws:
            await recv_json(ws)  # ready
            await send(ws, type="start", context_id="c", spk_id="joe", format=fmt,
                       sample_rate=9000)  # fmt: skip
            return await until(ws, "error", "started")

    # Three times what the server can hold: a leak would leave it full. AAC has rates of its
    # own (it used to fail after `started`, with a traceback).
    for fmt in ["mp3", "aac"] * 6:
        event = run(one(fmt))
        assert event["type"] == "error" and event["code"] == "unsupported_format", event
        assert event["context_id"] == "c" and "9000" in event["message"]
        # every rate it offers is one a start may ask for (AAC's 7350 and 96000 were listed)
        offered = [int(r) for r in event["message"].split("use one of ")[1].split(", ")]
        assert offered and all(8000 <= r <= 48000 for r in offered), event["message"]
    assert_idle(tight)
    r = httpx.post(f"{tight.base_url}/tts/pcm", json={"tts_text": "Still here.", "spk_id": "joe"})
    assert r.status_code == 200
    assert_speech(decode_pcm(r.content), 22050, min_seconds=0.5)


def test_client_address_limits(make_server):
    # TIGHT's contexts expire after 1 s with nothing to say; here the three empty ones must
    # hold their streams until the checks are done, on a loaded machine too.
    tight = make_server(*TIGHT, "--context-idle-timeout-s", "30")

    async def go() -> tuple[dict, dict, int, httpx.Response]:
        async with connect(tight) as ws:
            assert (await recv_json(ws))["context_idle_timeout_s"] == 30
            for i in range(3):  # --max-client-streams 3
                await send(ws, type="start", context_id=f"k{i}", spk_id="joe")
                await until(ws, "started")
            await send(ws, type="start", context_id="k3", spk_id="joe")
            streams = await until(ws, "error", "started")
            async with httpx.AsyncClient(base_url=tight.base_url) as c:
                http = await c.post("/tts/pcm", json={"tts_text": "Hi there.", "spk_id": "joe"})
            sockets = [await connect(tight).__aenter__() for _ in range(3)]  # 4 with ws
            try:
                extra = await connect(tight).__aenter__()
                refused = await recv_json(extra)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await extra.recv()
                return streams, refused, closed.value.rcvd.code, http
            finally:
                for s in sockets:
                    await s.close()

    streams, refused, close_code, http = run(go())
    assert streams["code"] == "too_many_streams" and streams["context_id"] == "k3"
    error(http, 429)
    assert refused["type"] == "error" and refused["code"] == "too_many_sockets"
    assert close_code == 1008
    assert_idle(tight)


# ---- bounded cost per request ---------------------------------------------------------------


@pytest.mark.parametrize("speed", [0.003, 0.01, 5e-324, 0.2, 4.5])
def test_speed_outside_a_quarter_to_four_is_refused(server, speed):
    body = {"tts_text": "Hello there.", "spk_id": "joe", "speed": speed}
    assert "speed" in error(httpx.post(f"{server.base_url}/tts/pcm", json=body), 422)["detail"]
    oai = {"input": "Hello there.", "voice": "joe", "speed": speed}
    message(httpx.post(f"{server.base_url}/v1/audio/speech", json=oai), 400)  # OpenAI's status

    async def ws() -> dict:
        async with connect(server) as ws:
            await recv_json(ws)
            await send(ws, type="start", context_id="s", spk_id="joe", speed=speed)
            return await until(ws, "error", "started")

    assert run(ws())["code"] == "invalid_message"


def test_duration_scales_as_one_over_speed(server):
    def seconds(speed: float) -> float:
        body = {"tts_text": LONG_TEXT, "spk_id": "joe", "speed": speed}
        r = httpx.post(f"{server.base_url}/tts/pcm", json=body, timeout=120)
        assert r.status_code == 200
        return len(r.content) / 2 / 22050

    normal = seconds(1.0)
    for speed in (0.5, 2.0, 4.0):
        ratio = normal / seconds(speed)
        # Piper draws phoneme durations at random: the two renditions differ a little.
        assert abs(ratio - speed) / speed < 0.12, f"speed {speed}: {ratio:.2f}x shorter"


def test_audio_limit_ends_http_and_ws_streams(tight):
    before = assert_idle(tight)
    body = {"tts_text": LONG_TEXT * 3, "spk_id": "joe"}
    audio = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),  # the body is cut: the client can tell
        httpx.stream("POST", f"{tight.base_url}/tts/pcm", json=body, timeout=60) as r,
    ):
        assert r.status_code == 200
        for piece in r.iter_raw():
            audio += piece
    # The chunk that crosses the limit is sent whole: at most one piece (~3 s) past it.
    assert 4.0 <= len(audio) / 2 / 22050 < 8.0
    # A cut on purpose is one warning with its reason, not uvicorn's error about the body.
    cut = tight.wait_log(r"WARNING .*stream ended early \(audio_limit", timeout=10)
    time.sleep(0.5)
    assert "ERROR" not in tight.log_path.read_text()[cut.start() :]

    async def ws() -> dict:
        async with connect(tight) as ws:
            await recv_json(ws)
            await send(ws, type="start", context_id="a", spk_id="joe", text=LONG_TEXT * 3)
            await send(ws, type="close", context_id="a")
            return await until(ws, "error", "done")

    event = run(ws())
    assert event["code"] == "audio_limit" and event["context_id"] == "a"
    after = assert_idle(tight)
    assert after["dropped"] == before["dropped"] + 2


# Measured on a ~200 MB server: 166-230 MB stayed held before (allocator arenas, the ONNX
# Runtime arena); 28-77 MB with malloc_trim alone (freed pieces spread over glibc's 16 arenas);
# 0-9 MB with 4 arenas (--malloc-arenas) on the machine of 2026-11-30, but 5-104 MB (mostly
# ~40-50) over 15 such requests on another on 2026-12-02, same code: the bound sits between.
# The scheduler hands memory back only past 1.5x its idle size (rtserver.memory.Trimmer): on
# this ~200 MB server up to ~100 MB may stay held without a hand-back, under the bound (and
# the long request grows it by ~250 MB, past 1.5x).
HELD_MB = 128


def test_memory_is_handed_back_after_a_long_request(make_server):
    srv = make_server("--max-text-chars", "100000")
    speak = {"tts_text": "Warm up the buffers once.", "spk_id": "joe"}
    assert httpx.post(f"{srv.base_url}/tts/pcm", json=speak, timeout=60).status_code == 200
    assert_idle(srv)
    time.sleep(1.5)
    base = rss_mb(srv.proc.pid)
    body = {"tts_text": LONG_TEXT * 8, "spk_id": "joe", "speed": 0.5}  # ~4 minutes of audio
    r = httpx.post(f"{srv.base_url}/tts/pcm", json=body, timeout=300)
    assert r.status_code == 200 and len(r.content) / 2 / 22050 > 180
    assert_idle(srv)
    # The scheduler hands memory back about a second after it goes idle.
    grown = eventually(lambda: rss_mb(srv.proc.pid) - base, lambda mb: mb < HELD_MB)
    assert grown < HELD_MB, f"RSS stayed {grown:.0f} MB above its level before the request"


def test_memory_goes_back_only_past_its_growth_bound():
    """What ordinary requests free, the next ones take again (a hand-back costs their page
    faults), so the scheduler's trimmer hands memory back only once the process has grown past
    1.5x its size after the last hand-back while idle (under load that size would include the
    load's memory, which would then never go back). Resident sizes are given here."""
    sizes = iter([1000, 800, 1100, 1201, 1150, 1300, 900, 1350, 1351, 700])
    trims: list[int] = []
    trim = memory.Trimmer(1.5, resident=lambda: next(sizes), trim=lambda: trims.append(1))
    # 1000: the first, trims (then 800, idle); 1100: within 1.5 x 800; 1201 under load: past
    # it, trims, and 800 stays the floor; 1150: within; 1300: past (then 900); 1350: within;
    # 1351: past (then 700)
    idle = [True, False, False, True, True, True, True]
    assert [trim(i) for i in idle] == [True, False, True, False, True, False, True]
    assert len(trims) == 4 and next(sizes, None) is None


def test_the_idle_size_to_grow_from_falls_when_the_engine_lets_go_later():
    """A CosyVoice engine keeps its flow pool's memory for a while after a burst: the idle
    size measured then includes it. Once the pool goes, a smaller idle size is the one later
    growth is measured from (else a long request's leftovers up to 1.5x the larger size stay)."""
    sizes = iter([5000, 4000, 2000, 2500, 3100, 2000])
    trims: list[int] = []
    trim = memory.Trimmer(1.5, resident=lambda: next(sizes), trim=lambda: trims.append(1))
    # 5000: the first, trims (then 4000, the pool held); 2000: the pool gone, within; 2500:
    # within 1.5 x 2000 once it is the floor; 3100: past 3000, trims (then 2000)
    assert [trim(True) for _ in range(4)] == [True, False, False, True]
    assert len(trims) == 2 and next(sizes, None) is None


# ---- idle and stalled clients -----------------------------------------------------------------


def test_empty_contexts_expire_and_free_their_slots(tight):
    """...and count as dropped (a limit ended them), not as cancelled (a client's barge-in)."""
    before = tight.healthz()

    async def go() -> tuple[dict, list[dict]]:
        async with connect(tight) as ws:
            ready = await recv_json(ws)
            assert ready["context_idle_timeout_s"] == 1
            for i in range(3):
                await send(ws, type="start", context_id=f"e{i}", spk_id="joe")
                await until(ws, "started")
            held = tight.healthz()
            ended = [await until(ws, "error", "done", "cancelled") for _ in range(3)]
            return held, ended

    held, ended = run(go())
    assert held["active"] + held["queued"] == 3
    assert sorted(e["context_id"] for e in ended) == ["e0", "e1", "e2"]
    assert {e["code"] for e in ended} == {"context_timeout"}
    after = assert_idle(tight)
    assert after["dropped"] - before["dropped"] == 3
    assert after["cancelled"] == before["cancelled"]


def test_flushes_and_blank_text_do_not_keep_an_idle_context(tight):
    """A client that nags an empty context with flushes and blank, silent or refused fragments,
    forever, must not hold its scheduler slot: only text to say counts as activity."""

    async def go() -> tuple[dict, dict, float]:
        async with connect(tight) as ws:
            await recv_json(ws)
            await send(ws, type="start", context_id="nag", spk_id="joe")
            await until(ws, "started")
            held, t0 = tight.healthz(), time.monotonic()

            async def nag() -> None:
                while True:
                    await send(ws, type="flush", context_id="nag")
                    for text in ("  ", "", ".", "\x01"):  # \x01: refused (invalid_text)
                        await send(ws, type="text", context_id="nag", text=text)
                    await asyncio.sleep(0.2)

            nagging = asyncio.create_task(nag())
            try:
                while (ended := await until(ws, "error", "done")).get("code") == "invalid_text":
                    pass
            finally:
                nagging.cancel()
            return held, ended, time.monotonic() - t0

    held, ended, after = run(go(), timeout=30)
    assert held["active"] + held["queued"] == 1
    assert ended["code"] == "context_timeout" and ended["context_id"] == "nag"
    assert after < 10  # the context timeout is 1 s; the socket's (3 s) never fires here
    assert_idle(tight)


async def first_audio_after_a_wait(ws) -> float:
    """Seconds until a context started on `ws` (a full server: it waits) has audio."""
    t0 = time.monotonic()
    await send(ws, type="start", context_id="o", spk_id="joe", text="It is my turn to speak now.")
    await send(ws, type="close", context_id="o")
    while not isinstance(await ws.recv(), bytes):
        pass
    return time.monotonic() - t0


def test_idle_contexts_give_their_slots_up_while_others_wait(make_server):
    """A socket that kept its contexts alive with a word every 20 s (each restarts the idle
    timeout) held every slot for good. Alone on the server such contexts stay; once a stream
    waits for a slot, a context with nothing to say gives its slot up after 5 s. (All from
    one address: per-client limits off, or the hog could not take both slots.)"""
    srv = make_server("--max-streams", "2", "--max-client-streams", "0", "--no-warmup")

    async def go() -> tuple[dict, float, list[dict]]:
        async with connect(srv) as hog, connect(srv) as other:
            await recv_json(hog)
            await recv_json(other)
            for i in range(2):
                await send(hog, type="start", context_id=f"h{i}", spk_id="joe",
                           text="Hm, well, I see. ")  # fmt: skip
                await until(hog, "segment")  # spoken: nothing left to say
            await asyncio.sleep(7)  # idle past 5 s, alone: both keep their slots
            held = srv.healthz()
            waited = await first_audio_after_a_wait(other)
            ended = [await until(hog, "error") for _ in range(2)]
            await until(other, "done")
            return held, waited, ended

    held, waited, ended = run(go())
    assert held["active"] == 2 and held["queued"] == 0, held
    assert waited < 12, waited  # the default context timeout (30 s) would have kept it waiting
    assert {e["code"] for e in ended} == {"context_timeout"}
    assert all("others waited" in e["message"] for e in ended), ended
    assert_idle(srv)


def test_text_that_never_makes_a_sentence_gives_its_slot_up_while_others_wait(make_server):
    """A letter a second into each context, never a sentence end: each restarts the
    auto-flush wait and keeps the context busy, so it held its slot with nothing spoken for
    as long as the text limit allowed. While others wait, such a context's text is spoken as
    it stands after 5 s without audio, and a context gives its slot up at a pause once it has
    held it 20 s: the waiting stream gets its slot."""
    srv = make_server("--max-streams", "2", "--max-client-streams", "0", "--no-warmup")

    async def drip(hog) -> None:
        while True:
            for i in range(2):
                await send(hog, type="text", context_id=f"h{i}", text="a")
            await asyncio.sleep(0.5)

    async def go() -> tuple[float, list[dict], int]:
        async with connect(srv) as hog, connect(srv) as other:
            await recv_json(hog)
            await recv_json(other)
            for i in range(2):
                await send(hog, type="start", context_id=f"h{i}", spk_id="joe")
                await until(hog, "started")
            dripping = asyncio.create_task(drip(hog))
            await asyncio.sleep(1)
            waited = await first_audio_after_a_wait(other)
            dripping.cancel()
            ended: dict[str, dict] = {}
            spoken = 0
            while len(ended) < 2:  # (letters sent after the end get context_closed)
                message = await hog.recv()
                if isinstance(message, bytes):
                    spoken += 1
                elif (event := json.loads(message))["type"] == "error" and event["code"] != (
                    "context_closed"
                ):
                    ended[event["context_id"]] = event
            await until(other, "done")
            return waited, list(ended.values()), spoken

    waited, ended, spoken = run(go())
    assert waited < 30, waited  # the lease (20 s), not the text limit (hours)
    assert {e["code"] for e in ended} == {"context_timeout"}
    # The first cut gives the waiting stream its slot; the other context is cut in the same
    # look only if it is at a pause then too, else it ends idle once the letters stop.
    assert any(e["message"].startswith("held a slot") for e in ended), ended
    assert all(e["message"].startswith(("held a slot", "nothing to say")) for e in ended), ended
    assert spoken, "the letters were never spoken"
    assert_idle(srv)


def test_one_address_never_holds_every_slot(make_server):
    """A client that opens as many streams as there are slots, and keeps them (here: contexts
    it never speaks in; a stream read at real time holds its slot for up to --max-audio-s),
    runs all but one: a client from another address gets the last slot at once."""
    srv = make_server("--max-streams", "2", "--context-idle-timeout-s", "20", "--no-warmup")

    async def go() -> tuple[dict, float, httpx.Response]:
        async with connect(srv) as hog:
            await recv_json(hog)
            for i in range(2):
                await send(hog, type="start", context_id=f"h{i}", spk_id="joe")
                await until(hog, "started")
            await asyncio.sleep(0.5)
            held = srv.healthz()
            t0 = time.monotonic()
            transport = httpx.AsyncHTTPTransport(local_address=STRANGER)
            async with httpx.AsyncClient(transport=transport, timeout=30) as stranger:
                body = {"tts_text": "My turn.", "spk_id": "joe"}
                r = await stranger.post(f"{srv.base_url}/tts/pcm", json=body)
            waited = time.monotonic() - t0
            for i in range(2):
                await send(hog, type="cancel", context_id=f"h{i}")
            return held, waited, r

    held, waited, r = run(go())
    assert (held["active"], held["queued"]) == (1, 1), held
    assert r.status_code == 200, r.text
    assert_speech(decode_pcm(r.content), 22050, min_seconds=0.3)
    # Before, it waited for a hog's context to give its slot up (5 s, the contended rule).
    assert waited < 4, waited
    assert_idle(srv)


def test_a_socket_whose_context_waits_for_a_slot_is_not_idle(make_server):
    """A context queued behind a full server, its client quiet: the socket's idle timeout
    (2 s here) closed it while it waited. It is kept, and the context speaks once a slot
    comes free. A queued context given no text yet is not ended either (it holds no slot,
    so the contended 5 s rule is not for it)."""
    srv = make_server("--max-streams", "1", "--ws-idle-timeout-s", "2", "--no-warmup")

    async def go() -> tuple[dict, list[str]]:
        body = {"tts_text": LONG_TEXT * 3, "spk_id": "joe"}
        async with (
            httpx.AsyncClient(timeout=30) as http,
            http.stream("POST", f"{srv.base_url}/tts/pcm", json=body) as held,  # unread: it
            connect(srv) as ws,  # keeps the one slot
        ):
            await recv_json(ws)
            await send(ws, type="start", context_id="w", spk_id="joe", text="Waiting my turn.")
            await send(ws, type="flush", context_id="w")
            await until(ws, "started")
            await send(ws, type="start", context_id="e", spk_id="joe")
            await until(ws, "started")
            await asyncio.sleep(7)
            waiting = srv.healthz()
            await held.aclose()
            await send(ws, type="text", context_id="e", text="And then mine.")
            for cid in ("w", "e"):
                await send(ws, type="close", context_id=cid)
            return waiting, [(await until(ws, "done", "error"))["type"] for _ in range(2)]

    waiting, endings = run(go())
    assert waiting["queued"] == 2, waiting
    assert endings == ["done", "done"], endings
    assert_idle(srv)


def test_socket_with_only_idle_contexts_is_closed(tight):
    async def go() -> tuple[list[str], float]:
        async with connect(tight) as ws:
            await recv_json(ws)
            t0 = time.monotonic()
            await send(ws, type="start", context_id="quiet", spk_id="joe")
            codes = []
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    event = await recv_json(ws)
                    if event["type"] == "error":
                        codes.append(event["code"])
            return codes, time.monotonic() - t0

    codes, lasted = run(go())
    assert codes == ["context_timeout", "idle_timeout"]
    assert lasted < 15
    assert_idle(tight)


def raw_request(srv: ServerProcess, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """An HTTP request on a bare socket, so the test decides when (if ever) to read."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", srv.port))
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /tts/pcm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode() + data
    )  # fmt: skip
    return s


def cpu_until_quiet(pid: int, since: float, timeout: float = 60) -> float:
    """CPU seconds a process spends from ``since`` (its CPU time then) until half a second
    in which it spends under 0.05 s."""
    last, deadline = cpu_s(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_s(pid)
        if now - last < 0.05:
            break
        last = now
    return last - since


def test_clients_leaving_right_after_their_start_leave_no_work_behind(make_server):
    """Clients sending a request and leaving 0.1 s later, again and again, 8 at once: a left
    job's pieces not started yet were queued on the workers anyway (its workers counted as
    free), and ran after the clients had gone, before everyone else's pieces (another
    client's first audio grew 0.2 -> 26 s over 30 s of it). They are cancelled now: once the
    last client has left, the server works only as long as the pieces still running."""
    srv = make_server("--max-client-streams", "0", "--max-text-chars", "100000")
    before = assert_idle(srv)
    body = {"tts_text": LONG_TEXT * 4, "spk_id": "joe", "stream": True}
    stop = time.monotonic() + 4

    def leave_again_and_again() -> None:
        while time.monotonic() < stop:
            s = raw_request(srv, body)
            time.sleep(0.1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # a reset: gone at once

    with ThreadPoolExecutor(8) as pool:
        for left in [pool.submit(leave_again_and_again) for _ in range(8)]:
            left.result()
    cpu = cpu_s(srv.proc.pid)
    after = assert_idle(srv)
    spent = cpu_until_quiet(srv.proc.pid, cpu)
    assert spent < 2.0, f"{spent:.1f} s of CPU after the last client left"
    assert after["cancelled"] > before["cancelled"] + 8, after


def test_clients_that_stop_reading_are_dropped(make_server):
    srv = make_server("--read-timeout-s", "2", "--max-text-chars", "200000", "--no-warmup")
    huge = LONG_TEXT * 40  # ~20 minutes of speech: far more than any socket buffer holds
    before = assert_idle(srv)

    async def lazy_ws() -> dict:
        async with websockets.connect(f"{srv.ws_url}/ws/tts", compression=None, max_queue=1) as ws:
            await send(ws, type="start", context_id="lazy", spk_id="joe", text=huge)
            await send(ws, type="close", context_id="lazy")
            await asyncio.sleep(1)
            assert srv.healthz()["sockets_open"] == 1
            # Both clients still hold their sockets and read nothing: the server must let go
            # of their streams anyway (a handler stuck in a send that never returns held them).
            return await asyncio.to_thread(assert_idle, srv, 60)

    lazy_http = raw_request(srv, {"tts_text": huge, "spk_id": "joe"}, rcvbuf=4096)
    try:
        after = run(lazy_ws())
        assert_closed_by_server(lazy_http)
    finally:
        lazy_http.close()
    # Each ended by --read-timeout-s: its job dropped, or its socket reset first; either way
    # a limit it ran into (dropped), not a client that left (cancelled).
    assert after["dropped"] - before["dropped"] == 2, after
    assert after["cancelled"] == before["cancelled"], after
    assert after["completed"] == before["completed"]


def test_a_client_that_stops_reading_gives_a_wanted_slot_up_by_what_it_heard(make_server):
    """A listener reads PCM at real time, then stops (its socket open) as another client asks
    for the only slot. It gives the slot up once it is CONTENDED_READ_S behind what reached
    it: not behind what the server wrote, seconds of which still wait in the server's socket
    buffers and in its send for room."""
    from rtserver.scheduler import CONTENDED_READ_S

    srv = make_server("--max-streams", "1", "--max-text-chars", "100000", "--no-warmup")
    before = assert_idle(srv)
    # Long sentences: the piece waiting in the server's send for room is one (~20 s of audio).
    sentence = ", and ".join(["the weather is sunny with a light breeze from the west"] * 6)
    text = f"{sentence.capitalize()}. " * 10
    listener = raw_request(srv, {"tts_text": text, "spk_id": "joe"}, rcvbuf=16384)
    try:
        head, _, pcm = listener.recv(4096).partition(b"\r\n\r\n")
        rate = int(head.lower().split(b"x-sample-rate: ")[1].split(b"\r\n")[0])
        began = time.monotonic()
        while (heard := len(pcm) / 2 / rate) < 2:  # (chunk sizes, a few bytes: no matter)
            time.sleep(max(0.0, began + heard - time.monotonic()))
            pcm += listener.recv(2048)
        stopped = time.monotonic()
        with httpx.stream("POST", f"{srv.base_url}/tts/pcm", timeout=60,
                          json={"tts_text": "Hello there.", "spk_id": "joe"}) as other:  # fmt: skip
            next(other.iter_raw())
            waited = time.monotonic() - stopped
    finally:
        listener.close()
    after = assert_idle(srv)
    assert after["dropped"] - before["dropped"] == 1, after
    # Behind from the moment it stopped, plus what its receive buffer holds (the kernel
    # doubles the 16 KB asked: 0.7 s of 22 kHz PCM) and the scheduler's idle tick (1 s):
    # not the seconds in the server's buffers as well (11 s in all).
    assert waited < CONTENDED_READ_S + 2 * 16384 / 2 / rate + 2, waited
    # and its reason names no more time than it has read nothing (it said 11 s of 6)
    why = re.search(r"read no audio for (\d+) s while others waited", srv.log())
    assert why is not None and int(why.group(1)) <= waited + 0.5, (why, waited)


def assert_closed_by_server(s: socket.socket, timeout: float = 30) -> None:
    """Read what is left until the server's close (EOF or a reset) ends the stream."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass


def test_requests_abandoned_in_the_queue_cost_no_synthesis(make_server):
    srv = make_server("--max-streams", "1", "--max-queue", "32", "--max-client-streams", "0",
                      "--max-text-chars", "100000")  # fmt: skip
    before = assert_idle(srv)
    body = {"tts_text": LONG_TEXT * 10, "spk_id": "joe", "stream": True}
    with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=60) as holder:
        chunks = holder.iter_raw()
        next(chunks)  # the holder runs; everything after it waits in the queue
        for _ in range(20):
            raw_request(srv, {"tts_text": LONG_TEXT, "spk_id": "joe"}).close()
        deadline = time.monotonic() + 20
        while srv.healthz()["cancelled"] < before["cancelled"] + 20:
            assert time.monotonic() < deadline, "abandoned requests are still queued"
            time.sleep(0.1)
        produced = srv.healthz()["audio_s"]
    after = assert_idle(srv)
    assert after["cancelled"] == before["cancelled"] + 21
    # Only the holder's pieces in flight may end after it was left; none of the 20.
    assert after["audio_s"] - produced < 10, (produced, after)
    assert "ERROR" not in srv.log()  # a client leaving is no error (it was logged as a 500)


# ---- strict input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/tts/pcm", "/tts", "/v1/audio/speech"])
def test_bytes_that_are_not_utf8_json_get_a_clear_4xx(server, path):
    url = f"{server.base_url}{path}"
    json_type = {"content-type": "application/json"}
    got = message(httpx.post(url, content=b'{"tts_text": "\xff\xfe", "spk_id": "joe"}',
                             headers=json_type), 400)  # fmt: skip
    assert "UTF-8" in got
    got = message(httpx.post(url, content=b"[" * 1000 + b"]" * 1000, headers=json_type), 400)
    assert "nested" in got
    got = message(httpx.post(url, content=b'{"tts_text": "hi", "spk_id": "joe"}',
                             headers={"content-type": "text/plain"}), 415)  # fmt: skip
    assert "application/json" in got
    message(httpx.post(url, data={"tts_text": "hi", "spk_id": "joe"}), 415)


@pytest.mark.parametrize(
    "text, code",
    [("a\x00b", "invalid_text"), ("Ring\x07", "invalid_text"), ("...", "no_speakable_text"),
     ("\u200b\u200b", "no_speakable_text"), ("?! -- ...", "no_speakable_text")],
)  # fmt: skip
def test_text_with_nothing_to_say_or_control_characters_is_422(server, text, code):
    body = error(httpx.post(f"{server.base_url}/tts/pcm",
                            json={"tts_text": text, "spk_id": "joe"}), 422)  # fmt: skip
    assert body["extra"]["code"] == code and "tts_text" in body["detail"]
    oai = {"input": text, "voice": "alloy", "response_format": "pcm"}
    assert "input" in message(httpx.post(f"{server.base_url}/v1/audio/speech", json=oai), 400)
    sft = httpx.post(f"{server.base_url}/inference_sft", data={"tts_text": text, "spk_id": "joe"})
    error(sft, 422)


def test_ws_bad_frames_and_text_get_errors_and_the_socket_survives(server):
    async def go() -> tuple[dict, dict, dict, dict]:
        async with connect(server) as ws:
            await recv_json(ws)
            await ws.send(json.dumps({"type": "ping", "pad": "x" * (1024 * 1024)}))
            too_large = await until(ws, "error")
            await ws.send("[" * 5000 + "]" * 5000)
            nested = await until(ws, "error")
            await send(ws, type="start", context_id="n", spk_id="joe", sample_rate=16000)
            await until(ws, "started")
            await send(ws, type="text", context_id="n", text="bad \x00 byte")
            nul = await until(ws, "error")
            # Nothing speakable, at a rate that needs resampling: still a clean `done`.
            await send(ws, type="text", context_id="n", text="... \u200b !")
            await send(ws, type="close", context_id="n")
            done = await until(ws, "done", "error")
            await send(ws, type="ping")
            await until(ws, "pong")
            return too_large, nested, nul, done

    too_large, nested, nul, done = run(go())
    assert too_large["code"] == "message_too_large"
    assert nested["code"] in ("invalid_json", "invalid_message")
    assert nul["code"] == "invalid_text" and nul["context_id"] == "n"
    assert done["type"] == "done" and done["audio_ms"] == 0 and done["segments"] == 0
    assert_idle(server)


def children(pid: int) -> list[int]:
    """The processes a process started (its phonemizer, for the built-in voice)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_out_of_file_handles_fails_the_request_instead_of_speaking_silence(make_server):
    """espeak-ng reopens its dictionary for every request and, when it cannot, says nothing
    and raises nothing: a request must fail then, not answer 200 with a short silence."""
    import resource

    srv = make_server("--no-warmup")
    with httpx.Client(base_url=srv.base_url, timeout=60) as client:
        body = {"tts_text": "Hello there, how are you today?", "spk_id": "joe"}
        assert client.post("/tts/pcm", json=body).status_code == 200  # the connection is kept
        (espeak,) = children(srv.proc.pid)  # espeak-ng runs in a child process
        limits = resource.prlimit(espeak, resource.RLIMIT_NOFILE)
        resource.prlimit(espeak, resource.RLIMIT_NOFILE, (3, limits[1]))  # no new files
        try:
            starved = client.post("/tts/pcm", json=body)
        finally:
            resource.prlimit(espeak, resource.RLIMIT_NOFILE, limits)
        assert starved.status_code == 500, (starved.status_code, len(starved.content))
        assert "espeak" in starved.json()["detail"]
        again = client.post("/tts/pcm", json=body)
    assert again.status_code == 200
    assert_speech(decode_pcm(again.content), 22050, min_seconds=1.0)
    assert_idle(srv)


# espeak-ng's overrun is undefined behaviour: each of these crashed it most times, not always.
ESPEAK_CRASHERS = ["U.S." * 100, "a." * 97, "U.S." * 50, "a." * 400, "x." * 1000]
CRASH = "zyxwvcrash"  # what the test hook's phonemizer child dies on


def test_text_that_crashed_espeak_is_spoken(server):
    """Runs of dotted letters crashed espeak-ng (piper-tts 1.8), failing the request, and each
    crash made the next request wait for a fresh phonemizer child, every other stream's step
    with it: a client sending them one after another slowed every other client."""
    for text in ESPEAK_CRASHERS:
        r = httpx.post(f"{server.base_url}/tts/pcm", json={"tts_text": text, "spk_id": "joe"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, (text[:12], r.text)
        assert_speech(decode_pcm(r.content), 22050, min_seconds=1.0)


def test_text_that_crashes_espeak_fails_one_request_only(make_server):
    """espeak-ng is C that a text may crash. It ran in the server's process, so one such
    request killed every stream and connection. Now it fails that request; a stream already
    running goes on, the next request is spoken and the counters go back."""
    hooks = str(Path(__file__).parent / "server_hooks")
    srv = make_server("--no-warmup", env={"PYTHONPATH": hooks, "RTSERVER_TEST_ESPEAK_CRASH": CRASH})

    async def go() -> tuple[list[httpx.Response], bytes, httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
            long = {"tts_text": LONG_TEXT, "spk_id": "joe", "stream": True}
            async with client.stream("POST", "/tts/pcm", json=long) as running:
                pieces = running.aiter_bytes()
                audio = [await anext(pieces)]  # it is under way
                bad = []
                for text in [f"Hello {CRASH} there.", f"{CRASH} again."]:
                    body = {"tts_text": text, "spk_id": "joe"}
                    bad.append(await client.post("/tts/pcm", json=body))
                audio += [piece async for piece in pieces]
            body = {"tts_text": "Hello there, how are you?", "spk_id": "joe"}
            return bad, b"".join(audio), await client.post("/tts/pcm", json=body)

    bad, audio, after = run(go())
    assert all(r.status_code == 500 and "phonemizer" in r.json()["detail"] for r in bad)
    assert srv.proc.poll() is None
    assert_speech(decode_pcm(audio), 22050, min_seconds=10)
    assert after.status_code == 200
    assert_speech(decode_pcm(after.content), 22050, min_seconds=1.0)
    assert_idle(srv)


def slow_upload(srv: ServerProcess, source: str) -> socket.socket:
    """A registration that promises 8 MB and sends a few bytes of it."""
    s = socket.create_connection(("127.0.0.1", srv.port), source_address=(source, 0))
    s.sendall(b"POST /speakers HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")  # fmt: skip
    return s


def whole_upload(srv: ServerProcess, source: str, size: int) -> socket.socket:
    """A registration whose whole body (`size` bytes of a form that is not one) is sent."""
    s = socket.create_connection(("127.0.0.1", srv.port), source_address=(source, 0))
    s.sendall(b"POST /speakers HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % size + bytes(size))  # fmt: skip
    return s


def upload(srv: ServerProcess, source: str, path: str = "/speakers", **form: str):
    """A small registration (or `path`'s form) from `source` (127/8: each its own client)."""
    files = {"prompt_wav": ("p.wav", b"RIFF" + bytes(2000), "audio/wav")}
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(base_url=srv.base_url, transport=transport, timeout=30) as client:
        return client.post(path, data=form or {"spk_id": "late", "prompt_text": "Hello."},
                           files=files)  # fmt: skip


def upload_read(r: httpx.Response) -> bool:
    """Whether the upload was read: the built-in voice then refuses the registration."""
    return r.status_code == 400 and "registration" in r.json()["detail"]


def test_upload_bodies_are_read_a_few_at_a_time(make_server):
    """A registration's body is held whole before the registration limit sees it: 256 slow
    uploads held 1.5 GB. Past 4 bodies being read, an upload waits its turn before it sends
    one (at most 16 wait, 4 from one address; more get 503). One client address reads at most
    2 at once, its others waiting for its own: 4 slow ones from one address locked everyone
    out of registration and zero-shot for as long as it went on. (Slow uploads are not cut
    here: see the next test.)"""
    srv = make_server("--no-warmup", "--min-upload-kib-s", "0")

    def health(what: str, n: int) -> None:
        assert eventually(srv.healthz, lambda h: h[what] == n)[what] == n

    mine = [slow_upload(srv, "127.0.0.2") for _ in range(2)]
    theirs = [slow_upload(srv, "127.0.0.3") for _ in range(2)]
    health("uploads_reading", 4)
    with ThreadPoolExecutor(6) as pool:
        # so are the routes that take a recording with the text (upstream's zero-shot)
        zero_shot = pool.submit(
            upload, srv, "127.0.0.4", "/inference_zero_shot", tts_text="Hi.", prompt_text="Hello."
        )
        queued = [pool.submit(upload, srv, "127.0.0.5") for _ in range(4)]
        health("uploads_waiting", 5)
        refused = upload(srv, "127.0.0.5")  # one address's fifth waiting one
        assert refused.status_code == 503 and "waiting" in refused.json()["detail"]
        assert refused.headers["retry-after"]
        third = pool.submit(upload, srv, "127.0.0.2")  # its two places are taken: it waits
        health("uploads_waiting", 6)
        theirs.pop().close()  # the place left goes to the waiters in turn, not to .2's third
        assert zero_shot.result(timeout=30).status_code == 400
        assert all(upload_read(q.result(timeout=30)) for q in queued)
        assert not third.done()
        mine.pop().close()
        assert upload_read(third.result(timeout=30))  # its own place came back
    for s in mine + theirs:
        s.close()
    assert upload_read(eventually(lambda: upload(srv, "127.0.0.2"), upload_read))
    assert_idle(srv)


def test_an_upload_waiter_that_leaves_gives_its_turn_up(make_server):
    """A client that closed its connection while its upload waited for a place kept its
    turn until its 15 s wait ran out: four such from one address held that address's whole
    share of waiting, and its next upload got 503. Now the turn goes as the client does:
    one that sent nothing of its body, one that sent more than uvicorn reads ahead of the app
    (64 KiB: then the socket is no longer read), one that reset the connection, and one that
    sent its whole body."""
    srv = make_server("--no-warmup", "--min-upload-kib-s", "0")
    busy = [slow_upload(srv, source) for source in ("127.0.0.2", "127.0.0.3") for _ in range(2)]
    assert eventually(srv.healthz, lambda h: h["uploads_reading"] == 4)["uploads_reading"] == 4
    left = [slow_upload(srv, "127.0.0.5") for _ in range(3)]  # with the next, its share
    left.append(whole_upload(srv, "127.0.0.5", 100_000))
    for s in left[1:3]:
        # past 64 KiB, but what the kernel's buffers take: a close stuck behind body bytes
        # never reaches the server (that client keeps its turn until its wait ends)
        s.sendall(bytes(100_000))
    assert eventually(srv.healthz, lambda h: h["uploads_waiting"] == 4)["uploads_waiting"] == 4
    left[2].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for s in left:
        s.close()
    began = time.monotonic()
    h = eventually(srv.healthz, lambda h: h["uploads_waiting"] == 0, 10)
    assert h["uploads_waiting"] == 0 and time.monotonic() - began < 5, h
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(upload, srv, "127.0.0.5")  # waits: it is not refused
        assert eventually(srv.healthz, lambda h: h["uploads_waiting"] == 1)["uploads_waiting"]
        busy.pop().close()
        assert upload_read(again.result(timeout=30))
    for s in busy:
        s.close()
    assert_idle(srv)


@pytest.mark.parametrize("path", ["/speakers", "/inference_zero_shot"])
def test_a_body_that_is_no_form_is_refused_unread_where_recordings_go(server, path):
    """The recording routes read a JSON body whole (up to 8 MiB) with no upload place held:
    40 such held 335 MB. It is refused before a byte of it is read (415), as soon as its
    headers are in, and not with a close: a client still sending its body (httpx's async
    client) got a reset instead of the answer. An empty one (a default header) is no body."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n"
                  "Content-Type: application/json\r\n\r\n{".encode())  # fmt: skip
        s.settimeout(10)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 415 "), answer

    async def send_it_all() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            return await client.post(path, content=bytes(8_000_000), headers=JSON)

    r = asyncio.run(send_it_all())
    assert r.status_code == 415 and "multipart" in r.json()["detail"], r.text
    r = httpx.post(f"{server.base_url}{path}", headers=JSON, timeout=30)
    assert r.status_code != 415, r.text  # (the fields are missing: another 4xx)
    assert_idle(server)


JSON = {"content-type": "application/json"}


def test_a_slow_upload_keeps_its_place_while_places_are_free(make_server):
    """One address's third upload waits for one of its own two places, with two places
    free: a slow upload of another address is no one's wait, and is not cut (it was, with a
    408 that freed a place nobody could take)."""
    srv = make_server("--no-warmup")
    mine = [slow_upload(srv, "127.0.0.2") for _ in range(3)]  # two read, one waits
    other = slow_upload(srv, "127.0.0.3")
    h = eventually(srv.healthz, lambda h: (h["uploads_reading"], h["uploads_waiting"]) == (3, 1))
    assert (h["uploads_reading"], h["uploads_waiting"]) == (3, 1), h
    other.settimeout(6)  # past the 3 s grace, a few checks
    with pytest.raises(TimeoutError):
        other.recv(4096)
    for s in [*mine, other]:
        s.close()
    assert_idle(srv)


def test_a_slow_upload_gives_its_place_up_while_others_wait(make_server):
    """Four uploads trickling a few bytes from two addresses held every upload place until
    their deadline: another client waited half of it and got 503. While others wait, an
    upload slower than --min-upload-kib-s after 3 s gives its place up with a 408, and the
    waiter is read."""
    srv = make_server("--no-warmup")
    slow = [slow_upload(srv, source) for source in ("127.0.0.2", "127.0.0.3") for _ in range(2)]
    assert eventually(srv.healthz, lambda h: h["uploads_reading"] == 4)["uploads_reading"] == 4
    assert upload_read(upload(srv, "127.0.0.4"))
    for s in slow:
        s.settimeout(0.5)
    cut = []
    for s in slow:
        with contextlib.suppress(OSError):
            cut.append(s.recv(4096))
        s.close()
    assert any(b" 408 " in c and b"while others waited" in c for c in cut), cut
    assert_idle(srv)
