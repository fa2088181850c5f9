"""Decode what the server sent and measure it (PyAV for MP3, numpy for PCM)."""

from __future__ import annotations

import io

import av
import numpy as np


def decode_mp3(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data), format="mp3") as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().astype(np.float32).reshape(f.layout.nb_channels if hasattr(f.layout, "nb_channels") else 1, -1)[0]
                  for f in container.decode(stream)]  # fmt: skip
        rate = stream.rate
    return np.concatenate(frames), rate


def decode_audio(data: bytes, fmt: str | None = None, rate: int = 8000) -> tuple[np.ndarray, int]:
    """Any container PyAV reads (probed), or headerless G.711 (`mulaw`, `alaw`) at `rate`."""
    opts = {"format": fmt, "options": {"sample_rate": str(rate)}} if fmt else {}
    with av.open(io.BytesIO(data), **opts) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        audio = np.concatenate(frames)
        if audio.dtype.kind == "i":  # s16 (FLAC, WAV, G.711) to the float scale of the rest
            return audio.astype(np.float32) / -np.iinfo(audio.dtype).min, stream.rate
        return audio.astype(np.float32), stream.rate


def decode_pcm(data: bytes) -> np.ndarray:
    assert len(data) % 2 == 0, "s16le PCM must have an even number of bytes"
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def longest_silence_s(x: np.ndarray, rate: int, threshold: float = 1e-4) -> float:
    """Longest run of samples below `threshold` (a dropout or gap shows up here)."""
    quiet = np.abs(x) < threshold
    if not quiet.any():
        return 0.0
    edges = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts, ends = np.where(edges == 1)[0], np.where(edges == -1)[0]
    return float((ends - starts).max()) / rate


def assert_speech(x: np.ndarray, rate: int, min_seconds: float, max_gap_s: float = 1.0) -> None:
    """At least `min_seconds` of audible audio with no silence as long as `max_gap_s`. Piper
    draws its pauses at random (0.2-0.3 s here, once 0.52 s in CI); a blank or lost piece of
    audio is a chunk long (1-3 s), so 1 s tells them apart."""
    duration = len(x) / rate
    assert duration >= min_seconds, f"only {duration:.2f}s of audio"
    assert rms(x) > 0.01, f"audio is (nearly) silent: rms={rms(x):.4f}"
    gap = longest_silence_s(x, rate)
    assert gap < max_gap_s, f"a {gap:.2f}s silent gap inside the audio"
