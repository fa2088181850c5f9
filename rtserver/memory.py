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


def trimmer() -> Callable[[], None]:
    """glibc keeps freed memory in its arenas for reuse; after a long request that is hundreds
    of MB the process never needs again. malloc_trim hands it back to the OS."""
    libc = _libc()
    if libc is None:
        return lambda: None
    return lambda: libc.malloc_trim(0)
