"""The one polling wait of the test suite, in a blocking and an asyncio flavour.

Both poll ``predicate`` every ``interval`` seconds on the monotonic clock until it returns
something truthy (which they return) or ``timeout`` passes. The timeout only bounds a
failing test, so one generous default serves every caller; a wait that is the subject of
a test sets its own. A timeout raises :class:`WaitTimeout`, which is both an
``AssertionError`` (pytest shows it as a failed check) and a ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

TIMEOUT_S = 15.0
INTERVAL_S = 0.02


class WaitTimeout(AssertionError, TimeoutError):
    """A condition that did not come true in time."""


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT_S, interval: float = INTERVAL_S,
               what: str = "condition") -> Any:
    """Block (the calling thread) until ``predicate()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{what} not met within {timeout:g} s")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = TIMEOUT_S, interval: float = INTERVAL_S,
                what: str = "condition") -> Any:
    """:func:`wait_until` for code on an event loop: sleeps without blocking the loop, so an
    in-process broker or service on the same loop keeps running while the test waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{what} not met within {timeout:g} s")
        await asyncio.sleep(interval)
