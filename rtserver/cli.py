"""`rtserver serve` starts the server; `rtserver say` speaks text through a running one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.config
import os
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from litestar import Litestar

from rtserver.settings import (
    ENV_PREFIX,
    SECRET_SETTINGS,
    Settings,
    SettingsError,
    help_texts,
)
from rtserver.signals import StopSignals

if TYPE_CHECKING:
    from rtserver.api.connection import ConnectionLimits
    from rtserver.service import TTSService

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
        text = f"{text} (default: {shown}; env {ENV_PREFIX}{name.upper()})"
        kw: dict = {"help": text.replace("%", "%%")}  # argparse formats help with %
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["action"] = "append"
        p.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kw)


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains first: no new sessions, /readyz 503, the
    running streams get up to the drain deadline, then each WebSocket context left is told
    `shutting_down`. Only then does uvicorn shut down. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, app: Litestar, deadline_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.deadline_s = deadline_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # held: the loop keeps tasks weakly
        self._signals = StopSignals()

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._signals.received(sig):
            return
        service = getattr(self.app.state, "service", None)
        if self._loop is None or service is None:  # not serving yet
            super().handle_exit(sig, frame)
        elif self._draining:  # the second: cut what is left and exit (uvicorn's own handling
            # re-raised the signal at exit: status -15 or -2, and 500s for queued requests)
            self._loop.call_soon_threadsafe(self._exit_now, service)
        else:
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain, service)

    def _start_drain(self, service: TTSService) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain(service))

    def _exit_now(self, service: TTSService) -> None:
        service.cut_streams()
        self.should_exit = True  # not force_exit: that cancelled the app's own shutdown

    async def _drain(self, service: TTSService) -> None:
        try:
            await service.drain(self.deadline_s)
        finally:
            self.should_exit = True


def serve(args: argparse.Namespace) -> None:
    from rtserver.api.connection import guarded_protocol, guarded_websocket
    from rtserver.app import create_app, served
    from rtserver.engines import check_engine
    from rtserver.logs import log_config
    from rtserver.memory import cap_arenas

    try:
        settings = args.env.replace(
            **{k: v for k, v in vars(args).items() if k in Settings.__struct_fields__}
        )
    except SettingsError as exc:
        sys.exit(f"rtserver: {exc}")
    cap_arenas(settings.malloc_arenas)
    logging_config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(logging_config)
    if settings.on_ray:
        serve_on_ray(settings)
        return
    try:
        check_engine(settings)
    except SettingsError as exc:
        sys.exit(f"rtserver: {exc}")
    app = create_app(settings)
    config = uvicorn.Config(
        served(app),
        host=settings.host,
        port=settings.port,
        log_config=logging_config,
        ws_per_message_deflate=False,  # PCM/MP3 do not compress; deflate only burns CPU
        ws_max_size=WS_MAX_FRAME,
        ws_ping_interval=settings.ws_ping_interval_s,
        # No pong deadline: a ping waits behind the audio queued ahead of it, which is tens of
        # seconds for a listener reading G.711 at real time (cut with 1011 after a minute). A
        # peer that takes nothing is aborted by the write watch (--read-timeout-s), an idle
        # one closed by --ws-idle-timeout-s.
        ws_ping_timeout=None,
        timeout_graceful_shutdown=2,  # after our own drain: what is still open is cut
    )
    limits = connection_limits(settings, config)
    config.http, config.ws = guarded_protocol(limits), guarded_websocket(limits)
    # Bound before the model loads (uvicorn binds after its startup): a port in use fails in
    # a moment, not after minutes of loading and a "ready" line. Until startup completes,
    # connections wait in the listen backlog.
    sock = _bind(config)
    DrainingServer(config, app, settings.drain_timeout_s).run(sockets=[sock])


def _bind(config: uvicorn.Config) -> socket.socket:
    """uvicorn's bind, a failure said in one line naming the settings to change (uvicorn logs
    only the OS error)."""
    failed: list[OSError] = []

    def take(record: logging.LogRecord) -> bool:
        if isinstance(record.msg, OSError):
            failed.append(record.msg)
            return False
        return True

    log = logging.getLogger("uvicorn.error")
    log.addFilter(take)
    try:
        return config.bind_socket()
    except SystemExit:
        why = failed[0].strerror if failed else "cannot bind"
        sys.exit(f"rtserver: --host {config.host} --port {config.port}: {why} "
                 f"(env {ENV_PREFIX}HOST, {ENV_PREFIX}PORT)")  # fmt: skip
    finally:
        log.removeFilter(take)


def connection_limits(settings: Settings, config: uvicorn.Config) -> ConnectionLimits:
    from rtserver.api.connection import ConnectionLimits, raise_fd_limit, trusted_hosts

    fit = raise_fd_limit(settings.max_connections)
    if settings.max_connections and fit < settings.max_connections:
        logging.getLogger("rtserver").warning(
            "--max-connections %d: the open-file limit fits %d; using that",
            settings.max_connections, fit)  # fmt: skip
    return ConnectionLimits(
        max_connections=min(settings.max_connections, max(fit, 1))
        if settings.max_connections
        else 0,
        max_client_connections=settings.max_client_connections,
        request_timeout_s=settings.request_timeout_s,
        write_timeout_s=settings.read_timeout_s,
        trusted=trusted_hosts(config.forwarded_allow_ips),
    )


def serve_on_ray(settings: Settings) -> None:
    """`serve` with --replicas or --ray-address: replicas on Ray Serve (rtserver.cluster)."""
    from rtserver.engines import check_engine

    try:
        settings.check_cluster()
        if not settings.ray_address:
            # A cluster started here runs its proxy and replicas on this machine: what fails
            # them here fails in a moment, as for plain `serve`, instead of after Ray's start
            # and three tries per replica (a minute and more of tracebacks).
            check_engine(settings)
            check_port_free(settings.host, settings.port)
    except SettingsError as exc:
        sys.exit(f"rtserver: {exc}")
    # Ray's workers would otherwise rebuild this environment from the working dir when the
    # command runs under `uv run` (a new venv, torch included); they use the installed one.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Ray folds a line another replica wrote in the same shape (numbers and ids aside) into a
    # later "[repeated Nx across cluster]": the replicas' access lines, each its own request.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        from rtserver import cluster
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        sys.exit("rtserver: --replicas and --ray-address need Ray Serve: install the `cluster` "
                 "extra (uv run --extra cluster rtserver serve ...)")  # fmt: skip
    try:
        cluster.run(settings)
    except SettingsError as exc:
        sys.exit(f"rtserver: {exc}")


def check_port_free(host: str, port: int) -> None:
    """Bind --host/--port as Ray Serve's proxy will, and let go. Its bind sets no SO_REUSEADDR,
    so connections closed in the last minute (TIME_WAIT) hold the port for it too."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SettingsError(
                f"--port: cannot listen on {host}:{port}: {exc.strerror} (another server, or "
                "connections to one closed less than a minute ago: Ray Serve's proxy cannot "
                "reuse the port before they time out)"
            ) from None


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
