"""A Session is one synthesis stream, an HTTP request or a WebSocket context: text in, encoded
audio out. Both transports use it the same way, so every check, limit and release lives here.

Opening one (`TTSService.open_session`) builds everything that can fail (speaker, encoder,
client quota) before the job is admitted, and undoes what it took if admission fails. From
then on `events()` is the one audio pump: it encodes the job's chunks and yields `Audio`,
`SegmentEnd` and one terminal event (`Finished`, `Cancelled` or `Failed`); leaving it early
cancels the job, and `end()` releases everything whatever path the stream took.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from rtserver.audio import Encoder
from rtserver.engine import Cancelled, Chunk, Done, Failed, Job, JobStatus
from rtserver.text import Segmenter, speakable

__all__ = [
    "Audio",
    "Cancelled",
    "ClientQuota",
    "Failed",
    "Finished",
    "SegmentEnd",
    "Session",
    "SessionEvent",
    "TextRejected",
    "TooManyForClient",
    "check_text",
    "speakable",
]

_ALLOWED_CONTROLS = "\t\n\r"
VOICE_LEVEL = 0.02  # |sample| above this is speech, not the silence around it (-34 dBFS)


class TextRejected(ValueError):
    """Text that must not reach the engine. `code` is the WebSocket error code."""

    def __init__(
        self, code: str, message: str, status: int = 422, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.field = field  # the request's field the text came in, where there is one


class TooManyForClient(Exception):
    """One client address holds its whole quota of streams or sockets."""


def check_text(text: str, used: int, limit: int, name: str = "text") -> None:
    """Refuse control characters and text past the per-stream limit (`used` already spent).
    `name` is what the message calls the text (a request's field)."""
    bad = next(
        (c for c in text if unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS), None
    )
    if bad is not None:
        message = f"{name} contains the control character U+{ord(bad):04X}"
        raise TextRejected("invalid_text", message, field=name)
    if used + len(text) > limit:
        raise TextRejected(
            "text_too_long",
            f"{name} has {used + len(text)} characters; the limit is {limit}",
            status=413,
            field=name,
        )


class ClientQuota:
    """At most `limit` things (streams, sockets) open at once per client address."""

    def __init__(self, what: str, limit: int, state: str = "open") -> None:
        self.what, self.state = what, state  # "2 streams open", "4 uploads waiting"
        self.limit = limit  # 0: no limit
        self._held: dict[str, int] = {}

    def acquire(self, client: str) -> Callable[[], None]:
        """Take one; returns the (idempotent) release. Raises TooManyForClient."""
        held = self._held.get(client, 0)
        if self.limit and held >= self.limit:
            raise TooManyForClient(
                f"{client} already has {held} {self.what} {self.state} (the limit)"
            )
        self._held[client] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._held[client] - 1
                if left:
                    self._held[client] = left
                else:
                    del self._held[client]

        return release

    def held(self) -> int:
        return sum(self._held.values())

    def held_by(self, client: str) -> int:
        return self._held.get(client, 0)


@dataclass
class Audio:
    data: bytes  # encoded audio (never empty)


@dataclass
class SegmentEnd:
    index: int
    text: str
    start_ms: float  # where the segment sits in the stream's audio
    end_ms: float
    voiced_ms: tuple[float, float] | None = None  # first to last non-silent sample, if any
    truncated: bool = False  # it ended at a limit of the model: not all its text was spoken


@dataclass
class Finished:
    ttfa_ms: float | None  # first text to first audio; None if no audio
    audio_ms: float
    processing_ms: float
    rtf: float
    segments: int


SessionEvent = Audio | SegmentEnd | Finished | Cancelled | Failed


def _unknown() -> None:
    return None


class Session:
    def __init__(
        self,
        job: Job,
        encoder: Encoder,
        segmenter: Segmenter,
        max_chars: int,
        wake: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        self.job = job
        self.encoder = encoder
        self.sample_rate = encoder.sample_rate  # of the encoded output
        self._segmenter = segmenter
        self._max_chars = max_chars
        self._wake = wake  # tells the scheduler something changed
        self._release = release  # frees the client's quota
        self.texts: list[str] = []  # submitted segments, by segment index
        self.chars = 0
        self.first_audio_at: float | None = None
        self._rate_in = job.speaker.sample_rate
        self._samples = 0  # engine-rate samples pumped so far
        self._silence = 0  # and of silence the encoder was drained with (see _pauses_after)
        self._flush_ends: set[int] = set()  # segment counts at flushes not yet drained
        self._segment_start = 0  # where the segment being pumped began (see _position)
        self._voiced: tuple[int, int] | None = None  # the segment's first/last loud sample
        self._segments_done = 0
        self._cut: Failed | None = None
        # Set by the transport: why the server cut the client's connection off, if it did (a
        # client that read nothing): then the stream ends as that limit (counted as
        # dropped), not as a client that left, however the cancel comes.
        self.cut_by: Callable[[], Failed | None] = lambda: None
        # Set by the transport too, where it knows: bytes of this stream that reached the
        # client. The scheduler judges a client by the audio that reached it (see
        # Channel.delivered_s), not by what waits in the server's buffers.
        self.acked: Callable[[], int | None] = _unknown
        job.channel.reached_s = self._reached_s

    def _reached_s(self) -> float | None:
        """Seconds of audio that reached the client, where the transport knows (called from
        the scheduler's thread: it reads counters and asks the socket)."""
        return None if (n := self.acked()) is None else self.encoder.seconds_in(n)

    # ---- text in ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """The whole text at once (HTTP): segmented, submitted and closed."""
        self.push(text)
        self.close()

    def push(self, text: str) -> None:
        """A fragment; raises TextRejected (and takes nothing of it) when it is not allowed."""
        check_text(text, self.chars, self._max_chars)
        self.chars += len(text)
        if self.job.first_text_at is None and speakable(text):
            self.job.first_text_at = time.monotonic()
        if self.job.text_streaming:
            self._stream(text)
        else:
            self._submit(self._segmenter.push(text))

    def flush(self) -> int:
        """Submit whatever is buffered now; returns how many segments are submitted in all."""
        if self.job.text_streaming:
            self.job.seal()
            self._wake()
        else:
            self._submit(self._segmenter.flush())
        if self.texts:
            self._flush_ends.add(len(self.texts))
        return len(self.texts)

    def _stream(self, text: str) -> None:
        """Text streaming: the fragment goes to the engine now, as part of the open segment
        (a flush seals it). Spaces matter here, so nothing is stripped."""
        if self.job.open_segment is None and not speakable(text):
            return  # would open a segment with nothing to say
        index = self.job.add_fragment(text)
        if index == len(self.texts):
            self.texts.append(text)
        else:
            self.texts[index] += text
        self._wake()

    def close(self) -> None:
        self.flush()
        self.job.close_input()
        self._wake()

    @property
    def pending_text(self) -> bool:
        """Text a flush would let go: what the segmenter holds back (waiting for a sentence
        end), or in text streaming a piece still open (its LLM run waits for more text, and
        holds its slot while it waits)."""
        if self.job.text_streaming:
            return self.job.open_segment is not None
        return speakable(self._segmenter.pending)

    def _submit(self, segments: list[str]) -> None:
        # Segments with nothing to say would give silence, or no audio at all: never send them.
        segments = [s for s in segments if speakable(s)]
        if segments:
            self.texts.extend(segments)
            self.job.add_segments(segments)
            self._wake()

    # ---- control ---------------------------------------------------------------------------

    @property
    def segments_done(self) -> int:
        """Segments whose audio the consumer has taken (their SegmentEnd is yielded)."""
        return self._segments_done

    @property
    def working(self) -> bool:
        """The engine has text of this stream to speak that needs nothing more from the
        client: a segment submitted and not yet all out. (Text the segmenter holds for a
        sentence end, or an open text-streaming piece, waits on the client.)"""
        sealed = len(self.texts) - (self.job.open_segment is not None)
        return self._segments_done < sealed

    @property
    def idle(self) -> bool:
        """Nothing left to say: every submitted segment is spoken and no text is buffered."""
        return self._segments_done == len(self.texts) and not self.pending_text

    def cancel(self, why: Failed | None = None) -> None:
        self.job.cancel(why or self.cut_by())
        self._wake()

    def cut(self, why: Failed) -> None:
        """End the stream now as ``why`` (the server's shutdown): the chunks still queued for
        the consumer are not sent, the job is cancelled."""
        self._cut = why
        self.cancel(why)
        self.job.channel.put(why)  # wakes events() even if the inference thread is stuck

    def end(self) -> None:
        """Release everything this session holds. Idempotent; safe on any path."""
        if self.job.status is not JobStatus.FINISHED:
            self.cancel()
        self.job.channel.reached_s = _unknown  # (no cycle through the job: freed at once)
        self._release()

    # ---- audio out -------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[SessionEvent]:
        """The stream's events, ending with exactly one Finished, Cancelled or Failed."""
        try:
            while True:
                if self._cut is not None:
                    yield self._cut
                    return
                event = await self.job.channel.get()
                if isinstance(event, Chunk):
                    for out in self._chunk(event):
                        if self._cut is not None:  # cut while the last part was sent
                            break
                        if isinstance(out, SegmentEnd):  # counted once its audio went out
                            if self._pauses_after(out.index) and (tail := self._drain()):
                                yield Audio(tail)  # (a flush may come while audio is sent)
                            self._segments_done = out.index + 1
                        yield out
                    continue
                ends = isinstance(event, Done) or (isinstance(event, Failed) and self._samples)
                if ends and (tail := self.encoder.finish()):  # a Failed before any audio
                    yield Audio(tail)  # stays first (a 4xx); a later one, after what it held
                yield self._finished() if isinstance(event, Done) else event
                return
        finally:
            self.end()

    def _chunk(self, chunk: Chunk) -> list[Audio | SegmentEnd]:
        out: list[Audio | SegmentEnd] = []
        self._track_voice(chunk.audio)
        self._samples += len(chunk.audio)
        data = self.encoder.encode(chunk.audio)
        if data:
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            out.append(Audio(data))
        if chunk.segment_end:
            start_ms, end_ms = (
                n * 1000 / self._rate_in for n in (self._segment_start, self._position)
            )
            self._segment_start = self._position
            text = self.texts[chunk.segment]
            voiced = self._voiced and tuple(
                round(n * 1000 / self._rate_in, 1) for n in self._voiced
            )
            self._voiced = None
            ms = round(start_ms, 1), round(end_ms, 1)
            out.append(SegmentEnd(chunk.segment, text, *ms, voiced, chunk.truncated))
        return out

    def drain_if_spoken(self) -> bytes:
        """At a flush that finds all the text given spoken (its last segment ended before
        the flush came): the encoder's held-back audio, pushed out now (see _pauses_after)."""
        if not self.texts or self._segments_done < len(self.texts) or self.job.input_closed:
            return b""
        self._flush_ends.discard(len(self.texts))
        return self._drain()

    def _drain(self) -> bytes:
        tail, silence = self.encoder.drain()
        self._silence += silence
        self._segment_start = self._position  # the next segment starts after the silence
        return tail

    def _pauses_after(self, segment: int) -> bool:
        """A flush ends with this segment and more text may come (a WebSocket context): the
        encoder's held-back audio is pushed out with silence then, so all of the flushed
        text's audio is sent before `flushed`. The silence (10 ms to 0.35 s, in the stream's
        timeline) falls at the end of a turn; between sentences the next audio pushes it, at
        the end `finish` does."""
        if segment + 1 not in self._flush_ends:
            return False
        self._flush_ends.discard(segment + 1)
        return not self.job.input_closed

    @property
    def _position(self) -> int:
        """Where the stream's timeline is (engine-rate samples): audio and drained silence."""
        return self._samples + self._silence

    def _track_voice(self, audio: np.ndarray) -> None:
        """Where speech starts and ends in the segment (word timings are spread over it)."""
        loud = np.flatnonzero(np.abs(audio) > VOICE_LEVEL)
        if loud.size:
            first, last = self._position + int(loud[0]), self._position + int(loud[-1]) + 1
            self._voiced = (self._voiced[0] if self._voiced else first, last)

    @property
    def samples(self) -> int:
        """Samples of audio the engine has made for this session so far."""
        return self._samples

    def _finished(self) -> Finished:
        audio_ms = self._samples * 1000 / self._rate_in
        processing_ms = self.job.processing_seconds * 1000
        ttfa = None  # to the first encoded bytes (a codec's first frame may wait): the client's
        if self.first_audio_at is not None and self.job.first_text_at is not None:
            ttfa = round((self.first_audio_at - self.job.first_text_at) * 1000, 1)
        return Finished(
            ttfa_ms=ttfa,
            audio_ms=round(audio_ms, 1),
            processing_ms=round(processing_ms, 1),
            rtf=round(processing_ms / audio_ms, 4) if audio_ms else 0.0,
            segments=len(self.texts),
        )
