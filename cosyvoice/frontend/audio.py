"""Prompt-audio decoding and feature extraction (spec frontend-llm.md §3).

* :func:`decode_audio` reads wav, flac, mp3, ogg or m4a (PyAV) and down-mixes to mono.
* :func:`resample` is torchaudio's ``Resample`` with default arguments, as upstream (from an
  odd rate, after FFmpeg's resampler takes it to 48 kHz: see :data:`MAX_RESAMPLE_KERNEL`).
* :func:`kaldi_fbank_cmn` (CAM++ input), :func:`whisper_log_mel` (S3 tokenizer input) and
  :func:`matcha_mel` (flow prompt mel) reproduce the documented DSP exactly.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchaudio


class AudioError(ValueError):
    """Prompt audio that cannot be used (not audio, too short, too long, silent, ...)."""


# a path, encoded bytes, a binary file object, or already decoded (samples, sample_rate)
AudioSource = str | Path | bytes | bytearray | memoryview | io.IOBase | tuple[np.ndarray, int]


# The containers prompt audio may come in, by their first bytes -> FFmpeg's demuxer. The
# demuxer is forced, so FFmpeg never probes: a playlist, SDP or concat file (which make FFmpeg
# open files or network sockets) is refused before FFmpeg sees a byte.
CONTAINERS = ("wav", "flac", "mp3", "ogg", "m4a")
MAX_RATE = 384_000  # Hz; the highest rate recorders use (a higher one is a memory bomb's)
# torchaudio's Resample builds a windowed-sinc kernel of about (orig/g) x (target/g) x 12
# float64 values, g = gcd(orig, target): 11025 -> 16000 Hz gives 282 240 (27 MB), but 16001 ->
# 16000 gives 2.6e8 (a 33 KB upload took 10 GB). Past this product, FFmpeg's resampler
# (arbitrary ratios, constant memory) first takes the audio to INTERMEDIATE_RATE.
MAX_RESAMPLE_KERNEL = 1_000_000
INTERMEDIATE_RATE = 48_000


def sniff_container(head: bytes) -> str:
    """The FFmpeg demuxer for a whitelisted container, from the file's first 12 bytes."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[4:8] == b"ftyp":
        return "mov"  # FFmpeg's mov/mp4/m4a demuxer
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    raise AudioError(f"not a supported audio file: send one of {', '.join(CONTAINERS)}")


def decode_audio(
    src: AudioSource, max_seconds: float | None = None, min_rate: int = 0
) -> tuple[np.ndarray, int]:
    """Decode ``src`` to mono float32 in [-1, 1] and its rate.

    ``src`` is a path, encoded bytes, a binary file object (a container of
    :data:`CONTAINERS`), or a ``(samples, rate)`` tuple with samples shaped (N,) or
    (channels, N). With ``max_seconds``, decoding stops with :class:`AudioError` as soon as
    the audio is longer (an hour-long upload is never fully decoded); with ``min_rate``, a
    container at a lower rate is refused before it is decoded (a header saying 1 Hz made
    every sample a second: "too long").
    """
    if isinstance(src, tuple):
        return _samples(*src)
    if isinstance(src, bytes | bytearray | memoryview):
        src = io.BytesIO(bytes(src))
    elif isinstance(src, str | Path):
        src = io.BytesIO(Path(src).read_bytes())
    head = src.read(12)
    src.seek(-len(head), io.SEEK_CUR)
    return _decode(src, sniff_container(head), max_seconds, min_rate)


def _samples(arr: np.ndarray, rate: int) -> tuple[np.ndarray, int]:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr.mean(axis=0)
    if arr.ndim != 1 or arr.size == 0:
        raise AudioError("sample array must be non-empty and 1-D or (channels, N)")
    return arr, int(rate)


def _decode(
    src: io.IOBase, fmt: str | None, max_seconds: float | None, min_rate: int
) -> tuple[np.ndarray, int]:
    """The first audio stream of the container in ``src`` (FFmpeg's demuxer ``fmt``)."""
    import av  # only for encoded audio: decoded samples need no codec

    try:
        with av.open(src, mode="r", format=fmt) as container:
            if not container.streams.audio:
                raise AudioError("no audio stream found")
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # FFmpeg has no decoder (a WAV of 0-bit samples)
                raise AudioError(
                    f"cannot decode audio: no decoder for its codec ({fmt or 'probed'})"
                )
            rate = stream.rate or stream.codec_context.sample_rate
            if rate and rate > MAX_RATE:
                raise AudioError(f"sample rate above {MAX_RATE} Hz")
            if rate and rate < min_rate:
                raise AudioError(f"sample rate {rate} Hz is below {min_rate} Hz")
            chunks = _frames(container.decode(stream), rate, max_seconds)
    except AudioError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        # FFmpeg's own words ("Invalid data found when processing input"), not its errno
        raise AudioError(f"cannot decode audio: {getattr(e, 'strerror', None) or e}") from e
    if not chunks or not rate:
        raise AudioError("audio stream is empty")
    return np.concatenate(chunks), int(rate)


def _frames(frames: Iterable, rate: int, max_seconds: float | None) -> list[np.ndarray]:
    """Decoded frames as mono float chunks; AudioError once past ``max_seconds``."""
    import av

    limit = int(max_seconds * rate) if max_seconds and rate else None
    # packed float keeps full precision for every input format (PyAV's planar
    # to_ndarray crashed the process on 8 channels)
    resampler = av.AudioResampler(format="flt", layout=None, rate=None)
    chunks: list[np.ndarray] = []
    n = 0
    for frame in frames:
        for f in resampler.resample(frame):
            chunks.append(_mono(f))
            n += chunks[-1].size
        if limit is not None and n > limit:
            raise AudioError(f"audio too long: more than {max_seconds:g} s")
    return chunks + [_mono(f) for f in resampler.resample(None)]


def _mono(frame) -> np.ndarray:
    """A packed float frame, its channels averaged (kept mono as it is read: many channels at
    a high rate would otherwise hold their whole product in memory)."""
    return frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1)


@functools.lru_cache(maxsize=16)  # bounded: each rate pair keeps its kernel
def _resampler(orig: int, target: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig, target)


def resample(wav: torch.Tensor, orig: int, target: int) -> torch.Tensor:
    """(1, N) at ``orig`` Hz -> (1, M) at ``target`` Hz."""
    if orig == target:
        return wav
    g = math.gcd(orig, target)
    if (orig // g) * (target // g) > MAX_RESAMPLE_KERNEL:
        wav, orig = _ffmpeg_resample(wav, orig, INTERMEDIATE_RATE), INTERMEDIATE_RATE
        if orig == target:
            return wav
    return _resampler(orig, target)(wav)


def _ffmpeg_resample(wav: torch.Tensor, orig: int, target: int) -> torch.Tensor:
    import av

    frame = av.AudioFrame.from_ndarray(
        wav.reshape(1, -1).float().numpy(), format="flt", layout="mono"
    )
    frame.sample_rate = orig
    rs = av.AudioResampler(format="flt", layout="mono", rate=target)
    out = [f.to_ndarray().reshape(-1) for f in (*rs.resample(frame), *rs.resample(None))]
    return torch.from_numpy(np.concatenate(out)).reshape(1, -1)


def kaldi_fbank_cmn(wav16k: torch.Tensor) -> torch.Tensor:
    """(1, N) 16 kHz -> (T, 80) kaldi fbank minus its mean over time (CAM++ input)."""
    feat = torchaudio.compliance.kaldi.fbank(
        wav16k, num_mel_bins=80, dither=0, sample_frequency=16000
    )
    return feat - feat.mean(dim=0, keepdim=True)


# ---------------------------------------------------------------------------------------------
# librosa-compatible Slaney mel filterbank (written from librosa's documented definition)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = f >= min_log_hz
    mels = np.where(log_t, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


@functools.cache
def mel_filterbank(
    sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32, Slaney mel scale and Slaney area normalisation."""
    if fmax is None:
        fmax = sr / 2.0
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    return weights


def whisper_log_mel(wav16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """(1, N) 16 kHz -> (1, n_mels, N // 160) whisper log-mel (S3 tokenizer input)."""
    window = torch.hann_window(400, device=wav16k.device)
    stft = torch.stft(wav16k, 400, 160, window=window, return_complex=True)
    mag = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filterbank(16000, 400, n_mels)).to(wav16k.device)
    mel = filters @ mag
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def matcha_mel(
    wav: torch.Tensor,
    n_fft: int,
    num_mels: int,
    sampling_rate: int,
    hop_size: int,
    win_size: int,
    fmin: float = 0,
    fmax: float | None = None,
    center: bool = False,
) -> torch.Tensor:
    """(1, N) -> (1, num_mels, N // hop) natural-log magnitude mel (flow prompt features)."""
    basis = torch.from_numpy(mel_filterbank(sampling_rate, n_fft, num_mels, fmin, fmax)).to(
        wav.device
    )
    window = torch.hann_window(win_size, device=wav.device)
    pad = (n_fft - hop_size) // 2
    y = torch.nn.functional.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    spec = torch.stft(
        y,
        n_fft,
        hop_length=hop_size,
        win_length=win_size,
        window=window,
        center=center,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.view_as_real(spec)
    spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    return torch.log(torch.clamp(basis @ spec, min=1e-5))
