"""In-process synthesis of one utterance: a loop over :meth:`CosyVoiceModel.step`, the same step
a serving scheduler drives for many utterances at once (tests, CLI, scripts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .model import CosyVoiceModel, load
from .speakers import Speaker
from .utterance import Status


def synthesize(
    model: CosyVoiceModel, text: str, speaker: str | Speaker, stream: bool = False, **opts: Any
) -> Iterator[torch.Tensor]:
    """Yield float32 audio chunks (1-D, ``model.sample_rate``): one per text segment with
    ``stream=False``, streaming chunks otherwise. ``opts``: ``seed`` (0 = random), ``speed``
    and the other :class:`cosyvoice.utterance.Utterance` options (``greedy=True,
    noise=False`` is the deterministic setting the golden fixtures were recorded with).
    Closing the generator early (``break``, ``close()``) cancels the utterance, which gives
    back what it holds."""
    utt = model.start(speaker, stream=stream, **opts)
    model.add_text(utt, text)
    model.close_text(utt)
    try:
        while utt.status is not Status.FINISHED:
            for out in model.step([utt]):
                if out.error:
                    raise RuntimeError(out.error)
                if out.audio.numel():
                    yield out.audio
    finally:
        model.cancel(utt)  # idempotent: nothing left to free once it finished


def tts(
    model_dir: str | Path, text: str, speaker: str, stream: bool = False, **opts: Any
) -> Iterator[torch.Tensor]:
    """One-shot helper: load ``model_dir`` and synthesize (reloads every call; keep the model
    from :func:`cosyvoice.load` around for repeated use)."""
    yield from synthesize(load(model_dir), text, speaker, stream=stream, **opts)
