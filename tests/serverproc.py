"""Start a real rtserver process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def eventually(check: Callable[[], T], ok: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Call `check` until `ok` holds for what it returns (or `timeout` passes): the last value.
    For state the server reaches a moment after a client's action (a freed slot, memory
    trimmed once idle), where a fixed sleep is too short on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not ok(value := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def _held(health: dict) -> bool:
    """Whether a /healthz snapshot shows anything held: a job active or queued, a session or
    socket, engine memory."""
    held = [health[k] for k in ("active", "queued", "streams_open", "sockets_open")]
    held += [health[f"{k}_{s}"] for k in ("uploads", "prompts") for s in ("reading", "waiting")
             if f"{k}_{s}" in health]  # fmt: skip
    held += [v for k, v in health.items() if k.startswith("held_")]
    return any(held)


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def stat_fields(pid: int, thread: int | None = None) -> list[str]:
    """The fields of a process's (or one of its threads') /proc stat after "(comm)" (which may
    hold spaces): state, ppid, ..., minflt at 7, utime at 11, stime at 12 (proc(5) less 3)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int, thread: int | None = None, system: bool = False) -> float:
    """CPU seconds of a process, all its threads (Linux /proc), or of one of its threads
    (``thread``: its id; the process's own id is its main thread, the server's event loop);
    ``system``: only those spent in the kernel."""
    fields = stat_fields(pid, thread)
    ticks = int(fields[12]) + (0 if system else int(fields[11]))
    return ticks / os.sysconf("SC_CLK_TCK")


def faults_sys(pid: int) -> tuple[int, float]:
    """A process's minor page faults and system CPU seconds so far (Linux /proc)."""
    return int(stat_fields(pid)[7]), cpu_s(pid, system=True)


def kernel_since(pid: int, start: tuple[int, float]) -> tuple[float, float]:
    """System CPU seconds and millions of minor page faults since ``start`` (a
    :func:`faults_sys` of the same process)."""
    faults, sys_s = faults_sys(pid)
    return sys_s - start[1], (faults - start[0]) / 1e6


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc), e.g. the Ray cluster a server started."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(stat_fields(int(entry.name))[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.update(children)
        todo.extend(children)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended: it only waits to be reaped)."""
    running = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if stat_fields(pid)[0] != "Z":
                running.add(pid)
    return running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self,
        *args: str,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        new_session: bool = False,  # a process group of its own, as a terminal's command has
        cwd: Path | str = ROOT,  # another checkout's code (benchmarks comparing commits)
        port: int | None = None,  # a stopped server's, to restart "the same" server
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path or ROOT / "tests" / "out" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "rtserver", "serve", "--port", str(self.port), *args]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=new_session,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def log_end(self) -> int:
        """Where the log ends now: `wait_log(..., since=)` looks only at what comes after."""
        self._log.flush()
        return len(self.log_path.read_text(errors="replace"))

    def wait_log(self, pattern: str, timeout: float = 300.0, since: int = 0) -> re.Match:
        """Wait for a line of the server's log (from `since`) to match `pattern` (a regex);
        returns the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._log.flush()
            if m := re.search(pattern, self.log_path.read_text(errors="replace")[since:]):
                return m
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.5)
        raise TimeoutError(f"no {pattern!r} in the log in {timeout}s:\n{self.log()}")

    def healthz(self) -> dict:
        return httpx.get(f"{self.base_url}/healthz", timeout=10).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Poll /healthz until no job is active or queued; returns the last snapshot."""
        return eventually(self.healthz, lambda h: h["active"] == h["queued"] == 0, timeout)

    def assert_idle(self, timeout: float = 15.0) -> dict:
        """Wait until nothing is held (no job active or queued, no session or socket left
        unreleased) and return the snapshot; fail if something stays held."""
        h = eventually(self.healthz, lambda h: not _held(h), timeout)
        assert not _held(h), f"still held after {timeout}s: {h}"
        return h

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
