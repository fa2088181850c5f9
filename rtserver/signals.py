"""Stop signals as their sender meant them."""

from __future__ import annotations

import time

# A signal to a process group reaches this process and `uv run` above it, which forwards it:
# the same signal twice, milliseconds apart (systemd's default KillMode, GNU timeout, kill --
# -PGID). Read as a second signal, it cut every stream instead of draining them.
REPEAT_S = 0.3


class StopSignals:
    """Counts SIGTERM/SIGINT: the same signal again within REPEAT_S is the first one delivered
    twice, not a second request to stop."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None

    def received(self, sig: int) -> bool:
        """Note ``sig``; False if it repeats the last signal (nothing to do)."""
        now = time.monotonic()
        if self._last is not None and self._last[0] == sig and now - self._last[1] < REPEAT_S:
            return False
        self._last = (sig, now)
        return True
