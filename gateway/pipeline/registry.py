"""The device registry: the ``devices`` table (and, through its triggers, the page's tag
table). Plain functions on a connection, inside the caller's transaction."""

from __future__ import annotations

import json
import sqlite3

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from devices.models import Device
from gateway import clock
from gateway.pipeline.routing import channel_key
from gateway.timeutil import iso, iso_ts

_UPSERT_DEVICE = (
    "INSERT INTO devices(device_id, segment, tags, channels, invalid, source, updated_at, owner) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET segment = excluded.segment, "
    "tags = excluded.tags, channels = excluded.channels, invalid = excluded.invalid, "
    "source = excluded.source, updated_at = excluded.updated_at, owner = excluded.owner")



def _chunks(items: list[Any], n: int = 500) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def upsert_devices(conn: sqlite3.Connection, devices: list[tuple[Device, str]], now: float | None = None) -> None:
    """Insert or replace each (device, source) in order; invalid marks survive only for
    channels whose address is unchanged. One SELECT per 500 distinct devices and one
    ``executemany`` (a registration burst is thousands per commit); a device twice in the
    batch ends as its last registration, with the marks both channel lists keep."""
    now = now or clock.now()
    ids = list(dict.fromkeys(d.device_id for d, _ in devices))
    marks_of: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(ids):
        sql = f"SELECT device_id, invalid FROM devices WHERE device_id IN ({','.join('?' * len(chunk))})"
        for device_id, invalid in conn.execute(sql, chunk):
            if invalid != "{}":
                marks_of[device_id] = json.loads(invalid)
    rows = []
    for device, source in devices:
        marks = marks_of.get(device.device_id)
        if marks:
            keys = {channel_key(c) for c in device.channels}
            marks = marks_of[device.device_id] = {k: v for k, v in marks.items() if k in keys}
        rows.append((device.device_id, device.segment, json.dumps(device.tags) if device.tags else "[]",
                     json.dumps([c.model_dump(exclude_none=True) for c in device.channels]),
                     json.dumps(marks) if marks else "{}", source, now, device.owner))
    conn.executemany(_UPSERT_DEVICE, rows)


def upsert_device(conn: sqlite3.Connection, device: Device, source: str, now: float | None = None) -> None:
    """:func:`upsert_devices` for one device (a batch of one)."""
    upsert_devices(conn, [(device, source)], now)


def remove_device(conn: sqlite3.Connection, device_id: str) -> bool:
    return conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0


def device_json(row: sqlite3.Row) -> dict[str, Any]:
    marks = json.loads(row["invalid"])
    channels = json.loads(row["channels"])
    out_channels = []
    for ch in channels:
        model = Device.model_validate({"device_id": "x", "channels": [ch]}).channels[0]
        mark = marks.get(channel_key(model))
        entry = dict(ch)
        if mark:
            entry["invalid"] = mark
        out_channels.append(entry)
    return {"device_id": row["device_id"], "segment": row["segment"], "tags": json.loads(row["tags"]),
            "channels": out_channels, "owner": row["owner"] if "owner" in row.keys() else None,  # (a database not migrated yet)
            "updated_at": iso_ts(row["updated_at"])}


def get_device(conn: sqlite3.Connection, device_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    return device_json(row) if row else None


def iter_devices(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    for row in conn.execute("SELECT * FROM devices ORDER BY device_id"):
        yield device_json(row)


def mark_invalid(conn: sqlite3.Connection, device_id: str, key: str, reason: str, now: float) -> None:
    row = conn.execute("SELECT invalid FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    if row is None:
        return
    marks = json.loads(row["invalid"])
    marks[key] = {"at": iso_ts(now), "reason": reason}
    conn.execute("UPDATE devices SET invalid = ? WHERE device_id = ?", (json.dumps(marks), device_id))


def devices_after(conn: sqlite3.Connection, after: str, limit: int) -> list[dict[str, Any]]:
    """One page of the registry by device_id (:func:`device_json` each), after ``after``."""
    rows = conn.execute("SELECT * FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?", (after, limit))
    return [device_json(r) for r in rows]


def in_segment(conn: sqlite3.Connection, segment: str) -> list[str]:
    """device_ids of a segment (index devices_by_segment)."""
    return [r[0] for r in conn.execute("SELECT device_id FROM devices WHERE segment = ?", (segment,))]


def count_targets(conn: sqlite3.Connection, target: dict[str, Any]) -> int:
    """How many deliveries a job will have, known when it is accepted (the registry may
    still change while it is expanded; expansion corrects the count at its end)."""
    if "devices" in target:
        return len(target["devices"])
    if "people" in target:
        from gateway.pipeline import reach  # it reads this module's devices

        return reach.count_targets(conn, target["people"])
    if "segment" in target:
        return conn.execute("SELECT COUNT(*) FROM devices WHERE segment = ?", (target["segment"],)).fetchone()[0]
    return conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0]


def channels_of(conn: sqlite3.Connection, device_ids: list[str]) -> dict[str, tuple[str, str]]:
    """device_id → (stored channels text, stored invalid marks text) of those that exist."""
    if not device_ids:
        return {}
    marks = ",".join("?" * len(device_ids))
    return {r[0]: (r[1], r[2]) for r in conn.execute(
        f"SELECT device_id, channels, invalid FROM devices WHERE device_id IN ({marks})", device_ids)}


def page_after(conn: sqlite3.Connection, cursor: str, limit: int, segment: str | None = None) -> list[tuple[str, str, str]]:
    """(device_id, channels text, invalid text) of the next ``limit`` devices after
    ``cursor`` by device_id, of one segment or all."""
    if segment is not None:
        rows = conn.execute("SELECT device_id, channels, invalid FROM devices WHERE segment = ? "
                            "AND device_id > ? ORDER BY device_id LIMIT ?", (segment, cursor, limit))
    else:
        rows = conn.execute("SELECT device_id, channels, invalid FROM devices WHERE device_id > ? "
                            "ORDER BY device_id LIMIT ?", (cursor, limit))
    return [(r[0], r[1], r[2]) for r in rows]



# ------------------------------------------------------------------ reads for other packages
def device_row(conn: sqlite3.Connection, device_id: str) -> sqlite3.Row | None:
    """The stored row of one device (every column), or None."""
    return conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()


def known(conn: sqlite3.Connection, device_ids: list[str]) -> set[str]:
    """Which of ``device_ids`` are registered."""
    found: set[str] = set()
    for chunk in _chunks(device_ids):
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(f"SELECT device_id FROM devices WHERE device_id IN ({marks})", chunk))
    return found


def matching(conn: sqlite3.Connection, prefix: str = "", segment: str = "", tag: str = "", after: str = "",
             limit: int = 50, id_upper: str = "\x7f") -> tuple[int, list[sqlite3.Row]]:
    """(how many match, the first ``limit`` rows by device_id after ``after``) of the devices
    with an id prefix, a segment and a tag (each optional). A tag is found through
    ``ui_device_tags (tag, device_id)`` (the range and the cursor go on its device_id); a
    database without that table is searched in the JSON, slower and still right."""
    source, key = "devices d", "d.device_id"
    tag_table = bool(tag) and conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ui_device_tags'").fetchone() is not None
    if tag_table:
        source, key = "ui_device_tags t JOIN devices d ON d.device_id = t.device_id", "t.device_id"
    where: list[str] = []
    args: list[Any] = []
    if tag_table:
        where.append("t.tag = ?")
        args.append(tag)
    elif tag:
        where.append("EXISTS (SELECT 1 FROM json_each(CASE WHEN json_valid(d.tags) THEN d.tags ELSE '[]' END) "
                     "WHERE value = ?)")
        args.append(tag)
    if prefix:
        where.append(f"{key} >= ? AND {key} < ?")
        args += [prefix, prefix + id_upper]
    if segment:
        where.append("d.segment = ?")
        args.append(segment)
    cond = " AND ".join(where) or "1"
    total = int(conn.execute(f"SELECT COUNT(*) FROM {source} WHERE {cond}", args).fetchone()[0])
    rows = conn.execute(f"SELECT d.* FROM {source} WHERE {cond} AND {key} > ? ORDER BY {key} LIMIT ?",
                        (*args, after, limit)).fetchall()
    return total, rows


def count(conn: sqlite3.Connection) -> int:
    """How many devices are registered."""
    return int(conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0])


def segments_of(conn: sqlite3.Connection, device_ids: Iterable[str]) -> dict[str, str]:
    """device_id → segment ('' for none) of those of ``device_ids`` that are registered."""
    ids = json.dumps(sorted(device_ids))
    return {str(r[0]): str(r[1]) for r in conn.execute(
        "SELECT device_id, COALESCE(segment, '') FROM devices WHERE device_id IN (SELECT value FROM json_each(?))",
        (ids,))}

__all__ = ["channel_key", "channels_of", "count_targets", "device_json", "devices_after", "in_segment", "get_device", "count", "device_row", "known", "matching", "segments_of", "iter_devices", "mark_invalid",
           "page_after", "remove_device", "upsert_device", "upsert_devices"]
