"""Operating the server: Prometheus metrics, readiness, one log format with request ids, and
a SIGTERM drain that tells WebSocket clients before it closes them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import websockets
from audio_check import assert_speech, decode_pcm
from prometheus_client.parser import text_string_to_metric_families
from serverproc import ServerProcess, eventually
from test_http_api import LONG_TEXT


def scrape(srv: ServerProcess) -> dict[str, float]:
    r = httpx.get(f"{srv.base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"  # once
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_metrics_parse_and_move_after_a_request(server):
    before = scrape(server)
    body = {"tts_text": "Counting this one.", "spk_id": "joe"}
    assert httpx.post(f"{server.base_url}/tts/pcm", json=body, timeout=60).status_code == 200
    server.assert_idle()
    after = scrape(server)
    ok = "rtserver_http_requests_total{route=/tts/pcm,status=200}"
    assert after[ok] == before.get(ok, 0) + 1
    assert after["rtserver_jobs_completed_total"] == before["rtserver_jobs_completed_total"] + 1
    assert after["rtserver_ttfa_seconds_count"] == before["rtserver_ttfa_seconds_count"] + 1
    assert after["rtserver_rtf_count"] == before["rtserver_rtf_count"] + 1
    assert after["rtserver_batch_size_count"] > before["rtserver_batch_size_count"]
    assert after["rtserver_audio_seconds_total"] > before["rtserver_audio_seconds_total"]
    assert after["rtserver_jobs_active"] == 0


# Each body route, with a content type it reads: the headers promise 34 bytes, 5 come.
PARTIAL = {"/tts/pcm": "application/json", "/v1/audio/speech": "application/json",
           "/inference_sft": "application/x-www-form-urlencoded"}  # fmt: skip


def send_partial(srv: ServerProcess, path: str, then_close: bool = False) -> bytes:
    """POST to `path` with only part of its body; the status line it gets (none: closed)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {PARTIAL[path]}\r\n"
                  "Content-Length: 34\r\n\r\ntts_t".encode())  # fmt: skip
        return b"" if then_close else s.recv(4096).split(b"\r\n")[0]


def test_metrics_count_the_status_the_client_got(make_server):
    srv = make_server("--request-timeout-s", "1", "--no-warmup")
    with ThreadPoolExecutor(len(PARTIAL)) as pool:  # all late at once: one timeout's wait
        lines = list(pool.map(lambda path: send_partial(srv, path), PARTIAL))
    assert all(line.startswith(b"HTTP/1.1 408 ") for line in lines), lines
    send_partial(srv, "/tts/pcm", then_close=True)  # a client that left mid-body got nothing
    left = "rtserver_http_requests_total{route=/tts/pcm,status=499}"
    counted = eventually(lambda: scrape(srv), lambda m: left in m)
    for path in PARTIAL:
        assert counted[f"rtserver_http_requests_total{{route={path},status=408}}"] == 1, path
    assert counted[left] == 1
    assert not [k for k in counted if "status=500" in k], counted
    srv.assert_idle()


def test_readyz_is_unready_when_the_scheduler_is_full(make_server):
    srv = make_server("--max-streams", "1", "--max-queue", "0", "--no-warmup")
    assert httpx.get(f"{srv.base_url}/readyz").json() == {"ready": True, "reason": "ready"}
    body = {"tts_text": LONG_TEXT * 3, "spk_id": "joe", "stream": True}
    with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=60) as r:
        chunks = r.iter_raw()
        next(chunks)  # the only slot is taken
        full = httpx.get(f"{srv.base_url}/readyz")
        during = scrape(srv)
    assert full.status_code == 503 and "capacity" in full.json()["reason"]
    assert during["rtserver_streams_open"] == 1 and during["rtserver_sockets_open"] == 0
    srv.assert_idle()
    assert scrape(srv)["rtserver_streams_open"] == 0
    assert httpx.get(f"{srv.base_url}/readyz").status_code == 200


def test_request_ids_and_one_json_log_format(make_server):
    srv = make_server("--log-format", "json", "--no-warmup")
    mine = httpx.post(f"{srv.base_url}/tts/pcm", headers={"x-request-id": "trace-42"},
                      json={"tts_text": "Trace me.", "spk_id": "joe"}, timeout=60)  # fmt: skip
    assert mine.headers["x-request-id"] == "trace-42"
    fresh = httpx.get(f"{srv.base_url}/speakers").headers["x-request-id"]
    assert fresh and fresh != "trace-42"
    # answered before any route runs: an unknown path, a method the route lacks
    for r in (httpx.get(f"{srv.base_url}/nope"), httpx.delete(f"{srv.base_url}/tts")):
        assert r.status_code in (404, 405) and r.headers.get("x-request-id"), r.headers
    srv.assert_idle()
    lines = [line for line in srv.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines[1:]]  # a partial first line may be cut
    assert {"time", "level", "logger", "request_id", "message"} <= set(entries[-1])
    traced = [e for e in entries if e["request_id"] == "trace-42"]
    loggers = {e["logger"] for e in traced}
    assert "uvicorn.access" in loggers  # the access line carries the id too
    assert any(e["logger"].startswith("rtserver") for e in traced)


def test_sigterm_drains_then_tells_websocket_contexts(make_server):
    srv = make_server("--drain-timeout-s", "2", "--no-warmup")

    async def go() -> tuple[list[dict], int, float]:
        async with websockets.connect(f"{srv.ws_url}/ws/tts", compression=None) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "start", "context_id": "long", "spk_id": "joe",
                                      "text": LONG_TEXT * 10}))  # fmt: skip
            while not isinstance(await ws.recv(), bytes):
                pass  # audio flows
            srv.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            async with httpx.AsyncClient(base_url=srv.base_url) as c:
                # The signal is handled a moment later: ready until then.
                while (ready := await c.get("/readyz")).status_code == 200:
                    assert time.monotonic() - t0 < 5, "still ready 5 s after SIGTERM"
                    await asyncio.sleep(0.05)
                late = await c.post("/tts/pcm", json={"tts_text": "Too late.", "spk_id": "joe"})
            assert ready.status_code == 503 and "shutting down" in ready.json()["reason"]
            assert late.status_code == 503
            events = []
            try:
                while True:
                    msg = await ws.recv()
                    if isinstance(msg, str):
                        events.append(json.loads(msg))
            except websockets.ConnectionClosed as closed:
                return events, closed.rcvd.code if closed.rcvd else -1, time.monotonic() - t0

    events, code, waited = asyncio.run(asyncio.wait_for(go(), 60))
    errors = [e for e in events if e["type"] == "error"]
    assert errors and errors[-1]["code"] == "shutting_down" and errors[-1]["context_id"] == "long"
    assert code == 1001
    assert 1.5 < waited < 6  # the drain deadline, not an instant cut
    srv.proc.wait(timeout=20)
    assert srv.proc.returncode == 0


def test_an_http_stream_left_at_the_drain_deadline_is_cut_without_a_traceback(make_server):
    """A long `/tts/pcm` stream read at about real time outlives the drain: at its deadline
    the body breaks (no clean end: the client can tell), the server logs one warning and
    exits 0. Left to uvicorn's shutdown, the stream's task was cancelled two seconds later,
    with an error line and a CancelledError traceback."""
    srv = make_server("--drain-timeout-s", "1", "--no-warmup", "--max-streams", "1")
    url = f"{srv.base_url}/tts/pcm"
    body = {"tts_text": LONG_TEXT * 10, "spk_id": "joe", "stream": True}
    with ThreadPoolExecutor(2) as pool, httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes(4096)
        next(chunks)
        # one more waits in the queue for the only slot: at the drain's end it gets 503
        queued = pool.submit(httpx.post, url, json={"tts_text": "Hi.", "spk_id": "joe"}, timeout=30)
        eventually(srv.healthz, lambda h: h["queued"] == 1, 10)
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # timed by the server's exit: the client reads on through what the socket buffers held
        exited = pool.submit(lambda: (srv.proc.wait(timeout=20), time.monotonic())[1])
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in chunks:
                time.sleep(0.05)
        assert queued.result().status_code == 503, queued.result().text
        waited = exited.result() - t0
    assert 0.8 < waited < 6, waited  # the drain deadline, then the cut
    log = srv.log()
    assert srv.proc.returncode == 0, log
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "shutting_down" in log  # the cut's one warning line


def test_ctrl_c_in_a_terminal_stops_the_server_and_its_phonemizer_quietly(make_server):
    """A terminal's Ctrl-C sends SIGINT to the whole process group: the server drains and
    exits 0, and the built-in voice's phonemizer child (rtserver.engines.espeak) ends when
    its pipe closes. It printed a KeyboardInterrupt traceback."""
    srv = make_server("--no-warmup", new_session=True)
    r = httpx.post(f"{srv.base_url}/tts/pcm", json={"tts_text": "Hi there.", "spk_id": "joe"})
    assert r.status_code == 200  # the phonemizer child is up and has worked
    os.killpg(srv.proc.pid, signal.SIGINT)
    srv.proc.wait(timeout=20)
    log = srv.log()
    assert srv.proc.returncode == 0, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log


def test_clients_that_read_nothing_do_not_hold_the_shutdown(make_server):
    """A WebSocket client and an HTTP client that stop reading mid-stream: at the drain's end
    the server still cuts everything and exits in seconds, with warnings only. The socket
    that read nothing held the drain until the write watch gave up on it (about 70 s, past
    keepalive pings), and the HTTP stream's task was cancelled with an ERROR and a traceback."""
    from websockets.sync.client import connect

    srv = make_server("--drain-timeout-s", "1", "--no-warmup")
    start = {"type": "start", "context_id": "c", "spk_id": "joe", "text": LONG_TEXT * 10}
    with connect(f"{srv.ws_url}/ws/tts", max_queue=1, compression=None) as ws, httpx.stream(
        "POST", f"{srv.base_url}/tts/pcm", json={"tts_text": LONG_TEXT * 10, "spk_id": "joe"},
        timeout=30,
    ) as r:  # fmt: skip
        ws.recv(timeout=30)  # ready
        ws.send(json.dumps(start))
        assert r.status_code == 200
        next(r.iter_raw(1024))  # then neither reads again
        time.sleep(3)  # the server's writes back up into the kernel's buffers
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        srv.proc.wait(timeout=30)
        took = time.monotonic() - t0
    log = srv.log()
    assert srv.proc.returncode == 0 and took < 8, (took, log)
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.mark.parametrize("path", ["/tts/pcm", "/speakers"])
def test_a_request_whose_body_is_still_coming_at_the_drains_end_gets_a_503(make_server, path):
    """A client still sending its body (JSON, or a recording's upload) when the drain ends:
    it is answered as every request the drain refuses is, 503 with Retry-After. uvicorn,
    its task cancelled, answered a plain-text 500 (and /metrics counted a server error)."""
    srv = make_server("--drain-timeout-s", "1", "--no-warmup")
    kind = "application/json" if path == "/tts/pcm" else "multipart/form-data; boundary=b"
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
              "Content-Length: 100000\r\n\r\n".encode() + b"--b\r\n")  # fmt: skip
    time.sleep(0.5)  # the head read: the request is the app's
    srv.proc.send_signal(signal.SIGTERM)
    s.settimeout(0.2)
    answer, deadline = b"", time.monotonic() + 20
    while time.monotonic() < deadline:  # still sending, as such a client does
        try:
            s.sendall(b"x")
            if not (piece := s.recv(4096)):
                break
            answer += piece
        except TimeoutError:
            continue
        except OSError:  # reset once the server is gone
            break
    s.close()
    srv.proc.wait(timeout=20)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in head.lower()
    assert "shutting down" in json.loads(body)["detail"]


def test_a_signal_delivered_twice_is_one_drain(make_server):
    """A signal to the process group (systemd's default KillMode, GNU timeout) reaches the
    server and `uv run` above it, which forwards it: the same SIGTERM twice, milliseconds
    apart. It was read as a second signal: every stream was cut, none drained."""
    srv = make_server("--drain-timeout-s", "30", "--no-warmup")
    url = f"{srv.base_url}/tts/pcm"
    body = {"tts_text": LONG_TEXT * 2, "spk_id": "joe", "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        chunks = r.iter_bytes(4096)
        got = next(chunks)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        got += b"".join(chunks)  # the whole stream: an early end raises here
    srv.proc.wait(timeout=30)
    log = srv.log()
    assert srv.proc.returncode == 0 and "shutting_down" not in log, log
    assert_speech(decode_pcm(got), 22050, min_seconds=10)


def test_a_second_signal_exits_at_once_and_cleanly(make_server):
    """SIGTERM, then SIGTERM again during the drain: the streams are cut and the server exits
    0 at once. uvicorn's own handling re-raised the signal at exit (status -15), and the
    queued request got a plain-text 500."""
    srv = make_server("--drain-timeout-s", "30", "--no-warmup", "--max-streams", "1")
    url = f"{srv.base_url}/tts/pcm"
    body = {"tts_text": LONG_TEXT * 10, "spk_id": "joe", "stream": True}
    with ThreadPoolExecutor(1) as pool, httpx.stream("POST", url, json=body, timeout=30) as r:
        chunks = r.iter_bytes(4096)
        next(chunks)
        queued = pool.submit(httpx.post, url, json={"tts_text": "Hi.", "spk_id": "joe"}, timeout=30)
        eventually(srv.healthz, lambda h: h["queued"] == 1, 10)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1)  # (the same signal within REPEAT_S is one delivered twice)
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in chunks:
                pass
        assert queued.result().status_code == 503, queued.result().text
    srv.proc.wait(timeout=20)
    log = srv.log()
    assert srv.proc.returncode == 0 and time.monotonic() - t0 < 5, log
    assert "Traceback" not in log, log


def test_a_flood_of_garbage_connections_is_logged_at_a_bounded_rate(make_server):
    """uvicorn writes a warning for every request it cannot parse: one client sending garbage
    on new connections wrote 2,100 lines a second. Those lines are bounded like refusals, and
    the count of those left out is said in a later second's line."""
    from rtserver.logs import FLOOD_LINES_S

    srv = make_server()
    t0 = time.monotonic()
    for _ in range(10 * FLOOD_LINES_S):
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"\x00GARBAGE\r\n\r\n")
            s.recv(300)
    seconds = time.monotonic() - t0
    time.sleep(1.1)  # a line in a later second says how many were left out
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"\x00GARBAGE\r\n\r\n")
        s.recv(300)
    lines = eventually(
        lambda: [ln for ln in srv.log_path.read_text().splitlines() if "Invalid HTTP" in ln],
        lambda lines: "lines like this left out]" in "\n".join(lines),
    )
    assert "lines like this left out]" in "\n".join(lines), lines[-3:]
    assert len(lines) <= FLOOD_LINES_S * (seconds + 3), (len(lines), seconds)
    assert httpx.get(f"{srv.base_url}/healthz").status_code == 200


def test_a_flood_of_refusals_is_logged_at_a_bounded_rate():
    """One access line per refused request: an attacker's 1,500 refusals a second wrote
    0.7 GB of log an hour. The loggers that write a line per request or connection keep at
    most FLOOD_LINES_S refusals a second, and say how many they left out in the next second's
    line; answered requests are all logged."""
    import logging.config

    from rtserver.logs import FLOOD_LINES_S, log_config

    names = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "rtserver.connection")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in loggers]
    logging.config.dictConfig(log_config("info", "text"))  # as the server configures it
    access = logging.getLogger("uvicorn.access")
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    access.handlers = [Keep()]
    try:
        for second, n, status in ((1000, 5 * FLOOD_LINES_S, 503), (1000, 30, 200), (1001, 1, 503)):
            for _ in range(n):
                record = access.makeRecord(access.name, logging.INFO, __file__, 0,
                                           '%s - "%s %s HTTP/%s" %d',
                                           ("10.0.0.9:1", "POST", "/speakers", "1.1", status), None)  # fmt: skip
                record.created = second + 0.5
                access.handle(record)
    finally:  # this process's logging as it was
        for lg, handlers, filters, level, propagate in saved:
            lg.handlers, lg.filters, lg.propagate = handlers, filters, propagate
            lg.setLevel(level)
    assert len(kept) == FLOOD_LINES_S + 30 + 1, len(kept)  # answers all kept
    assert kept[-1].startswith(f"[{4 * FLOOD_LINES_S} lines like this left out]"), kept[-1]
