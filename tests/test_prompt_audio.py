"""Prompt uploads: the whitelisted containers decode; anything else is refused before FFmpeg
sees it (an SDP file or a playlist would make it open sockets or files)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import av
import numpy as np
import pytest

from cosyvoice.frontend.audio import AudioError, decode_audio


def encode(
    container: str, codec: str, seconds: float = 1.5, rate: int = 16000,
    samples: np.ndarray | None = None,
) -> bytes:  # fmt: skip
    """``samples`` (mono float) encoded at ``rate``; by default ``seconds`` of a 220 Hz tone."""
    if samples is None:
        t = np.arange(int(seconds * rate)) / rate
        samples = 0.3 * np.sin(2 * np.pi * 220 * t)
    tone = samples.astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        fmt = stream.codec_context.format.name
        frame = av.AudioFrame.from_ndarray(tone.reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
        for f in resampler.resample(frame):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


@pytest.mark.parametrize(
    "container, codec",
    [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"), ("ogg", "libopus"),
     ("ipod", "aac")],
)  # fmt: skip
def test_whitelisted_containers_decode(container, codec):
    rate = 48000 if codec == "libopus" else 16000
    wav, sr = decode_audio(encode(container, codec, rate=rate))
    assert sr == rate
    assert abs(len(wav) / sr - 1.5) < 0.15  # encoder priming and padding at most
    assert 0.2 < np.abs(wav).max() < 0.4


@pytest.mark.parametrize(
    "data",
    [
        b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 5004 RTP/AVP 0\n",
        b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",
        b"ffconcat version 1.0\nfile /etc/passwd\n",
        b"",
    ],
)
def test_anything_else_is_refused_unopened(data):
    with pytest.raises(AudioError, match="not a supported audio file"):
        decode_audio(data)


def test_an_odd_sample_rate_resamples_in_bounded_memory():
    """torchaudio's kernel for 16001 -> 16000 Hz alone would be ~8 GB (a 33 KB upload took a
    server to 10 GB): such rates go through FFmpeg's resampler first. The tone must survive."""
    code = """
import resource, sys, numpy as np, torch
from cosyvoice.frontend.audio import resample
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rate = 16001
t = np.arange(rate) / rate
x = torch.from_numpy((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))[None]
for target in (16000, 24000):
    y = resample(x, rate, target)[0].numpy()
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * target / len(y)
    print(target, len(y), round(float(peak_hz)))
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for target in ("16000", "24000"):
        n, hz = map(int, lines[target].split())
        assert abs(n - int(target)) <= 2 and abs(hz - 440) <= 2, lines
    assert int(lines["grew_mb"]) < 300, lines


def _wav_header_says(tag: int, bits: int) -> bytes:
    """Two seconds of 16-bit samples under a fmt chunk that says format ``tag`` of ``bits``."""
    pcm = (np.sin(np.arange(32000) * 0.05) * 8000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", tag, 1, 16000, 32000, 2, bits)
    return (b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm)  # fmt: skip


@pytest.mark.parametrize("tag, bits", [(1, 0), (3, 16), (0xFFFE, 16)])
def test_a_wav_of_a_codec_ffmpeg_cannot_decode_is_refused(tag, bits):
    """FFmpeg opens it but has no decoder: the server answered 500 (AttributeError)."""
    with pytest.raises(AudioError, match="cannot decode audio"):
        decode_audio(_wav_header_says(tag, bits))


def test_an_undecodable_file_is_said_in_ffmpegs_words_without_its_errno():
    """A truncated WAV's error read "[Errno 1094995529] Invalid data found ...": the errno
    is FFmpeg's internals, not something a client can act on."""
    with pytest.raises(AudioError) as refused:
        decode_audio(b"RIFF\0\0\0\0WAVEfmt " + bytes(100))
    assert "Invalid data" in str(refused.value) and "Errno" not in str(refused.value)
