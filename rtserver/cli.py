"""`rtserver serve` starts the server; `rtserver say` speaks text through a running one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from rtserver.settings import DEFAULT_PORT, Settings

# Frames up to this size are read and answered with `message_too_large` (the limit is
# max_message_bytes); past it the WebSocket library must refuse to buffer them: close 1009.
WS_MAX_FRAME = 4 * 1024 * 1024


def _serve_args(p: argparse.ArgumentParser, env: Settings) -> None:
    p.add_argument("--host", default=env.host)
    p.add_argument("--port", type=int, default=env.port, help=f"default {DEFAULT_PORT}")
    p.add_argument("--model", type=Path, default=env.model,
                   help="a CosyVoice model dir (default: the built-in Piper voice)")  # fmt: skip
    p.add_argument("--voices-dir", type=Path, default=env.voices_dir,
                   help="extra Piper voices (*.onnx + *.onnx.json)")  # fmt: skip
    p.add_argument("--speaker-dir", type=Path, default=env.speaker_dir,
                   help="where registered CosyVoice speakers are kept (default: in the model dir)")  # fmt: skip
    p.add_argument("--llm-fixed-tokens", type=int, default=env.llm_fixed_tokens,
                   help="benchmarks only: every LLM run emits exactly this many tokens")  # fmt: skip
    p.add_argument("--max-streams", type=int, default=env.max_streams)
    p.add_argument("--max-queue", type=int, default=env.max_queue)
    p.add_argument("--max-text-chars", type=int, default=env.max_text_chars)
    p.add_argument("--max-audio-s", type=float, default=env.max_audio_s,
                   help="audio one request or context may produce before it ends")  # fmt: skip
    p.add_argument("--max-client-streams", type=int, default=env.max_client_streams,
                   help="streams open at once per client address (0: no limit)")  # fmt: skip
    p.add_argument("--max-client-sockets", type=int, default=env.max_client_sockets,
                   help="WebSockets open at once per client address (0: no limit)")  # fmt: skip
    p.add_argument("--read-timeout-s", type=float, default=env.read_timeout_s,
                   help="drop a stream whose client reads none of its audio this long")  # fmt: skip
    p.add_argument("--max-contexts", type=int, default=env.max_contexts)
    p.add_argument("--max-message-bytes", type=int, default=env.max_message_bytes)
    p.add_argument("--ws-idle-timeout-s", type=float, default=env.ws_idle_timeout_s)
    p.add_argument("--context-idle-timeout-s", type=float, default=env.context_idle_timeout_s,
                   help="end a WebSocket context that has nothing to say this long")  # fmt: skip
    p.add_argument("--auto-flush-ms", type=int, default=env.auto_flush_ms)
    p.add_argument("--device", default=env.device)
    p.add_argument("--dtype", default=env.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--scheduler", default=env.scheduler, choices=["batch", "serial"])
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=env.warmup)
    p.add_argument("--log-level", default=env.log_level)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from rtserver.api.http import abort_quietly
    from rtserver.app import create_app

    settings = Settings(
        **{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        abort_quietly(create_app(settings)),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_per_message_deflate=False,  # PCM/MP3 do not compress; deflate only burns CPU
        ws_max_size=WS_MAX_FRAME,
        ws_ping_interval=20,
        ws_ping_timeout=20,
    )


def main(argv: list[str] | None = None) -> None:
    env = Settings.from_env()
    parser = argparse.ArgumentParser(prog="rtserver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_args(sub.add_parser("serve", help="start the server"), env)
    from rtserver.say import add_say_args

    add_say_args(sub.add_parser("say", help="speak text through a running server"), env)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
    else:
        from rtserver.say import say

        sys.exit(asyncio.run(say(args)))


if __name__ == "__main__":
    main()
