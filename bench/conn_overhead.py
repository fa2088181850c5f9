"""Per-request cost of the server's HTTP path, side by side for several checkouts.

    git worktree add /tmp/base COMMIT
    uv run python bench/conn_overhead.py /tmp/base .

A server is started from each checkout (with this virtualenv), then in 5 rounds each gets
1000 keep-alive `GET /healthz` and 500 requests on a connection of their own; prints the
microseconds per request (median of the rounds, and each round).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import httpx
import report  # noqa: F401  (puts tests/ on the path)
from serverproc import ServerProcess

ROUNDS = 5
QUIET = {"RTSERVER_LOG_LEVEL": "warning"}  # the log's cost is no part of what is measured


def keep_alive_us(port: int, n: int) -> float:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        t = time.perf_counter()
        for _ in range(n):
            client.get("/healthz")
        return (time.perf_counter() - t) / n * 1e6


def new_connection_us(port: int, n: int) -> float:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    t = time.perf_counter()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(request)
            while s.recv(65536):
                pass
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="checkouts to compare (each serves from its folder)")
    roots = ap.parse_args().roots
    servers = {
        root: ServerProcess("--no-warmup", cwd=root, env=QUIET).wait_ready() for root in roots
    }
    times: dict[str, tuple[list[float], list[float]]] = {r: ([], []) for r in roots}
    try:
        for _ in range(ROUNDS):  # interleaved, so a change in the machine's load hits both
            for root, srv in servers.items():
                times[root][0].append(keep_alive_us(srv.port, 1000))
                times[root][1].append(new_connection_us(srv.port, 500))
    finally:
        for srv in servers.values():
            srv.stop()
    for root, (kept, fresh) in times.items():
        print(f"{root}: keep-alive {statistics.median(kept):.0f} us/request "
              f"{[round(x) for x in kept]}; new connection {statistics.median(fresh):.0f} "
              f"us/request {[round(x) for x in fresh]}")  # fmt: skip


if __name__ == "__main__":
    main()
