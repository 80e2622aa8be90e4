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
from gateway.pipeline import acks, deliveries, registry
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


def _items(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
    now = clock.now()
    stored = acks.acks_of(conn, [r["message_id"] for r in rows])
    out = []
    for row in rows:
        try:
            n = json.loads(row["notification"])
        except (TypeError, ValueError):
            n = {}
        step = row["person_id"] is not None and row["attempts"] == 0
        out.append({
            "message_id": row["message_id"], "job_id": row["job_id"], "title": n.get("title"),
            "body": n.get("body"), "data": n.get("data") or {}, "priority": n.get("priority", "normal"),
            "state": row["state"],
            "opened": any(a["status"] == "opened" for a in stored.get(row["message_id"], ())),
            "created_at": iso_ts(row["created_at"]), "device_id": row["device_id"],
            "reason": deliveries.wait_reason(row["state"], row["next_at"], row["last_error"], row["moved"], now, step)})
    return out


def inbox(conn: sqlite3.Connection, mine: Mine, limit: int = DEFAULT_INBOX_PAGE,
          before: str | None = None) -> list[dict[str, Any]]:
    """Up to ``limit`` of the person's notifications, newest first, older than ``before``
    (a message_id of theirs; :class:`NotInInbox` if it is not)."""
    rows = deliveries.person_page(conn, mine.person_id, mine.device_ids, limit,
                                  before.lower() if before is not None else None)
    if rows is None:
        raise NotInInbox(before)
    return _items(conn, rows)


def inbox_item(conn: sqlite3.Connection, mine: Mine, message_id: str) -> dict[str, Any] | None:
    """One of the person's deliveries (any of a people job's, not only the one the inbox
    shows), or None (unknown, or someone else's)."""
    row = deliveries.person_row(conn, mine.person_id, mine.device_ids, message_id.lower())
    return _items(conn, [row])[0] if row is not None else None


def devices(conn: sqlite3.Connection, device_ids: list[str]) -> list[dict[str, Any]]:
    """The person's devices in their reach order, as the page shows them: each channel's
    platform and a shortened address (:func:`gateway.http.ui_queries.redact_channel`: a page
    carries no usable token), the owner and when it was last changed. An id with no device
    row (not registered, or removed) is ``{"device_id", "missing": true}``."""
    from gateway.http.ui_queries import redact_channel

    out: list[dict[str, Any]] = []
    for device_id in device_ids:
        device = registry.get_device(conn, device_id)
        if device is None:
            out.append({"device_id": device_id, "missing": True})
            continue
        out.append({"device_id": device_id, "owner": device.get("owner"), "segment": device.get("segment"),
                    "channels": [{"platform": c.get("platform"), "address": redact_channel(c),
                                  "invalid": c.get("invalid")} for c in device["channels"]],
                    "updated_at": device.get("updated_at"), "missing": False})
    return out


__all__ = ["DEFAULT_INBOX_PAGE", "MAX_INBOX_PAGE", "Mine", "NotInInbox", "devices", "inbox", "inbox_item"]
