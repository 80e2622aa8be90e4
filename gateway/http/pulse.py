"""A wake-up for everyone waiting on "something committed" (event streams, the operator page)."""

from __future__ import annotations

import asyncio


class Pulse:
    """Wakes every waiter at once when something committed (job status may have changed)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float, stopping: asyncio.Event) -> None:
        event = self._event
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
