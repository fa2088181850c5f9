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
        self._emitted = 0

    def _last_boundary(self) -> int:
        """Index just past the last safe sentence end in the buffer, or 0."""
        buf = self._buf
        cut = 0
        for i, c in enumerate(buf):
            if c not in _ALL_PUNCT or i + 1 >= len(buf):
                continue
            nxt = buf[i + 1]
            if c == "." and nxt.isdigit():
                continue  # decimal point, not a sentence end
            cut = i + 2 if nxt in CLOSING_QUOTES else i + 1
        return cut

    def push(self, fragment: str) -> list[str]:
        self._buf += fragment
        cut = self._last_boundary()
        if cut == 0:
            return []
        chunk = self._buf[:cut]
        need = self.first_min_len if self._emitted == 0 else self.min_len
        if self._length(chunk.strip()) < need:
            return []
        self._buf = self._buf[cut:]
        segs = self._normalize(chunk)
        self._emitted += len(segs)
        return segs

    @property
    def pending(self) -> str:
        """Text received but not yet emitted (an idle auto-flush would speak it)."""
        return self._buf

    def flush(self) -> list[str]:
        chunk, self._buf = self._buf, ""
        if not chunk.strip():
            return []
        segs = self._normalize(chunk)
        self._emitted += len(segs)
        return segs
