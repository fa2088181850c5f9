"""Float32 engine audio -> the bytes a client gets: s16le PCM or one continuous MP3 stream.

One encoder object per stream, fed chunk by chunk and finished once, so chunk joins are
invisible: no per-chunk headers, encoder padding or fades. Resampling (when a client asks for
another rate) uses libswresample through PyAV, with its filter state kept across chunks.
"""

from __future__ import annotations

import functools
import io
import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import av
import av.filter
import numpy as np
from rtserver_client.protocol import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

MP3_CODEC = "libmp3lame"
MP3_BITRATE = 64_000  # mono speech: transparent enough, 8 kB/s


def _frame(audio: np.ndarray, rate: int, pts: int, fmt: str = "flt") -> av.AudioFrame:
    """Mono float32 samples as a PyAV frame (`flt` and `fltp` are the same bytes for one
    channel; encoders want one or the other)."""
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio, dtype=np.float32).reshape(1, -1), format=fmt, layout="mono"
    )
    frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
    return frame


def _end_s(packet: av.Packet) -> float:
    """Where an encoded packet ends on the input's timeline (codecs shift their packets'
    pts back by their lookahead, so this is the input the packet has covered)."""
    return float((packet.pts + packet.duration) * packet.time_base)


def to_s16le(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class _Resampler:
    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.rate_in = rate_in
        self._rs = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
        self._pts = 0

    def __call__(self, audio: np.ndarray | None) -> np.ndarray:
        if (audio is not None and not len(audio)) or (audio is None and not self._pts):
            return np.zeros(0, np.float32)  # libswresample fails on empty input and empty flushes
        frame = None
        if audio is not None:
            frame = _frame(audio, self.rate_in, self._pts)
            self._pts += len(audio)
        out = [f.to_ndarray().reshape(-1) for f in self._rs.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def time_stretch(audio: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """Speak `speed` times faster at the same pitch (FFmpeg's WSOLA `atempo`); the duration
    becomes exactly 1/speed of the input's."""
    if speed == 1.0 or not len(audio):
        return audio
    factors = []
    while speed < 0.5:  # one atempo instance covers 0.5 to 100
        factors.append(0.5)
        speed /= 0.5
    graph = av.filter.Graph()
    nodes = [graph.add_abuffer(format="flt", sample_rate=rate, layout="mono",
                               time_base=Fraction(1, rate))]  # fmt: skip
    nodes += [graph.add("atempo", f"{f:.6f}") for f in (*factors, speed)]
    nodes.append(graph.add("abuffersink"))
    for a, b in zip(nodes, nodes[1:], strict=False):
        a.link_to(b)
    graph.configure()
    graph.push(_frame(audio, rate, 0))
    graph.push(None)
    out = []
    while True:
        try:
            out.append(graph.pull().to_ndarray().reshape(-1))
        except (av.BlockingIOError, av.EOFError):
            break
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class Encoder:
    """Base: optional resampling in front of a codec."""

    media_type = "application/octet-stream"
    _DRAIN_MAX_S = 0.5  # codecs hold back up to 0.35 s (MP3 at 8 kHz): a bound, not a goal

    def __init__(self, rate_in: int, rate_out: int | None = None) -> None:
        self.rate_in = rate_in
        self.sample_rate = rate_out or rate_in
        self._resample = (
            _Resampler(rate_in, self.sample_rate) if self.sample_rate != rate_in else None
        )
        self._finished = False
        self._given = 0  # samples given to `encode`, at rate_in
        self._coded = 0  # samples given to the codec, at sample_rate (the next frame's pts)
        self.bytes_out = 0  # bytes it has returned

    def encode(self, audio: np.ndarray) -> bytes:
        self._given += len(audio)
        return self._code(self._resample(audio) if self._resample else audio)

    def finish(self) -> bytes:
        self._finished = True
        tail = self._resample(None) if self._resample else np.zeros(0, np.float32)
        data = self._code(tail)
        end = self._finish()
        self.bytes_out += len(end)
        return data + end

    def _code(self, audio: np.ndarray) -> bytes:
        data = self._encode(audio) if len(audio) else b""
        self._coded += len(audio)
        self.bytes_out += len(data)
        return data

    def seconds_in(self, nbytes: int) -> float:
        """About how much audio ``nbytes`` of the output hold (its rate so far: exact for
        PCM, a compressed stream's average)."""
        return nbytes * self._emitted_s() / self.bytes_out if self.bytes_out else 0.0

    def drain(self) -> tuple[bytes, int]:
        """Push out, with silence after it, all the audio given so far, and keep the stream
        open (`finish` ends it). What it holds back is a resampler's filter delay, a codec's
        lookahead and unfilled frame, a muxer's page: 10 ms (a resampler) to 0.35 s (MP3 at
        8 kHz). Returns the bytes and how many samples of silence (at rate_in) it took."""
        if self._finished:  # the stream has ended: nothing is held
            return b"", 0
        given_s, out, silence = self._given / self.rate_in, [], 0
        most = int(self._DRAIN_MAX_S * self.rate_in)
        while silence < most:
            behind = given_s - self._emitted_s()
            if behind * self.sample_rate < 1:  # within a sample: all out
                break
            n = min(max(self.rate_in // 100, math.ceil(behind * self.rate_in)), most - silence)
            out.append(self.encode(np.zeros(n, np.float32)))
            silence += n
        return b"".join(out), silence

    def _emitted_s(self) -> float:
        """How much of the audio (seconds from the start) has come out as bytes."""
        return self._coded / self.sample_rate  # no codec delay

    def _encode(self, audio: np.ndarray) -> bytes:
        raise NotImplementedError

    def _finish(self) -> bytes:
        return b""


class PcmEncoder(Encoder):
    media_type = "audio/pcm"

    def _encode(self, audio: np.ndarray) -> bytes:
        return to_s16le(audio)


class WavEncoder(PcmEncoder):
    """A streamed WAV: the header first, with the 'unknown length' sizes players accept."""

    media_type = "audio/wav"

    def __init__(self, rate_in: int, rate_out: int | None = None) -> None:
        super().__init__(rate_in, rate_out)
        self._header_sent = False

    def header(self) -> bytes:
        rate = self.sample_rate
        return (
            b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", 0xFFFFFFFF)
        )  # fmt: skip

    def _encode(self, audio: np.ndarray) -> bytes:
        head = b"" if self._header_sent else self.header()
        self._header_sent = True
        return head + to_s16le(audio)

    def _finish(self) -> bytes:
        return b"" if self._header_sent else self.header()


class Mp3Encoder(Encoder):
    media_type = "audio/mpeg"

    def __init__(self, rate_in: int, rate_out: int | None = None) -> None:
        super().__init__(rate_in, rate_out)
        cc = av.CodecContext.create(MP3_CODEC, "w")
        cc.sample_rate = self.sample_rate
        cc.layout = "mono"
        cc.format = av.AudioFormat("fltp")
        cc.bit_rate = MP3_BITRATE
        cc.open()
        self._cc = cc
        self._out_s = 0.0  # where the last packet out ends

    def _emitted_s(self) -> float:
        return self._out_s

    def _encode(self, audio: np.ndarray | None) -> bytes:
        frame = None
        if audio is not None:
            frame = _frame(np.clip(audio, -1.0, 1.0), self.sample_rate, self._coded, "fltp")
        packets = self._cc.encode(frame)
        if packets:
            self._out_s = _end_s(packets[-1])
        return b"".join(bytes(p) for p in packets)

    def _finish(self) -> bytes:
        return self._encode(None)


class _Sink(io.RawIOBase):
    """Where a muxer writes: bytes are collected and taken after each encode (not seekable,
    so muxers write a stream, never go back to patch a header)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


@dataclass(frozen=True)
class Muxed:
    """A codec in a streamable container (or a raw one), at `rates` (the first: default)."""

    container: str
    codec: str
    media_type: str
    rates: tuple[int, ...] = ()  # () = any rate, default the engine's
    options: tuple[tuple[str, str], ...] = ()
    holds_last_packet: bool = False  # the muxer writes a packet once the next one comes


MUXED = {
    "opus": Muxed("ogg", "libopus", "audio/ogg", (48000, 24000, 16000, 12000, 8000),
                  (("page_duration", "20000"),), True),  # 20 ms Ogg pages: audio leaves at once
    # (the last page is kept back until the next, to mark the stream's end on it)
    "aac": Muxed("adts", "aac", "audio/aac"),
    "flac": Muxed("flac", "flac", "audio/flac"),
    "mulaw": Muxed("mulaw", "pcm_mulaw", "audio/PCMU", (8000, 16000)),  # telephony: G.711
    "alaw": Muxed("alaw", "pcm_alaw", "audio/PCMA", (8000, 16000)),
}  # fmt: skip


class MuxEncoder(Encoder):
    def __init__(self, spec: Muxed, rate_in: int, rate_out: int | None = None) -> None:
        super().__init__(rate_in, rate_out or (spec.rates[0] if spec.rates else None))
        self.media_type = spec.media_type
        self._sink = _Sink()
        self._out = av.open(self._sink, "w", format=spec.container, options=dict(spec.options))
        self._stream = self._out.add_stream(spec.codec, rate=self.sample_rate, layout="mono")
        # To the codec's own sample format (s16 for G.711 and FLAC, fltp for AAC, ...).
        codec_format = self._stream.codec_context.format.name
        self._to_codec = av.AudioResampler(format=codec_format, layout="mono")
        self._holds_last = spec.holds_last_packet
        self._ends = (0.0, 0.0)  # where the last two packets muxed end

    def _emitted_s(self) -> float:
        return self._ends[0] if self._holds_last else self._ends[1]

    def _encode(self, audio: np.ndarray | None) -> bytes:
        if audio is None:  # the end: flush the converter, then the encoder
            frames = [*self._to_codec.resample(None), None]
        else:
            frame = _frame(np.clip(audio, -1.0, 1.0), self.sample_rate, self._coded)
            frames = self._to_codec.resample(frame)
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._ends = (self._ends[1], _end_s(packet))
                self._out.mux(packet)
        return self._sink.take()

    def _finish(self) -> bytes:
        tail = self._encode(None)
        self._out.close()
        return tail + self._sink.take()


FORMATS = ("pcm", "wav", "mp3", *MUXED)


@functools.cache
def _codec_rates(codec: str) -> tuple[int, ...]:
    """The rates an encoder takes (empty: any)."""
    return tuple(av.codec.Codec(codec, "w").audio_rates or ())


def _check_rate(fmt: str, rate: int, allowed: tuple[int, ...]) -> None:
    if allowed and rate not in allowed:
        # only the ones a request may ask for: the others would be refused
        asked = (r for r in sorted(allowed) if MIN_SAMPLE_RATE <= r <= MAX_SAMPLE_RATE)
        rates = ", ".join(map(str, asked))
        raise ValueError(f"{fmt} cannot be encoded at {rate} Hz; use one of {rates}")


def make_encoder(fmt: str, rate_in: int, rate_out: int | None = None) -> Encoder:
    """Raises ValueError for a format or rate the codec cannot do (before any job exists)."""
    if fmt == "mp3":  # MPEG-1/2/2.5 rates
        _check_rate(fmt, rate_out or rate_in, _codec_rates(MP3_CODEC))
    if fmt in MUXED:
        spec = MUXED[fmt]
        out = rate_out or (spec.rates[0] if spec.rates else rate_in)
        _check_rate(fmt, out, spec.rates or _codec_rates(spec.codec))  # AAC: a list of its own
        return MuxEncoder(spec, rate_in, rate_out)
    encoders: dict[str, type[Encoder]] = {"pcm": PcmEncoder, "mp3": Mp3Encoder, "wav": WavEncoder}
    if fmt not in encoders:
        raise ValueError(f"unknown audio format {fmt!r}; use one of {', '.join(FORMATS)}")
    return encoders[fmt](rate_in, rate_out)
