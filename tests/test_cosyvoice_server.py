"""The server on CosyVoice: the tiny official-format golden model dir through every route."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from audio_check import assert_speech, decode_mp3, decode_pcm
from golden.conftest import resolve_golden_dir
from serverproc import ServerProcess, eventually, rss_mb
from test_cli import rtserver
from test_operations import scrape
from test_prompt_audio import encode
from test_robustness import until

from rtserver.client import ServerError, TTSClient

GOLDEN = resolve_golden_dir()
MODEL = GOLDEN / "cosyvoice2" / "model"
TEXT = "你好，今天天气很好。我们去公园散步吧。Hello there, this is a test of the server."
LONG = "".join(f"第{i}句话说的是今天的天气很好，我们一起去公园散步吧。" for i in range(20))

pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"no golden model dir at {MODEL}")


def start(speaker_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(
        "--model", str(MODEL), "--speaker-dir", str(speaker_dir), *args, env=env
    ).wait_ready()


@pytest.fixture(scope="module")
def cv_speakers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speakers")


@pytest.fixture(scope="module")
def cv(cv_speakers):
    srv = start(cv_speakers)
    yield srv
    srv.stop()


def pcm(srv: ServerProcess, text: str = TEXT, **kw) -> bytes:
    body = {"tts_text": text, "spk_id": "spk_f1", **kw}
    r = httpx.post(f"{srv.base_url}/tts/pcm", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-sample-rate"] == "24000"
    return r.content


def test_speakers_are_the_model_dirs(cv):
    listed = httpx.get(f"{cv.base_url}/speakers").json()
    assert {s["id"] for s in listed} == {"spk_f1", "spk_m1", "zs_spk1"}
    assert all(s["instructions"] for s in listed)  # CosyVoice2's instruct mode
    assert cv.healthz()["engine"] == "cosyvoice-v2"


@pytest.mark.parametrize("stream", [False, True])
def test_pcm_and_mp3_stream_and_not(cv, stream):
    audio = decode_pcm(pcm(cv, stream=stream, seed=3))
    assert_speech(audio, 24000, min_seconds=1.0)
    r = httpx.post(f"{cv.base_url}/tts", json={"tts_text": TEXT, "spk_id": "zs_spk1",
                                              "stream": stream, "seed": 3}, timeout=120)  # fmt: skip
    assert r.status_code == 200
    mp3, rate = decode_mp3(r.content)
    assert rate == 24000
    assert_speech(mp3, rate, min_seconds=1.0)


def test_same_seed_same_audio_and_stream_matches_length(cv):
    a, b = pcm(cv, seed=11), pcm(cv, seed=11)
    assert a == b
    streamed = pcm(cv, seed=11, stream=True)
    # Same tokens (same seed); streaming only changes how the vocoder is chunked.
    assert abs(len(streamed) - len(a)) / len(a) < 0.05
    assert pcm(cv, seed=12) != a


def test_inference_sft_form_body(cv):
    r = httpx.request("GET", f"{cv.base_url}/inference_sft",
                      data={"tts_text": TEXT, "spk_id": "spk_m1"}, timeout=120)  # fmt: skip
    assert r.status_code == 200
    assert_speech(decode_pcm(r.content), 24000, min_seconds=1.0)


def three_at_once(srv: ServerProcess) -> bytes:
    """Three requests at once (plain, long streamed, zero-shot speaker); the first one's PCM."""

    async def together():
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
            bodies = [
                {"tts_text": TEXT, "spk_id": "spk_f1", "seed": 21},
                {"tts_text": LONG, "spk_id": "spk_m1", "seed": 22, "stream": True},
                {"tts_text": "另一个请求。" * 3, "spk_id": "zs_spk1", "seed": 23},
            ]
            rs = await asyncio.gather(*(c.post("/tts/pcm", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in rs)
            return [r.content for r in rs]

    return asyncio.run(together())[0]


def assert_same_pcm(a: bytes, b: bytes) -> None:
    x, y = decode_pcm(a), decode_pcm(b)
    assert len(x) == len(y)
    # Float reassociation in batched matmuls only (a few LSB after the vocoder); a different
    # token would differ by orders of magnitude more.
    assert np.abs(x - y).max() <= 8 / 32768


def test_concurrent_requests_are_batch_invariant(cv):
    assert_same_pcm(pcm(cv, seed=21), three_at_once(cv))


def test_vocoder_thread_and_torch_linears_serve_the_same_audio_and_free_cut_streams(cv, tmp_path):
    """--vocoder-thread on (the default with a GPU): batches are vocoded on a thread of their
    own while decode steps go on, their audio handed out by later steps. --packed off: the LLM
    and the flow run torch's linears instead of the oneDNN-packed ones the CPU default uses."""
    srv = start(tmp_path, "--vocoder-thread", "on", "--packed", "off", "--no-warmup")
    try:
        assert_same_pcm(pcm(cv, seed=21), three_at_once(srv))
        assert_disconnect_frees_the_job(srv)
    finally:
        srv.stop()


def test_ws_speaks_and_cancel_frees_the_job(cv):
    async def go():
        async with TTSClient(cv.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="spk_f1", seed=5)
            for ch in TEXT:
                await ctx.send(ch)
            await ctx.close()
            done = await ctx.collect()
            long = await conn.start(spk_id="spk_m1", text=LONG)  # open until the cancel
            async for item in long.events():
                if isinstance(item, bytes):
                    break
            await long.cancel()
            rest = await long.collect()
            return done, rest

    before = cv.wait_idle()
    done, rest = asyncio.run(asyncio.wait_for(go(), 120))
    assert_speech(decode_pcm(done.audio), 24000, min_seconds=1.0)
    assert done.done is not None and done.segments
    assert rest.cancelled and rest.done is None
    after = cv.wait_idle()
    assert after["active"] == 0 and after["cancelled"] == before["cancelled"] + 1


def test_ws_text_streaming_speaks_each_flushed_piece(cv):
    """Fragments feed one LLM run per piece as they arrive; a flush ends the piece. Cut
    mid-word, the audio is the same as the piece sent whole (same seed)."""
    first, second = "Hello there, how are you doing today?", "Fine, thanks."

    async def turn(fragments: list[str]) -> tuple:
        async with TTSClient(cv.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="spk_f1", seed=8, text_streaming=True)
            for f in fragments:
                await ctx.send(f)
            await ctx.flush()
            await ctx.send(second)
            await ctx.close()
            return await ctx.collect()

    before = cv.wait_idle()
    whole = asyncio.run(asyncio.wait_for(turn([first]), 120))
    cut = asyncio.run(
        asyncio.wait_for(turn(["Hel", "lo the", "re, how", " are you do", "ing today?"]), 120)
    )
    for result in (whole, cut):
        assert [s.text for s in result.segments] == [first, second]
        assert result.done is not None and any(type(e).__name__ == "Flushed" for e in result.events)
        assert_speech(decode_pcm(result.audio), 24000, min_seconds=0.5)
    assert cut.audio == whole.audio
    after = cv.assert_idle()
    assert after["completed"] == before["completed"] + 2


@pytest.mark.parametrize("streaming", [True, False])
def test_ws_text_left_open_is_spoken_then_times_out(tmp_path, streaming):
    """Text the client never flushes, then only blank fragments every 100 ms. In text
    streaming its LLM run waited for more text, holding its slot and KV blocks for good (pings
    kept the socket); in both modes each blank put the auto-flush off again. Now the text is
    spoken after auto_flush_ms and the idle context then ends."""
    srv = start(tmp_path, "--auto-flush-ms", "300", "--context-idle-timeout-s", "2")
    words = "Hello there, my friend"

    async def turn() -> tuple[list, bytes]:
        events, audio = [], b""
        async with TTSClient(srv.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="spk_f1", seed=3, text_streaming=streaming)
            await ctx.send(words)

            async def blanks() -> None:
                while True:
                    await asyncio.sleep(0.1)
                    await ctx.send(" ")

            nagging = asyncio.create_task(blanks())
            try:
                async for item in ctx.events():
                    if isinstance(item, bytes):
                        audio += item
                    else:
                        events.append(item)
            finally:
                nagging.cancel()
        return events, audio

    try:
        events, audio = asyncio.run(asyncio.wait_for(turn(), 60))
        assert [e.text.strip() for e in events if type(e).__name__ == "Segment"] == [words]
        assert_speech(decode_pcm(audio), 24000, min_seconds=0.3)
        assert type(events[-1]).__name__ == "Error" and events[-1].code == "context_timeout"
        after = srv.assert_idle()
        assert after["held_kv_blocks"] == 0 and after["held_flow_blocks"] == 0
    finally:
        srv.stop()


def assert_disconnect_frees_the_job(srv: ServerProcess) -> None:
    """A client that leaves after the first audio: its job is cancelled and freed."""
    before = srv.wait_idle()
    body = {"tts_text": LONG, "spk_id": "spk_f1", "stream": True}
    with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=120) as r:
        next(r.iter_raw())
    after = srv.assert_idle(timeout=10)  # its KV and flow cache blocks given back too
    assert after["active"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["held_kv_blocks"] == 0 and after["held_flow_blocks"] == 0


def test_text_wetext_cannot_parse_is_spoken(cv):
    """A digit right after "№" made wetext fail an assertion: a 500 for ordinary text."""
    body = {"tts_text": "Hello there. Room №7 is here.", "spk_id": "spk_f1", "seed": 1}
    r = httpx.post(f"{cv.base_url}/tts/pcm", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert_speech(decode_pcm(r.content), 24000, min_seconds=0.5)


def test_http_disconnect_frees_the_job(cv):
    assert_disconnect_frees_the_job(cv)


def prompt_wav(
    seconds: float = 3.0, rate: int = 24000, amplitude: float = 0.3, channels: int = 1
) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    x = amplitude * (np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.05 * rng.standard_normal(len(t)))
    frames = np.repeat(np.clip(x, -1, 1)[:, None], channels, axis=1)  # interleaved
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((frames * 32767).astype("<i2").tobytes())
    return buf.getvalue()


PROMPT_TEXT = "希望你以后能够做的比我还好呦。"


def register(srv: ServerProcess, spk_id: str, audio: bytes, text: str = PROMPT_TEXT):
    return httpx.post(
        f"{srv.base_url}/speakers",
        data={"spk_id": spk_id, "prompt_text": text},
        files={"prompt_wav": ("prompt.wav", audio, "audio/wav")},
        timeout=120,
    )


def test_a_model_dir_with_no_speakers_serves_once_one_is_registered(tmp_path):
    """The released CosyVoice2 and 3 dirs have no spk2info.pt: the server failed its warm-up
    (it took the first speaker), and an OpenAI voice, which stands for the first speaker, got
    a 500. Now it warms up on a silent speaker, says how to add one, and then speaks; so does
    `rtserver say` with no --spk (it asked for the built-in voice)."""
    bare = tmp_path / "model"
    bare.mkdir()
    for f in MODEL.iterdir():
        if f.name != "spk2info.pt":
            (bare / f.name).symlink_to(f)
    srv = ServerProcess("--model", str(bare), "--speaker-dir", str(tmp_path / "speakers"))
    try:
        srv.wait_ready(timeout=300)  # warm-up on
        assert httpx.get(f"{srv.base_url}/speakers").json() == []

        async def ready():
            async with TTSClient(srv.base_url) as client, client.connect() as conn:
                return conn.ready

        assert asyncio.run(ready()).sample_rate == 24000  # it was read off the first speaker
        speech = {"model": "tts-1", "input": "你好，今天天气很好。", "voice": "alloy"}
        refused = httpx.post(f"{srv.base_url}/v1/audio/speech", json=speech, timeout=60)
        assert refused.status_code == 400 and "POST /speakers" in refused.text, refused.text
        said = rtserver("say", "你好。", "--url", srv.base_url, "-o", str(tmp_path / "no.wav"))
        assert said.returncode == 1 and "no speakers yet" in said.stderr, said.stderr
        assert register(srv, "mine", prompt_wav()).status_code == 201
        said = rtserver(
            "say", "你好，今天天气很好。", "--url", srv.base_url, "-o", str(tmp_path / "hi.wav")
        )
        assert said.returncode == 0, said.stderr  # `say` spoke as joe, which it has not: 400
        with wave.open(str(tmp_path / "hi.wav")) as w:
            assert w.getframerate() == 24000
            assert_speech(decode_pcm(w.readframes(w.getnframes())), 24000, min_seconds=0.5)
        r = httpx.post(f"{srv.base_url}/v1/audio/speech", json=speech | {"response_format": "pcm"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        assert_speech(decode_pcm(r.content), 24000, min_seconds=0.5)
        srv.assert_idle()
    finally:
        srv.stop()


def test_register_speaker_survives_restart_and_can_be_deleted(tmp_path):
    spk_dir = tmp_path / "speakers"
    srv = start(spk_dir, "--no-warmup")
    try:
        r = register(srv, "my_voice", prompt_wav())
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "my_voice"
        assert register(srv, "my_voice", prompt_wav()).status_code == 409
        # A transcript is bounded before anything is normalized or decoded.
        r = register(srv, "long_voice", prompt_wav(), text="好" * 1001)
        assert r.status_code == 413 and r.json()["extra"]["code"] == "text_too_long", r.text
        for bad, why in [
            (b"definitely not audio", "audio"),
            (prompt_wav(seconds=0.3), "short"),
            (prompt_wav(amplitude=0.0), "silent"),
            (prompt_wav(seconds=1.0, rate=400_000), "rate"),
        ]:
            r = register(srv, "bad_voice", bad)
            assert r.status_code == 400, r.text
            assert why in r.json()["detail"].lower()
        # 8 channels (PyAV's planar decoding crashed the server on them) are mixed down
        assert register(srv, "surround", prompt_wav(channels=8)).status_code == 201
        # The form as the recording routes take it (those answered 200, this a 422 naming a
        # Python type): the transcript as a file part, and of two recordings the first.
        wav = ("prompt.wav", prompt_wav(), "audio/wav")
        files = [("prompt_text", ("t.txt", PROMPT_TEXT.encode(), "text/plain")),
                 ("prompt_wav", wav), ("prompt_wav", wav)]  # fmt: skip
        r = httpx.post(
            f"{srv.base_url}/speakers", data={"spk_id": "filed"}, files=files, timeout=120
        )
        assert r.status_code == 201 and r.json()["id"] == "filed", r.text
    finally:
        srv.stop()
    srv = start(spk_dir, "--no-warmup")
    try:
        ids = {s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()}
        assert {"my_voice", "surround"} <= ids and not {"bad_voice", "long_voice"} & ids
        body = {"tts_text": TEXT, "spk_id": "my_voice", "seed": 1}
        r = httpx.post(f"{srv.base_url}/tts/pcm", json=body, timeout=120)
        assert r.status_code == 200
        assert_speech(decode_pcm(r.content), 24000, min_seconds=1.0)
        assert httpx.delete(f"{srv.base_url}/speakers/my_voice").status_code == 204
        built_in = httpx.delete(f"{srv.base_url}/speakers/spk_f1")
        assert built_in.status_code == 400
        assert built_in.json()["detail"] == "'spk_f1' is a built-in speaker and cannot be deleted"
        unknown = httpx.delete(f"{srv.base_url}/speakers/my_voice")  # gone: no such resource
        assert unknown.status_code == 404 and "my_voice" in unknown.json()["detail"], unknown.text
        assert httpx.post(f"{srv.base_url}/tts/pcm", json=body).status_code == 400
    finally:
        srv.stop()


def test_a_speaker_folder_that_cannot_be_written_is_told_at_start_and_refuses_with_507(tmp_path):
    """A read-only model dir (the default speaker folder is inside it) answered a registration
    with a bare 500 after analysing the upload, and nothing said so at start-up. Here the
    folder's parent is a file, which stops a root process too."""
    (tmp_path / "file").write_text("")
    srv = start(tmp_path / "file" / "speakers", "--no-warmup")
    try:
        srv.wait_log("speakers cannot be registered or deleted here", 10)
        r = register(srv, "mine", prompt_wav())
        assert r.status_code == 507 and "cannot store speakers" in r.json()["detail"], r.text
        assert str(tmp_path) not in r.text  # the server's paths stay in its log
        srv.wait_log(re.escape(f"speaker store: speakers cannot be saved: {tmp_path / 'file'}"),
                     10)  # fmt: skip
        assert httpx.post(f"{srv.base_url}/tts/pcm", json={"tts_text": "你好。", "spk_id": "spk_f1"},
                          timeout=120).status_code == 200  # fmt: skip
        srv.assert_idle()
    finally:
        srv.stop()


def test_prompts_and_names_that_would_harm_are_refused(tmp_path):
    srv = start(tmp_path / "speakers", "--no-warmup")
    try:
        rss = rss_mb(srv.proc.pid)
        # An odd rate: torchaudio's kernel alone would take GBs (it is resampled via FFmpeg).
        assert register(srv, "odd_rate", prompt_wav(rate=16001)).status_code == 201
        assert rss_mb(srv.proc.pid) < rss + 500
        # Finite but huge float samples gave a NaN speaker that spoke only silence.
        huge = np.sin(np.arange(3 * 24000) / 10.0) * 1e37
        r = register(srv, "huge", encode("wav", "pcm_f32le", rate=24000, samples=huge))
        assert r.status_code == 400 and "range" in r.json()["detail"], r.text
        # "." and ".." are normalized away by clients (no way to delete them); invisible or
        # bidirectional characters make look-alike names.
        # A name not in composed form (NFC) sat beside the composed one, looking the same.
        # The answer says why.
        odd = ("e\u0301", "\u212b")  # é as e + accent; the Angstrom sign (NFC: Å)
        for name, why in (
            (".", "is . or .."),
            ("..", "is . or .."),
            (" pad", "white space"),
            ("a\u200bb", "invisible"),
            ("x\u202eevil", "invisible"),
            ("a\u2028b", "invisible"),
            ("a\x7fb", "control"),
            ("a/b", "without /"),
            ("b" * 500_000, "1 to 64"),
            *((o, "NFC") for o in odd),
        ):
            r = register(srv, name, prompt_wav())
            detail = r.json()["detail"]
            assert r.status_code == 400 and "name" in detail and why in detail, (name[:9], r.text)
            assert len(r.content) < 1000  # the name echoed in part (it was the whole 500 KB)
        # A header saying 1 Hz: refused for its rate (it said "too long": a second a sample).
        r = register(srv, "slow", prompt_wav(seconds=48_000, rate=1))
        assert r.status_code == 400 and "below 16000 Hz" in r.json()["detail"], r.text
        ids = {s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()}
        assert "odd_rate" in ids and "huge" not in ids
        # A speaker deleted while it speaks: the stream goes on in its voice to the end.
        body = {"tts_text": LONG[:200], "spk_id": "odd_rate", "seed": 2}
        failed = srv.healthz()["failed"]
        with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=120) as r:
            pieces = r.iter_bytes()
            audio = next(pieces)
            assert httpx.delete(f"{srv.base_url}/speakers/odd_rate").status_code == 204
            audio += b"".join(pieces)  # an early end would be an incomplete chunked body
        assert_speech(decode_pcm(audio), 24000, min_seconds=5.0)
        assert srv.healthz()["failed"] == failed
    finally:
        srv.stop()


SDP = b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 5004 RTP/AVP 0\n"


def udp_ports(pid: int) -> set[int]:
    """Local UDP ports of the process's sockets (from /proc: its fds' inodes)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    ports = set()
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_registrations_stop_at_max_speakers_and_a_deletion_makes_room(tmp_path):
    """Registered speakers stay in memory and on disk: anyone allowed to register could fill
    both. The golden dir has 3 built-in speakers; with --max-speakers 5 two more fit."""
    spk_dir = tmp_path / "speakers"
    srv = start(spk_dir, "--no-warmup", "--max-speakers", "5")
    try:
        assert register(srv, "one", prompt_wav()).status_code == 201

        async def two_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                return await asyncio.gather(*(
                    client.post("/speakers", data={"spk_id": name, "prompt_text": "你好。"},
                                files={"prompt_wav": ("p.wav", prompt_wav(), "audio/wav")})
                    for name in ("two", "three")
                ))  # fmt: skip

        # One slot left for two registrations in flight: exactly one gets it.
        codes = sorted(r.status_code for r in asyncio.run(two_at_once()))
        assert codes == [201, 409], codes
        full = register(srv, "four", prompt_wav())
        assert full.status_code == 409 and "at most 5 speakers" in full.json()["detail"]
        ids = {s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()}
        assert len(ids) == 5 and "four" not in ids, ids
        assert len(list(spk_dir.iterdir())) == 2  # nothing written for the refused ones
        assert httpx.delete(f"{srv.base_url}/speakers/one").status_code == 204
        assert register(srv, "four", prompt_wav()).status_code == 201
        srv.assert_idle()
    finally:
        srv.stop()


def test_uploads_are_whitelisted_and_one_name_registers_once(tmp_path):
    srv = start(tmp_path / "speakers", "--no-warmup")
    try:
        t0 = time.monotonic()
        r = register(srv, "sdp_voice", SDP)
        assert r.status_code == 400 and "wav, flac, mp3, ogg" in r.json()["detail"]
        assert time.monotonic() - t0 < 5  # refused unread, not after FFmpeg's 20 s wait
        assert udp_ports(srv.proc.pid) == set()

        async def four() -> list[int]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
                files = {"prompt_wav": ("p.wav", prompt_wav(), "audio/wav")}
                data = {"spk_id": "same", "prompt_text": "希望你以后能够做的比我还好呦。"}
                rs = await asyncio.gather(
                    *(c.post("/speakers", data=data, files=files) for _ in range(4))
                )
                return sorted(r.status_code for r in rs)

        assert asyncio.run(four()) == [201, 409, 409, 409]
        too_big = register(srv, "big_voice", b"RIFF" + b"\0" * (9 * 1024 * 1024))
        assert too_big.status_code == 413
    finally:
        srv.stop()


def test_four_registrations_at_once_from_one_client_all_register(tmp_path):
    """A backend registering its voices at once: two are analysed, the others wait their
    turn (before, they got 503 for want of a place)."""
    srv = start(tmp_path / "speakers", "--no-warmup")
    try:

        async def many(n: int, name: str = "voice") -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as c:
                files = {"prompt_wav": ("p.wav", prompt_wav(), "audio/wav")}
                return await asyncio.gather(*(
                    c.post("/speakers", files=files,
                           data={"spk_id": f"{name}{i}", "prompt_text": "你好。"})
                    for i in range(n)
                ))  # fmt: skip

        codes = [r.status_code for r in asyncio.run(many(4))]
        assert codes == [201] * 4, codes
        ids = {s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()}
        assert {f"voice{i}" for i in range(4)} <= ids
        # The wait is bounded: 2 analysed, 2 of one client's waiting, the others refused.
        answers = asyncio.run(many(10, "more"))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(201) >= 4 and set(codes) <= {201, 503}, codes
        assert codes.count(503) >= 1, codes
        srv.assert_idle()
    finally:
        srv.stop()


async def queued_while(srv: ServerProcess, asks: list[dict], meanwhile) -> list[httpx.Response]:
    """POST each of ``asks`` ({"url": ..., "json": ...}) behind a WebSocket context that
    holds the one slot; once all are queued, await ``meanwhile(client)``, free the slot and
    return the answers."""
    async with (
        websockets.connect(f"{srv.ws_url}/ws/tts", compression=None) as ws,
        httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c,
    ):
        await ws.recv()
        await ws.send(json.dumps({"type": "start", "context_id": "hold", "spk_id": "spk_f1"}))
        await ws.recv()  # started: the one slot is held, the others queue
        waiting = [asyncio.create_task(c.post(**ask)) for ask in asks]
        queued = await asyncio.to_thread(
            eventually, srv.healthz, lambda h: h["queued"] == len(asks)
        )
        assert queued["queued"] == len(asks), queued
        await meanwhile(c)
        await ws.send(json.dumps({"type": "cancel", "context_id": "hold"}))
        return await asyncio.gather(*waiting)


def test_requests_whose_speaker_is_deleted_while_they_wait_get_400(tmp_path):
    """Queued behind a full server while their speaker is deleted: each route answers 400
    naming the speaker, as for a speaker that never was. Before, /v1/audio/speech got 500,
    and with `instructions` it spoke in the deleted voice."""
    srv = start(tmp_path / "speakers", "--no-warmup", "--max-streams", "1")
    try:
        assert register(srv, "gone", prompt_wav()).status_code == 201
        speech = {"input": "你好。", "voice": "gone"}
        asks = [
            {"url": "/v1/audio/speech", "json": {**speech, "instructions": "用四川话说"}},
            {"url": "/v1/audio/speech", "json": speech},
            {"url": "/tts/pcm", "json": {"tts_text": "你好。", "spk_id": "gone"}},
            {"url": "/v1/audio/speech", "json": {**speech, "response_format": "wav"}},
        ]

        async def delete(c: httpx.AsyncClient) -> None:
            assert (await c.delete("/speakers/gone")).status_code == 204

        answers = asyncio.run(queued_while(srv, asks, delete))
        assert [r.status_code for r in answers] == [400] * 4, [r.text for r in answers]
        assert all("gone" in r.text for r in answers)
        srv.assert_idle()
    finally:
        srv.stop()


def test_a_context_whose_speaker_is_deleted_while_it_waits_ends_for_the_client(tmp_path):
    """A WebSocket context queued while its speaker is deleted ends with `unknown_speaker`,
    and the Python client's context ends with it (its events() waited forever: the code was
    not one that ends a context)."""
    srv = start(tmp_path / "speakers", "--no-warmup", "--max-streams", "1")
    try:
        assert register(srv, "brief", prompt_wav()).status_code == 201

        async def go() -> ServerError:
            async with TTSClient(srv.base_url) as client, client.connect() as conn:
                hold = await conn.start(spk_id="spk_f1")  # holds the one slot
                waits = await conn.start(spk_id="brief", text="你好。")
                await waits.close()
                await asyncio.to_thread(eventually, srv.healthz, lambda h: h["queued"] == 1)
                gone = await asyncio.to_thread(httpx.delete, f"{srv.base_url}/speakers/brief")
                assert gone.status_code == 204
                await hold.cancel()
                with pytest.raises(ServerError) as ended:
                    await asyncio.wait_for(waits.collect(), 60)
                return ended.value

        assert asyncio.run(go()).error.code == "unknown_speaker"
        srv.assert_idle()
    finally:
        srv.stop()


def test_a_steered_request_speaks_its_speaker_registered_anew_while_it_waits(tmp_path):
    """Queued while its speaker is deleted and registered again under the same name, a
    request with `instructions` speaks the new recording, as one without does (it spoke the
    deleted one)."""
    srv = start(tmp_path / "speakers", "--no-warmup", "--max-streams", "1")
    speech = {"input": "你好。", "voice": "anew", "instructions": "用四川话说",
              "response_format": "pcm", "seed": 5}  # fmt: skip

    def say() -> httpx.Response:
        return httpx.post(f"{srv.base_url}/v1/audio/speech", json=speech, timeout=120)

    async def anew(c: httpx.AsyncClient) -> None:
        assert (await c.delete("/speakers/anew")).status_code == 204
        again = await asyncio.to_thread(register, srv, "anew", prompt_wav(seconds=4.0))
        assert again.status_code == 201, again.text

    try:
        assert register(srv, "anew", prompt_wav()).status_code == 201
        old = say()
        [queued] = asyncio.run(
            queued_while(srv, [{"url": "/v1/audio/speech", "json": speech}], anew)
        )
        new = say()
        assert old.status_code == queued.status_code == new.status_code == 200, queued.text
        assert new.content != old.content
        assert_same_pcm(queued.content, new.content)
        srv.assert_idle()
    finally:
        srv.stop()


def test_a_text_streaming_turn_is_not_cut_while_it_speaks(tmp_path):
    """While another stream waits for the one slot, a context past its lease (2 s here)
    ends only at a pause. A text-streaming piece still taking text is spoken as the text
    comes, ahead of its listener: it is no pause (it was cut mid-speech, with no segment)."""
    srv = start(tmp_path / "speakers", "--no-warmup", "--max-streams", "1", "--slot-lease-s", "2")
    try:

        async def go() -> tuple[str, str]:
            async with (
                websockets.connect(f"{srv.ws_url}/ws/tts", compression=None) as agent,
                websockets.connect(f"{srv.ws_url}/ws/tts", compression=None) as other,
            ):
                for ws in (agent, other):
                    assert json.loads(await ws.recv())["slot_lease_s"] == 2
                start = {"type": "start", "spk_id": "spk_f1", "text_streaming": True}
                await agent.send(json.dumps({**start, "context_id": "a"}))
                await agent.send(json.dumps({"type": "text", "context_id": "a", "text": "我们"}))
                await other.send(json.dumps({**start, "context_id": "o", "text": "你好。"}))
                await other.send(json.dumps({"type": "close", "context_id": "o"}))
                for i in range(24):  # 6 s of text, faster than it is spoken
                    text = {"type": "text", "context_id": "a", "text": f"今天很好，第{i}个。"}
                    await agent.send(json.dumps(text))
                    await asyncio.sleep(0.25)
                await agent.send(json.dumps({"type": "close", "context_id": "a"}))
                ends = [await until(ws, "done", "error", "cancelled") for ws in (agent, other)]
                return tuple(e["type"] for e in ends)

        assert asyncio.run(asyncio.wait_for(go(), 120)) == ("done", "done")
        srv.assert_idle()
    finally:
        srv.stop()


def test_piper_engine_refuses_registration(server):
    r = register(server, "x", prompt_wav())
    assert r.status_code == 400 and "registration" in r.json()["detail"]
    r = prompted(server)
    assert r.status_code == 400 and "zero-shot" in r.json()["detail"], r.text


def prompted(srv: ServerProcess, mode: str = "zero_shot", method: str = "GET",
             audio: bytes | None = None, **fields: str) -> httpx.Response:  # fmt: skip
    """Upstream's client: GET (or POST) to /inference_MODE with a multipart body of the fields
    and `prompt_wav` (zero_shot: with its transcript)."""
    form = {"tts_text": TEXT, **fields}
    if mode == "zero_shot":
        form = {"prompt_text": PROMPT_TEXT, **form}
    files = {"prompt_wav": ("prompt.wav", prompt_wav() if audio is None else audio)}
    url = f"{srv.base_url}/inference_{mode}"
    return httpx.request(method, url, data=form, files=files, timeout=120)


def test_a_zero_shot_request_lets_its_upload_go_before_it_speaks(cv):
    """A recording past 1 MB is spooled to a temporary file: it stayed open until the whole
    stream had been sent (minutes for a long text)."""

    def temp_files() -> int:
        fds = Path(f"/proc/{cv.proc.pid}/fd")
        with contextlib.suppress(FileNotFoundError):  # an fd closed while listed
            return sum(os.readlink(fd).startswith(tempfile.gettempdir()) for fd in fds.iterdir())
        return temp_files()

    before = temp_files()
    form = {"tts_text": LONG * 4, "prompt_text": PROMPT_TEXT}  # 80 sentences: minutes of audio
    files = {"prompt_wav": ("prompt.wav", prompt_wav(seconds=25.0))}  # 1.2 MB
    url = f"{cv.base_url}/inference_zero_shot"
    with httpx.stream("POST", url, data=form, files=files, timeout=120) as r:
        assert r.status_code == 200  # speaking (the headers wait for the first audio)
        during = temp_files()
    assert during <= before, (before, during)  # (another test's may close meanwhile)
    cv.assert_idle()


def test_inference_zero_shot_speaks_as_the_speaker_registered_from_that_recording(cv):
    """The voice is the recording's: seed for seed, the same audio as the speaker registered
    from it; another recording speaks otherwise; nothing is kept."""
    listed = httpx.get(f"{cv.base_url}/speakers").json()
    r = prompted(cv, seed="7")
    assert r.status_code == 200, r.text
    assert r.headers["x-sample-rate"] == "24000"
    assert_speech(decode_pcm(r.content), 24000, min_seconds=1.0)
    assert httpx.get(f"{cv.base_url}/speakers").json() == listed
    assert_same_pcm(prompted(cv, method="POST", seed="7").content, r.content)
    assert prompted(cv, audio=prompt_wav(seconds=5.0, amplitude=0.5), seed="7").content != r.content
    assert register(cv, "zs_same", prompt_wav()).status_code == 201
    try:
        body = {"tts_text": TEXT, "spk_id": "zs_same", "seed": 7}
        same = httpx.post(f"{cv.base_url}/tts/pcm", json=body, timeout=120)
        assert_same_pcm(same.content, r.content)
        sft = httpx.post(f"{cv.base_url}/inference_sft",
                         data={"tts_text": TEXT, "spk_id": "zs_same", "seed": "7"}, timeout=120)  # fmt: skip
        assert_same_pcm(sft.content, r.content)
    finally:
        assert httpx.delete(f"{cv.base_url}/speakers/zs_same").status_code == 204
    cv.assert_idle()


def _calls(m: dict[str, float], stage: str, mode: str) -> float:
    return m[f"rtserver_engine_calls_total{{mode={mode},stage={stage}}}"]


STAGES = ("llm", "flow", "vocoder")


def test_metrics_say_how_each_stage_runs(cv, cv_speakers):
    """/metrics says whether each stage runs at CUDA graphs' static shapes and counts its calls
    by way. A CPU's default runs every call eagerly at its own shapes; --graphs on runs every
    call a bucket holds at the static shapes (replayed on a GPU, eagerly here), whole
    utterances and one-call streams too, and the audio is still speech."""
    before = scrape(cv)
    pcm(cv, seed=5)
    after = scrape(cv)
    for stage in STAGES:
        assert after[f"rtserver_engine_graphs{{stage={stage}}}"] == 0
        assert _calls(after, stage, "dynamic") > _calls(before, stage, "dynamic")
        assert _calls(after, stage, "static") == _calls(after, stage, "replayed") == 0
    srv = start(cv_speakers, "--graphs", "on", "--max-streams", "4")
    try:
        before = scrape(srv)
        for stream in (False, True):  # (a short reply's stream ends in its first flow call)
            audio = pcm(srv, "Hello there, this is a test.", stream=stream, seed=5)
            assert_speech(decode_pcm(audio), 24000, 0.5)
        srv.assert_idle()
        after = scrape(srv)
    finally:
        srv.stop()
    for stage in STAGES:
        assert after[f"rtserver_engine_graphs{{stage={stage}}}"] == 1
        assert _calls(after, stage, "static") > _calls(before, stage, "static")
        assert _calls(after, stage, "dynamic") == _calls(before, stage, "dynamic")
        assert _calls(after, stage, "replayed") == 0  # (no GPU: nothing captured)


def test_a_registered_speaker_starts_from_its_kept_prompt_at_once(cv):
    """Registering a speaker computes its prompt's part of the flow state (once it has
    answered): the first segment of its first stream copies it in too, as /metrics shows, and deleting the speaker frees
    it. (That the copy gives the audio a computed prompt does: test_flow_cache.py.)"""
    before = scrape(cv)
    voice = prompt_wav(seconds=4.0, amplitude=0.45)  # a recording no other test keeps
    assert register(cv, "kept_ahead", voice).status_code == 201
    try:  # kept in the background once the registration has answered
        more = before["rtserver_flow_prompts"] + 1
        kept = eventually(lambda: scrape(cv), lambda m: m["rtserver_flow_prompts"] == more, 60)
        assert kept["rtserver_flow_prompts"] == more
        assert kept["rtserver_flow_prompt_bytes"] > before["rtserver_flow_prompt_bytes"]
        body = {"tts_text": TEXT, "spk_id": "kept_ahead", "stream": True}
        r = httpx.post(f"{cv.base_url}/tts/pcm", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert_speech(decode_pcm(r.content), 24000, min_seconds=0.5)
        after = scrape(cv)
        hits, misses = "rtserver_flow_prompt_hits_total", "rtserver_flow_prompt_misses_total"
        assert after[hits] > kept[hits] and after[misses] == kept[misses]  # every segment
    finally:
        assert httpx.delete(f"{cv.base_url}/speakers/kept_ahead").status_code == 204
    gone = scrape(cv)  # deleted: what the flow kept of it goes too
    assert gone["rtserver_flow_prompts"] == before["rtserver_flow_prompts"]
    assert gone["rtserver_flow_prompt_bytes"] == before["rtserver_flow_prompt_bytes"]
    cv.assert_idle()


def test_a_speaker_registered_by_another_server_is_kept_here_too(cv, cv_speakers):
    """Two servers on one --speaker-dir (Ray replicas, servers on a shared volume): only the
    one that took a registration kept the prompt ahead, so the speaker's first stream on the
    other computed it. The other now finds it within seconds and keeps it as well."""
    other = start(cv_speakers)
    try:
        before = scrape(other)
        voice = prompt_wav(seconds=3.5, amplitude=0.4)  # a recording no other test keeps
        assert register(cv, "kept_elsewhere", voice).status_code == 201
        more = before["rtserver_flow_prompts"] + 1
        kept = eventually(lambda: scrape(other), lambda m: m["rtserver_flow_prompts"] == more, 60)
        assert kept["rtserver_flow_prompts"] == more
        assert (
            kept["rtserver_flow_prompt_misses_total"] == before["rtserver_flow_prompt_misses_total"]
        )
    finally:
        assert httpx.delete(f"{cv.base_url}/speakers/kept_elsewhere").status_code == 204
        other.stop()
    cv.assert_idle()


def test_shutdown_while_a_prompt_is_kept_exits_cleanly(tmp_path):
    """SIGTERM while a registered speaker's long prompt is kept in the background: the keep
    stops after its piece and the process exits 0 (a thread still in torch at exit aborted
    it with SIGABRT)."""
    srv = start(tmp_path / "speakers", "--no-warmup")
    try:
        assert register(srv, "long", prompt_wav(seconds=29.0)).status_code == 201
        time.sleep(0.5)  # into the keep (seconds of pieces for 29 s, even on the tiny model)
        srv.proc.terminate()
        assert srv.proc.wait(timeout=60) == 0, srv.log()
    finally:
        srv.stop()


def test_a_speaker_deleted_while_its_request_waits_gets_a_400(tmp_path):
    """A request accepted for a speaker that is deleted before the request gets a slot is
    answered 400 (unknown speaker), not a 500 with a traceback in the log."""
    srv = start(tmp_path / "speakers", "--no-warmup", "--max-streams", "1")
    try:
        assert register(srv, "brief", prompt_wav()).status_code == 201
        begin = {"type": "start", "context_id": "hog", "spk_id": "spk_f1", "text": "你好，"}

        async def hog_the_slot() -> httpx.Response:  # a context waiting for more text
            async with websockets.connect(f"{srv.ws_url}/ws/tts") as ws:
                await ws.recv()  # ready
                await ws.send(json.dumps(begin))
                with ThreadPoolExecutor(1) as pool:
                    waits = pool.submit(httpx.post, f"{srv.base_url}/tts/pcm", timeout=120,
                                        json={"tts_text": TEXT, "spk_id": "brief"})  # fmt: skip
                    await asyncio.to_thread(eventually, srv.healthz, lambda h: h["queued"] == 1, 30)
                    assert httpx.delete(f"{srv.base_url}/speakers/brief").status_code == 204
                return await asyncio.to_thread(waits.result)  # the idle context gives way

        r = asyncio.run(hog_the_slot())
        assert r.status_code == 400 and "brief" in r.text, r.text
        assert "failed to start" not in srv.log()
        srv.assert_idle()
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "fields, audio, status, says",
    [
        ({}, b"definitely not audio", 400, "audio"),
        ({}, prompt_wav(seconds=0.3), 400, "short"),
        ({"prompt_text": "好" * 1001}, None, 413, "prompt_text"),
        ({"prompt_text": ""}, None, 422, "prompt_text"),
        ({"tts_text": "   "}, None, 422, "tts_text"),
        ({"tts_text": "好" * 5001}, None, 413, "tts_text"),
        ({"seed": "-1"}, None, 422, "seed"),
        ({}, b"RIFF" + b"\0" * (9 * 1024 * 1024), 413, "over 8 MiB"),
    ],
)
def test_inference_zero_shot_refuses_bad_input_and_holds_nothing(cv, fields, audio, status, says):
    r = prompted(cv, audio=audio, **fields)
    assert r.status_code == status and says in r.text, r.text
    cv.assert_idle()


def test_cross_lingual_and_instruct2_prompt_the_llm_otherwise(cv):
    """Seed for seed, zero-shot, cross-lingual (no prompt for the LLM) and instruct2 (the
    instruction instead) each speak otherwise; each is reproducible."""
    zs = prompted(cv, seed="7")
    cl = prompted(cv, "cross_lingual", seed="7")
    ins = prompted(cv, "instruct2", instruct_text="用四川话说这句话", seed="7")
    for r in (cl, ins):
        assert r.status_code == 200 and r.headers["x-sample-rate"] == "24000", r.text
        assert_speech(decode_pcm(r.content), 24000, min_seconds=0.5)
    assert len({zs.content, cl.content, ins.content}) == 3
    again = prompted(cv, "instruct2", "POST", instruct_text="用四川话说这句话", seed="7")
    assert_same_pcm(again.content, ins.content)
    missing = prompted(cv, "instruct2")
    assert missing.status_code == 422 and "instruct_text" in missing.text, missing.text
    cv.assert_idle()


def test_openai_instructions_steer_cosyvoice2(cv):
    speech = {"model": "gpt-4o-mini-tts", "input": TEXT, "voice": "spk_f1",
              "response_format": "pcm", "seed": 5}  # fmt: skip

    def say(**more) -> bytes:
        r = httpx.post(f"{cv.base_url}/v1/audio/speech", json=speech | more, timeout=120)
        assert r.status_code == 200, r.text
        return r.content

    plain, steered = say(), say(instructions="用四川话说这句话")
    assert steered != plain
    assert_same_pcm(say(instructions="用四川话说这句话"), steered)
    assert_same_pcm(say(instructions="  "), plain)
    long = httpx.post(f"{cv.base_url}/v1/audio/speech", json=speech | {"instructions": "快" * 1001})
    assert long.status_code == 400 and long.json()["error"]["code"] == "text_too_long", long.text
    # the same through /tts/pcm; a WebSocket context (segmented otherwise) is steered too
    body = {"tts_text": TEXT, "spk_id": "spk_f1", "stream": True, "seed": 5,
            "instructions": "用四川话说这句话"}  # fmt: skip
    assert_same_pcm(httpx.post(f"{cv.base_url}/tts/pcm", json=body, timeout=120).content, steered)

    async def ws(instructions: str | None) -> tuple[bytes, str | None]:
        async with TTSClient(cv.base_url) as client, client.connect() as conn:
            try:
                ctx = await conn.start(spk_id="spk_f1", seed=5, text=TEXT,
                                       instructions=instructions)  # fmt: skip
            except ServerError as e:
                return b"", e.error.code
            await ctx.close()
            return (await ctx.collect()).audio, None

    ws_plain, _ = asyncio.run(asyncio.wait_for(ws(None), 120))
    ws_steered, _ = asyncio.run(asyncio.wait_for(ws("用四川话说这句话"), 120))
    assert ws_steered != ws_plain
    assert_same_pcm(asyncio.run(asyncio.wait_for(ws("用四川话说这句话"), 120))[0], ws_steered)
    assert asyncio.run(asyncio.wait_for(ws("快" * 1001), 60)) == (b"", "text_too_long")
    cv.assert_idle()


def test_inference_zero_shot_needs_the_recording_and_head_starts_nothing(cv):
    url = f"{cv.base_url}/inference_zero_shot"
    r = httpx.post(url, data={"tts_text": TEXT, "prompt_text": PROMPT_TEXT}, timeout=60)
    assert r.status_code == 422 and "prompt_wav" in r.text, r.text
    assert httpx.head(url).status_code == 405
    cv.assert_idle()


@pytest.mark.parametrize("family, rate", [("cosyvoice1", 22050), ("cosyvoice3", 24000)])
def test_other_families_serve_http_and_ws(tmp_path, family, rate):
    model = GOLDEN / family / "model"
    srv = ServerProcess("--model", str(model), "--speaker-dir", str(tmp_path), "--no-warmup")
    try:
        srv.wait_ready()
        speakers = httpx.get(f"{srv.base_url}/speakers").json()
        assert {s["sample_rate"] for s in speakers} == {rate}
        assert {s["instructions"] for s in speakers} == {family == "cosyvoice3"}
        body = {"tts_text": TEXT, "spk_id": "spk_f1", "stream": True, "seed": 2}
        r = httpx.post(f"{srv.base_url}/tts/pcm", json=body, timeout=120)
        assert r.status_code == 200 and r.headers["x-sample-rate"] == str(rate)
        assert_speech(decode_pcm(r.content), rate, min_seconds=0.3)

        async def ws():
            async with TTSClient(srv.base_url) as client, client.connect() as conn:
                ctx = await conn.start(spk_id="spk_m1", text=TEXT)
                await ctx.close()
                return await ctx.collect(), ctx.sample_rate

        result, ws_rate = asyncio.run(asyncio.wait_for(ws(), 120))
        assert ws_rate == rate and result.done is not None
        assert_speech(decode_pcm(result.audio), rate, min_seconds=0.3)
        # instruct2 is CosyVoice2/3's; OpenAI's `instructions` are ignored where there is none
        r = prompted(srv, "instruct2", instruct_text="用四川话说这句话")
        if family == "cosyvoice1":
            assert r.status_code == 400 and "CosyVoice2" in r.text, r.text
        else:
            assert r.status_code == 200, r.text
            assert_speech(decode_pcm(r.content), rate, min_seconds=0.3)
        speech = {"input": TEXT, "voice": "spk_f1", "instructions": "用四川话说这句话"}
        r = httpx.post(f"{srv.base_url}/v1/audio/speech", json=speech, timeout=120)
        assert r.status_code == 200, r.text
        # upstream's v1 instruct route is CosyVoice-300M-Instruct's: a plain v1 dir refuses it
        instruct = {"tts_text": TEXT, "spk_id": "spk_f1", "instruct_text": "Speak slowly."}
        r = httpx.post(f"{srv.base_url}/inference_instruct", data=instruct, timeout=120)
        if family == "cosyvoice1":
            assert r.status_code == 400 and "300M-Instruct" in r.text, r.text
        else:
            assert r.status_code == 200, r.text
        srv.assert_idle()
    finally:
        srv.stop()


def instruct(srv: ServerProcess, method: str = "GET", **fields) -> httpx.Response:
    """Upstream's client to /inference_instruct: a form body, GET or POST."""
    form = {"tts_text": TEXT, "spk_id": "spk_f1", "instruct_text": CHARACTER, "seed": "3"}
    url = f"{srv.base_url}/inference_instruct"
    return httpx.request(method, url, data=form | fields, timeout=120)


CHARACTER = "Theo, a fiery rebel leader, fights with fervor for justice."


def test_v1_instruct_model_speaks_instructions_on_every_route(tmp_path):
    """CosyVoice-300M-Instruct (the golden v1 dir under that name, as upstream tells it):
    /inference_instruct speaks otherwise than /inference_sft seed for seed, reproducibly, GET
    as POST, and as /tts/pcm and OpenAI's route with `instructions`; bad forms get a 4xx."""
    named = tmp_path / "CosyVoice-300M-Instruct"
    named.symlink_to(GOLDEN / "cosyvoice1" / "model")
    srv = ServerProcess("--model", str(named), "--speaker-dir", str(tmp_path / "spk"),
                        "--no-warmup").wait_ready()  # fmt: skip
    try:
        assert all(s["instructions"] for s in httpx.get(f"{srv.base_url}/speakers").json())
        steered = instruct(srv)
        assert steered.status_code == 200 and steered.headers["x-sample-rate"] == "22050"
        assert_speech(decode_pcm(steered.content), 22050, min_seconds=0.3)
        sft = httpx.post(f"{srv.base_url}/inference_sft", timeout=120,
                         data={"tts_text": TEXT, "spk_id": "spk_f1", "seed": "3"})  # fmt: skip
        assert sft.status_code == 200 and sft.content != steered.content
        assert_same_pcm(instruct(srv, "POST").content, steered.content)
        assert instruct(srv, instruct_text="Speak like a child.").content != steered.content
        body = {"tts_text": TEXT, "spk_id": "spk_f1", "seed": 3, "instructions": CHARACTER}
        r = httpx.post(f"{srv.base_url}/tts/pcm", json=body, timeout=120)
        assert_same_pcm(r.content, steered.content)
        speech = {"input": TEXT, "voice": "spk_f1", "seed": 3, "response_format": "pcm"}
        plain, steered_too = (
            httpx.post(f"{srv.base_url}/v1/audio/speech", json=speech | more, timeout=120)
            for more in ({}, {"instructions": CHARACTER})
        )
        assert plain.status_code == steered_too.status_code == 200
        assert steered_too.content != plain.content
        for fields, status, says in [
            ({"instruct_text": ""}, 422, "instruct_text"),
            ({"instruct_text": "   "}, 400, "blank"),
            ({"instruct_text": "快" * 1001}, 413, "instruct_text has 1001"),
            ({"spk_id": "nobody"}, 400, "nobody"),
            ({"seed": "-1"}, 422, "seed"),
        ]:
            r = instruct(srv, "POST", **fields)
            assert r.status_code == status and says in r.text, (fields, r.text)
        assert httpx.head(f"{srv.base_url}/inference_instruct").status_code == 405
        srv.assert_idle()
    finally:
        srv.stop()


def test_inference_instruct_on_cosyvoice2_steers_a_speaker_as_instructions_do(cv):
    r = instruct(cv, instruct_text="用四川话说这句话")
    assert r.status_code == 200, r.text
    body = {"tts_text": TEXT, "spk_id": "spk_f1", "seed": 3, "instructions": "用四川话说这句话"}
    assert_same_pcm(httpx.post(f"{cv.base_url}/tts/pcm", json=body, timeout=120).content,
                    r.content)  # fmt: skip
    cv.assert_idle()


def hooked(speaker_dir: Path, **hooks: str) -> ServerProcess:
    """A server with tests/server_hooks' ``hooks`` (RTSERVER_TEST_* variables) on."""
    path = [str(Path(__file__).resolve().parent / "server_hooks"), os.environ.get("PYTHONPATH")]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, path)), **hooks}
    return start(speaker_dir, "--no-warmup", env=env)


def test_a_segment_truncated_at_the_llms_length_cap_says_so(cv, tmp_path):
    """A segment whose speech ends at a limit of the model (here the LLM's length cap,
    lowered to 1 speech token per text token, below its minimum of 2: every segment reaches
    it) is spoken up to there: its `segment` event says `truncated`, and the server counts it.
    The same turn on a server with the model's own cap is not truncated."""
    short = hooked(tmp_path, RTSERVER_TEST_TOKEN_TEXT_RATIO="1")
    sentences = ["你好，今天天气很好。", "我们去公园散步吧。"]
    metric = "rtserver_segments_truncated_total"

    async def turn(srv: ServerProcess):
        async with TTSClient(srv.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="spk_f1", seed=5)
            for s in sentences:
                await ctx.send(s)
            await ctx.close()
            return await ctx.collect()

    try:
        counted = scrape(short)[metric]
        cut, whole = (asyncio.run(asyncio.wait_for(turn(s), 120)) for s in (short, cv))
        assert [s.text for s in cut.segments] == [s.text for s in whole.segments] == sentences
        assert [s.truncated for s in cut.segments] == [True, True]
        assert [s.truncated for s in whole.segments] == [False, False]
        assert 0 < len(cut.audio) < len(whole.audio)
        assert_speech(decode_pcm(cut.audio), 24000, min_seconds=0.1)
        assert scrape(short)[metric] == counted + 2
        r = httpx.post(f"{short.base_url}/tts/pcm", json={"tts_text": TEXT, "spk_id": "spk_f1"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200 and len(r.content) > 0
        assert scrape(short)[metric] > counted + 2
        assert "truncated at a limit of the model" in short.log()
        short.assert_idle()
    finally:
        short.stop()


def test_deletes_of_one_speaker_at_once_leave_one_204_and_404s(tmp_path):
    """Eight DELETEs of one registered speaker sent together, each deletion held up a moment
    on its way to the store so that all pass the route's check: those beaten to the store by
    another get 404 as for a speaker that is gone, not 400 (a speaker that cannot be deleted)
    or 500."""
    srv = hooked(tmp_path, RTSERVER_TEST_DELETE_DELAY_S="0.2")

    async def deletes() -> list[int]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c:
            rs = await asyncio.gather(*(c.delete("/speakers/racer") for _ in range(8)))
            return sorted(r.status_code for r in rs)

    try:
        for _ in range(2):
            assert register(srv, "racer", prompt_wav()).status_code == 201
            assert asyncio.run(deletes()) == [204] + [404] * 7
            assert "racer" not in {s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()}
        srv.assert_idle()
    finally:
        srv.stop()
