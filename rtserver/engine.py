"""The contract between the scheduler and a synthesis engine, and the Job that carries a request.

The scheduler is the only caller of an engine and calls it from its one inference thread. An
engine never sees HTTP or WebSocket types; a session never sees the engine.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rtserver.channel import Channel


@dataclass(frozen=True)
class Speaker:
    id: str
    language: str
    sample_rate: int
    engine: str
    instructions: bool = False  # whether `instructions` steer it (the engine's instruct mode)
    # The engine's own voice for a speaker made for one request (a zero-shot prompt, a voice
    # steered by instructions); None: the engine's speaker `id`.
    voice: Any = field(default=None, compare=False, repr=False)


@dataclass
class Chunk:
    """A piece of audio: float32 mono in [-1, 1] at the speaker's sample rate."""

    audio: np.ndarray
    segment: int  # index of the text segment this audio belongs to
    segment_end: bool  # the last chunk of that segment
    # (with segment_end) the segment's speech ended at a limit of the model before all of
    # its text was spoken
    truncated: bool = False


@dataclass
class Done:
    pass


class SpeakerGone(LookupError):
    """Raised by Engine.start: the job's speaker was deleted after the job was accepted."""


@dataclass
class Failed:
    message: str
    code: str = "synthesis_failed"  # the WebSocket error code; see rtserver.protocol.ERROR_CODES


@dataclass
class Cancelled:
    pass


Event = Chunk | Done | Failed | Cancelled


class JobStatus(enum.Enum):
    WAITING = "waiting"  # submitted, not yet admitted to the engine
    RUNNING = "running"  # admitted: the engine holds its state
    FINISHED = "finished"  # done, failed or cancelled: its last event is sent, state released


_job_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One synthesis stream: an HTTP request or a WebSocket context.

    Text arrives as segments (sentences), possibly over time; `close_input` says no more will come.
    The inference thread pops segments; the event loop pushes them: hence the lock.
    """

    speaker: Speaker
    channel: Channel
    speed: float = 1.0
    seed: int = 0
    stream: bool = False
    max_audio_s: float = float("inf")  # the scheduler fails the job past this much audio
    text_streaming: bool = False  # fragments reach the engine as they arrive (add_fragment)
    request_id: str = "-"  # of the request that opened it, for the inference thread's logs
    client: str = ""  # the client address: admission takes turns between clients
    id: int = field(default_factory=lambda: next(_job_ids))
    status: JobStatus = JobStatus.WAITING  # written by the scheduler only
    created: float = field(default_factory=time.monotonic)
    first_text_at: float | None = None  # the first speakable text came (set by the session)
    # Set by the scheduler (inference thread); read by the session and the WebSocket watch.
    admitted_at: float | None = None  # when it took a slot
    first_audio_at: float | None = None
    plays_until: float = 0.0  # when a real-time listener has played all its audio, gaps kept
    audio_seconds: float = 0.0
    processing_seconds: float = 0.0
    engine_state: Any = None  # owned by the engine between start() and release()

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: deque[tuple[int, str]] = deque()  # (segment index, text)
        self._submitted = 0  # segments opened so far
        self._open: int | None = None  # text streaming: the segment still taking fragments
        self._input_closed = False
        self._cancel = threading.Event()
        self.ending: Failed | None = None  # why it was ended from outside, if not cancelled

    def add_segments(self, segments: list[str]) -> None:
        with self._lock:
            self._open = None
            for text in segments:
                self._segments.append((self._submitted, text))
                self._submitted += 1

    def add_fragment(self, text: str) -> int:
        """Text streaming: a fragment of the open segment (opening one if needed); returns
        its index. The engine may start speaking it before the segment is sealed."""
        with self._lock:
            if self._open is None:
                self._open = self._submitted
                self._submitted += 1
            self._segments.append((self._open, text))
            return self._open

    def seal(self) -> None:
        """Text streaming: the open segment is complete."""
        with self._lock:
            self._open = None

    @property
    def open_segment(self) -> int | None:
        with self._lock:
            return self._open

    def close_input(self) -> None:
        with self._lock:
            self._open = None
            self._input_closed = True

    def next_segment(self) -> tuple[int, str] | None:
        """Pop the next segment (or fragment) with its index in the job, or None."""
        with self._lock:
            return self._segments.popleft() if self._segments else None

    @property
    def runs_dry_at(self) -> float | None:
        """When a listener playing in real time since the first audio runs out of it (None
        before the first audio)."""
        if self.first_audio_at is None:
            return None
        return self.first_audio_at + self.audio_seconds

    @property
    def ttfa(self) -> float | None:
        """Seconds from the first speakable text to the first audio made (a WebSocket context
        may open long before its text: that wait is not the server's)."""
        if self.first_audio_at is None or self.first_text_at is None:
            return None
        return self.first_audio_at - self.first_text_at

    @property
    def rtf(self) -> float | None:
        """Seconds of processing per second of audio made (None before any audio)."""
        return self.processing_seconds / self.audio_seconds if self.audio_seconds else None

    def take_text(self) -> tuple[list[tuple[int, str]], int | None, bool]:
        """Everything queued, with the open segment and whether input is closed, as one
        snapshot: a segment sealed (or input closed) by then has all its text in the list."""
        with self._lock:
            items = list(self._segments)
            self._segments.clear()
            return items, self._open, self._input_closed

    def has_pending_text(self) -> bool:
        with self._lock:
            return bool(self._segments)

    @property
    def input_closed(self) -> bool:
        with self._lock:
            return self._input_closed

    def cancel(self, why: Failed | None = None) -> None:
        """End the job at the scheduler's next tick: as Cancelled, or as `why` (a limit the
        stream ran into: its client is told so, and it counts as dropped, not cancelled). The
        first call decides."""
        if not self._cancel.is_set():
            self.ending = why
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Engine(Protocol):
    """What the scheduler needs from a model. All methods run on the inference thread."""

    name: str
    max_batch: int  # how many jobs one step() may advance together
    sample_rate: int  # of its audio (a speaker may have its own; there may be none yet)

    def speakers(self) -> list[Speaker]: ...

    def warmup(self) -> None: ...

    def start(self, job: Job) -> None:
        """Allocate per-job state (job.engine_state). May raise: that fails only this job."""

    def ready(self, job: Job) -> bool:
        """Whether step() can make progress on this job now (text pending, work in flight,
        or input closed so it can finish)."""

    def step(self, jobs: list[Job]) -> list[tuple[Job, Event]]:
        """Advance every job by one unit of work. A job finishes by returning Done for it.
        Must not raise for a per-job problem: return Failed for that job instead."""

    def release(self, job: Job) -> None:
        """Free per-job state (finish, cancel or failure). Idempotent."""

    # optional: ``held() -> dict[str, int]``, memory units that jobs hold now (cache blocks...),
    # 0 once no job runs; published as /healthz ``held_<name>`` and rtserver_engine_held_<name>
