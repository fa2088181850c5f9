"""A one-way channel from the inference thread (and, to cut a stream, the consumer's own
loop) to one asyncio consumer.

The producer never blocks (it must not stall the scheduler); it is the scheduler's job not to
produce for a consumer whose backlog is full (see Scheduler.max_backlog). So the channel is
bounded by construction, not by refusing puts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class Channel:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_read: Callable[[], None]) -> None:
        self._loop = loop
        self._items: deque[tuple[Any, float]] = deque()  # (item, seconds of audio in it)
        self._ready = asyncio.Event()
        self._on_read = on_read  # wakes the scheduler: backlog went down
        # The producer's put and the consumer's get both read and write these two: a put
        # between get's look at the items and its write left an item unread with no clock.
        self._clock = threading.Lock()
        self._waiting_since: float | None = None  # items wait unread since then
        self._blocked_s = 0.0  # time items waited unread, up to _waiting_since
        self.taken_s = 0.0  # seconds of audio the consumer has read (written by it alone)
        # Set by the consumer: seconds of audio that reached its client, where it knows.
        self.reached_s: Callable[[], float | None] = lambda: None

    def put(self, item: Any, seconds: float = 0.0) -> None:
        """Called from any thread; ``seconds``: of audio in the item."""
        with self._clock:
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
            self._items.append((item, seconds))
        self._loop.call_soon_threadsafe(self._ready.set)

    @property
    def backlog(self) -> int:
        return len(self._items)

    def stalled_for(self, now: float) -> float:
        """How long items have waited with the consumer reading none of them."""
        with self._clock:
            return self._stalled(now)

    def blocked_for(self, now: float) -> float:
        """How long, in all, items have waited unread: the time the consumer, not the
        producer, held the stream up (a consumer that takes each item as it comes has ~0)."""
        with self._clock:
            return self._blocked_s + self._stalled(now)

    def delivered_s(self) -> float:
        """Seconds of audio the consumer has read and passed on to its client: a client that
        stops reading leaves seconds of what was read for it in the server's buffers."""
        reached = self.reached_s()
        return self.taken_s if reached is None else min(self.taken_s, reached)

    def _stalled(self, now: float) -> float:
        since = self._waiting_since
        return now - since if since is not None and self._items else 0.0

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            await self._ready.wait()
        now = time.monotonic()
        with self._clock:
            item, seconds = self._items.popleft()
            if self._waiting_since is not None:
                self._blocked_s += now - self._waiting_since
            self._waiting_since = now if self._items else None
        self.taken_s += seconds
        self._on_read()
        return item
