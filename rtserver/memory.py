"""What the server asks of glibc's allocator, so that memory a long request used goes back to
the OS once the request is over. Elsewhere (musl, macOS) both calls do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def arena_env(arenas: int) -> dict[str, str]:
    """The environment that caps a new process's arenas (a Ray replica's): glibc reads it
    before any thread starts. MALLOC_ARENA_MAX in this process's environment wins; empty
    for 0."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return {"MALLOC_ARENA_MAX": os.environ["MALLOC_ARENA_MAX"]}
    return {"MALLOC_ARENA_MAX": str(arenas)} if arenas else {}


def cap_arenas(arenas: int) -> None:
    """glibc gives a thread that contends for malloc an arena of its own, up to 8 per core.
    A long request leaves its freed memory spread over all of them in pieces malloc_trim
    cannot hand back (measured on 2 cores, Piper, a 6-minute request: 30-77 MB kept; with 4
    arenas 0-9 MB). glibc fixes the limit the first time two threads contend, so call this
    before the process starts threads. 0, or MALLOC_ARENA_MAX in the environment (which glibc
    has read already), leave glibc's choice."""
    libc = _libc()
    if arenas and libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, arenas)


# Ordinary requests on CosyVoice2 (CPU) regrow a trimmed process by ~1.3x; a long request on
# the built-in voice doubles it (see Trimmer).
TRIM_GROWTH = 1.5


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> Callable[[], object] | None:
    libc = _libc()
    return None if libc is None else lambda: libc.malloc_trim(0)


class Trimmer:
    """Hands freed memory back to the OS (glibc's malloc_trim) once the process has grown past
    ``growth`` times its size after the last hand-back while idle.

    glibc keeps freed memory in its arenas for reuse; after a long request that is hundreds of
    MB the process never needs again (a Piper server of ~200 MB: +166-230 MB). But what an
    ordinary request frees, the next one takes again, and taking it back from the OS costs a
    page fault per page: on a CPU CosyVoice2 server (full size, bf16, 3.6 GB resident, ~0.8 GB
    of it handed back each time) a stream's first audio came 0.25 s later after a hand-back
    (2.62 vs 2.38 s). So only growth past ``growth`` goes back: a long request's leftovers,
    not the working set (which may thus keep up to half the trimmed size in freed memory)."""

    def __init__(
        self,
        growth: float = TRIM_GROWTH,
        resident: Callable[[], int | None] = resident_bytes,
        trim: Callable[[], object] | None = None,
    ) -> None:
        self.growth = growth
        self._resident = resident
        self._trim = trim if trim is not None else _malloc_trim()
        self._floor: int | None = None  # resident bytes after the last hand-back while idle

    def __call__(self, idle: bool) -> bool:
        """Hand memory back if due; returns whether it did. ``idle``: no job holds memory, so
        what is left is the server's own size, which later growth is measured from (measured
        under load, the memory the load frees would stay). Until the first idle hand-back, and
        where resident memory cannot be read, every call hands back."""
        if self._trim is None:
            return False
        now = self._resident()
        if self._floor is not None and now is not None and now <= self._floor * self.growth:
            if idle:  # smaller than at the hand-back: the engine let idle state go since
                self._floor = min(self._floor, now)  # (a CosyVoice flow pool, held a while)
            return False
        self._trim()
        if idle:
            self._floor = self._resident()
        return True
