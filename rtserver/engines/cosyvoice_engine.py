"""CosyVoice behind the scheduler: a job is one :class:`cosyvoice.utterance.Utterance`.

The model owns the pipeline (segments, seeds, LLM and token2wav batching); this adapter only
moves a job's text into its utterance, asks the model to step every job's utterance together,
and turns the model's outputs into the scheduler's events.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cosyvoice
from cosyvoice.frontend import IncrementalSplitter
from cosyvoice.speakers import SpeakerError
from cosyvoice.utterance import Output, Status, Utterance
from rtserver.engine import Chunk, Done, Event, Failed, Job, Speaker, SpeakerGone

log = logging.getLogger("rtserver.cosyvoice")


class _WholeText:
    """HTTP segmentation: the whole text as one piece; the model splits it as upstream does."""

    def __init__(self) -> None:
        self._buf = ""

    def push(self, text: str) -> list[str]:
        self._buf += text
        return []

    def flush(self) -> list[str]:
        text, self._buf = self._buf, ""
        return [text] if text.strip() else []

    @property
    def pending(self) -> str:
        return self._buf


def _raw_sentence(text: str) -> list[str]:
    """WebSocket text is only cut at sentence ends here; the model normalizes and splits."""
    return [text.strip()] if text.strip() else []


class CosyVoiceEngine:
    def __init__(
        self,
        model_dir: Path,
        max_batch: int = 64,
        fixed_tokens: int | None = None,
        **load_opts: Any,
    ) -> None:
        """``load_opts``: :func:`cosyvoice.load`'s options (device, dtype, speaker_dir,
        flow_cache_mb, exact_final, vocoder_thread, packed, graphs), passed as they are."""
        self.model = cosyvoice.load(model_dir, max_batch=max_batch, **load_opts)
        if why := self.model.speakers.unwritable():  # a read-only model dir, most often
            log.warning("speakers cannot be registered or deleted here: %s (--speaker-dir "
                        "sets the folder they are kept in)", why)  # fmt: skip
        self.name = f"cosyvoice-{self.model.family}"
        self.max_batch = max_batch
        self.sample_rate = self.model.sample_rate
        self.fixed_tokens = fixed_tokens  # benchmarks: every LLM run emits exactly this many
        self.text_streaming = self.model.text_streaming
        self.instructions = self.model.instructions  # CosyVoice2/3, CosyVoice-300M-Instruct
        # every started job by its utterance: a step may hand out audio of jobs it was not
        # given (batches vocoded on the model's vocoder thread arrive a step or more later)
        self._jobs: dict[int, Job] = {}

    # ---- speakers -------------------------------------------------------------------------

    def _speaker(self, name: str, voice: Any = None) -> Speaker:
        rate = self.model.sample_rate
        return Speaker(name, "zh/en", rate, self.name, self.instructions, voice=voice)

    def speakers(self) -> list[Speaker]:
        # Asked of the store each time: it sees what other replicas sharing its speaker dir
        # registered or deleted (one stat while nothing changed).
        return [self._speaker(n) for n in self.model.speakers.list()]

    def register_speaker(self, spk_id: str, audio: bytes, prompt_text: str) -> Speaker:
        self.model.speakers.register(spk_id, audio, prompt_text)
        return self._speaker(spk_id)

    def keep_prompt(self, spk_id: str, stopping: threading.Event) -> bool:
        """Off the inference thread, after a registration: a speaker registered is about to
        be used, so its prompt's part of the flow state is computed now and its first stream
        starts past it too. It stops (between pieces) once ``stopping`` is set or the speaker
        is deleted or registered anew, and what it kept of a speaker no longer there goes."""
        try:
            voice = self.model.speakers.get(spk_id)
        except SpeakerError:  # deleted already
            return False

        def gone() -> bool:
            try:  # the store's object until its file changes: another one is another voice
                return self.model.speakers.get(spk_id) is not voice
            except SpeakerError:
                return True

        kept = self.model.keep_prompt(voice, stop=lambda: stopping.is_set() or gone())
        if kept and gone():  # its deletion's forget came first
            self.model.forget_prompt(voice)
            return False
        return kept

    def prompt_speaker(
        self, audio: bytes, prompt_text: str | None, instruction: str | None = None
    ) -> Speaker:
        """A speaker for one request from a prompt recording: with its transcript (zero-shot),
        without (cross-lingual), or steered by an instruction (instruct2)."""
        voice = self.model.speakers.from_prompt(audio, prompt_text)
        if instruction is not None:
            voice = self.model.instructed(voice, instruction)
        return self._speaker(voice.name, voice)

    def instructed(self, speaker: Speaker, instruction: str) -> Speaker:
        """``speaker`` steered by an instruction (where the model takes them: ``instructions``)."""
        voice = self.model.instructed(speaker.voice or speaker.id, instruction)
        return replace(speaker, voice=voice)

    def delete_speaker(self, spk_id: str) -> None:
        """Off the inference thread. What the flow kept of its prompt goes too."""
        voice = self.model.speakers.get(spk_id)
        self.model.speakers.delete(spk_id)
        try:
            self.model.forget_prompt(voice)
        except Exception:  # deleted all the same; the store's LRU pushes the prompt out
            log.exception("could not drop the kept prompt of speaker %r", spk_id)

    def segmenter(self, incremental: bool):
        return IncrementalSplitter(_raw_sentence) if incremental else _WholeText()

    # ---- scheduler interface --------------------------------------------------------------

    def warmup(self) -> None:
        self.model.warmup()

    def start(self, job: Job) -> None:
        try:
            job.engine_state = self.model.start(
                job.speaker.voice or job.speaker.id, seed=job.seed, speed=job.speed,
                stream=job.stream, fixed_tokens=self.fixed_tokens, text_stream=job.text_streaming,
            )  # fmt: skip
        except SpeakerError as exc:  # deleted while the job waited
            raise SpeakerGone(str(exc)) from exc
        self._jobs[id(job.engine_state)] = job

    def ready(self, job: Job) -> bool:
        utt: Utterance | None = job.engine_state
        if utt is None:
            return False
        return (
            utt.busy
            or _seal_due(utt, job.open_segment)
            or job.has_pending_text()
            or job.input_closed
        )

    def step(self, jobs: list[Job]) -> list[tuple[Job, Event]]:
        for job in jobs:
            self._take_text(job)
        by_utt = self._jobs
        outs = self.model.step(
            [j.engine_state for j in jobs], slack=lambda u: _slack(by_utt[id(u)])
        )
        return [(by_utt[id(o.utterance)], e) for o in outs if id(o.utterance) in by_utt
                for e in _events(o)]  # fmt: skip

    def held(self) -> dict[str, int]:
        return self.model.held()

    def let_go(self) -> bool:
        """No job is running or waiting (the scheduler calls it idle); True while the model
        has more idle work (CUDA graphs to capture, one per call)."""
        return self.model.let_go()

    def stats(self) -> dict[str, int]:
        """Read at scrape time, off the inference thread: counts only."""
        return self.model.stats()

    def graph_stats(self) -> dict[str, Any]:
        """Read at scrape time, as :meth:`stats`."""
        return self.model.graph_stats()

    def release(self, job: Job) -> None:
        if job.engine_state is not None:
            self._jobs.pop(id(job.engine_state), None)
            self.model.cancel(job.engine_state)
        job.engine_state = None

    # ---- internals ------------------------------------------------------------------------

    def _take_text(self, job: Job) -> None:
        """Move the job's queued segments (or text-streaming fragments) into its utterance;
        seal or close it as the job's snapshot says."""
        utt: Utterance = job.engine_state
        items, open_segment, closed = job.take_text()
        if utt.status is Status.FINISHED or utt.closed:  # failed or cancelled: its error is out
            return
        for index, text in items:
            self.model.add_text(utt, text, tag=index)
        if closed:
            self.model.close_text(utt)
        elif _seal_due(utt, open_segment):
            self.model.seal(utt)


def _seal_due(utt: Utterance, open_segment: int | None) -> bool:
    """The utterance's text-streaming piece is still open, but the job has sealed it."""
    return utt.open_tag is not None and utt.open_tag != open_segment


def _slack(job: Job) -> float | None:
    """Seconds of audio the listener has left to play (None before the first audio)."""
    dry = job.runs_dry_at
    return None if dry is None else dry - time.monotonic()


def _events(out: Output) -> list[Event]:
    if out.error:
        return [Failed(out.error)]
    events: list[Event] = []
    if out.audio.numel() or out.tag_end:
        events.append(
            Chunk(out.audio.numpy(), out.tag, segment_end=out.tag_end, truncated=out.truncated)
        )
    if out.done:
        events.append(Done())
    return events
