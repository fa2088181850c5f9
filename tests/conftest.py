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

    def make(*args: str, env: dict[str, str] | None = None, **kw: bool) -> ServerProcess:
        srv = ServerProcess(*args, env=env, **kw)
        started.append(srv)
        return srv.wait_ready()

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed on first use where we may (root + apt-get), as the
    quickstart promises a test command that installs what it needs."""
    import os
    import shutil
    import subprocess

    path = shutil.which("chromium")
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
        path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is required for the browser test: apt-get install chromium")
    return path


def pytest_report_header(config) -> str:
    """Say up front whether the CosyVoice tests can run (they need the golden fixtures)."""
    from golden.conftest import resolve_golden_dir

    golden = resolve_golden_dir()
    if golden.is_dir():
        return f"golden fixtures: {golden}"
    return (
        f"golden fixtures: none at {golden}: the CosyVoice tests skip "
        "(put them at .golden/ or set COSYVOICE_GOLDEN=DIR; see README, Quickstart)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip for want of the golden fixtures is reported per reason, not per test: without
    them `-rs` listed hundreds of lines, one for each CosyVoice test."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and isinstance(rep.longrepr, tuple) and "golden" in rep.longrepr[2]:
        rep.longrepr = (str(Path(__file__).parent), None, rep.longrepr[2])
