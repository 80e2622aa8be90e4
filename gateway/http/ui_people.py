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
from gateway.people.model import Person, QuietWindow, quiet_text


def _platforms(conn: sqlite3.Connection, device_ids: list[str]) -> dict[str, list[str]]:
    """device_id → its channels' platforms in order, for those that are registered."""
    out: dict[str, list[str]] = {}
    for device_id, channels in conn.execute(
            "SELECT device_id, channels FROM devices WHERE device_id IN (SELECT value FROM json_each(?))",
            (json.dumps(device_ids),)):
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
    where, args = "1", []
    if prefix:
        where, args = "person_id >= ? AND person_id < ?", [prefix, prefix + ID_UPPER]
    total = conn.execute(f"SELECT COUNT(*) FROM persons WHERE {where}", args).fetchone()[0]
    ids = [r[0] for r in conn.execute(f"SELECT person_id FROM persons WHERE {where} AND person_id > ? "
                                      "ORDER BY person_id LIMIT ?", (*args, after, limit + 1))]
    more = len(ids) > limit
    ids = ids[:limit]
    found = store.get_many(conn, ids)
    people = [found[i] for i in ids if i in found]
    platforms = _platforms(conn, sorted({d for p in people for d in p.devices}))
    return {"people": [person_row(p, platforms, quiet_default, reach_default) for p in people], "total": total,
            "next": ids[-1] if more else None}


__all__ = ["people_page", "person_row"]
