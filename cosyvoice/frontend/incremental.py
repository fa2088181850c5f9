"""Incremental sentence splitter for text that arrives in fragments (WebSocket input).

``push(fragment)`` returns the normalised segments that are complete; ``flush()`` returns the
rest. A boundary is only taken once the character after the sentence-final mark has arrived
(it may be a closing quote, which belongs to the sentence, or a digit after a '.').
"""

from __future__ import annotations

from collections.abc import Callable

from .text import CLOSING_QUOTES, EN_PUNCT, ZH_PUNCT

_ALL_PUNCT = set(ZH_PUNCT) | set(EN_PUNCT)


class IncrementalSplitter:
    """``normalize(text) -> list[str]`` is the frontend's split normaliser; ``length`` measures a
    raw chunk (characters by default). A chunk is emitted once it holds at least ``min_len``
    units (``first_min_len`` for the very first one, small by default for low latency)."""

    def __init__(
        self,
        normalize: Callable[[str], list[str]],
        min_len: int = 60,
        first_min_len: int = 1,
        length: Callable[[str], int] = len,
    ) -> None:
        self._normalize = normalize
        self._length = length
        self.min_len = min_len
        self.first_min_len = first_min_len
        self._buf = ""
        self._cut = 0  # just past the last safe sentence end found in the buffer, or 0
        self._emitted = 0

    def _scan(self, start: int) -> None:
        """Look for sentence ends from `start` on (each mark is decided once the character after
        it has arrived), so a long buffer is not scanned again for every fragment."""
        buf = self._buf
        for i in range(start, len(buf) - 1):
            c, nxt = buf[i], buf[i + 1]
            if c not in _ALL_PUNCT or (c == "." and nxt.isdigit()):
                continue  # not a mark, or a decimal point
            self._cut = i + 2 if nxt in CLOSING_QUOTES else i + 1

    def push(self, fragment: str) -> list[str]:
        start = max(len(self._buf) - 1, 0)  # the last mark waited for this fragment
        self._buf += fragment
        self._scan(start)
        if self._cut == 0:
            return []
        chunk = self._buf[: self._cut]
        need = self.first_min_len if self._emitted == 0 else self.min_len
        if self._length(chunk.strip()) < need:
            return []
        self._buf, self._cut = self._buf[self._cut :], 0
        segs = self._normalize(chunk)
        self._emitted += len(segs)
        return segs

    @property
    def pending(self) -> str:
        """Text received but not yet emitted (an idle auto-flush would speak it)."""
        return self._buf

    def flush(self) -> list[str]:
        chunk, self._buf, self._cut = self._buf, "", 0
        if not chunk.strip():
            return []
        segs = self._normalize(chunk)
        self._emitted += len(segs)
        return segs
