"""Times are UTC everywhere; a time without a zone is read as UTC (contract §9)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    """The gateway's time (:mod:`gateway.clock`: steady under steps of the system clock)."""
    from gateway import clock

    return clock.utcnow()


def iso(dt: datetime) -> str:
    """ISO-8601 with milliseconds and a ``Z``. A time already in UTC (the usual case: a
    parsed ack's ``at``, :func:`utcnow`) skips the conversion; this runs once per ack."""
    if dt.tzinfo is UTC:
        return dt.isoformat(timespec="milliseconds")[:-6] + "Z"
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@overload
def iso_ts(ts: float) -> str: ...
@overload
def iso_ts(ts: None) -> None: ...
def iso_ts(ts: float | None) -> str | None:
    """:func:`iso` of a Unix time (how SQLite rows keep times); ``None`` stays ``None``."""
    return None if ts is None else iso(datetime.fromtimestamp(ts, UTC))


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
