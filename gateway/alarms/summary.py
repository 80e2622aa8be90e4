"""The alarms at a glance: how many are in each state and which fire now.

One read of the ``alarms`` table (owned by :mod:`gateway.alarms.store`) for everyone who
reports on alarms: ``homepot-gateway status``, ``/metrics`` and the operator page's Now
view, so the three always count the same way.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

# The columns a firing alarm is reported with; ``akey`` is shown as ``key`` (AlarmState).
_FIRING_COLUMNS = ("rule", "akey", "state", "value", "since", "fired_at", "acknowledged_by", "note",
                   "escalation_step", "jobs", "due_at")


@dataclass(frozen=True)
class AlarmSummary:
    """``by_state``: alarm records per state as stored (``idle`` included); ``firing``: the
    firing alarms, longest-firing first, as rows (``key``, raw ``value``/``jobs`` JSON text,
    epoch-second times)."""

    by_state: dict[str, int] = field(default_factory=dict)
    firing: list[dict[str, Any]] = field(default_factory=list)

    def count(self, state: str) -> int:
        return self.by_state.get(state, 0)


def summary(conn: sqlite3.Connection, firing_limit: int | None = None) -> AlarmSummary | None:
    """The summary, or None when this database has no alarms table (no alarm ever ran)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alarms'").fetchone() is None:
        return None
    by_state = {str(state): int(n) for state, n in conn.execute("SELECT state, COUNT(*) FROM alarms GROUP BY state")}
    sql = (f"SELECT {', '.join(_FIRING_COLUMNS)} FROM alarms WHERE state = 'firing' "
           "ORDER BY fired_at, rule, akey")
    if firing_limit is not None:
        sql += f" LIMIT {int(firing_limit)}"
    if firing_limit == 0:  # the counts alone (the operator page lists firing alarms a page at a time)
        return AlarmSummary(by_state, [])
    names = ["key" if c == "akey" else c for c in _FIRING_COLUMNS]
    firing = [dict(zip(names, tuple(row))) for row in conn.execute(sql)]
    return AlarmSummary(by_state, firing)


__all__ = ["AlarmSummary", "summary"]
