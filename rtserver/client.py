"""The Python client, from the `rtserver-client` distribution (clients/python).

Kept as a module of the server package so `from rtserver.client import TTSClient` keeps
working; the code lives in one place, `rtserver_client`.
"""

from rtserver_client.client import (
    Connection,
    Context,
    Event,
    Result,
    ServerError,
    TTSClient,
    auth_headers,
    ws_url,
)

__all__ = [
    "Connection",
    "Context",
    "Event",
    "Result",
    "ServerError",
    "TTSClient",
    "auth_headers",
    "ws_url",
]
