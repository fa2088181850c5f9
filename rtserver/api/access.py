"""Who may use the server: API keys, an admin key for speakers, allowed origins and hosts.

An ASGI wrapper around the whole app, before routing, so no handler can forget it and a
client without a key learns nothing (not even which paths exist: 401, not 404):
- Host allow-list (against DNS rebinding): a request for another Host gets 400 (the health
  probes answer any Host: probes address a pod or VM by its IP).
- API keys: with `--api-key` set, every route except the health probes and the static demo
  page needs `Authorization: Bearer KEY` (401 otherwise). Browsers cannot set headers on a
  WebSocket, so `/ws/tts` also takes the key as a subprotocol `rtserver.key.KEY` next to
  `rtserver` (headers are not logged, unlike a query string); the server answers `rtserver`.
- Admin keys: with `--admin-key` set, registering or deleting a speaker needs one of them.
- Origins: a browser WebSocket from an origin outside `--allow-origin` is refused (403); with
  a key set and no list, only the server's own origin is allowed. CORS uses the same list
  (its preflights need no key: browsers send none with them).
Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

import msgspec
from litestar.config.cors import CORSConfig
from litestar.datastructures import Headers
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.utils import normalize_path

from rtserver.api.errors import refusal
from rtserver.settings import Settings

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: no key, ever
STATIC_PATHS = ("/", "/demo")  # the demo page and its files: public, useless without a key
SUBPROTOCOL = "rtserver"
KEY_SUBPROTOCOL = "rtserver.key."
ADMIN_ROUTES = ("/speakers",)  # POST and DELETE below these need an admin key
# Response headers a browser's script may read (CORS hides all but a few by default): the
# request id, the PCM routes' audio format, the wait a 429 or 503 asks for, the replica.
EXPOSED_HEADERS = [
    "X-Request-Id", "X-Sample-Rate", "X-Channels", "X-Bit-Depth", "X-Encoding",
    "Content-Disposition", "Retry-After", "X-Replica",
]  # fmt: skip


def _matches(given: str | None, keys: list[str]) -> bool:
    if not given:
        return False
    # Compare with every key (no early exit), so timing says nothing about which matched.
    hits = [hmac.compare_digest(given.encode(), key.encode()) for key in keys]
    return any(hits)


def offered_subprotocols(headers: Headers) -> list[str]:
    raw = headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _presented_key(scope: Scope, headers: Headers) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if scope["type"] == "websocket":
        for proto in offered_subprotocols(headers):
            if proto.startswith(KEY_SUBPROTOCOL):
                return proto[len(KEY_SUBPROTOCOL) :]
    return None


class AccessControl:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = settings.api_key
        self.admin_keys = settings.admin_key
        self.origins = settings.allow_origin
        self.hosts = {h.lower() for h in settings.allow_host}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers.from_scope(scope)
        refusal = self._refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await _deny_upgrade(scope, send, refusal[1])
        else:
            await _deny(send, *refusal, routed_path(scope))

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        """(status, why) if the request may not pass, else None."""
        path = routed_path(scope)
        if path in OPEN_PATHS:
            return None  # probes: a load balancer's or kubelet's name the pod by its address
        host = headers.get("host", "").lower()
        if self.hosts and host not in self.hosts and host.rsplit(":", 1)[0] not in self.hosts:
            return 400, f"host {host!r} is not served here"
        if self.origins and _preflight(scope, headers):
            return None  # CORS preflights, which the CORS layer answers whatever the path
        if scope["type"] == "websocket" and not self._origin_ok(headers.get("origin"), host):
            return 403, "this origin may not open a WebSocket here"
        key = _presented_key(scope, headers)
        if self.keys and not _public(path, scope) and not self._key_ok(key):
            if key:
                return 401, "this API key is not valid here"
            return 401, "an API key is required: send `Authorization: Bearer KEY`"
        admin = _matches(key, self.admin_keys)
        if self.admin_keys and _admin_route(scope.get("method"), path) and not admin:
            return 403, "registering or deleting speakers needs an admin key"
        return None

    def _key_ok(self, key: str | None) -> bool:
        return _matches(key, self.keys) or _matches(key, self.admin_keys)

    def _origin_ok(self, origin: str | None, host: str) -> bool:
        if origin is None:  # not a browser: origins do not apply
            return True
        if "*" in self.origins or origin in self.origins:
            return True
        if self.origins or self.keys:
            return urlsplit(origin).netloc.lower() == host  # same origin only
        return True


def _preflight(scope: Scope, headers: Headers) -> bool:
    """A browser's CORS preflight (as Litestar's CORS layer tells one): it never carries
    credentials (the request it asks about will), and the answer says only which origins,
    methods and headers may call."""
    return scope.get("method") == "OPTIONS" and "origin" in headers


def _public(path: str, scope: Scope) -> bool:
    static = path in STATIC_PATHS or path.startswith(STATIC_PATHS[1] + "/")
    return static and scope.get("method", "GET") in ("GET", "HEAD")


def routed_path(scope: Scope) -> str:
    """The path as Litestar's router matches it (these checks run before routing): without
    the root path, with repeated and trailing slashes dropped, so `//speakers/` (or
    `/%2Fspeakers`, which the server decodes to that) is `/speakers` here as there."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return normalize_path(path)


def _admin_route(method: str | None, path: str) -> bool:
    return method in ("POST", "DELETE") and any(
        path == r or path.startswith(r + "/") for r in ADMIN_ROUTES
    )


async def _deny(
    send: Send, status: int, detail: str, path: str, kind: str = "http.response"
) -> None:
    body = msgspec.json.encode(refusal(path, status, detail))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="rtserver"'))
    await send({"type": f"{kind}.start", "status": status, "headers": headers})
    await send({"type": f"{kind}.body", "body": body})


async def _deny_upgrade(scope: Scope, send: Send, detail: str) -> None:
    """A refused WebSocket upgrade: 403 with the reason in the app's JSON (and the request's
    `x-request-id`), where the server can answer an upgrade with a body (ASGI's denial
    response: uvicorn's); a bare 403 said nothing of a bad key vs. a refused origin. Else (Ray
    Serve's proxy) the close, which the server answers with a bare 403."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": detail})
        return
    await _deny(send, 403, detail, routed_path(scope), kind="websocket.http.response")


def cors_config(settings: Settings) -> CORSConfig | None:
    """CORS from the same origin list; with a key and no list, none (same origin only)."""
    origins = settings.allow_origin or ([] if settings.api_key else ["*"])
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        # Any request header: the origin list is what decides who may call, and clients
        # send more than Authorization and Content-Type (X-Request-Id, which the server
        # keeps; the OpenAI SDKs' X-Stainless-*), which a list refused at the preflight.
        allow_headers=["*"],
        expose_headers=EXPOSED_HEADERS,
    )


def accepted_subprotocol(headers: Headers) -> str | None:
    """A browser that offered `rtserver` (to carry its key) must get it back, or it fails."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(headers) else None
