"""/ws/tts against a real server with real `websockets` clients."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import websockets
from audio_check import assert_speech, decode_audio, decode_mp3, decode_pcm
from serverproc import rss_mb

from rtserver.audio import make_encoder
from rtserver.client import ServerError, TTSClient

TEXT = (
    "Voice agents stream their replies a few words at a time. The server buffers the words, "
    "cuts them into sentences, and speaks each sentence as soon as it is complete. When the "
    "user interrupts, the agent cancels, and the audio stops at once."
)
LONG = " ".join([TEXT] * 6)
TURN = "Hello there, this is the whole turn."


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def speak(base_url: str, text: str, word_by_word: bool, fmt: str = "pcm"):
    async with TTSClient(base_url) as client, client.connect() as conn:
        ctx = await conn.start(spk_id="joe", format=fmt)
        if word_by_word:
            for word in text.split(" "):
                await ctx.send(word + " ")
        else:
            await ctx.send(text)
        await ctx.close()
        return await ctx.collect(), ctx.sample_rate


def words(text: str) -> list[str]:
    return text.split()


def test_word_by_word_matches_one_piece(server):
    pieces, rate = run(speak(server.base_url, TEXT, word_by_word=True))
    whole, _ = run(speak(server.base_url, TEXT, word_by_word=False))
    a, b = decode_pcm(pieces.audio), decode_pcm(whole.audio)
    assert_speech(a, rate, min_seconds=8.0)
    assert abs(len(a) - len(b)) / len(b) < 0.15, (len(a), len(b))
    # Segment events cover all the text, in order, and tile the audio.
    assert words(" ".join(s.text for s in pieces.segments)) == words(TEXT)
    assert len(pieces.segments) >= 3
    assert pieces.segments[0].start_ms == 0
    for prev, nxt in zip(pieces.segments, pieces.segments[1:], strict=False):
        assert nxt.start_ms == pytest.approx(prev.end_ms, abs=0.2)
    assert pieces.segments[-1].end_ms == pytest.approx(len(a) * 1000 / rate, abs=1)
    done = pieces.done
    assert done and done.segments == len(pieces.segments)
    assert done.audio_ms == pytest.approx(len(a) * 1000 / rate, abs=1)
    assert done.ttfa_ms is not None and done.ttfa_ms > 0 and 0 < done.rtf < 1


def test_word_timings_arrive_in_order_before_their_segment(server):
    """`timestamps: true`: a `words` event per segment, before its `segment`, covering its
    words in order within its speech, with the pauses at punctuation where the audio has
    them."""
    text = "Hello there, my friend. This is the second sentence of one flush."

    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", timestamps=True, text=text)
            await ctx.close()
            return await ctx.collect(), ctx.sample_rate

    result, rate = run(go())
    kinds = [type(e).__name__ for e in result.events]
    assert kinds.count("Words") == len(result.segments) >= 1
    for i, kind in enumerate(kinds):
        if kind == "Words":
            assert (
                kinds[i + 1] == "Segment" and result.events[i].index == result.events[i + 1].index
            )
    assert [w.word for w in result.words] == text.split()
    times = [(w.start_ms, w.end_ms) for w in result.words]
    assert all(s < e for s, e in times)
    assert all(a[1] <= b[0] for a, b in zip(times, times[1:], strict=False))
    audio = decode_pcm(result.audio)
    assert result.words[-1].end_ms <= len(audio) * 1000 / rate + 1
    # The first word starts where speech starts (not at the leading silence).
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    assert abs(result.words[0].start_ms - loud[0] * 1000 / rate) < 30
    # The longest pause inside the speech (after a comma or a sentence end) falls in one of
    # the estimated gaps between words, give or take 250 ms.
    gaps = np.diff(loud)
    k = int(np.argmax(gaps))
    pause_ms = (loud[k] + loud[k + 1]) / 2 * 1000 / rate
    pairs = list(zip(result.words, result.words[1:], strict=False))
    miss, (before, _) = min(
        (max(0.0, a.end_ms - pause_ms, pause_ms - b.start_ms), (a, b)) for a, b in pairs
    )
    assert miss < 250 and not before.word[-1].isalnum(), (pause_ms, before, miss)
    # Uncalled-for words: none without timestamps.
    plain, _ = run(speak(server.base_url, "Hello there.", word_by_word=False))
    assert not plain.words


def test_mp3_context_and_resampling(server):
    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            mp3 = await conn.start(spk_id="joe", format="mp3", text=TEXT)
            pcm = await conn.start(spk_id="joe", format="pcm", sample_rate=16000, text=TEXT)
            await mp3.close()
            await pcm.close()
            return await mp3.collect(), await pcm.collect(), pcm.sample_rate

    mp3, pcm, rate = run(go())
    assert rate == 16000
    audio, mp3_rate = decode_mp3(mp3.audio)
    assert mp3_rate == 22050
    assert_speech(audio, mp3_rate, min_seconds=8.0)
    assert_speech(decode_pcm(pcm.audio), 16000, min_seconds=8.0)


@pytest.mark.parametrize("fmt", ["mulaw", "alaw"])
def test_telephony_contexts_speak_g711_at_8khz(server, fmt):
    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", format=fmt, text=TEXT)
            await ctx.close()
            return await ctx.collect(), ctx.sample_rate

    result, rate = run(go())
    assert rate == 8000
    assert len(result.audio) / rate > 8.0  # one byte per sample
    assert_speech(decode_audio(result.audio, fmt)[0], 8000, min_seconds=8.0)


@pytest.mark.parametrize("n", [2, 5])
def test_interleaved_contexts_each_get_their_audio(server, n):
    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctxs = [await conn.start(spk_id="joe", context_id=f"c{i}") for i in range(n)]
            streams = {ctx.started.stream for ctx in ctxs}
            assert len(streams) == n
            # Interleave word by word across contexts, with a different text per context.
            texts = [f"This is context number {i}. " + TEXT for i in range(n)]
            split = [t.split(" ") for t in texts]
            for k in range(max(map(len, split))):
                for ctx, ws in zip(ctxs, split, strict=True):
                    if k < len(ws):
                        await ctx.send(ws[k] + " ")
            for ctx in ctxs:
                await ctx.close()
            return await asyncio.gather(*(c.collect() for c in ctxs)), texts

    results, texts = run(go())
    for result, text in zip(results, texts, strict=True):
        assert result.done is not None
        assert_speech(decode_pcm(result.audio), 22050, min_seconds=8.0)
        assert words(" ".join(s.text for s in result.segments)) == words(text)


def test_cancel_mid_utterance(server):
    async def go():
        async with websockets.connect(f"{server.ws_url}/ws/tts", compression=None) as ws:
            json.loads(await ws.recv())  # ready
            await ws.send(
                json.dumps({"type": "start", "context_id": "a", "spk_id": "joe", "text": LONG})
            )  # not closed: the context holds its job until the cancel, however fast it speaks
            started = json.loads(await ws.recv())
            stream = started["stream"]
            while not isinstance(frame := await ws.recv(), bytes):
                pass
            assert struct.unpack_from("<I", frame)[0] == stream
            assert server.healthz()["active"] == 1
            await ws.send(json.dumps({"type": "cancel", "context_id": "a"}))
            t0 = time.monotonic()
            while True:
                frame = await ws.recv()
                if isinstance(frame, str) and json.loads(frame)["type"] == "cancelled":
                    break
            ack_s = time.monotonic() - t0
            health = server.healthz()
            # Nothing of context a after the ack, while a new context on the socket works.
            await ws.send(json.dumps({"type": "start", "context_id": "b", "spk_id": "joe",
                                      "text": "A fresh start after the interruption."}))  # fmt: skip
            await ws.send(json.dumps({"type": "close", "context_id": "b"}))
            audio_b = b""
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    assert struct.unpack_from("<I", frame)[0] != stream, "audio after cancelled"
                    audio_b += frame[4:]
                elif json.loads(frame)["type"] == "done":
                    break
            return ack_s, health, audio_b

    before = server.wait_idle()
    ack_s, health, audio_b = run(go())
    assert health["active"] == 0, health
    assert health["cancelled"] == before["cancelled"] + 1
    assert ack_s < 5
    assert_speech(decode_pcm(audio_b), 22050, min_seconds=1.0)


def test_flush_is_acknowledged_after_its_audio(server):
    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe")
            await ctx.send("Half a sentence without an end", flush=True)
            seen: list[str] = []
            async for item in ctx.events():
                if isinstance(item, bytes):
                    seen.append("audio")
                else:
                    seen.append(type(item).__name__)
                    if seen[-1] == "Flushed":
                        break
            await ctx.cancel()
            return seen

    seen = run(go())
    assert seen.index("audio") < seen.index("Segment") < seen.index("Flushed")


def test_flushes_waiting_for_their_audio_are_bounded(server):
    """A client flushing as fast as it can while its audio is still to come: each flush was
    kept until its `flushed` (a million of them while a context waited for a slot). Past 256
    waiting, a flush that adds no text gets `too_many_flushes` and is dropped; one with text
    (an agent flushing each sentence) is kept. The kept ones are answered in order, and the
    context goes on to its end."""

    async def go():
        async with websockets.connect(f"{server.ws_url}/ws/tts", compression=None) as ws:
            await ws.recv()  # ready
            await ws.send(json.dumps({"type": "start", "context_id": "f", "spk_id": "joe"}))
            await ws.send(json.dumps({"type": "text", "context_id": "f", "text": LONG}))
            for _ in range(300):
                await ws.send(json.dumps({"type": "flush", "context_id": "f"}))
            more = {"type": "text", "context_id": "f", "text": "And one more.", "flush": True}
            await ws.send(json.dumps(more))
            await ws.send(json.dumps({"type": "close", "context_id": "f"}))
            events = []
            while not events or events[-1]["type"] != "done":
                if isinstance(msg := await ws.recv(), str):
                    events.append(json.loads(msg))
            return events

    events = run(go())
    refused = [e for e in events if e["type"] == "error"]
    acked = [e["flush_id"] for e in events if e["type"] == "flushed"]
    assert {e["code"] for e in refused} == {"too_many_flushes"}, refused[:3]
    assert acked == list(range(1, 258)) and len(refused) == 300 - 256
    server.assert_idle()


async def one_turn(base_url: str, fmt: str, text: str, flush_late: bool = False):
    """A context's audio for `text` and a flush (with the text, or once its segment is
    spoken), then a close: what had come at `flushed`, everything, and the last segment."""
    async with TTSClient(base_url) as client, client.connect() as conn:
        ctx = await conn.start(spk_id="joe", format=fmt)
        await ctx.send(text, flush=not flush_late)
        got, at_flushed, segment = b"", b"", None
        async for item in ctx.events():
            if isinstance(item, bytes):
                got += item
            elif type(item).__name__ == "Segment":
                segment = item
                if flush_late:
                    await ctx.flush()
            elif type(item).__name__ == "Flushed":
                at_flushed = got
                await ctx.close()
        return at_flushed, got, segment


@pytest.mark.parametrize("fmt", ["mp3", "aac", "opus", "flac"])
def test_flushed_comes_after_all_of_its_audio_in_coded_formats(server, fmt):
    """Codecs hold audio back (a frame, a lookahead, an Ogg page): at `flushed`, what came is
    decodable to the segment's end, and what comes after it (the close) has none of it."""
    at_flushed, whole, segment = run(one_turn(server.base_url, fmt, TURN))
    early, rate = decode_audio(at_flushed)
    late = decode_audio(whole)[0][len(early) :]
    assert len(early) / rate * 1000 >= segment.end_ms - 0.05  # (end_ms: rounded to 0.1)
    assert not len(late) or np.abs(late).max() < 1e-3  # -60 dBFS: silence, not speech


def test_a_flush_after_its_text_is_spoken_still_sends_all_its_audio(server):
    """A paragraph break lets the text go at once; the flush that comes after its audio
    finds nothing new to say, and drains the encoder then (before: the tail waited for the
    next turn)."""
    at_flushed, _, segment = run(one_turn(server.base_url, "mp3", TURN + "\n\n", True))
    early, rate = decode_audio(at_flushed)
    assert len(early) / rate * 1000 >= segment.end_ms - 0.05  # (end_ms: rounded to 0.1)


@pytest.mark.parametrize("fmt", ["pcm", "mp3", "aac", "opus", "flac", "mulaw"])
def test_a_finished_encoder_has_nothing_to_drain(fmt):
    """A flush racing a context the server ends drains an encoder already finished: nothing
    comes of it (Opus raised from its closed codec)."""
    encoder = make_encoder(fmt, 22050)
    tone = 0.3 * np.sin(np.arange(5000, dtype=np.float32) / 10)
    assert encoder.encode(tone) + encoder.finish()
    assert encoder.drain() == (b"", 0)


def test_a_context_that_times_out_sends_its_audio_before_the_error(make_server):
    """Text let go without a flush, then nothing: the context ends on `context_timeout`, and
    the audio the encoder held back comes before the error (before: it was dropped)."""
    srv = make_server("--context-idle-timeout-s", "1", "--no-warmup")

    async def go():
        async with TTSClient(srv.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", format="mp3")
            await ctx.send(TURN + "\n\n")
            got, segments = b"", []
            async for item in ctx.events():
                if isinstance(item, bytes):
                    got += item
                elif type(item).__name__ == "Segment":
                    segments.append(item)
            return got, segments, ctx.ending

    audio, segments, ending = run(go())
    assert ending.code == "context_timeout", ending
    decoded, rate = decode_audio(audio)
    assert segments and len(decoded) / rate * 1000 >= segments[-1].end_ms - 0.05


def test_sentences_between_flushes_get_no_drain_silence(server):
    """Only a flush's last segment is drained: a sentence spoken before the next arrives (an
    LLM slower than speech) is followed by the next one's audio, with no silence between."""

    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", format="mp3")
            await ctx.send("The first sentence is here. The")
            segments = []
            async for item in ctx.events():
                if type(item).__name__ == "Segment":
                    segments.append(item)
                    if len(segments) == 1:
                        await ctx.send(" second one follows it.", flush=True)
                elif type(item).__name__ == "Flushed":
                    await ctx.close()
            return segments

    first, second = run(go())[:2]
    assert second.start_ms == first.end_ms


def test_idle_text_is_flushed_automatically(server):
    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe")
            await ctx.send("No punctuation and no flush")
            async for item in ctx.events():
                if not isinstance(item, bytes) and type(item).__name__ == "Segment":
                    await ctx.cancel()
                    return item.text

    assert run(go()) == "No punctuation and no flush"


# ---- malformed input ----------------------------------------------------------------------


async def expect_error(ws, code: str) -> dict:
    while True:
        msg = await ws.recv()
        if isinstance(msg, str) and (event := json.loads(msg))["type"] == "error":
            assert event["code"] == code, event
            assert event["message"]
            return event


async def still_open(ws) -> None:
    await ws.send(json.dumps({"type": "ping"}))
    while json.loads(await ws.recv())["type"] != "pong":
        pass


def test_malformed_input_gets_error_events_and_socket_survives(server):
    async def go():
        async with websockets.connect(f"{server.ws_url}/ws/tts", compression=None) as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready" and "joe" in ready["speakers"]
            # (frame, code, the context_id the error names: a refused start's, as with an
            # unknown speaker; it was null for an ill-typed start)
            cases = [
                ("{oops", "invalid_json", None),
                # half an emoji, as JavaScript's JSON.stringify sends a string cut inside one,
                # is dropped and the message goes on (it was invalid_json for no context)
                ('{"type": "text", "context_id": "y", "text": "ab \\ud83d", "flush": true}', "unknown_context", "y"),
                # ... and the rest of the frame is read as sent: a number out of range stays one,
                # an escaped backslash before "ud83d" is not an escape (the mend wrote 1e999
                # back as Infinity: invalid_json, no context)
                ('{"type": "start", "context_id": "z", "spk_id": "joe", "speed": 1e999, "text": "hi \\ud83d"}', "invalid_message", "z"),
                ('{"type": "text", "context_id": "w", "text": "\\\\ud83d \\udc00 \\ud83d\\ude00", "flush": true}', "unknown_context", "w"),
                (json.dumps({"type": "bogus"}), "invalid_message", None),
                (json.dumps({"type": "start", "spk_id": "joe"}), "invalid_message", None),
                (json.dumps({"type": "start", "context_id": "x", "spk_id": "joe", "speed": 0}), "invalid_message", "x"),
                (json.dumps({"type": "text", "context_id": "nope", "text": "hi"}), "unknown_context", "nope"),
                (json.dumps({"type": "start", "context_id": "x", "spk_id": "nobody"}), "unknown_speaker", "x"),
                (json.dumps({"type": "text", "context_id": "x", "text": "a" * (ready["max_message_bytes"] + 10)}), "message_too_large", "x"),
            ]  # fmt: skip
            for frame, code, context_id in cases:
                await ws.send(frame)
                event = await expect_error(ws, code)
                assert event["context_id"] == context_id, (frame[:80], event)
                await still_open(ws)
            await ws.send(b"\x00\x01binary")
            await expect_error(ws, "binary_not_accepted")
            await still_open(ws)
            # Too many contexts: the limit from `ready`, then one more.
            for i in range(ready["max_contexts"]):
                await ws.send(json.dumps({"type": "start", "context_id": f"k{i}", "spk_id": "joe"}))
            await ws.send(json.dumps({"type": "start", "context_id": "extra", "spk_id": "joe"}))
            event = await expect_error(ws, "too_many_contexts")
            assert event["context_id"] == "extra"
            await ws.send(json.dumps({"type": "start", "context_id": "k0", "spk_id": "joe"}))
            await expect_error(ws, "duplicate_context")
            await ws.send(json.dumps({"type": "close", "context_id": "k1"}))
            await ws.send(json.dumps({"type": "text", "context_id": "k1", "text": "late"}))
            await expect_error(ws, "context_closed")
            await still_open(ws)

    run(go())
    server.assert_idle()  # the socket closed: its contexts were dropped


def test_barge_in_at_the_context_limit_starts_the_new_context(server):
    """A socket with every context open cancels one and starts another in the same breath
    (barge-in): the new one starts once the cancelled one has ended, not refused; so does a
    start that reuses the cancelled context's id."""

    async def go():
        async with websockets.connect(f"{server.ws_url}/ws/tts", compression=None) as ws:
            ready = json.loads(await ws.recv())
            n = ready["max_contexts"]
            for i in range(n):
                await ws.send(json.dumps({"type": "start", "context_id": f"k{i}",
                                          "spk_id": "joe", "text": LONG}))  # fmt: skip
            await ws.send(json.dumps({"type": "cancel", "context_id": "k0"}))
            await ws.send(json.dumps({"type": "start", "context_id": "new", "spk_id": "joe",
                                      "text": "Sorry, go on."}))  # fmt: skip
            got: dict[str, list[str]] = {"k0": [], "new": []}  # event types (error: code)
            while "cancelled" not in got["k0"] or not got["new"]:
                msg = await ws.recv()
                if isinstance(msg, str) and (e := json.loads(msg)).get("context_id") in got:
                    got[e["context_id"]].append(e.get("code", e["type"]))
            assert got["new"] == ["started"]
            # the same with the cancelled context's id
            await ws.send(json.dumps({"type": "cancel", "context_id": "k1"}))
            await ws.send(json.dumps({"type": "start", "context_id": "k1", "spk_id": "joe",
                                      "text": "Again."}))  # fmt: skip
            k1: list[str] = []  # the old k1's last events, then the new one's
            while "duplicate_context" not in k1 and k1[-1:] != ["started"]:
                msg = await ws.recv()
                if isinstance(msg, str) and (e := json.loads(msg)).get("context_id") == "k1":
                    k1.append(e.get("code", e["type"]))
            assert k1[-2:] == ["cancelled", "started"], k1

    run(go())
    server.assert_idle()


def test_client_error_helpers_raise(server):
    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            with pytest.raises(ServerError, match="unknown_speaker"):
                await conn.start(spk_id="nobody")
            # the built-in voice cannot stream text into a running model
            with pytest.raises(ServerError, match="unsupported_option"):
                await conn.start(spk_id="joe", text_streaming=True)
            # An id that is open: refused here (the server's refusal carries that id, and the
            # client would lose track of the open context it belongs to).
            ctx = await conn.start(spk_id="joe", context_id="twice", text="Hello there.")
            with pytest.raises(ValueError, match="twice"):
                await conn.start(spk_id="joe", context_id="twice")
            await ctx.close()
            return await ctx.collect()

    result = run(go())
    assert result.done is not None, result.events
    assert_speech(decode_pcm(result.audio), 22050, min_seconds=0.5)


def test_client_text_to_an_ended_context_spoils_no_later_start(server):
    """Text can cross a context's end on the wire (the server timed it out, or it was done):
    the server's `unknown_context` for it names that context, and the client used to queue it
    as the answer to the next `start` on the socket, which then raised though the server had
    started that context."""

    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ended = await conn.start(spk_id="joe", text="Hi there.")
            await ended.close()
            await ended.collect()
            await ended.send("More text, too late.")
            await asyncio.sleep(0.3)  # the refusal is in
            ctx = await conn.start(spk_id="joe", text="Hello there.")
            await ctx.close()
            return await ctx.collect()

    result = run(go())
    assert result.done is not None, result.events
    assert_speech(decode_pcm(result.audio), 22050, min_seconds=0.5)
    server.assert_idle()


def test_idle_socket_is_closed(make_server):
    srv = make_server("--ws-idle-timeout-s", "1", "--no-warmup")

    async def go():
        async with websockets.connect(f"{srv.ws_url}/ws/tts", compression=None) as ws:
            await ws.recv()
            await expect_error(ws, "idle_timeout")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()

    run(go())


def wait_stalled(srv, quiet_s: float = 1.5, timeout: float = 30) -> dict:
    """Wait until the scheduler stops stepping (nothing left it may work on)."""
    deadline = time.monotonic() + timeout
    last = srv.healthz()
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = srv.healthz()
        if now["steps"] != last["steps"]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError("the scheduler kept stepping for a client that does not read")


def test_slow_reader_is_bounded_and_does_not_stall_others(make_server):
    srv = make_server("--max-text-chars", "200000")
    huge = " ".join([TEXT] * 60)  # ~15 minutes of speech: ~40 MB of PCM if it were all produced

    async def go():
        # max_queue=1: the client library stops reading from TCP once one frame waits.
        async with websockets.connect(
            f"{srv.ws_url}/ws/tts", compression=None, max_queue=1
        ) as lazy:
            await lazy.send(
                json.dumps({"type": "start", "context_id": "lazy", "spk_id": "joe", "text": huge})
            )
            await lazy.send(json.dumps({"type": "close", "context_id": "lazy"}))
            # The lazy context produces until the socket and its backlog are full, then stops.
            stalled = await asyncio.to_thread(wait_stalled, srv)
            assert stalled["active"] == 1
            base = rss_mb(srv.proc.pid)
            result, rate = await speak(srv.base_url, TEXT, word_by_word=False)
            after_other = await asyncio.to_thread(wait_stalled, srv)
            grown = rss_mb(srv.proc.pid) - base
            return result, rate, stalled, after_other, grown

    result, rate, stalled, after_other, grown = run(go())
    # The other client got its whole stream while the lazy one stayed parked.
    assert_speech(decode_pcm(result.audio), rate, min_seconds=8.0)
    assert result.done is not None
    assert after_other["active"] == 1 and after_other["completed"] == stalled["completed"] + 1
    assert grown < 50, f"server RSS grew {grown:.1f} MB while a client did not read"
    srv.assert_idle(timeout=15)  # the lazy socket closed: its job was dropped


def test_per_message_deflate_is_refused(server):
    async def go():
        # The client offers permessage-deflate (the library default); the server must decline.
        async with websockets.connect(f"{server.ws_url}/ws/tts") as ws:
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            assert json.loads(await ws.recv())["type"] == "ready"

    run(go())


def test_client_never_hangs_on_a_refused_start_or_a_closed_socket(make_server):
    srv = make_server("--ws-idle-timeout-s", "1", "--no-warmup")

    async def go() -> tuple[str, str]:
        async with TTSClient(srv.base_url) as client, client.connect() as conn:
            # The server cannot parse this start, so its error carries no context id.
            with pytest.raises(ServerError) as refused:
                await conn.start(spk_id="joe", speed=40.0)
            ctx = await conn.start(spk_id="joe")
            # Nothing more is sent: the server closes the idle socket under the open context.
            with pytest.raises(ServerError) as closed:
                await ctx.collect()
            return refused.value.error.code, closed.value.error.code

    refused, closed = asyncio.run(asyncio.wait_for(go(), 20))
    assert refused == "invalid_message"
    assert closed in ("context_timeout", "connection_closed")


def test_a_socket_gets_its_share_of_the_event_loop_and_no_more():
    """A socket's messages may keep the loop busy a share of the time: bursts within the
    allowance never wait, a client that keeps costing more waits for what it took (its
    reading pauses, so TCP slows it down), and time spent waiting earns the share back."""
    from rtserver.api.ws_session import LoopShare

    share = LoopShare(0.2, burst_s=0.5, now=0.0)
    assert [share.spend(0.1, now=0.01 * i) for i in range(5)] == [0.0] * 5  # the burst
    wait = share.spend(0.1, now=0.05)  # 0.6 s spent in 0.05 s: 0.09 s over the allowance
    assert wait == pytest.approx((0.6 - 0.5 - 0.05 * 0.2) / 0.2)
    assert share.spend(0.0, now=0.05 + wait) == pytest.approx(0.0)
    cheap = LoopShare(0.2, burst_s=0.5, now=0.0)  # 1 ms a message, 100 a second: never waits
    assert max(cheap.spend(0.001, now=i / 100) for i in range(10_000)) == 0.0


def test_a_reply_waiting_for_a_slow_reader_is_not_the_sockets_loop_time():
    """A client reading audio at real time keeps the server's write buffer over its mark for
    seconds; a pong the receiver sends then waits for it to drain. That wait was charged to
    the socket's share of the loop (6 s of it paused its reading for 27 s: its next text or
    cancel unread). The protocol's own event tells the wait from the send."""
    from rtserver.api.connection import READ_METER, ReadMeter
    from rtserver.api.ws_session import WsSession

    async def go() -> float:
        meter = ReadMeter(asyncio.Queue(), asyncio.Event())  # writable: clear, a full buffer
        sent: list[str] = []

        async def send_text(text: str) -> None:  # uvicorn's send: it waits for the reader
            await meter.writable.wait()
            sent.append(text)

        socket = SimpleNamespace(scope={"extensions": {READ_METER: meter}}, client=None,
                                 send_text=send_text)  # fmt: skip
        service = SimpleNamespace(settings=None, loop_shares={})
        session = WsSession(socket, service)  # type: ignore[arg-type]
        session._receiver = asyncio.current_task()
        asyncio.get_running_loop().call_later(0.3, meter.writable.set)  # the client reads
        await session._write('{"type":"pong"}')
        assert sent == ['{"type":"pong"}']
        return session._waited

    assert run(go()) >= 0.25


def test_plain_http_on_the_websocket_route_says_what_it_is(server):
    """curl or a browser's address bar on /ws/tts: it was a bare 405 Method Not Allowed."""
    r = httpx.get(f"{server.base_url}/ws/tts")
    assert r.status_code == 426 and r.headers["upgrade"] == "websocket"
    assert "WebSocket endpoint" in r.json()["detail"]
