"""Engines: the built-in Piper voice and CosyVoice. Imported lazily by name so that the core
never imports the GPL-licensed Piper package unless the built-in voice is used."""

from __future__ import annotations

from rtserver.engine import Engine
from rtserver.settings import Settings

AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def load_engine(settings: Settings) -> Engine:
    if settings.model is None:
        from rtserver.engines.piper_voice import PiperEngine

        return PiperEngine(settings.voices_dir)
    from rtserver.engines.cosyvoice_engine import CosyVoiceEngine

    return CosyVoiceEngine(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        speaker_dir=settings.speaker_dir,
        max_batch=settings.max_streams,
        fixed_tokens=settings.llm_fixed_tokens or None,
        flow_cache_mb=settings.flow_cache_mb,
        exact_final=settings.exact_final,
        vocoder_thread=AUTO_ON_OFF[settings.vocoder_thread],
        packed=AUTO_ON_OFF[settings.packed],
    )
