"""Times are UTC everywhere; a time without a zone is read as UTC (contract §9)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The gateway's time (:mod:`gateway.clock`: steady under steps of the system clock)."""
    from gateway import clock

    return clock.utcnow()


def iso(dt: datetime) -> str:
    """ISO-8601 with milliseconds and a ``Z``."""
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """Parse ISO-8601; a naive time is UTC. Raises ValueError."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("not an ISO-8601 time")
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)
