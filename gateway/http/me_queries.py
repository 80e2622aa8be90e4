"""Reads of a person's own page (``/v1/me/*``): their inbox and their devices.

A person's notifications, newest job first, are the deliveries made for them (a job that
targets people marks each delivery with its person, ``deliveries.person_id``) and those
to a device in their reach list from jobs that target devices, segments or all (no
person). A delivery made for someone else is not theirs even on a device they share, and
one from before a device came to them is theirs only as long as it is in their list.
Every query takes the person (:class:`Mine`) and nothing else, so a route cannot name a
row of anyone else's by mistake: a message_id that is not among theirs reads as absent.

Paging is on the server with a cursor: ``before`` is the message_id of the last item of
the previous page, looked up among the person's own deliveries (another person's id is
"not in your inbox", never a position in theirs). Order is (job created_at, message_id)
descending, a total order, so a page boundary never skips or repeats an item, even for the
deliveries of one job to several of the person's devices.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway import clock
from gateway.pipeline import store
from gateway.pipeline.deliveries import wait_reason
from gateway.timeutil import iso_ts

MAX_INBOX_PAGE = 200
DEFAULT_INBOX_PAGE = 20


class NotInInbox(LookupError):
    """A message_id that is not one of the person's deliveries."""


@dataclass(frozen=True, slots=True)
class Mine:
    """Whose rows a query may read: the person and their reach list."""

    person_id: str
    device_ids: tuple[str, ...]

    def where(self) -> tuple[str, list[Any]]:
        """The condition (on ``deliveries d``) that a delivery is this person's, and its values."""
        sql = "(d.person_id = ?"
        args: list[Any] = [self.person_id]
        if self.device_ids:
            sql += f" OR (d.person_id IS NULL AND d.device_id IN ({','.join('?' * len(self.device_ids))}))"
            args += self.device_ids
        return sql + ")", args


def _item(row: sqlite3.Row, now: float) -> dict[str, Any]:
    try:
        n = json.loads(row["notification"])
    except (TypeError, ValueError):
        n = {}
    step = row["person_id"] is not None and row["attempts"] == 0
    return {"message_id": row["message_id"], "job_id": row["job_id"], "title": n.get("title"),
            "body": n.get("body"), "data": n.get("data") or {}, "priority": n.get("priority", "normal"),
            "state": row["state"], "opened": bool(row["opened"]), "created_at": iso_ts(row["created_at"]),
            "device_id": row["device_id"],
            "reason": wait_reason(row["state"], row["next_at"], row["last_error"], row["moved"], now, step)}


# A job that targets people makes a delivery for each of the person's devices up front,
# the later ones waiting their turn (gateway.pipeline.reach): the inbox shows the
# notification once, by the delivery that got furthest (acknowledged, sent, queued, then
# the rest; the earliest turn first). Deliveries of jobs for devices, segments or all are
# each an item of their own.
_ROWS = """
WITH mine AS (
    SELECT d.message_id, d.job_id, d.device_id, d.state, d.person_id, d.attempts, d.next_at, d.last_error, d.moved,
           ROW_NUMBER() OVER (PARTITION BY d.job_id, d.person_id ORDER BY
               CASE d.state WHEN 'acknowledged' THEN 0 WHEN 'sent' THEN 1 WHEN 'queued' THEN 2 ELSE 3 END,
               d.attempts DESC, d.next_at, d.message_id) AS pick
    FROM deliveries d WHERE {cond})
SELECT m.*, j.notification, j.created_at,
       EXISTS (SELECT 1 FROM acks a WHERE a.message_id = m.message_id AND a.status = 'opened') AS opened
FROM mine m JOIN jobs j ON j.job_id = m.job_id
"""


def inbox(conn: sqlite3.Connection, mine: Mine, limit: int = DEFAULT_INBOX_PAGE,
          before: str | None = None) -> list[dict[str, Any]]:
    """Up to ``limit`` of the person's notifications, newest first, older than ``before``
    (a message_id of theirs; :class:`NotInInbox` if it is not)."""
    cond, args = mine.where()
    where = "WHERE (m.person_id IS NULL OR m.pick = 1) "
    more: list[Any] = []
    if before is not None:
        cursor = conn.execute(f"SELECT j.created_at FROM deliveries d JOIN jobs j ON j.job_id = d.job_id "
                              f"WHERE d.message_id = ? AND {cond}", [before.lower(), *args]).fetchone()
        if cursor is None:
            raise NotInInbox(before)
        where += "AND (j.created_at < ? OR (j.created_at = ? AND m.message_id < ?)) "
        more = [cursor[0], cursor[0], before.lower()]
    rows = conn.execute(_ROWS.format(cond=cond) + where + "ORDER BY j.created_at DESC, m.message_id DESC LIMIT ?",
                        [*args, *more, limit]).fetchall()
    now = clock.now()
    return [_item(r, now) for r in rows]


def inbox_item(conn: sqlite3.Connection, mine: Mine, message_id: str) -> dict[str, Any] | None:
    """One of the person's deliveries (any of a people job's, not only the one the inbox
    shows), or None (unknown, or someone else's)."""
    cond, args = mine.where()
    row = conn.execute(_ROWS.format(cond=f"d.message_id = ? AND {cond}"), [message_id.lower(), *args]).fetchone()
    return _item(row, clock.now()) if row is not None else None


def devices(conn: sqlite3.Connection, device_ids: list[str]) -> list[dict[str, Any]]:
    """The person's devices in their reach order, as the page shows them: each channel's
    platform and a shortened address (:func:`gateway.http.ui_queries.redact_channel`: a page
    carries no usable token), the owner and when it was last changed. An id with no device
    row (not registered, or removed) is ``{"device_id", "missing": true}``."""
    from gateway.http.ui_queries import redact_channel

    out: list[dict[str, Any]] = []
    for device_id in device_ids:
        device = store.get_device(conn, device_id)
        if device is None:
            out.append({"device_id": device_id, "missing": True})
            continue
        out.append({"device_id": device_id, "owner": device.get("owner"), "segment": device.get("segment"),
                    "channels": [{"platform": c.get("platform"), "address": redact_channel(c),
                                  "invalid": c.get("invalid")} for c in device["channels"]],
                    "updated_at": device.get("updated_at"), "missing": False})
    return out


__all__ = ["DEFAULT_INBOX_PAGE", "MAX_INBOX_PAGE", "Mine", "NotInInbox", "devices", "inbox", "inbox_item"]
