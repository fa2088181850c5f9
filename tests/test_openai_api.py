"""The OpenAI-compatible speech route, as Pipecat/LiveKit's OpenAI TTS clients call it."""

from __future__ import annotations

import base64
import io
import json

import av
import httpx
import numpy as np
from audio_check import assert_speech, decode_mp3, decode_pcm

TEXT = "Hello from the OpenAI compatible route. It streams speech like the real one does."


def speech(server, **body) -> httpx.Response:
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy", **body}
    return httpx.post(f"{server.base_url}/v1/audio/speech", json=body, timeout=60)


def test_mp3_with_an_openai_voice_alias(server):
    r = speech(server)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
    audio, rate = decode_mp3(r.content)
    assert_speech(audio, rate, min_seconds=3.0)


def test_pcm_is_24khz_like_openai_and_wav_has_a_header(server):
    pcm = speech(server, voice="joe", response_format="pcm")
    assert pcm.status_code == 200
    assert_speech(decode_pcm(pcm.content), 24000, min_seconds=3.0)
    wav = speech(server, voice="joe", response_format="wav")
    assert wav.content[:4] == b"RIFF" and wav.content[8:12] == b"WAVE"
    with av.open(io.BytesIO(wav.content), format="wav") as c:
        rate = c.streams.audio[0].rate
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert rate == 22050
    assert_speech(samples.astype(np.float32) / 32768, rate, min_seconds=3.0)


def test_sse_stream_format(server):
    r = speech(server, response_format="pcm", stream_format="sse")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    deltas = [e for e in events[:-1] if e["type"] == "speech.audio.delta"]
    assert len(deltas) == len(events) - 1 and deltas
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert_speech(decode_pcm(audio), 24000, min_seconds=3.0)


def test_errors(server):
    r = speech(server, voice="nobody")
    assert r.status_code == 400 and "alloy" in r.json()["detail"]
    r = speech(server, response_format="opus")
    assert r.status_code == 422 and "mp3" in r.json()["detail"]
    assert speech(server, speed=10).status_code == 422
    voices = httpx.get(f"{server.base_url}/v1/audio/voices").json()
    assert voices["voices"] == ["joe"] and "alloy" in voices["aliases"]
