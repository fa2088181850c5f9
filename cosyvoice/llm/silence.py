"""v3 post-LLM silent-token filter (spec §8.5).

CosyVoice3 drops runs of "FSQ silent and breath" tokens longer than 5 before they reach the
flow; the LLM itself still consumed them. v1/v2 have no such list.
"""

from __future__ import annotations

from collections.abc import Iterable

V3_SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
MAX_SILENT_RUN = 5


class SilentFilter:
    """Per-request state: ``keep(token)`` says whether the token goes on to the flow."""

    def __init__(
        self, silent: frozenset[int] = V3_SILENT_TOKENS, max_run: int = MAX_SILENT_RUN
    ) -> None:
        self.silent = silent
        self.max_run = max_run
        self.run = 0

    def keep(self, token: int) -> bool:
        if token in self.silent:
            self.run += 1
            return self.run <= self.max_run
        self.run = 0
        return True


def filter_silent(tokens: Iterable[int], silent: frozenset[int] = V3_SILENT_TOKENS) -> list[int]:
    f = SilentFilter(silent)
    return [t for t in tokens if f.keep(t)]
