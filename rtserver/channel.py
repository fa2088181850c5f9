"""A one-way channel from the inference thread to one asyncio consumer.

The producer never blocks (it must not stall the scheduler); it is the scheduler's job not to
produce for a consumer whose backlog is full (see Scheduler.max_backlog). So the channel is
bounded by construction, not by refusing puts.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any


class Channel:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_read: Callable[[], None]) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._on_read = on_read  # wakes the scheduler: backlog went down

    def put(self, item: Any) -> None:
        """Called from any thread."""
        self._items.append(item)
        self._loop.call_soon_threadsafe(self._ready.set)

    @property
    def backlog(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            await self._ready.wait()
        item = self._items.popleft()
        self._on_read()
        return item
