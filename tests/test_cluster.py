"""`rtserver serve --replicas 2`: a real local Ray cluster, Serve's proxy on a loopback port, two
CPU replicas of the built-in voice, and real clients: load spread over both replicas, the
WebSocket protocol through the proxy, a replica killed mid-stream, and SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from audio_check import assert_speech, decode_pcm
from serverproc import ServerProcess, alive, descendants
from test_http_api import LONG_TEXT
from test_web_demo import SHORT_TEXT, Page, headless

from rtserver.client import Context, Result, ServerError, TTSClient
from rtserver.protocol import Error

# The test process joins the cluster as a Ray driver (to kill a replica's actor): with the
# workers of the environment it runs in, not a copy built under `uv run`, and with the token
# the local cluster was started with.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip("ray", reason="needs the cluster extra: uv run --extra cluster pytest")

pytestmark = pytest.mark.cluster

# Per replica MAX_STREAMS; MAX_QUEUE more wait at the proxy. Serve bounds its queue loosely
# under a burst (requests not yet handed to a replica with room count as queued), so a burst
# of 20 stays within MAX_QUEUE alone.
MAX_STREAMS, MAX_QUEUE = 3, 20
SENTENCE = "The weather today is sunny with a light breeze from the west."


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServerProcess]:
    """One command, one local Ray cluster for the module: two replicas at half a CPU each."""
    srv = ServerProcess(
        "--replicas", "2", "--replica-cpus", "0.5", "--max-streams", str(MAX_STREAMS),
        "--max-queue", str(MAX_QUEUE), "--drain-timeout-s", "2",
    )  # fmt: skip
    try:
        ready = srv.wait_log(r"ready: 2 replicas on \S+ \(Ray cluster (\S+)\)", timeout=240)
        srv.ray_address = ready.group(1)
        yield srv
    finally:
        srv.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


def speak(client: httpx.AsyncClient, text: str) -> asyncio.Future[httpx.Response]:
    return client.post("/tts/pcm", json={"tts_text": text, "spk_id": "joe"})


def replica_healths(srv: ServerProcess, replicas: set[str], timeout: float = 30) -> dict:
    """/healthz through the proxy until each of `replicas` answered once: {replica: body}."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while not replicas <= set(seen) and time.monotonic() < deadline:
        r = httpx.get(f"{srv.base_url}/healthz", timeout=10)
        seen[r.headers["x-replica"]] = r.json()
    assert set(seen) >= replicas, (seen, replicas)
    return seen


def test_twenty_requests_are_served_by_both_replicas(cluster):
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as c:
            return await asyncio.gather(
                *(speak(c, f"This is request number {i}. {SENTENCE}") for i in range(20))
            )

    responses = run(go())
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    for r in responses:
        assert_speech(decode_pcm(r.content), int(r.headers["x-sample-rate"]), min_seconds=3.0)
        assert len(r.headers.get_list("x-request-id")) == 1  # the proxy's and the app's: one
    served = Counter(r.headers["x-replica"] for r in responses)
    assert len(served) == 2, served
    # Health and metrics per replica: each names itself, and counts only its own jobs.
    healths = replica_healths(cluster, set(served))
    for replica, health in healths.items():
        assert health["replica"] == replica
        assert health["completed"] >= served[replica]
    metrics = httpx.get(f"{cluster.base_url}/metrics")
    assert f'rtserver_replica_info{{replica="{metrics.headers["x-replica"]}"}} 1.0' in metrics.text


def test_replicas_start_with_few_malloc_arenas(cluster):
    """A replica is a process Ray starts: it caps glibc's arenas (what lets a long request's
    memory go back) only if its environment says so before its first thread."""
    replicas = set()
    for pid in descendants(cluster.proc.pid):
        with contextlib.suppress(OSError):
            if b"ServeReplica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                replicas.add(pid)
    assert len(replicas) == 2, replicas
    for pid in replicas:
        assert b"MALLOC_ARENA_MAX=4" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


@pytest.mark.parametrize(
    "method, path, body, expect",
    [
        ("GET", "/", None, "text/html"),
        ("GET", "/demo/app.js", None, "javascript"),
        ("GET", "/schema", None, "text/html"),
        ("GET", "/schema/openapi.json", None, "openapi+json"),
        ("GET", "/speakers", None, "application/json"),
        ("GET", "/readyz", None, "application/json"),
        ("GET", "/v1/audio/voices", None, "application/json"),
        ("POST", "/tts", {"tts_text": SENTENCE, "spk_id": "joe"}, "audio/mpeg"),
        ("POST", "/v1/audio/speech", {"input": SENTENCE, "voice": "alloy"}, "audio/mpeg"),
        ("GET", f"/inference_sft?tts_text={SENTENCE}&spk_id=joe", None, "audio/L16"),
    ],
)
def test_every_route_answers_through_the_proxy(cluster, method, path, body, expect):
    r = httpx.request(method, f"{cluster.base_url}{path}", json=body, timeout=60)
    assert r.status_code == 200 and expect in r.headers["content-type"], (r.status_code, r.text)
    assert r.headers["x-replica"] and r.content
    # The replica's access line names the path (Serve's said `POST / 200` for every route),
    # the query's values left out as on a plain server.
    rid = r.headers["x-request-id"]
    line = cluster.wait_log(rf'\[{rid}\] \S+ - "{method} (\S+) HTTP/1.1" 200', timeout=30)
    shown, _, query = path.partition("?")
    assert line.group(1) == shown + ("?tts_text=...&spk_id=..." if query else ""), line.group(0)
    # The framework's own answers too: an unknown path or method names its replica.
    missing = httpx.get(f"{cluster.base_url}/no/such/route")
    assert missing.status_code == 404 and missing.json()["status_code"] == 404
    wrong = httpx.put(f"{cluster.base_url}/tts")
    assert wrong.status_code == 405 and wrong.json()["status_code"] == 405
    assert missing.headers["x-replica"] and wrong.headers["x-replica"]


@pytest.mark.browser
def test_the_web_demo_speaks_through_the_proxy(chromium, cluster):
    with headless(chromium) as browser:
        page = Page(browser, cluster.base_url)
        page.page.fill("#text", SHORT_TEXT)
        page.page.click("#speak")
        page.wait("rtDemo.sampleRate > 0", what="`started`")
        rate = page.demo("sampleRate")
        page.wait(f"rtDemo.samplesPlayed >= {2 * rate}", timeout_s=25, what="2 s played")
        page.wait("rtDemo.state === 'idle'", timeout_s=30, what="play-out to finish")
        assert page.demo("samplesPlayed") == page.demo("samplesReceived")
        assert page.demo("lastError") is None and page.errors == []


def test_refused_only_when_every_replica_is_full(cluster):
    """Each replica takes MAX_STREAMS, MAX_QUEUE more wait at the proxy for whichever frees
    first; only past all of that comes a 503, with Retry-After."""

    async def go() -> tuple[list[int], list[httpx.Response]]:
        async with (
            httpx.AsyncClient(base_url=cluster.base_url, timeout=120) as http,
            TTSClient(cluster.base_url) as client,
        ):
            async with contextlib.AsyncExitStack() as holders:
                await fill_both_replicas(client, holders)
                requests = []
                for _ in range(MAX_QUEUE + 2):  # one after the other
                    requests.append(asyncio.create_task(speak(http, SENTENCE)))
                    await asyncio.sleep(0.025)
                refused = await first_done(requests, 2)
            # The holders' sockets are closed: the queued requests go in.
            return refused, await asyncio.gather(*requests)

    refused, responses = run(go())
    assert refused == [MAX_QUEUE, MAX_QUEUE + 1], refused
    for r in responses[MAX_QUEUE:]:
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert [r.status_code for r in responses[:MAX_QUEUE]] == [200] * MAX_QUEUE
    for r in responses[:MAX_QUEUE]:
        assert_speech(decode_pcm(r.content), 22050, min_seconds=2.0)


async def fill_both_replicas(client: TTSClient, stack: contextlib.AsyncExitStack) -> None:
    """MAX_STREAMS WebSockets on each replica, each with a context that says nothing: every
    socket is one of Serve's requests on its replica, every context one of its scheduler's
    streams, and they hold their places until closed, however fast the engine speaks (requests
    speaking long texts once finished inside the burst on a fast machine)."""
    on: Counter[str] = Counter()
    for _ in range(2 * MAX_STREAMS):
        conn = await stack.enter_async_context(client.connect())
        on[conn.ws.response.headers["x-replica"]] += 1
        await conn.start(spk_id="joe")
    assert sorted(on.values()) == [MAX_STREAMS, MAX_STREAMS], on


async def first_done(tasks: list[asyncio.Task], n: int, timeout: float = 30) -> list[int]:
    """Wait until `n` of `tasks` are done: their indices, in order."""
    deadline = time.monotonic() + timeout
    while sum(t.done() for t in tasks) < n:
        assert time.monotonic() < deadline, [t.done() for t in tasks]
        await asyncio.wait([t for t in tasks if not t.done()], timeout=0.5,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    return [i for i, t in enumerate(tasks) if t.done()]


def test_websocket_session_through_the_proxy(cluster):
    """Two contexts on one socket, a flush acknowledged after its audio, a cancel."""

    async def go() -> tuple[list[str], Result, Result, str]:
        async with TTSClient(cluster.base_url) as client, client.connect() as conn:
            replica = conn.ws.response.headers["x-replica"]
            rid = conn.ws.response.headers["x-request-id"]  # its access line: path and 101
            await asyncio.to_thread(cluster.wait_log, rf'\[{rid}\] \S+ - "WebSocket /ws/tts ', 30)
            long = await conn.start(spk_id="joe", context_id="long", text=LONG_TEXT * 4)
            turn = await conn.start(spk_id="joe", context_id="turn")
            await turn.send("Half a sentence without an end", flush=True)
            seen: list[str] = []
            async for item in turn.events():
                seen.append("audio" if isinstance(item, bytes) else type(item).__name__)
                if seen[-1] == "Flushed":
                    break
            await turn.send("and here is the rest of it. ")
            await turn.close()
            async for item in long.events():
                if isinstance(item, bytes):  # it speaks: now barge in
                    await long.cancel()
                    break
            return seen, await turn.collect(), await long.collect(), replica

    seen, turn, long, replica = run(go())
    assert seen.index("audio") < seen.index("Segment") < seen.index("Flushed")
    assert turn.done is not None and [s.text for s in turn.segments] == [
        "and here is the rest of it."
    ]
    assert_speech(decode_pcm(turn.audio), 22050, min_seconds=1.0)
    assert long.cancelled and long.done is None
    # The replica that had the socket holds nothing afterwards.
    deadline = time.monotonic() + 15
    while True:
        health = replica_healths(cluster, {replica})[replica]
        if (health["active"], health["streams_open"], health["sockets_open"]) == (0, 0, 0):
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


async def open_on_each_replica(
    http: httpx.AsyncClient, client: TTSClient, stack: contextlib.AsyncExitStack
) -> dict[str, tuple[Coroutine[None, None, bytes], Coroutine[None, None, bytes]]]:
    """On each of the two replicas, one streaming HTTP request and one WebSocket context, with
    audio flowing: {replica: (reading the rest of the request, of the context)}. Nothing
    slows a request behind Serve's proxy (it queues what the replica sends without bound), so
    it speaks 4.5 minutes, to be still speaking at the kill on a fast machine too; a context
    stays open until read_context closes it."""
    request = {"tts_text": LONG_TEXT * 12, "spk_id": "joe"}
    responses: dict[str, httpx.Response] = {}
    while len(responses) < 2:
        # A second one on the same replica is closed at once: it would hold one of its slots.
        r = await http.send(http.build_request("POST", "/tts/pcm", json=request), stream=True)
        if r.headers["x-replica"] in responses:
            await r.aclose()
        else:
            responses[r.headers["x-replica"]] = r
            stack.push_async_callback(r.aclose)
    contexts: dict[str, Context] = {}
    while len(contexts) < 2:
        connecting = client.connect()
        conn = await connecting.__aenter__()
        replica = conn.ws.response.headers["x-replica"]
        if replica in contexts:
            await connecting.__aexit__(None, None, None)
        else:
            stack.push_async_exit(connecting)
            contexts[replica] = await conn.start(spk_id="joe", text=LONG_TEXT * 4)
    opened = {}
    for replica, r in responses.items():
        body = r.aiter_raw()
        first = await anext(body)
        ctx = contexts[replica]
        ctx_first = await ctx.queue.get()  # after `started`
        assert first and isinstance(ctx_first, bytes)
        opened[replica] = (read_body(first, body), read_context(ctx_first, ctx))
    return opened


async def outcome(reading: Awaitable[bytes]) -> tuple[str, float, bytes]:
    """How reading a stream to its end went: ("ok", seconds, audio) or (the error, seconds)."""
    t0 = time.monotonic()
    try:
        audio = await reading
    except (httpx.HTTPError, ServerError, websockets.ConnectionClosed) as exc:
        return type(exc).__name__, time.monotonic() - t0, b""
    return "ok", time.monotonic() - t0, audio


async def read_body(first: bytes, body: AsyncIterator[bytes]) -> bytes:
    return first + b"".join([piece async for piece in body])


async def read_context(first: bytes, ctx: Context) -> bytes:
    await ctx.close()
    return first + (await ctx.collect()).audio


def test_killing_a_replica_fails_only_its_streams(cluster):
    ray.init(address=cluster.ray_address, logging_level="ERROR", log_to_driver=False)
    try:
        run(_kill_one(cluster))
    finally:
        ray.shutdown()


async def _kill_one(cluster: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=cluster.base_url, timeout=60) as http,
        TTSClient(cluster.base_url) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        opened = await open_on_each_replica(http, client, stack)
        victim, survivor = opened
        actor = ray.get_actor(f"SERVE_REPLICA::rtserver#tts#{victim}", namespace="serve")
        ray.kill(actor, no_restart=True)  # as if its process crashed
        dead_http, dead_ws, http_ok, ws_ok = await asyncio.gather(
            *map(outcome, (*opened[victim], *opened[survivor]))
        )
        # Its own streams end with an error at once (the body cut short, the socket closed)...
        assert dead_http[0] == "RemoteProtocolError" and dead_http[1] < 10, dead_http
        assert dead_ws[0] in ("ServerError", "ConnectionClosedError") and dead_ws[1] < 10, dead_ws
        # ... the other replica's run to their end...
        for result in (http_ok, ws_ok):
            assert result[0] == "ok", result
            assert_speech(decode_pcm(result[2]), 22050, min_seconds=60)
        # ... and new requests are served at once.
        for _ in range(4):
            t0 = time.monotonic()
            r = await speak(http, SENTENCE)
            assert r.status_code == 200 and time.monotonic() - t0 < 10, r.text
        # Serve starts a replica in place of the dead one.
        deadline = time.monotonic() + 120
        while (r := await http.get("/healthz")).headers["x-replica"] in opened:
            assert time.monotonic() < deadline, "no new replica after 120 s"
            await asyncio.sleep(1)
        assert r.json()["replica"] == r.headers["x-replica"]


def test_sigterm_drains_and_stops_the_app_and_its_cluster(cluster):
    """Last in the module: it stops the cluster."""
    ray_processes = descendants(cluster.proc.pid)
    assert len(ray_processes) >= 4  # the Ray cluster the command started, and its workers

    async def probe(http: httpx.AsyncClient, seen: list[int]) -> None:
        """/readyz every 0.1 s, and a new request once it stops saying 200."""
        while True:
            seen.append((await http.get("/readyz")).status_code)
            if seen[-1] != 200:
                late = await http.post("/tts", json={"tts_text": "Too late.", "spk_id": "joe"})
                seen.append(late.status_code)
            await asyncio.sleep(0.1)

    async def go() -> tuple[list[str], int | None, list[int]]:
        seen: list[int] = []
        async with (
            TTSClient(cluster.base_url) as client,
            client.connect() as conn,
            httpx.AsyncClient(base_url=cluster.base_url, timeout=30) as http,
        ):
            ctx = await conn.start(spk_id="joe", text="A context that is never closed.")
            cluster.proc.send_signal(signal.SIGTERM)
            prober = asyncio.create_task(probe(http, seen))
            errors = [e.code async for e in ctx.events() if isinstance(e, Error)]
            prober.cancel()
            await conn.ws.wait_closed()
            return errors, conn.ws.close_code, seen

    errors, close_code, seen = run(go())
    # Until the drain is over, as from `rtserver serve`: the replicas' 503, not the proxy's
    # 404 for an app already deleted.
    assert 503 in seen and set(seen) <= {200, 503}, seen
    assert errors[0] == "shutting_down" and close_code == 1001, (errors, close_code)
    assert cluster.proc.wait(timeout=60) == 0, cluster.log()
    deadline = time.monotonic() + 15
    while alive(ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(ray_processes), "Ray processes outlived the command"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cluster.base_url}/healthz")
