"""`rtserver serve` starts the server; `rtserver say` speaks text through a running one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from rtserver.settings import (
    ENV_PREFIX,
    LIST_SETTINGS,
    SECRET_SETTINGS,
    Settings,
    SettingsError,
    help_texts,
)

# Frames up to this size are read and answered with `message_too_large` (the limit is
# max_message_bytes); past it the WebSocket library must refuse to buffer them: close 1009.
WS_MAX_FRAME = 4 * 1024 * 1024


def _serve_args(p: argparse.ArgumentParser, env: Settings) -> None:
    """One flag per setting, generated from Settings: its help, its default (after the
    environment) and its variable. Values stay strings here; Settings validates them."""
    for name, text in help_texts().items():
        flag = f"--{name.replace('_', '-')}"
        default = getattr(env, name)
        shown = "none" if default in (None, []) else default
        if name in SECRET_SETTINGS and default:
            shown = "set"
        kw: dict = {"help": f"{text} (default: {shown}; env {ENV_PREFIX}{name.upper()})"}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif name in LIST_SETTINGS:
            kw["action"] = "append"
        p.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kw)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from rtserver.api.http import abort_quietly
    from rtserver.app import create_app

    try:
        settings = args.env.replace(
            **{k: v for k, v in vars(args).items() if k in Settings.__struct_fields__}
        )
    except SettingsError as exc:
        sys.exit(f"rtserver: {exc}")
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
    try:
        env = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"rtserver: {exc}")
    parser = argparse.ArgumentParser(prog="rtserver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_args(sub.add_parser("serve", help="start the server"), env)
    from rtserver.say import add_say_args

    add_say_args(sub.add_parser("say", help="speak text through a running server"), env)
    args = parser.parse_args(argv)
    args.env = env
    if args.command == "serve":
        serve(args)
    else:
        from rtserver.say import say

        sys.exit(asyncio.run(say(args)))


if __name__ == "__main__":
    main()
