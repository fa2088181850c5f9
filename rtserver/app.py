"""The Litestar application: routes, CORS, OpenAPI, the web demo, and the engine's lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import NotFoundException
from litestar.file_system import BaseLocalFileSystem
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.response import File
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, PathType, Receive, Scope, Send
from litestar.types.file_types import FileInfo

from rtserver import __version__
from rtserver.api import openai
from rtserver.api.access import AccessControl, cors_config
from rtserver.api.errors import EXCEPTION_HANDLERS
from rtserver.api.http import ROUTES, FormRequest, abort_quietly, head_as_get, refuse_coded_body
from rtserver.api.ws import ws_tts, ws_tts_over_http
from rtserver.engine import Engine
from rtserver.engines import load_engine
from rtserver.logs import with_header, with_request_id
from rtserver.metrics import Metrics, count_requests
from rtserver.service import TTSService, in_own_thread
from rtserver.settings import Settings

log = logging.getLogger("rtserver")

_HERE = Path(__file__).resolve().parent
# In a checkout the demo sits beside the package; an installed wheel carries it inside.
WEB_DEMO = next((d for d in (_HERE / "web_demo", _HERE.parent / "web_demo") if d.is_dir()), None)


@get("/", include_in_schema=False)
async def index() -> File:
    if WEB_DEMO is None:
        raise NotFoundException("this install has no web demo")
    page = WEB_DEMO / "index.html"
    return File(page, filename=page.name, content_disposition_type="inline", media_type="text/html")


class StaticFileSystem(BaseLocalFileSystem):
    """The local file system for the static routes, where a path that names no file it could
    read (a NUL byte, a name too long, a file taken for a folder) is simply not there. Litestar
    lets such a lookup fail with a ValueError (logged as unhandled, the NUL byte in the line)
    or an OSError: a 500 for any client that sends one. As FileNotFoundError it is the 404 of
    a missing file."""

    async def info(self, path: PathType, **kwargs: object) -> FileInfo:
        try:
            return await super().info(path, **kwargs)
        except (ValueError, OSError) as exc:
            raise FileNotFoundError(f"no such file: {path!r}") from exc


def _static_files(path: str, directory: PathType) -> Router:
    return create_static_files_router(
        path=path, directories=[directory], file_system=StaticFileSystem(),
        include_in_schema=False,
    )  # fmt: skip


DOCS_ASSETS = "/docs-assets"  # Swagger UI's files, from the openapi-ui-bundles package


def _key_scheme(settings: Settings) -> dict[str, Any]:
    """With keys, the document says routes take one as a bearer token (so the docs page
    offers to send it): every route with API keys (the probes need none: OPEN), only the
    speaker routes with admin keys alone."""
    if not (settings.api_key or settings.admin_key):
        return {}
    scheme = SecurityScheme(type="http", scheme="bearer", description="--api-key, --admin-key")
    need = [{"key": []}] if settings.api_key else [{}, {"key": []}]
    return {"security": need, "components": Components(security_schemes={"key": scheme})}


def _swagger_ui() -> SwaggerRenderPlugin:
    """The API docs page at /schema, with its assets served from the package (no CDN: the
    page works offline and leaks no visit to a third party)."""
    return SwaggerRenderPlugin(
        js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{DOCS_ASSETS}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{DOCS_ASSETS}/favicon-32x32.png'>",
        path=["/", "/swagger"],
    )


def _docs_assets() -> Router:
    import openapi_ui_bundles.swagger_ui

    return _static_files(DOCS_ASSETS, openapi_ui_bundles.swagger_ui.static_path)


def with_replica(app: ASGIApp, replica: str) -> ASGIApp:
    """Wrap the ASGI app: name the replica that answered in `X-Replica` (behind Ray Serve's
    proxy a client cannot otherwise tell which replica, with its own counters, it reached).
    Around the app, not as its middleware: Litestar answers an unknown path (404) or method
    (405) before any middleware runs."""
    value = replica.encode()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, with_header(send, b"x-replica", value))

    return wrapped


def served(app: Litestar) -> ASGIApp:
    """The app as the server runs it, alone or as a replica. What must see every request is
    around the app, not its middleware: Litestar answers an unknown path (404) or method (405)
    before any middleware runs. So keys and hosts are checked first (a client without a key
    learns nothing, not even which paths exist), and every response is counted and carries its
    request id. HEAD is answered as GET, and a stream cut short ends in one log line."""

    def draining() -> bool:
        service = getattr(app.state, "service", None)
        return service is not None and service.draining

    inner = AccessControl(abort_quietly(head_as_get(app), draining), app.state.settings)
    return with_request_id(count_requests(inner, app.state.metrics))


def _log_ready(service: TTSService, settings: Settings) -> None:
    ids = [s.id for s in service.speakers()]
    log.info("ready: engine=%s speakers=%s on http://%s:%d", service.engine.name, ids,
             settings.host, settings.port)  # fmt: skip
    for voice, spk in openai.voice_aliases(tuple(settings.voice_alias)).items():
        if spk not in ids:  # it may be registered later (POST /speakers)
            log.warning("--voice-alias %s=%s: no speaker %r (yet); until there is one, "
                        "voice %r gets 400", voice, spk, spk, voice)  # fmt: skip


def create_app(
    settings: Settings, engine: Engine | None = None, replica: str | None = None
) -> Litestar:
    """The app; `replica` is its Ray Serve replica id when it is one of several. Serve it
    through :func:`served`, which adds the key and host checks (they run before routing)."""
    metrics = Metrics(replica)

    def boot() -> TTSService:
        svc = TTSService(settings, engine or load_engine(settings), metrics, replica)
        svc.start()
        return svc

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        service = await in_own_thread(boot)
        app.state.service = service
        _log_ready(service, settings)
        watch = asyncio.create_task(service.watch_speakers(), name="watch-speakers")
        try:
            yield
        finally:
            watch.cancel()
            await asyncio.to_thread(service.stop)

    def provide_service(state: State) -> TTSService:
        return state.service

    routes: list = [*ROUTES, *openai.ROUTES, ws_tts, ws_tts_over_http, index, _docs_assets()]
    if WEB_DEMO is not None:
        routes.append(_static_files("/demo", WEB_DEMO))

    return Litestar(
        route_handlers=routes,
        lifespan=[lifespan],
        dependencies={"service": Provide(provide_service, sync_to_thread=False)},
        exception_handlers={exc: openai.by_path(h) for exc, h in EXCEPTION_HANDLERS.items()},
        cors_config=cors_config(settings),
        logging_config=None,  # rtserver.logs configures one format for everything
        openapi_config=OpenAPIConfig(
            title="rtserver",
            version=__version__,
            description="Real-time CosyVoice TTS. The WebSocket protocol (/ws/tts) is in "
            "docs/websocket.md.",
            path="/schema",
            render_plugins=[_swagger_ui()],
            **_key_scheme(settings),
        ),
        request_max_body_size=1024 * 1024,
        request_class=FormRequest,
        before_request=refuse_coded_body,
        state=State({"settings": settings, "metrics": metrics}),
    )
