"""Rate-limited log lines: one per key per window, with a count of the ones held back.

A misconfigured client can publish thousands of denied messages a second; the
operator needs to see *that* it happens and why, once, not a flooded journal. The
first event of a key logs at once; later ones within ``window_s`` are only counted,
and the next line after the window says how many were suppressed. The key table is
bounded: when it is full, keys whose window has passed are forgotten first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

WINDOW_S = 60.0
MAX_KEYS = 10_000


class LogThrottle:
    __slots__ = ("_clock", "_keys", "max_keys", "window_s")

    def __init__(self, window_s: float = WINDOW_S, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._keys: dict[Hashable, list[float]] = {}   # key -> [last line at, suppressed since]

    def __call__(self, key: Hashable) -> int | None:
        """None: stay quiet (counted). An int: log now; it is the number suppressed since the last line."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None and now - entry[0] < self.window_s:
            entry[1] += 1
            return None
        suppressed = int(entry[1]) if entry is not None else 0
        if entry is None and len(self._keys) >= self.max_keys:
            self._prune(now)
        self._keys[key] = [now, 0]
        return suppressed

    def _prune(self, now: float) -> None:
        stale = [k for k, (at, _) in self._keys.items() if now - at >= self.window_s]
        for k in stale:
            del self._keys[k]
        if len(self._keys) >= self.max_keys:  # all recent: drop the oldest half
            for k in list(self._keys)[: self.max_keys // 2]:
                del self._keys[k]
