"""The Pipecat and LiveKit Agents plugins of rtserver-client, driven by each framework's own
machinery against a real built-in-voice server: a turn is spoken, a barge-in cancels it on the
server, and word timings (when the server sends `words` events) arrive in order."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable

import httpx
import numpy as np
import pytest
from audio_check import assert_speech, decode_pcm
from golden.conftest import resolve_golden_dir
from serverproc import ServerProcess, eventually

from rtserver.client import TTSClient

pytestmark = pytest.mark.plugins

TURN = "Hello there. The weather is lovely today, so let us go for a walk."
LONG = " ".join(
    ["Voice agents stream their replies a few words at a time, and users interrupt them."] * 12
)
RATE = 24000  # what both frameworks ask for: the server resamples from Piper's 22.05 kHz
COSYVOICE2 = resolve_golden_dir() / "cosyvoice2" / "model"  # the tiny test model


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

    tts = RTServerTTSService(**{"base_url": base_url, "voice": "joe", **kwargs})
    params = PipelineParams(audio_out_sample_rate=RATE)
    down, up = await run_test(tts, frames_to_send=frames, pipeline_params=params)
    return list(down), list(up)


Step = Callable[[list], Awaitable[None]]


async def pipecat_script(base_url: str, steps: list, **kwargs: object) -> tuple[list, list]:
    """As pipecat_frames, but a step may also be a coroutine function, called with the frames
    pushed downstream so far and awaited before the next step: to wait for a turn to end, or
    restart the server between turns (run_test only sleeps between frames)."""
    from pipecat.frames.frames import EndFrame, StartFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner
    from rtserver_client.pipecat import RTServerTTSService

    class Keep(FrameProcessor):
        """Keeps the frames going one way in a list the steps can look at as they come."""

        def __init__(self, direction: FrameDirection) -> None:
            super().__init__(enable_direct_mode=True)
            self.direction, self.frames = direction, []

        async def process_frame(self, frame, direction) -> None:
            await super().process_frame(frame, direction)
            if direction == self.direction and not isinstance(frame, StartFrame | EndFrame):
                self.frames.append(frame)
            await self.push_frame(frame, direction)

    up, down = Keep(FrameDirection.UPSTREAM), Keep(FrameDirection.DOWNSTREAM)
    tts = RTServerTTSService(base_url=base_url, voice="joe", **kwargs)
    params = PipelineParams(audio_out_sample_rate=RATE)
    worker = PipelineWorker(Pipeline([up, tts, down]), cancel_on_idle_timeout=False, params=params)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(worker, frame) -> None:
        started.set()

    async def drive() -> None:
        try:
            await asyncio.wait_for(started.wait(), timeout=30)
            for step in steps:
                await (step(down.frames) if callable(step) else worker.queue_frame(step))
        finally:
            await worker.queue_frame(EndFrame())  # a failed step ends the pipeline too

    runner = WorkerRunner()
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), drive())
    return down.frames, up.frames


def turns_ended(n: int) -> Step:
    """A step: wait until n turns have ended (n TTSStoppedFrames)."""
    from pipecat.frames.frames import TTSStoppedFrame

    async def wait(frames: list) -> None:
        async with asyncio.timeout(60):
            while sum(isinstance(f, TTSStoppedFrame) for f in frames) < n:
                await asyncio.sleep(0.05)

    return wait


def restart_on_same_port(make_server, old: ServerProcess) -> ServerProcess:
    """A new server where the stopped one was (as a restarted server or a replaced pod),
    once /readyz says it takes work."""
    log = old.log_path.with_suffix(".restarted.log")
    new = make_server("--no-warmup", port=old.port, log_path=log)

    def ready() -> int:
        try:
            return httpx.get(f"{new.base_url}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    assert eventually(ready, lambda status: status == 200, timeout=60) == 200
    return new


def turn(down: list, n: int) -> list:
    """The frames of the n-th turn (from 1): its TTSStartedFrame to its TTSStoppedFrame."""
    from pipecat.frames.frames import TTSStartedFrame, TTSStoppedFrame

    starts = [i for i, f in enumerate(down) if isinstance(f, TTSStartedFrame)]
    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    return down[starts[n - 1] : stops[n - 1] + 1]


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


def test_pipecat_refused_turn_is_reported_once(server):
    """A turn the server refuses (an unknown voice): one ErrorFrame, one TTSStoppedFrame, and
    none of its text reaches the context as if spoken. It used to push a second error per
    sentence (each sentence started the refused context again) and Pipecat's "completed with
    no audio" too, then the turn's text as spoken (Pipecat's end-of-context completion)."""
    from pipecat.frames.frames import (
        ErrorFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )

    down, up = run(pipecat_frames(server.base_url, llm_reply(TURN), voice="nobody"))
    errors = [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "unknown_speaker" in errors[0].error, errors
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == 1 and kinds.count(TTSStoppedFrame) == 1, kinds
    assert TTSAudioRawFrame not in kinds
    assert not [f.text for f in down if isinstance(f, TTSTextFrame)], "unspoken text pushed"
    server.assert_idle()


def test_pipecat_reply_over_max_text_chars_is_reported_once(make_server, sends_words):
    """A reply longer than the server's --max-text-chars, token by token: one ErrorFrame
    (`text_too_long`), the text that fit is spoken in one turn, and the text the server
    dropped is not pushed as spoken. It used to push an ErrorFrame for every token past the
    limit (405 for a 7,089-character reply)."""
    from pipecat.frames.frames import (
        ErrorFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )
    from pipecat.services.tts_service import TextAggregationMode

    srv = make_server("--max-text-chars", "400", "--no-warmup")
    tokens = TextAggregationMode.TOKEN
    down, up = run(pipecat_frames(srv.base_url, llm_reply(LONG), text_aggregation_mode=tokens))
    errors = [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "text_too_long" in errors[0].error, errors
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 1, kinds
    pcm = decode_pcm(b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame)))
    assert_speech(pcm, RATE, min_seconds=10)
    if sends_words:  # what was spoken got its words; the rest is not claimed
        spoken = words_of(" ".join(f.text for f in down if isinstance(f, TTSTextFrame)))
        assert 0 < len(spoken) < len(words_of(LONG)) and spoken == words_of(LONG)[: len(spoken)]
    srv.assert_idle()


def test_pipecat_speaks_after_the_server_restarts(make_server):
    """The server restarts between two turns (on the same port): the next turn opens a new
    socket and is spoken, without an error. The service used to reconnect in the background
    (and give up for good after three tries 4-10 s apart), and its next try replaced the
    socket the next turn had just started on: that turn was lost."""
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame

    srv = make_server("--no-warmup")

    async def restart(_: list) -> None:
        await asyncio.to_thread(srv.stop)
        await asyncio.to_thread(restart_on_same_port, make_server, srv)

    steps = [TTSSpeakFrame(TURN), turns_ended(1), restart, TTSSpeakFrame(TURN), turns_ended(2)]
    down, up = run(pipecat_script(srv.base_url, steps))
    assert not [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    audio = b"".join(f.audio for f in turn(down, 2) if isinstance(f, TTSAudioRawFrame))
    assert_speech(decode_pcm(audio), RATE, min_seconds=2.5)


def test_pipecat_turn_while_the_server_is_down(make_server):
    """A turn while the server is down gets one ErrorFrame, not fatal, and one
    TTSStoppedFrame, and its text is not pushed as spoken; the turn after the server is back
    is spoken. It used to get three errors and its text pushed as spoken, and a few turns in
    a row without audio (a server loading for a minute) made the service give up for good."""
    from pipecat.frames.frames import (
        ErrorFrame,
        TTSAudioRawFrame,
        TTSSpeakFrame,
        TTSStartedFrame,
        TTSTextFrame,
    )

    srv = make_server("--no-warmup")
    unspoken = "Nobody hears this sentence."

    async def stop(_: list) -> None:
        await asyncio.to_thread(srv.stop)

    async def start(_: list) -> None:
        await asyncio.to_thread(restart_on_same_port, make_server, srv)

    # Three turns while it is down: as many as Pipecat lets end without audio before it
    # gives up on a service.
    down_turns = [step for n in (2, 3, 4) for step in (TTSSpeakFrame(unspoken), turns_ended(n))]
    steps = [TTSSpeakFrame(TURN), turns_ended(1), stop, *down_turns, start]
    down, up = run(pipecat_script(srv.base_url, [*steps, TTSSpeakFrame(TURN), turns_ended(5)]))
    errors = [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    assert len(errors) == 3 and not any(f.fatal for f in errors), errors
    assert sum(isinstance(f, TTSStartedFrame) for f in down) == 5
    for n in (2, 3, 4):
        assert not [f for f in turn(down, n) if isinstance(f, TTSAudioRawFrame | TTSTextFrame)]
    text = " ".join(f.text for f in down if isinstance(f, TTSTextFrame))
    assert words_of(text) == words_of(TURN) * 2, "text pushed as spoken that was not"
    audio = b"".join(f.audio for f in turn(down, 5) if isinstance(f, TTSAudioRawFrame))
    assert_speech(decode_pcm(audio), RATE, min_seconds=2.5)


def test_pipecat_refused_key_ends_each_turn_unspoken(make_server):
    """A server that refuses the service's key (403 on the upgrade): one ErrorFrame, and each
    turn ends at once (TTSStarted .. TTSStopped) with none of its text pushed as spoken, as
    when the server is down. Pipecat gives an unusable service's turns no run_tts, and they
    used to get no TTSStoppedFrame, then their text as spoken when their audio timed out."""
    from pipecat.frames.frames import (
        ErrorFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSTextFrame,
    )
    from pipecat.tests.utils import SleepFrame

    srv = make_server("--api-key", "right-key-123", "--no-warmup")
    # Past Pipecat's 3 s stop_frame_timeout_s: a turn left open would have timed out.
    frames = [*llm_reply(TURN), SleepFrame(sleep=4), *llm_reply(TURN), SleepFrame(sleep=4)]
    down, up = run(pipecat_frames(srv.base_url, frames))
    errors = [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "403" in errors[0].error, errors
    assert "an API key is required" in errors[0].error, errors  # the server's reason
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 2, kinds
    assert TTSAudioRawFrame not in kinds
    assert not [f.text for f in down if isinstance(f, TTSTextFrame)], "unspoken text pushed"


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
    assert "this API key is not valid here" in str(refused.value), refused.value
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


async def drain(events) -> None:
    async for _ in events:
        pass


def test_livekit_times_out_on_a_stalled_server(make_server):
    """conn_options.timeout bounds the wait on a server that stopped answering (SIGSTOP: the
    kernel still accepts connections and takes what is sent): a stream waiting for its next
    audio, a start on the open socket, a new connection each raise APITimeoutError. The stream
    used to wait ~50 s for websockets' keepalive and then fail saying the server had closed
    the socket; the client (keepalive shortened here) now says the connection was lost."""
    from livekit.agents import APIConnectOptions, APITimeoutError
    from rtserver_client.client import ServerError
    from rtserver_client.livekit import TTS

    srv = make_server("--no-warmup")
    opts = APIConnectOptions(max_retry=0, timeout=4)

    async def times_out(waiting: Awaitable[object]) -> float:
        began = time.monotonic()
        with pytest.raises(APITimeoutError):
            await waiting
        return time.monotonic() - began

    async def connection_lost(ctx) -> str:
        with pytest.raises(ServerError) as lost:
            await ctx.collect()
        return str(lost.value)

    async def stalled(streaming, warm, cold, client: TTSClient) -> tuple[list, str]:
        conn = await client.open(ping_interval=1, ping_timeout=1)
        idle = await conn.start(spk_id="joe")  # open, with nothing to say
        await warm.synthesize("Hello there.").collect()  # its socket is open
        stream = streaming.stream(conn_options=opts)
        stream.push_text(LONG)  # no end of input: the agent's LLM is still talking
        events = aiter(stream)
        await anext(events)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            *waits, said = await asyncio.gather(
                times_out(drain(events)),
                times_out(warm.synthesize(TURN, conn_options=opts).collect()),
                times_out(cold.synthesize(TURN, conn_options=opts).collect()),
                connection_lost(idle),
            )
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        await stream.aclose()
        return waits, said

    async def go() -> tuple[list, str]:
        plugins = [TTS(base_url=srv.base_url, voice="joe") for _ in range(3)]
        try:
            async with TTSClient(srv.base_url) as client:
                return await stalled(*plugins, client)
        finally:
            for each in plugins:
                await each.aclose()

    waits, said = run(go())
    assert all(w < 30 for w in waits), waits  # 4 s each here; generous for a loaded machine
    assert "connection was lost" in said and "server closed" not in said, said


def test_livekit_more_concurrent_turns_than_a_socket_takes(make_server):
    """12 synthesize() at once on one TTS, against a server that takes 8 contexts per socket
    (its default): the plugin opens a second socket for the rest, so none is refused. They used
    to go on the one socket, and 4 failed with `too_many_contexts` (not retryable)."""
    from livekit.agents import APIConnectOptions
    from rtserver_client.livekit import TTS

    # Per address the server takes 8 streams by default: this test is about the sockets'.
    srv = make_server("--no-warmup", "--max-client-streams", "16")
    once = APIConnectOptions(max_retry=0)  # no retry to hide a refusal

    async def go() -> list:
        tts = TTS(base_url=srv.base_url, voice="joe", sample_rate=RATE)
        try:
            texts = [f"Hello there, this is turn {i}." for i in range(12)]
            return await asyncio.gather(
                *(tts.synthesize(t, conn_options=once).collect() for t in texts)
            )
        finally:
            await tts.aclose()

    for frame in run(go()):
        assert_speech(decode_pcm(bytes(frame.data)), RATE, min_seconds=0.5)
    assert srv.log_path.read_text().count('"WebSocket /ws/tts" [accepted]') == 2
    srv.assert_idle()


def test_livekit_draining_server_refusal_is_retryable(make_server):
    """A `start` the server refuses with `shutting_down` (it drains: a retry reaches the
    restarted server, or another replica) fails the attempt as retryable, and the next attempt
    opens a new socket instead of asking the draining one again. It used to be final."""
    from livekit.agents import APIConnectOptions, APIError
    from rtserver_client.livekit import TTS

    srv = make_server("--no-warmup", "--drain-timeout-s", "60")
    once = APIConnectOptions(max_retry=0)

    def draining() -> bool:
        return httpx.get(f"{srv.base_url}/readyz", timeout=5).status_code == 503

    async def refused(tts) -> APIError:
        with pytest.raises(APIError) as e:
            await tts.synthesize(TURN, conn_options=once).collect()
        return e.value

    async def go() -> list[APIError]:
        tts = TTS(base_url=srv.base_url, voice="joe", sample_rate=RATE)
        try:
            stream = tts.stream()
            stream.push_text(LONG)  # an open context: the drain waits for it
            events = aiter(stream)
            await anext(events)
            srv.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(eventually, draining, bool)
            errors = [await refused(tts), await refused(tts)]
            await stream.aclose()
            return errors
        finally:
            await tts.aclose()

    errors = run(go())
    assert all(e.retryable and "shutting_down" in str(e) for e in errors), errors
    # The second attempt asked on a new socket (the draining server still takes them).
    assert srv.log_path.read_text().count('"WebSocket /ws/tts" [accepted]') == 2


# ---- Both: start options ------------------------------------------------------------------


async def pipecat_pcm(base_url: str, text: str, **kwargs: object) -> tuple[bytes, list]:
    """The audio Pipecat's service made of one spoken text, and the ErrorFrames."""
    from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame

    down, up = await pipecat_frames(base_url, [TTSSpeakFrame(text)], **kwargs)
    errors = [f for f in (*down, *up) if isinstance(f, ErrorFrame)]
    return b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame)), errors


async def livekit_pcm(base_url: str, text: str, **kwargs: object) -> bytes:
    """The audio LiveKit's plugin made of one synthesize()."""
    from livekit.agents import APIConnectOptions
    from rtserver_client.livekit import TTS

    tts = TTS(base_url=base_url, sample_rate=RATE, **kwargs)
    try:
        frame = await tts.synthesize(text, conn_options=APIConnectOptions(max_retry=0)).collect()
        return bytes(frame.data)
    finally:
        await tts.aclose()


def test_plugins_pass_text_streaming_to_the_server(server):
    """`text_streaming=True` reaches the start: the built-in voice refuses it
    (`unsupported_option`, CosyVoice2/3 only), where a start without it is spoken."""
    from livekit.agents import APIError

    _, errors = run(pipecat_pcm(server.base_url, TURN, text_streaming=True))
    assert len(errors) == 1 and "unsupported_option" in errors[0].error, errors
    with pytest.raises(APIError, match="unsupported_option"):
        run(livekit_pcm(server.base_url, TURN, voice="joe", text_streaming=True))
    server.assert_idle()


@pytest.mark.skipif(not COSYVOICE2.is_dir(), reason=f"no golden model dir at {COSYVOICE2}")
def test_plugins_seed_and_text_streaming_on_cosyvoice2(make_server):
    """On CosyVoice2, with text streaming: the same seed gives the same audio, another seed
    other audio (the seed reaches the start; 0, the default, draws one per turn)."""
    srv = make_server("--model", str(COSYVOICE2), "--no-warmup")
    text = "Hello there, this is a test."
    opts = {"voice": "spk_f1", "text_streaming": True}

    async def go() -> tuple[list[bytes], list[bytes], list]:
        lk = [await livekit_pcm(srv.base_url, text, seed=s, **opts) for s in (11, 11, 12)]
        said = [await pipecat_pcm(srv.base_url, text, seed=s, **opts) for s in (11, 11, 12)]
        return lk, [pcm for pcm, _ in said], [e for _, errors in said for e in errors]

    lk, pc, errors = run(go())
    assert not errors, errors
    for a, b, other in (lk, pc):
        assert a and a == b and other != a
