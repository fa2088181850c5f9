"""The Pipecat and LiveKit Agents plugins of rtserver-client, driven by each framework's own
machinery against a real built-in-voice server: a turn is spoken, a barge-in cancels it on the
server, and word timings (when the server sends `words` events) arrive in order."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
from audio_check import assert_speech, decode_pcm

from rtserver.client import TTSClient

pytestmark = pytest.mark.plugins

TURN = "Hello there. The weather is lovely today, so let us go for a walk."
LONG = " ".join(
    ["Voice agents stream their replies a few words at a time, and users interrupt them."] * 12
)
RATE = 24000  # what both frameworks ask for: the server resamples from Piper's 22.05 kHz


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


def words_of(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


@pytest.fixture(scope="module")
def sends_words(server) -> bool:
    """Whether the server under test answers `timestamps: true` with `words` events."""

    async def probe() -> bool:
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", text="Hello there.", timestamps=True)
            await ctx.close()
            return bool((await ctx.collect()).words)

    return run(probe())


def need_words(sends_words: bool) -> None:
    if not sends_words:
        pytest.skip("the server under test sends no `words` events for `timestamps: true`")


async def cancel_seen(base_url: str, before: int) -> bool:
    """Wait for the server to count one more cancelled job; whether the plugin's socket was
    still open then, i.e. the plugin sent `cancel` (closing the socket cancels jobs too)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        while True:
            health = (await http.get("/healthz")).json()
            if health["cancelled"] > before:
                return health["sockets_open"] > 0
            await asyncio.sleep(0.02)


def check_word_times(spoken: list[tuple[str, float]], text: str, audio_s: float) -> None:
    """Words in the text's order, start times non-decreasing and inside the audio."""
    assert words_of(" ".join(w for w, _ in spoken)) == words_of(text), spoken
    starts = [t for _, t in spoken]
    assert starts == sorted(starts), starts
    assert starts[0] >= 0 and starts[-1] < audio_s, (starts, audio_s)


# ---- Pipecat ------------------------------------------------------------------------------


async def pipecat_frames(base_url: str, frames: list, **kwargs: object) -> tuple[list, list]:
    """The frames the service pushed downstream and upstream (where errors go)."""
    from pipecat.pipeline.worker import PipelineParams
    from pipecat.tests.utils import run_test
    from rtserver_client.pipecat import RTServerTTSService

    tts = RTServerTTSService(base_url=base_url, voice="joe", **kwargs)
    params = PipelineParams(audio_out_sample_rate=RATE)
    down, up = await run_test(tts, frames_to_send=frames, pipeline_params=params)
    return list(down), list(up)


async def pipecat_run(base_url: str, frames: list, **kwargs: object) -> list:
    return (await pipecat_frames(base_url, frames, **kwargs))[0]


def pipecat_turn(base_url: str, frames: list, **kwargs: object) -> list:
    return run(pipecat_run(base_url, frames, **kwargs))


def llm_reply(text: str) -> list:
    """The frames an LLM service pushes for one reply, a word per token."""
    from pipecat.frames.frames import (
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
    )

    tokens = [LLMTextFrame(word + " ") for word in text.split(" ")]
    return [LLMFullResponseStartFrame(), *tokens, LLMFullResponseEndFrame()]


@pytest.mark.parametrize("mode", ["sentence", "token"])
def test_pipecat_speaks_an_llm_turn(server, mode):
    """An LLM reply streamed token by token: Pipecat cuts sentences (SENTENCE mode), or the
    tokens go straight to the server's own sentence buffering (TOKEN mode)."""
    from pipecat.frames.frames import (
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )
    from pipecat.services.tts_service import TextAggregationMode

    down = pipecat_turn(
        server.base_url, llm_reply(TURN), text_aggregation_mode=TextAggregationMode(mode)
    )
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1, kinds
    first, last = kinds.index(TTSStartedFrame), kinds.index(TTSStoppedFrame)
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and {(f.sample_rate, f.num_channels) for f in audio} == {(RATE, 1)}
    assert all(first < i < last for i, k in enumerate(kinds) if k is TTSAudioRawFrame)
    pcm = decode_pcm(b"".join(f.audio for f in audio))
    assert_speech(pcm, RATE, min_seconds=2.5)
    assert len(pcm) / RATE < 10, "far more audio than the text"
    # The spoken text reaches the context (from word timings or end-of-turn completion).
    text = " ".join(f.text for f in down if isinstance(f, TTSTextFrame))
    assert words_of(text) == words_of(TURN)
    server.assert_idle()


def test_pipecat_barge_in_cancels_on_the_server(server):
    from pipecat.frames.frames import InterruptionFrame, TTSAudioRawFrame
    from pipecat.tests.utils import SleepFrame

    before = server.healthz()["cancelled"]
    # The user interrupts while the LLM's reply still streams (no end of response yet), so the
    # turn's context is open on the server however fast it speaks what it has: only the
    # plugin's `cancel` (or the socket closing) ends it.
    reply = llm_reply(LONG)[:-1]
    frames = [*reply, SleepFrame(sleep=3.0), InterruptionFrame(), SleepFrame(1.0)]

    async def go() -> tuple[list, bool]:
        return await asyncio.gather(
            pipecat_run(server.base_url, frames), cancel_seen(server.base_url, before)
        )

    down, socket_open = run(go())
    assert socket_open, "the job ended only when the socket closed: no `cancel` was sent"
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before_cut = [f for f in down[:cut] if isinstance(f, TTSAudioRawFrame)]
    assert before_cut, "no audio in the 3 s before the interruption"
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down[cut:]), "audio after barge-in"
    # The plugin sent `cancel`: the server dropped the job (not just Pipecat the audio).
    assert server.assert_idle()["cancelled"] == before + 1


def test_pipecat_word_timestamps(server, sends_words):
    need_words(sends_words)
    from pipecat.frames.frames import TTSAudioRawFrame, TTSSpeakFrame, TTSTextFrame

    down = pipecat_turn(server.base_url, [TTSSpeakFrame(TURN)])
    audio_s = sum(len(f.audio) for f in down if isinstance(f, TTSAudioRawFrame)) / 2 / RATE
    texts = [f for f in down if isinstance(f, TTSTextFrame)]
    assert len(texts) >= len(words_of(TURN)) - 1, "one text frame per word, timed"
    t0 = min(f.pts for f in texts)
    check_word_times([(f.text, (f.pts - t0) / 1e9) for f in texts], TURN, audio_s)


def test_pipecat_agent_silent_past_the_socket_timeout_gets_no_error(make_server):
    """The server closes a socket with no message for --ws-idle-timeout-s: the service
    reconnects, as on any close, and the agent's next turn is spoken. It used to push an
    ErrorFrame for each such close (one a minute for an agent waiting on its user)."""
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.tests.utils import SleepFrame

    srv = make_server("--ws-idle-timeout-s", "1", "--no-warmup")
    frames = [SleepFrame(sleep=2.5), TTSSpeakFrame(TURN)]
    down, up = run(pipecat_frames(srv.base_url, frames))
    errors = [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    assert not errors, errors
    pcm = decode_pcm(b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame)))
    assert_speech(pcm, RATE, min_seconds=2.5)
    # The server did close the idle socket meanwhile: the service opened another.
    assert srv.log().count('"WebSocket /ws/tts" [accepted]') >= 2


@pytest.mark.parametrize("mode", ["sentence", "token"])
def test_pipecat_turn_outlives_a_context_timeout(make_server, mode):
    """The LLM pauses mid-reply longer than --context-idle-timeout-s, and the server ends the
    turn's context: the turn goes on in a new context, one TTSStarted .. TTSStopped around all
    its audio and no ErrorFrame. It used to push an ErrorFrame and a TTSStoppedFrame, then a
    second TTSStartedFrame when the LLM went on."""
    from pipecat.frames.frames import (
        ErrorFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.services.tts_service import TextAggregationMode
    from pipecat.tests.utils import SleepFrame

    srv = make_server("--context-idle-timeout-s", "1", "--no-warmup")
    start, *first = llm_reply("Hello there. The weather is lovely today.")[:-1]
    *second, end = llm_reply("So let us go for a walk in the park.")[1:]
    frames = [start, *first, SleepFrame(sleep=4.5), *second, end]
    mode = TextAggregationMode(mode)
    # Pipecat itself ends a turn's audio after stop_frame_timeout_s (3 s) without any: set
    # above the pause, so that what is tested is the server's timeout (1 s; in TOKEN mode after
    # the 1.5 s auto-flush speaks the held sentence end) alone.
    kwargs = {"text_aggregation_mode": mode, "stop_frame_timeout_s": 10}
    down, up = run(pipecat_frames(srv.base_url, frames, **kwargs))
    assert not [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1, kinds
    first, last = kinds.index(TTSStartedFrame), kinds.index(TTSStoppedFrame)
    assert all(first < i < last for i, k in enumerate(kinds) if k is TTSAudioRawFrame)
    pcm = decode_pcm(b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame)))
    assert_speech(pcm, RATE, min_seconds=3.5)
    assert srv.assert_idle()["dropped"] >= 1  # the pause did end a server context


def test_livekit_refused_key_fails_at_once(make_server):
    """A server that refuses the key (403 on the upgrade) refuses it again: the plugin says so
    in a final error instead of "unreachable", retried three times over four seconds."""
    from livekit.agents import APIStatusError
    from rtserver_client.livekit import TTS

    srv = make_server("--api-key", "right-key-123", "--no-warmup")

    async def go() -> None:
        tts = TTS(base_url=srv.base_url, voice="joe", api_key="wrong-key-123")
        try:
            await tts.synthesize(TURN).collect()
        finally:
            await tts.aclose()

    with pytest.raises(APIStatusError) as refused:
        run(go())
    assert refused.value.status_code == 403 and not refused.value.retryable
    assert srv.log().count('"WebSocket /ws/tts" 403') == 1  # asked once, not retried


# ---- LiveKit Agents -----------------------------------------------------------------------
# As LiveKit's own plugin tests do: the plugin's stream() / synthesize() called directly.


def livekit_frames(events) -> tuple[np.ndarray, list]:
    """PCM and timed transcripts of a list of SynthesizedAudio."""
    from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT

    assert {(e.frame.sample_rate, e.frame.num_channels) for e in events} == {(RATE, 1)}
    pcm = decode_pcm(b"".join(bytes(e.frame.data) for e in events))
    timed = [w for e in events for w in e.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]
    return pcm, timed


async def livekit_stream(base_url: str, text: str):
    from rtserver_client.livekit import TTS

    tts = TTS(base_url=base_url, voice="joe", sample_rate=RATE)
    try:
        async with tts.stream() as stream:
            for word in text.split(" "):  # as an LLM streams it
                stream.push_text(word + " ")
            stream.flush()
            stream.end_input()
            return [ev async for ev in stream]
    finally:
        await tts.aclose()


def test_livekit_stream_speaks_pushed_text(server):
    events = run(livekit_stream(server.base_url, TURN))
    pcm, _ = livekit_frames(events)
    assert_speech(pcm, RATE, min_seconds=2.5)
    assert len(pcm) / RATE < 10, "far more audio than the text"
    assert events[-1].is_final and len({e.segment_id for e in events}) == 1
    server.assert_idle()


def test_livekit_stream_outlives_a_context_timeout(make_server, sends_words):
    """The LLM pauses mid-reply past --context-idle-timeout-s and the server ends the stream's
    context: the next text goes on in a new one, in the same segment, word times continuing
    from the first context's audio. The stream used to fail with "ended the context"."""
    need_words(sends_words)
    from rtserver_client.livekit import TTS

    srv = make_server("--context-idle-timeout-s", "1", "--no-warmup")
    first, second = "Hello there. The weather is lovely today.", "So let us go for a walk."

    async def go() -> list:
        tts = TTS(base_url=srv.base_url, voice="joe", sample_rate=RATE)
        try:
            async with tts.stream() as stream:
                stream.push_text(first)
                # The LLM pauses: the server speaks the held sentence end after its 1.5 s
                # auto-flush, then has nothing to say.
                await asyncio.sleep(4.5)
                stream.push_text(second)
                stream.end_input()
                return [ev async for ev in stream]
        finally:
            await tts.aclose()

    events = run(go())
    pcm, timed = livekit_frames(events)
    assert_speech(pcm, RATE, min_seconds=3.5)
    check_word_times([(str(w), w.start_time) for w in timed], f"{first} {second}", len(pcm) / RATE)
    assert events[-1].is_final and len({e.segment_id for e in events}) == 1
    assert srv.assert_idle()["dropped"] == 1  # the pause did end a server context


def test_livekit_synthesize_one_shot(server):
    from rtserver_client.livekit import TTS

    async def go():
        tts = TTS(base_url=server.base_url, voice="joe", sample_rate=RATE)
        try:
            return await tts.synthesize(TURN).collect()
        finally:
            await tts.aclose()

    frame = run(go())
    assert (frame.sample_rate, frame.num_channels) == (RATE, 1)
    assert_speech(decode_pcm(bytes(frame.data)), RATE, min_seconds=2.5)
    server.assert_idle()


def test_livekit_barge_in_cancels_on_the_server(server):
    from rtserver_client.livekit import TTS

    before = server.healthz()["cancelled"]

    async def go() -> float:
        tts = TTS(base_url=server.base_url, voice="joe", sample_rate=RATE)
        try:
            stream = tts.stream()
            stream.push_text(LONG)  # no end_input: the agent's LLM is still talking
            heard = 0.0
            async for ev in stream:
                heard += ev.frame.duration
                if heard > 1.0:  # the user starts talking: the agent closes the stream
                    break
            await stream.aclose()
            # The socket stays open, so anything the server still sent would show up here.
            await asyncio.sleep(1.0)
            return heard
        finally:
            await tts.aclose()

    async def both() -> tuple[float, bool]:
        return await asyncio.gather(go(), cancel_seen(server.base_url, before))

    heard, socket_open = run(both())
    assert socket_open, "the job ended only when the socket closed: no `cancel` was sent"
    assert 1.0 < heard < 30, heard  # LONG is ~60 s of speech: it was cut short
    assert server.assert_idle()["cancelled"] == before + 1


def test_livekit_word_timings(server, sends_words):
    need_words(sends_words)
    events = run(livekit_stream(server.base_url, TURN))
    pcm, timed = livekit_frames(events)
    check_word_times([(str(w), w.start_time) for w in timed], TURN, len(pcm) / RATE)
    assert all(w.end_time >= w.start_time for w in timed)
