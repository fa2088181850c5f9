"""Client for rtserver's /ws/tts WebSocket protocol and HTTP routes.

Depends only on msgspec, websockets and httpx. The framework plugins are optional extras:
`rtserver_client.pipecat` (`rtserver-client[pipecat]`) and `rtserver_client.livekit`
(`rtserver-client[livekit]`); they are not imported here.
"""

from rtserver_client.client import (
    Connection,
    Context,
    Event,
    HandshakeRefused,
    Result,
    ServerError,
    Speech,
    TTSClient,
    auth_headers,
    ws_url,
)
from rtserver_client.protocol import (
    Cancelled,
    Done,
    Error,
    Flushed,
    Format,
    Ready,
    Segment,
    ServerMessage,
    Started,
    Word,
    Words,
)

__all__ = [
    "Cancelled",
    "Connection",
    "Context",
    "Done",
    "Error",
    "Event",
    "Flushed",
    "HandshakeRefused",
    "Format",
    "Ready",
    "Result",
    "Segment",
    "ServerError",
    "ServerMessage",
    "Speech",
    "Started",
    "TTSClient",
    "Word",
    "Words",
    "auth_headers",
    "ws_url",
]
