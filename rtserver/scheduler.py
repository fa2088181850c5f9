"""The session scheduler: one inference thread multiplexes the engine across every stream.

Each tick: drop cancelled jobs, admit waiting ones (taking turns between clients), pick a
batch by earliest deadline (jobs still waiting for their first audio are due a moment after
they arrive; the others when their listener runs out of buffered audio), run one engine step,
route what it produced. Jobs whose consumer has not read its backlog are skipped, so a slow
client slows only itself and server memory stays bounded.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from rtserver.engine import (
    Cancelled,
    Chunk,
    Done,
    Engine,
    Event,
    Failed,
    Job,
    JobStatus,
    SpeakerGone,
)
from rtserver.memory import Trimmer
from rtserver.metrics import Metrics

log = logging.getLogger("rtserver.scheduler")


TRIM_EVERY_S = 30.0  # under constant load, hand freed memory back at least this often
TRIM_GAP_S = 1.0  # and at most this often, when jobs end or the scheduler goes idle
# While streams wait for a slot, a client this far behind real time (or read_timeout_s, if
# less), its audio kept waiting as long, gives its slot up: stalled readers from two
# addresses held every slot for the whole read timeout (others' first audio came 40 s late).
CONTENDED_READ_S = 5.0


_CLIENTS_REMEMBERED = 4096  # client addresses whose last admission the scheduler keeps


class Busy(Exception):
    """The scheduler is at capacity."""


@dataclass
class Counters:
    completed: int = 0
    cancelled: int = 0
    failed: int = 0  # engine errors
    dropped: int = 0  # ended by a limit or the server (see metrics.SCHEDULER_COUNTERS)
    rejected: int = 0
    steps: int = 0
    segments_truncated: int = 0  # segments whose speech ended at a model limit, text unspoken
    audio_s: float = 0.0  # audio produced for clients, all jobs together


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_streams: int = 16,
        max_queue: int = 16,
        max_backlog: int = 4,
        serial: bool = False,
        first_audio_budget_s: float = 0.25,
        read_timeout_s: float = float("inf"),
        client_share: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.max_streams = max_streams  # jobs admitted to the engine at once
        self.max_queue = max_queue  # jobs waiting for admission; beyond that: Busy
        self.max_backlog = max_backlog  # unread events per job before it stops being scheduled
        self.serial = serial  # benchmark baseline: one job at a time, start to finish
        self.first_audio_budget_s = first_audio_budget_s
        self.read_timeout_s = read_timeout_s  # a consumer that reads nothing this long is gone
        # Streams one client runs at once (0: no limit). Below max_streams, a client's streams
        # that read at real time for minutes cannot hold every slot: another client gets one.
        self.client_share = client_share
        self.counters = Counters()
        self.metrics = metrics or Metrics()
        self.metrics.watch(self.snapshot)
        self.last_tick = time.monotonic()  # the inference thread's heartbeat (see stalled())
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._held: dict[str, int] = {}  # the engine's held(), as of the last tick
        self._turns: OrderedDict[str, int] = OrderedDict()  # client: its last admission's
        self._turn = itertools.count()
        self._stop = False
        self._trim = Trimmer()
        self._trimmed_at = time.monotonic()
        self._dirty = False  # work done since memory was last handed back
        self._ended = False  # a job ended since then
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    # ---- called from the event loop -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._at_capacity():
                self.counters.rejected += 1
                raise Busy(f"server at capacity ({self._slots} streams, {self.max_queue} queued)")
            self._waiting.append(job)
        self._wake.set()

    def wake(self) -> None:
        """Something changed for some job (text, cancel, a read): look again."""
        self._wake.set()

    def stalled(self, after_s: float) -> bool:
        """The inference thread has not come round for `after_s` (a tick waits at most 1 s
        when idle, so only a stuck engine step or a dead thread gets here)."""
        return time.monotonic() - self.last_tick > after_s or not self._thread.is_alive()

    def full(self) -> bool:
        with self._lock:
            return self._at_capacity()

    def used_memory(self) -> None:
        """Work done off the inference thread (a speaker registration) left freed memory: hand
        it back as after synthesis."""
        self._dirty = True
        self.wake()

    @property
    def contended(self) -> bool:
        """Whether streams wait for a slot that is taken: then a slot held without use is given
        up sooner. (One client's streams past its share wait with slots free: they wait for
        that client's own, which keep their usual time.)"""
        return bool(self._waiting) and len(self._running) >= self._slots

    @property
    def _slots(self) -> int:
        return 1 if self.serial else self.max_streams

    def _at_capacity(self) -> bool:  # with the lock held
        return len(self._running) + len(self._waiting) >= self._slots + self.max_queue

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            active, queued = len(self._running), len(self._waiting)
        c = self.counters
        return {
            "active": active,
            "queued": queued,
            "completed": c.completed,
            "cancelled": c.cancelled,
            "failed": c.failed,
            "dropped": c.dropped,
            "rejected": c.rejected,
            "steps": c.steps,
            "segments_truncated": c.segments_truncated,
            "audio_s": round(c.audio_s, 3),
            "max_streams": self.max_streams,
            "max_queue": self.max_queue,
            **self._held,
        }

    # ---- the inference thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            try:
                self._tick()
            except Exception:  # the thread must outlive any bug: a dead loop hangs every stream
                log.exception("scheduler tick failed")
                time.sleep(0.05)

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self._wake.clear()
        self._drop_cancelled()
        self._drop_stalled()
        self._admit()
        batch = self._pick()
        self._release_memory()
        self._held = self._engine_held()
        if not batch:
            self._wake.wait(timeout=1.0)
            return
        self._dirty = True
        t0 = time.monotonic()
        results = self._step(batch)
        elapsed = time.monotonic() - t0
        share = elapsed / len(batch)
        log.debug("step: %d jobs in %.1f ms", len(batch), elapsed * 1000)
        self.counters.steps += 1
        self.metrics.step(len(batch))
        if not getattr(self.engine, "measures_time", False):
            for job in batch:
                job.processing_seconds += share
        for job, event in results:
            self._route(job, event)

    def _engine_held(self) -> dict[str, int]:
        held = getattr(self.engine, "held", None)
        return {f"held_{k}": v for k, v in held().items()} if held else {}

    def _release_memory(self) -> None:
        since = time.monotonic() - self._trimmed_at
        idle = not self._running and not self._waiting
        due = (idle or self._ended) and since > TRIM_GAP_S
        if self._dirty and (due or since > TRIM_EVERY_S):
            # the engine's idle state first (its memory is handed back too); with more idle
            # work left (or memory it lets go later), the next idle tick a gap later comes back
            # for it
            more = idle and self._let_go()
            self._trim(idle)
            self._trimmed_at, self._dirty, self._ended = time.monotonic(), more, False

    def _let_go(self) -> bool:
        let_go = getattr(self.engine, "let_go", None)
        try:
            return bool(let_go()) if let_go is not None else False
        except Exception:  # memory kept is no reason to fail the tick (it would every 50 ms)
            log.exception("the engine could not let its idle state go")
            return False

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [j for j in (*self._running, *self._waiting) if j.cancelled]
        for job in gone:
            self._finish(job, job.ending or Cancelled())

    def _drop_stalled(self) -> None:
        """A client that stops reading holds a slot (and its audio) until this gives up on it:
        `read_timeout_s` after both its last read and the time a listener playing in real
        time would have played all it read. (One reading at playback speed leaves whole
        seconds of audio in the socket's buffers, so it reads nothing new while they play.)
        While streams wait for a slot, a client CONTENDED_READ_S (or that, if less) behind
        real time that has left its audio unread as long gives its slot up sooner (reading
        nothing, or a few KB every 20 s, which held a slot for hours); so does one that
        far behind, having kept its audio waiting that long in all. (A client behind only
        because synthesis is slower than real time takes each chunk as it comes.)"""
        now = time.monotonic()
        with self._lock:
            contended, running = self.contended, list(self._running)
        for job in running:
            if (why := self._stalled(job, now, contended)) is not None:
                self._finish(job, Failed(why, code="read_timeout"))

    def _stalled(self, job: Job, now: float, contended: bool) -> str | None:
        """Why the job's client no longer keeps its slot, if it does not. How far behind it
        is asks its socket (a syscall): only for audio that has waited unread that long
        already, not for every stream the server runs ahead of, at every step."""
        unread = job.channel.stalled_for(now)
        if unread == 0:
            return None
        # Its audio waiting unread this long now: a client paced by playback takes a chunk
        # within about a chunk's length, but may be behind for the server's own slowness.
        patience = min(self.read_timeout_s, CONTENDED_READ_S) if contended else self.read_timeout_s
        if unread > patience and (behind := self._behind(job, now)) > patience:
            # How long it has read nothing, as far as the server can tell: its audio has
            # waited unread, and what reached it has played out (unread alone counts the
            # time the server ran ahead of a client that was still reading).
            quiet = min(unread, behind)
            if unread > self.read_timeout_s and behind > self.read_timeout_s:
                return f"the client read no audio for {quiet:.0f} s"
            return f"the client read no audio for {quiet:.0f} s while others waited"
        if not contended or job.channel.blocked_for(now) <= self.read_timeout_s:
            return None
        if (behind := self._behind(job, now)) > self.read_timeout_s:
            return f"the client read its audio {behind:.0f} s behind real time while others waited"
        return None

    @staticmethod
    def _behind(job: Job, now: float) -> float:
        """How far the job's client is behind a listener playing in real time since the
        first audio (infinite before it: nothing to play yet, so only unread time counts)."""
        if job.first_audio_at is None:
            return float("inf")
        return now - (job.first_audio_at + job.channel.delivered_s())

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or len(self._running) >= self._slots:
                    return
                job = self._next_waiting()
                if job is None:
                    return
                self._running.append(job)
                job.status, job.admitted_at = JobStatus.RUNNING, time.monotonic()
            try:
                self.engine.start(job)
            except SpeakerGone as exc:  # deleted since it was accepted: the client's 4xx
                log.info("job %d: %s", job.id, exc)
                self._route(job, Failed(str(exc), "unknown_speaker"))
            except Exception as exc:  # one bad job must not hurt the others
                log.exception("job %d failed to start", job.id)
                self._route(job, Failed(f"{type(exc).__name__}: {exc}"))

    def _next_waiting(self) -> Job | None:  # with the lock held
        """The waiting job to admit: of the clients with the fewest streams running, the one
        admitted longest ago (never: first), its oldest job. So one client's burst cannot keep
        every other client waiting behind it, nor can a client that queued many streams early
        take every slot that comes free. None when every waiting job's client runs its share
        already."""
        running = Counter(j.client for j in self._running)
        share = self.client_share or self.max_streams
        allowed = [j for j in self._waiting if running[j.client] < share]
        if not allowed:
            return None
        job = min(allowed, key=lambda j: (running[j.client], self._turns.get(j.client, -1)))
        self._waiting.remove(job)
        self._turns[job.client] = next(self._turn)
        self._turns.move_to_end(job.client)
        if len(self._turns) > _CLIENTS_REMEMBERED:  # the longest ago go first (as if never)
            self._turns.popitem(last=False)
        return job

    def _pick(self) -> list[Job]:
        with self._lock:
            running = list(self._running)
        ready = []
        for job in running:
            if job.cancelled or job.channel.backlog >= self.max_backlog:
                continue
            try:
                if self.engine.ready(job):
                    ready.append(job)
            except Exception as exc:
                log.exception("job %d: engine.ready failed", job.id)
                self._route(job, Failed(f"{type(exc).__name__}: {exc}"))

        ready.sort(key=self.deadline)
        return ready[: self.engine.max_batch]

    def deadline(self, job: Job) -> float:
        """When this job's listener needs its next audio (earliest deadline first).

        A listener playing in real time since the first audio runs dry at first_audio_at +
        audio_seconds. A job still waiting for its first audio is due `first_audio_budget_s`
        after its first text: so new jobs go first, unless a running stream is about to run
        dry (pure first-audio-first starves running streams when new jobs keep coming). (From
        its creation, a context opened long before its text outranked every running stream.)
        """
        dry = job.runs_dry_at
        if dry is None:
            return (job.first_text_at or job.created) + self.first_audio_budget_s
        return dry

    def _step(self, batch: list[Job]) -> list[tuple[Job, Event]]:
        try:
            return self.engine.step(batch)
        except Exception as exc:
            # Engines report per-job problems as Failed events; an exception out of a batched
            # step leaves no way to tell whose state is intact, so the batch fails, nothing else.
            log.exception("engine step failed for jobs %s", [j.id for j in batch])
            return [(job, Failed(f"{type(exc).__name__}: {exc}")) for job in batch]

    def _route(self, job: Job, event: Event) -> None:
        if job.status is JobStatus.FINISHED:
            return  # it ended earlier in this step (its audio limit, say): drop the rest
        if not isinstance(event, Chunk):
            self._finish(job, event)
            return
        if job.first_audio_at is None:
            job.first_audio_at = time.monotonic()
            self.metrics.first_audio(job)
        seconds = len(event.audio) / job.speaker.sample_rate
        job.plays_until = max(job.plays_until, time.monotonic()) + seconds
        job.audio_seconds += seconds
        self.counters.audio_s += seconds
        job.channel.put(event, seconds)
        if event.truncated:
            self.counters.segments_truncated += 1
            log.warning("job %d: segment %d truncated at a limit of the model, not all its "
                        "text spoken", job.id, event.segment, extra={"request_id": job.request_id})  # fmt: skip
        if job.audio_seconds >= job.max_audio_s:
            message = f"the stream reached its limit of {job.max_audio_s:g} s of audio"
            self._finish(job, Failed(message, code="audio_limit"))

    def _finish(self, job: Job, event: Done | Failed | Cancelled) -> None:
        """The job's last event: out of the queues, engine state freed, the consumer told."""
        with self._lock:
            if job.status is JobStatus.FINISHED:
                return
            if job.status is JobStatus.RUNNING:
                self._running.remove(job)
            else:
                self._waiting.remove(job)
            job.status = JobStatus.FINISHED
        self._ended = True
        self.engine.release(job)
        self._count(job, event)
        job.channel.put(event)

    def _count(self, job: Job, event: Done | Failed | Cancelled) -> None:
        c, extra = self.counters, {"extra": {"request_id": job.request_id}}
        if isinstance(event, Cancelled):
            c.cancelled += 1
            log.info("job %d cancelled after %.2fs of audio", job.id, job.audio_seconds, **extra)
        elif isinstance(event, Failed) and event.code == "synthesis_failed":
            c.failed += 1
            log.warning("job %d failed: %s", job.id, event.message, **extra)
        elif isinstance(event, Failed):
            c.dropped += 1
            log.info("job %d dropped (%s): %s", job.id, event.code, event.message, **extra)
        else:
            c.completed += 1
            self.metrics.done(job)
            ttfa = job.ttfa * 1000 if job.ttfa is not None else float("nan")
            rtf = job.rtf if job.rtf is not None else float("nan")
            log.info(
                "job %d done: spk=%s ttfa=%.0fms audio=%.2fs rtf=%.3f",
                job.id, job.speaker.id, ttfa, job.audio_seconds, rtf, **extra,
            )  # fmt: skip
