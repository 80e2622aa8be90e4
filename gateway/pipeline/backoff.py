"""Retry delays: exponential backoff with full jitter, capped; Retry-After wins."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): U(0, min(max, initial·2^(n-1)))."""
    ceiling = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


def retry_delay(attempt: int, retry_after: float | None, initial: float, maximum: float,
                rng: random.Random | None = None) -> float:
    """The platform's Retry-After is honoured as given (it may exceed our cap: the platform
    knows its quota); otherwise full-jitter backoff."""
    if retry_after is not None and retry_after >= 0:
        return retry_after
    return backoff_delay(attempt, initial, maximum, rng)
