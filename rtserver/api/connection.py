"""The HTTP connection under the app: the bounds uvicorn's HTTP/1.1 protocol leaves out.

uvicorn parses requests without a cap on the header block, gives a request's headers and body
no deadline, keeps a connection that never sends a byte, takes connections until the process
runs out of file handles, and waits for ever on a client that stops reading a response. Each
of those let one client hold the server's memory, sockets or stream quota (docs/deploy.md).
`guarded_protocol` returns uvicorn's httptools protocol with them bounded:

- at most `max_connections` connections (HTTP and WebSocket) at once, and
  `max_client_connections` HTTP connections per client address (a trusted proxy, whose
  clients are told apart by X-Forwarded-For, is exempt); beyond them a new connection gets
  503 or 429 and is closed before it can send anything;
- a request's header block (request line included) is at most `max_header_bytes`: 431;
- a connection must deliver a request's headers and body within `request_timeout_s` of its
  first byte (or of connecting, for the first request): 408 and closed;
- a response the client reads none of for `write_timeout_s` is cut: the socket is aborted,
  so the handler's send returns, the stream ends and its quota is released.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("rtserver.connection")

FD_RESERVE = 256  # file handles beyond the sockets: model files, threads' pipes, logs


def trusted_hosts(spec: str | list[str]) -> Callable[[str], bool]:
    """uvicorn's `forwarded_allow_ips` (a comma list or a list of addresses and networks,
    `*` for all) as a test of one peer address."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    if "*" in items:
        return lambda host: True
    nets = []
    for item in filter(None, items):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            continue  # a unix socket path or a name: never a TCP peer's address

    def trusted(host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in nets)

    return trusted


@dataclass
class ConnectionLimits:
    max_connections: int = 0  # 0: no limit
    max_client_connections: int = 0
    request_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024  # nginx's largest default header buffers total 32 KiB
    trusted: Callable[[str], bool] = lambda host: False
    per_client: dict[str, int] = field(default_factory=dict)  # open HTTP connections

    def acquire(self, host: str) -> bool:
        """Count one more connection from `host`; False when it holds its limit."""
        if not self.max_client_connections or self.trusted(host):
            return True
        held = self.per_client.get(host, 0)
        if held >= self.max_client_connections:
            return False
        self.per_client[host] = held + 1
        return True

    def release(self, host: str) -> None:
        left = self.per_client.get(host, 0) - 1
        if left > 0:
            self.per_client[host] = left
        else:
            self.per_client.pop(host, None)


def _response(status: HTTPStatus, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def guarded_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol under `limits` (pass it as uvicorn.Config(http=...))."""

    class GuardedHttp(HttpToolsProtocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._host: str | None = None  # counted against its per-client limit
            self._deadline: asyncio.TimerHandle | None = None  # the request being read
            self._stuck: asyncio.TimerHandle | None = None  # writing paused since
            self._in_head = True  # reading a request line and headers
            self._head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            host = self.client[0] if self.client else None
            if limits.max_connections and len(self.connections) > limits.max_connections:
                self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry")
            elif host is not None and not limits.acquire(host):
                self._refuse(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from you")
            else:
                self._host = host
                self._arm_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._let_go()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self) -> None:
            # The WebSocket protocol takes the socket over: its own limits and timeouts apply.
            self._let_go()
            super().handle_websocket_upgrade()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Counted after parsing: a chunk that also holds the body ended the head.
            if self._in_head and self._head_bytes > limits.max_header_bytes:
                log.warning("%s: header block over %d bytes; closed", self._host,
                            limits.max_header_bytes)  # fmt: skip
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             f"the header block is over {limits.max_header_bytes} bytes")  # fmt: skip

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_deadline()

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._cancel("_deadline")

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stuck is None:
                self._stuck = self.loop.call_later(limits.write_timeout_s, self._write_late)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel("_stuck")

        def _arm_deadline(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(limits.request_timeout_s, self._read_late)

        def _read_late(self) -> None:
            self._deadline = None
            if self._in_head and self._head_bytes == 0:
                self.transport.close()  # an idle connection: nothing to answer
                return
            log.warning("%s: request not received within %g s; closed", self._host,
                        limits.request_timeout_s)  # fmt: skip
            self._refuse(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive in time")

        def _write_late(self) -> None:
            self._stuck = None
            log.warning("%s: read none of its response for %g s; connection aborted",
                        self._host, limits.write_timeout_s)  # fmt: skip
            self.transport.abort()

        def _refuse(self, status: HTTPStatus, text: str) -> None:
            """Answer `status` and close, or only close when a response has begun."""
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_response(status, text))
            self._let_go()
            self.transport.close()

        def _cancel(self, name: str) -> None:
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

        def _let_go(self) -> None:
            """Stop the timers and give back the per-client count (idempotent)."""
            self._cancel("_deadline")
            self._cancel("_stuck")
            if self._host is not None:
                limits.release(self._host)
                self._host = None

    return GuardedHttp


def raise_fd_limit(connections: int) -> int:
    """Lift the soft limit on open files so `connections` sockets fit beside the server's own
    files; returns how many connections fit (fewer when the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return max(0, max(soft, want) - FD_RESERVE)
