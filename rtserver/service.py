"""What the HTTP and WebSocket handlers share: speakers, limits, and opening synthesis jobs.

Handlers stay thin: they parse, call this, and turn its exceptions into status codes or
WebSocket error events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from rtserver import __version__
from rtserver.audio import Encoder
from rtserver.channel import Channel
from rtserver.engine import Cancelled, Chunk, Done, Engine, Failed, Job, Speaker
from rtserver.scheduler import Busy, Scheduler
from rtserver.settings import Settings
from rtserver.text import Segmenter

__all__ = [
    "Busy",
    "SpeakerRegistrationError",
    "SynthesisFailed",
    "TTSService",
    "TextTooLong",
    "UnknownSpeaker",
]


class UnknownSpeaker(LookupError):
    def __init__(self, spk_id: str, valid: list[str]) -> None:
        super().__init__(f"unknown spk_id {spk_id!r}; valid speakers: {', '.join(valid)}")
        self.spk_id = spk_id
        self.valid = valid


class TextTooLong(ValueError):
    pass


class SynthesisFailed(RuntimeError):
    pass


class SpeakerRegistrationError(ValueError):
    """Registration refused: unusable audio, a bad or taken name, or an engine without it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TTSService:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.scheduler = Scheduler(
            engine,
            max_streams=settings.max_streams,
            max_queue=settings.max_queue,
            serial=settings.scheduler == "serial",
        )
        self.started_at = time.time()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.warmup:
            self.engine.warmup()
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    # ---- queries --------------------------------------------------------------------------

    def speakers(self) -> list[Speaker]:
        return self.engine.speakers()

    def speaker(self, spk_id: str) -> Speaker:
        speakers = {s.id: s for s in self.engine.speakers()}
        if spk_id not in speakers:
            raise UnknownSpeaker(spk_id, sorted(speakers))
        return speakers[spk_id]

    @property
    def sample_rate(self) -> int:
        return self.engine.speakers()[0].sample_rate

    def health(self) -> dict[str, object]:
        return {
            "status": "ok",
            "version": __version__,
            "engine": self.engine.name,
            "uptime_s": round(time.time() - self.started_at, 1),
            "speakers": len(self.engine.speakers()),
            **self.scheduler.snapshot(),
        }

    async def register_speaker(self, spk_id: str, audio: bytes, prompt_text: str) -> Speaker:
        register = getattr(self.engine, "register_speaker", None)
        if register is None:
            raise SpeakerRegistrationError(
                f"the {self.engine.name} engine has no zero-shot speaker registration", 400
            )
        if any(s.id == spk_id for s in self.engine.speakers()):
            raise SpeakerRegistrationError(f"speaker {spk_id!r} already exists", 409)
        try:
            # Feature extraction runs ONNX models: keep it off the event loop.
            return await asyncio.to_thread(register, spk_id, audio, prompt_text)
        except (ValueError, KeyError) as exc:  # AudioError, SpeakerError, empty text
            raise SpeakerRegistrationError(str(exc).strip("'\""), 400) from exc

    async def delete_speaker(self, spk_id: str) -> None:
        delete = getattr(self.engine, "delete_speaker", None)
        if delete is None:
            raise SpeakerRegistrationError(
                f"the {self.engine.name} engine has no registered speakers"
            )
        self.speaker(spk_id)  # UnknownSpeaker -> 400 listing the valid ones
        try:
            await asyncio.to_thread(delete, spk_id)
        except KeyError as exc:  # a built-in speaker
            raise SpeakerRegistrationError(str(exc).strip("'\""), 400) from exc

    # ---- synthesis ------------------------------------------------------------------------

    def check_text(self, text: str) -> None:
        if len(text) > self.settings.max_text_chars:
            raise TextTooLong(
                f"text has {len(text)} characters; the limit is {self.settings.max_text_chars}"
            )

    def segmenter(self, stream: bool, incremental: bool = False) -> Segmenter:
        """How text becomes job segments: the engine's own rules where it has them (CosyVoice
        splits as upstream does), else sentence segmentation tuned for low latency."""
        own = getattr(self.engine, "segmenter", None)
        if own is not None:
            return own(incremental)
        s = self.settings
        return Segmenter(
            min_chars=s.min_sentence_chars,
            first_chars=s.first_segment_chars,
            # stream=true asks for the finest chunks: cut at clauses, not only sentences.
            clause_chars=s.first_segment_chars if stream else 0,
        )

    def open_job(
        self, speaker: Speaker, speed: float = 1.0, seed: int = 0, stream: bool = False
    ) -> Job:
        """A job registered with the scheduler, ready for text. Raises Busy at capacity."""
        channel = Channel(asyncio.get_running_loop(), self.scheduler.wake)
        job = Job(speaker=speaker, channel=channel, speed=speed, seed=seed, stream=stream)
        self.scheduler.submit(job)
        return job

    def add_text(self, job: Job, segments: list[str], close: bool = False) -> None:
        if segments:
            job.add_segments(segments)
        if close:
            job.close_input()
        self.scheduler.wake()

    def cancel(self, job: Job) -> None:
        job.cancel()
        self.scheduler.wake()

    def synthesize(self, text: str, speaker: Speaker, speed: float, seed: int, stream: bool) -> Job:
        """A job for a whole text (HTTP): segmented, submitted and closed."""
        self.check_text(text)
        seg = self.segmenter(stream)
        job = self.open_job(speaker, speed, seed, stream)
        self.add_text(job, seg.push(text) + seg.flush(), close=True)
        return job

    async def first_event(self, job: Job) -> Chunk | Done:
        """Wait for the first audio, so a failure before it can still become an HTTP error."""
        event = await job.channel.get()
        if isinstance(event, Failed):
            raise SynthesisFailed(event.message)
        if isinstance(event, Cancelled):
            raise SynthesisFailed("the job was cancelled")
        return event

    async def encoded(
        self, job: Job, encoder: Encoder, first: Chunk | Done
    ) -> AsyncIterator[bytes]:
        """The job's audio through one encoder. Leaving early (client gone) cancels the job."""
        finished = False
        try:
            event: object = first
            while True:
                if isinstance(event, Chunk):
                    data = encoder.encode(event.audio)
                    if data:
                        yield data
                elif isinstance(event, Done):
                    finished = True
                    tail = encoder.finish()
                    if tail:
                        yield tail
                    return
                elif isinstance(event, Failed):
                    finished = True
                    # Headers are gone: break the body so the client sees an incomplete stream.
                    raise SynthesisFailed(event.message)
                else:
                    finished = True
                    return
                event = await job.channel.get()
        finally:
            if not finished:
                self.cancel(job)
