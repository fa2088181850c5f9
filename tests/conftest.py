from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The built-in-voice server every integration test shares."""
    srv = ServerProcess("--max-text-chars", "2000").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerProcess]]:
    """A private server with its own settings (capacity limits, model dirs, ...)."""
    started: list[ServerProcess] = []

    def make(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        srv = ServerProcess(*args, env=env)
        started.append(srv)
        return srv.wait_ready()

    yield make
    for srv in started:
        srv.stop()
