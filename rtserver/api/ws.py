"""/ws/tts: the route. The protocol itself lives in rtserver.api.ws_session."""

from __future__ import annotations

from litestar import WebSocket, get, websocket
from litestar.exceptions import HTTPException

from rtserver.api.access import accepted_subprotocol
from rtserver.api.ws_session import WsSession
from rtserver.service import TTSService


@websocket("/ws/tts")
async def ws_tts(socket: WebSocket, service: TTSService) -> None:
    await socket.accept(subprotocols=accepted_subprotocol(socket.headers))
    await WsSession(socket, service).run()


@get("/ws/tts", include_in_schema=False, sync_to_thread=False)
def ws_tts_over_http() -> None:
    """A plain HTTP request here (curl, a browser's address bar): say what the route is
    instead of a bare 405."""
    raise HTTPException(
        status_code=426,
        detail="/ws/tts is a WebSocket endpoint: connect with ws:// (wss:// behind TLS); "
        "docs/websocket.md has the protocol",
        headers={"Upgrade": "websocket"},
    )
