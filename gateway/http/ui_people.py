"""The operator page's People tab: persons by person_id (an id prefix, a page at a time, on
the primary key), each with their devices in reach order, time zone, quiet hours, bypass
priority, mutes and reach time as they apply now (a person who set none of their own
follows the ``[people]`` defaults, shown as such). Runs on the page's read-only connection.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gateway.http.ui_queries import ID_UPPER, _limit
from gateway.people import store
from gateway.pipeline import registry
from gateway.people.model import Person, QuietWindow, quiet_text


def _platforms(conn: sqlite3.Connection, device_ids: list[str]) -> dict[str, list[str]]:
    """device_id → its channels' platforms in order, for those that are registered."""
    out: dict[str, list[str]] = {}
    for device_id, (channels, _) in registry.channels_of(conn, device_ids).items():
        try:
            out[device_id] = [str(c.get("platform")) for c in json.loads(channels)]
        except (TypeError, ValueError, AttributeError):
            out[device_id] = []
    return out


def person_row(person: Person, platforms: dict[str, list[str]], quiet_default: list[QuietWindow],
               reach_default: float) -> dict[str, Any]:
    windows = person.quiet_hours if person.quiet_hours is not None else quiet_default
    return {
        "person_id": person.person_id, "name": person.name, "account": person.account,
        "devices": [{"device_id": d, "platforms": platforms.get(d, []), "missing": d not in platforms}
                    for d in person.devices],
        "timezone": person.timezone,
        "quiet_hours": [quiet_text(w.as_json()) for w in windows],
        "quiet_default": person.quiet_hours is None,
        "bypass_priority": person.bypass_priority,
        "muted": {"segments": list(person.muted.segments), "rules": list(person.muted.rules)},
        "reach_after_s": person.reach_after_s if person.reach_after_s is not None else reach_default,
        "reach_default": person.reach_after_s is None,
    }


def people_page(conn: sqlite3.Connection, quiet_default: list[QuietWindow], reach_default: float,
                prefix: str = "", after: str = "", limit: int = 50) -> dict[str, Any]:
    limit = _limit(limit)
    total = store.count(conn, prefix, ID_UPPER)
    people = store.page(conn, prefix, after, limit + 1, ID_UPPER)
    more = len(people) > limit
    people = people[:limit]
    platforms = _platforms(conn, sorted({d for p in people for d in p.devices}))
    return {"people": [person_row(p, platforms, quiet_default, reach_default) for p in people], "total": total,
            "next": people[-1].person_id if more else None}


__all__ = ["people_page", "person_row"]
