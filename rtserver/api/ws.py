"""/ws/tts: the route. The protocol itself lives in rtserver.api.ws_session."""

from __future__ import annotations

from litestar import WebSocket, websocket

from rtserver.api.access import accepted_subprotocol
from rtserver.api.ws_session import WsSession
from rtserver.service import TTSService


@websocket("/ws/tts")
async def ws_tts(socket: WebSocket, service: TTSService) -> None:
    await socket.accept(subprotocols=accepted_subprotocol(socket.headers))
    await WsSession(socket, service).run()
