"""Server settings: defaults, overridden by RTSERVER_* environment variables, then by CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_PORT = 50000  # upstream CosyVoice's FastAPI server port, so its client works unchanged


def _default_voices_dir() -> Path:
    return Path("pretrained_models")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    model: Path | None = None  # a CosyVoice model dir; None = the built-in Piper voice
    voices_dir: Path = field(default_factory=_default_voices_dir)  # extra Piper voices
    max_streams: int = 8  # jobs synthesizing at once (2 cores keep 8 Piper streams real-time)
    max_queue: int = 16  # jobs waiting beyond that; more get 503 / busy
    max_text_chars: int = 5000  # per HTTP request or WebSocket context
    max_audio_s: float = 600.0  # audio one request or context may produce; then it fails
    max_client_streams: int = 8  # streams open at once from one client address (0: no limit)
    max_client_sockets: int = 16  # WebSockets open at once from one client address (0: no limit)
    read_timeout_s: float = 30.0  # a stream whose client reads nothing for this long is dropped
    max_contexts: int = 8  # per WebSocket
    max_message_bytes: int = 64 * 1024  # per WebSocket frame from a client
    ws_idle_timeout_s: float = 60.0  # no message and no audio for this long: the socket closes
    context_idle_timeout_s: float = 30.0  # a context with nothing to say for this long ends
    auto_flush_ms: int = 1500  # WebSocket: speak buffered text after this much silence
    min_sentence_chars: int = 12
    first_segment_chars: int = 60  # cut the first segment at a clause past this for low TTFA
    speaker_dir: Path | None = None  # registered CosyVoice speakers; default: in the model dir
    llm_fixed_tokens: int = 0  # benchmarks only: every LLM run emits exactly this many tokens
    device: str = "cpu"
    dtype: str = "float32"
    scheduler: str = "batch"  # or "serial" (benchmark baseline)
    warmup: bool = True
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        s = cls()
        for f in fields(cls):
            raw = env.get(f"RTSERVER_{f.name.upper()}")
            if raw is not None:
                setattr(s, f.name, _parse(f.name, raw, getattr(s, f.name)))
        return s


def _parse(name: str, raw: str, current: object) -> object:
    if name in ("model", "voices_dir", "speaker_dir"):
        return Path(raw) if raw else None
    if isinstance(current, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    return raw
