"""Engines: the built-in Piper voice and CosyVoice. Imported lazily by name so that the core
never imports the GPL-licensed Piper package unless the built-in voice is used."""

from __future__ import annotations

from pathlib import Path

from rtserver.engine import Engine


def load_engine(model_dir: Path | None, voices_dir: Path | None, **options: object) -> Engine:
    if model_dir is None:
        from rtserver.engines.piper_voice import PiperEngine

        return PiperEngine(voices_dir)
    from rtserver.engines.cosyvoice_engine import CosyVoiceEngine

    return CosyVoiceEngine(model_dir, **options)
