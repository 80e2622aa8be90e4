"""All pipeline SQL, as plain functions on a connection.

They run inside one transaction each: on the daemon's database thread (via
``Database.run``) or in the CLI process. Nothing here awaits or logs; callers decide.
"""

from __future__ import annotations

import bisect
import json
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from datetime import UTC, datetime

from pydantic import TypeAdapter

from devices.models import PLATFORMS, Channel, Device, channel_address
from gateway import clock
from gateway import stats
from gateway.pipeline.models import Ack, AckIn, AckVia, ParsedJob
from gateway.storage import NotStored
from gateway.timeutil import iso, utcnow

COUNT_KEYS = ("queued", "sent", "acknowledged", "failed", "expired", "invalid_address")
FINAL_DELIVERY_STATES = frozenset({"acknowledged", "failed", "expired", "invalid_address"})

_channel_adapter: TypeAdapter[Any] = TypeAdapter(Channel)


class Forwarder(Protocol):
    """Where status changes and acks go besides the local broker (the upstream outbox)."""

    def enqueue(self, conn: sqlite3.Connection, kind: str, topic: str, payload: bytes,
                retain: bool, coalesce_key: str | None = None) -> None: ...


def _iso_utc(dt: datetime) -> str:
    """:func:`gateway.timeutil.iso` for the usual case of a time already in UTC (a parsed
    ack's ``at``), without the conversion and the replace: once per ack."""
    if dt.tzinfo is UTC:
        return dt.isoformat(timespec="milliseconds")[:-6] + "Z"
    return iso(dt)


def _iso_ts(ts: float) -> str:
    return iso(datetime.fromtimestamp(ts, UTC))


def bump(conn: sqlite3.Connection, name: str, n: int = 1) -> None:
    conn.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                 "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, n))


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    return {r["name"]: r["value"] for r in conn.execute("SELECT name, value FROM counters")}


# ------------------------------------------------------------------ devices
def channel_key(channel: Any) -> str:
    return f"{channel.platform}|{channel_address(channel)}"


def upsert_device(conn: sqlite3.Connection, device: Device, source: str, now: float | None = None) -> None:
    """Insert or replace; invalid marks survive only for channels whose address is unchanged."""
    row = conn.execute("SELECT invalid FROM devices WHERE device_id = ?", (device.device_id,)).fetchone()
    marks: dict[str, Any] = json.loads(row["invalid"]) if row else {}
    keys = {channel_key(c) for c in device.channels}
    marks = {k: v for k, v in marks.items() if k in keys}
    conn.execute(
        "INSERT INTO devices(device_id, segment, tags, channels, invalid, source, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET segment = excluded.segment, "
        "tags = excluded.tags, channels = excluded.channels, invalid = excluded.invalid, "
        "source = excluded.source, updated_at = excluded.updated_at",
        (device.device_id, device.segment, json.dumps(device.tags),
         json.dumps([c.model_dump(exclude_none=True) for c in device.channels]), json.dumps(marks),
         source, now or clock.now()),
    )


_UPSERT_DEVICE = (
    "INSERT INTO devices(device_id, segment, tags, channels, invalid, source, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET segment = excluded.segment, "
    "tags = excluded.tags, channels = excluded.channels, invalid = excluded.invalid, "
    "source = excluded.source, updated_at = excluded.updated_at")


def upsert_devices(conn: sqlite3.Connection, devices: list[tuple[Device, str]], now: float) -> None:
    """:func:`upsert_device` for each (device, source) in order, as one SELECT per 500
    distinct devices and one ``executemany``: the recorder's batch of registrations
    (a registration burst is thousands per commit). The rows written are the same, in
    the same order: a device twice in the batch ends as its last registration, with the
    invalid marks that both registrations' channel lists keep."""
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
                     json.dumps(marks) if marks else "{}", source, now))
    conn.executemany(_UPSERT_DEVICE, rows)


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
            "channels": out_channels, "updated_at": _iso_ts(row["updated_at"])}


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
    marks[key] = {"at": _iso_ts(now), "reason": reason}
    conn.execute("UPDATE devices SET invalid = ? WHERE device_id = ?", (json.dumps(marks), device_id))


# ------------------------------------------------------------------ channel choice
@dataclass(slots=True)  # not frozen: one per send, and a frozen dataclass costs several times as much to make
class Route:
    """The channel a delivery's next attempt uses."""

    platform: str
    channel: Any
    key: str


def choose_channel(channels: list[dict[str, Any]] | None, invalid: dict[str, Any] | Iterable[str],
                   platforms: Iterable[str], also_invalid: str | None = None) -> Route | tuple[str, str]:
    """First channel whose bridge is enabled and whose address is not marked invalid;
    else ``(final_state, error)`` for the delivery.

    Without marks to look for, the answer depends only on the channels and the enabled
    bridges: it is kept for the last ~1,000 channel lists seen, by identity (the lists of
    :func:`_channels` are shared by every device with the same stored text; the cache holds
    the list, so its id cannot be reused meanwhile). A fleet of MQTT devices validates its
    one channel shape once instead of once per delivery. The answer (a Route with a frozen
    pydantic channel, or a tuple) is shared: read, never changed."""
    if channels is None:
        return "failed", "device removed from the registry"
    if invalid or also_invalid is not None:
        return _choose_channel(channels, invalid, platforms, also_invalid)
    hit = _choices.get(id(channels))
    if hit is not None and hit[0] is channels and hit[1] is platforms:
        return hit[2]
    choice = _choose_channel(channels, invalid, platforms, also_invalid)
    if len(_choices) >= _CHANNELS_CACHED:
        _choices.clear()
    _choices[id(channels)] = (channels, platforms, choice)
    return choice


_choices: dict[int, tuple[list[dict[str, Any]], Any, Route | tuple[str, str]]] = {}


def _choose_channel(channels: list[dict[str, Any]], invalid: dict[str, Any] | Iterable[str],
                    platforms: Iterable[str], also_invalid: str | None) -> Route | tuple[str, str]:
    enabled = platforms if isinstance(platforms, (set, frozenset, dict)) else set(platforms)
    saw_invalid = False
    for raw in channels:
        if raw.get("platform") not in enabled and not invalid and also_invalid is None:
            continue  # no marks to look for: skip parsing channels we cannot use
        try:
            channel = _channel_adapter.validate_python(raw)
        except ValueError:
            continue
        key = channel_key(channel)
        if key in invalid or key == also_invalid:
            saw_invalid = True
            continue
        if channel.platform in enabled:
            return Route(channel.platform, channel, key)
    if saw_invalid:
        return "invalid_address", "every channel's address is invalid"
    return "failed", "no enabled bridge for any of the device's channels"


def channel_for(channels: list[dict[str, Any]] | None, invalid: dict[str, Any], platform: str) -> Route | None:
    """The device's first usable channel on ``platform`` (a resend goes where the send went)."""
    for raw in channels or []:
        if raw.get("platform") != platform:
            continue
        try:
            channel = _channel_adapter.validate_python(raw)
        except ValueError:
            continue
        key = channel_key(channel)
        if key not in invalid:
            return Route(platform, channel, key)
    return None


# ------------------------------------------------------------------ jobs
FINAL_JOB_STATES = ("completed", "acknowledged", "rejected")
_DIRTY = "status_dirty = 1, cloud_dirty = 1"  # a status is owed locally and to the cloud


def count_targets(conn: sqlite3.Connection, target: dict[str, Any]) -> int:
    """How many deliveries the job will have, known when it is accepted (the registry may
    still change while it is expanded; expansion corrects the count at its end)."""
    if "devices" in target:
        return len(target["devices"])
    if "segment" in target:
        return conn.execute("SELECT COUNT(*) FROM devices WHERE segment = ?", (target["segment"],)).fetchone()[0]
    return conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0]


def insert_job(conn: sqlite3.Connection, parsed: ParsedJob, source: str, now: float | None = None) -> bool:
    """Store an accepted job; False if the job_id was seen before (idempotency key).

    A job_id whose job was *rejected* was never dispatched: a valid job may take it (the
    rejection is replaced), so a technician can fix a typo and send again with the same id.
    """
    now = now or clock.now()
    existing = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (parsed.job_id,)).fetchone()
    if existing is not None:
        if existing["state"] != "rejected":
            return False
        conn.execute("DELETE FROM jobs WHERE job_id = ?", (parsed.job_id,))
    job = parsed.job
    n = job.notification
    target = job.target.as_json()
    targets = count_targets(conn, target)
    conn.execute(
        "INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, "
        "updated_at, expires_at, ttl, targets, queued, status_dirty, cloud_dirty) "
        "VALUES (?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 1)",
        (parsed.job_id, source, json.dumps(target), n.model_dump_json(),
         job.options.model_dump_json(exclude_none=True), now, now, now + n.ttl, n.ttl, targets, targets),
    )
    conn.execute("DELETE FROM status_clears WHERE job_id = ?", (parsed.job_id,))
    bump(conn, "jobs_accepted")
    return True


def submit_job(conn: sqlite3.Connection, parsed: ParsedJob, source: str) -> bool:
    """Store a new job (True), or ask for a known job's status to be re-published (False)."""
    if insert_job(conn, parsed, source):
        return True
    mark_dirty(conn, parsed.job_id)
    return False


def reject_job(conn: sqlite3.Connection, job_id: str, source: str, code: str, message: str,
               now: float | None = None) -> bool:
    """Store a rejection under a readable job_id (state ``rejected`` with its error), so that
    its status is published like any other (also later, if the broker is away now) and
    ``jobs show`` finds it. False if the id belongs to an accepted job: that job is left
    alone and its status re-published."""
    now = now or clock.now()
    error = json.dumps({"code": code, "message": message})
    row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if row is not None and row["state"] != "rejected":
        mark_dirty(conn, job_id)
        return False
    if row is None:
        conn.execute(
            "INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
            "expires_at, ttl, expanded, error, status_dirty, cloud_dirty) "
            "VALUES (?, 'rejected', ?, '{}', '{}', '{}', ?, ?, ?, 0, 1, ?, 1, 1)",
            (job_id, source, now, now, now, error))
        conn.execute("DELETE FROM status_clears WHERE job_id = ?", (job_id,))
    else:
        conn.execute(
            f"UPDATE jobs SET error = ?, source = ?, updated_at = ?, {_DIRTY}, status_published_at = 0, "
            "cloud_published_at = 0, logged_state = NULL WHERE job_id = ?", (error, source, now, job_id))
    bump(conn, "jobs_rejected")
    return True


def status_from_row(row: sqlite3.Row) -> dict[str, Any]:
    error = row["error"] if "error" in row.keys() else None
    return {
        "job_id": row["job_id"],
        "state": row["state"],
        "error": json.loads(error) if error else None,
        "counts": {"targets": row["targets"], **{k: row[k] for k in COUNT_KEYS}},
        "created_at": _iso_ts(row["created_at"]),
        "updated_at": _iso_ts(row["updated_at"]),
    }


def rejected_status(job_id: str, code: str, message: str) -> dict[str, Any]:
    now = iso(utcnow())
    return {"job_id": job_id, "state": "rejected", "error": {"code": code, "message": message},
            "counts": {"targets": 0, **{k: 0 for k in COUNT_KEYS}}, "created_at": now, "updated_at": now}


def job_status(conn: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return status_from_row(row) if row else None


def list_jobs(conn: sqlite3.Connection, limit: int = 1000, state: str | None = None) -> list[dict[str, Any]]:
    if state is None:
        rows = conn.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
    else:
        rows = conn.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created_at DESC LIMIT ?",
                            (state, limit)).fetchall()
    return [status_from_row(r) for r in rows]


def mark_dirty(conn: sqlite3.Connection, job_id: str) -> None:
    """Re-publish the job's current status now (locally and to the cloud)."""
    conn.execute(f"UPDATE jobs SET {_DIRTY}, status_published_at = 0, cloud_published_at = 0 WHERE job_id = ?",
                 (job_id,))


# ------------------------------------------------------------------ expansion
def jobs_to_expand(conn: sqlite3.Connection, limit: int = 10) -> list[str]:
    rows = conn.execute("SELECT job_id FROM jobs WHERE expanded = 0 ORDER BY created_at LIMIT ?", (limit,))
    return [r["job_id"] for r in rows]


_CHANNELS_CACHED = 1024
_channels_by_text: dict[str, list[dict[str, Any]]] = {}


def _channels(text: str) -> list[dict[str, Any]]:
    """A device's channels list decoded from its stored JSON, once per distinct text while
    it stays among the last ~1,000 seen. Fleets whose channels carry no per-device address
    (MQTT devices, the simulation) store the same text for every device, and expansion and
    every dispatcher pass decode it once per delivery otherwise; push fleets (a token per
    device) gain nothing and pay a dict lookup. The lists are shared: read, never changed."""
    decoded = _channels_by_text.get(text)
    if decoded is None:
        decoded = json.loads(text)
        if len(_channels_by_text) >= _CHANNELS_CACHED:
            _channels_by_text.clear()
        _channels_by_text[text] = decoded
    return decoded


def _route_of(channels: str, invalid: str, platforms: set[str] | None) -> str | None:
    if platforms is None:
        return None
    marks = json.loads(invalid) if invalid != "{}" else None  # no marks: the usual case, nothing to decode
    if not marks:  # the common case: the first channel on an enabled bridge, no parsing needed
        return next((c.get("platform") for c in _channels(channels) if c.get("platform") in platforms), None)
    choice = choose_channel(_channels(channels), marks, platforms)
    return choice.platform if isinstance(choice, Route) else None  # None: the dispatcher finishes it


def expand_page(conn: sqlite3.Connection, job_id: str, batch_size: int, now: float,
                platforms: Iterable[str] | None = None) -> bool:
    """Turn the next page of the job's target into delivery rows; True when done.

    The cursor (last device_id) is committed with the rows, so a crash mid-job resumes
    at the next page, and ``UNIQUE(job_id, device_id)`` makes a repeated page harmless.
    Each row gets its route (the bridge of its first attempt among ``platforms``), so
    the dispatcher can fetch due work per bridge.

    Counts: ``targets`` and ``queued`` were set when the job was accepted; rows made now
    are already counted as queued (unknown devices move to failed). At the end the
    counts are corrected to the rows really made, in case the registry changed meanwhile.
    """
    job = conn.execute("SELECT target, expand_cursor, expanded, expires_at FROM jobs WHERE job_id = ?",
                       (job_id,)).fetchone()
    if job is None or job["expanded"]:
        return True
    due = min(now, job["expires_at"])  # a stored time is never past the TTL (ttl 0: due at once)
    target = json.loads(job["target"])
    cursor = job["expand_cursor"] or ""
    unknown: list[str] = []
    platforms = set(platforms) if platforms is not None else None
    if "devices" in target:
        wanted: list[str] = target["devices"]
        start = bisect.bisect_right(wanted, cursor) if cursor else 0
        page = wanted[start:start + batch_size]
        found: dict[str, tuple[str, str]] = {}
        if page:
            marks = ",".join("?" * len(page))
            found = {r[0]: (r[1], r[2]) for r in conn.execute(
                f"SELECT device_id, channels, invalid FROM devices WHERE device_id IN ({marks})", page)}
        rows = [(d, _route_of(*found[d], platforms)) for d in page if d in found]
        unknown = [d for d in page if d not in found]
        done = start + batch_size >= len(wanted)
    else:
        if "segment" in target:
            found_rows = conn.execute("SELECT device_id, channels, invalid FROM devices WHERE segment = ? "
                                      "AND device_id > ? ORDER BY device_id LIMIT ?",
                                      (target["segment"], cursor, batch_size)).fetchall()
        else:
            found_rows = conn.execute("SELECT device_id, channels, invalid FROM devices WHERE device_id > ? "
                                      "ORDER BY device_id LIMIT ?", (cursor, batch_size)).fetchall()
        rows = [(r[0], _route_of(r[1], r[2], platforms)) for r in found_rows]
        page = [r[0] for r in found_rows]
        done = len(found_rows) < batch_size
    queued = _insert_deliveries(conn, job_id, rows, "queued", None, due)
    failed = _insert_deliveries(conn, job_id, [(d, None) for d in unknown], "failed", "unknown device", due)
    conn.execute(
        "UPDATE jobs SET expanded_rows = expanded_rows + ?, queued = queued - ?, failed = failed + ?, "
        "expand_cursor = ?, expanded = ?, state = CASE WHEN state = 'accepted' THEN 'dispatching' ELSE state END, "
        f"updated_at = ?, {_DIRTY} WHERE job_id = ?",
        (queued + failed, failed, failed, page[-1] if page else cursor, int(done), now, job_id),
    )
    if done:
        if "segment" in target:
            why = f"target.segment: no registered device is in segment {target['segment']!r}"
        else:
            why = "target.all: no device is registered"
        conn.execute(
            "UPDATE jobs SET queued = queued + (expanded_rows - targets), targets = expanded_rows, "
            "error = CASE WHEN expanded_rows = 0 THEN ? ELSE error END WHERE job_id = ?",
            (json.dumps({"code": "no_targets", "message": why}), job_id))
        settle_jobs(conn, [job_id], now)
    return done


def new_message_id() -> str:
    """A lowercase UUID (contract §6) whose first 48 bits are the time in ms (the RFC 9562
    version 7 layout; 74 random bits follow). Rows made together get neighbouring keys, so
    the ``deliveries`` primary key grows at its end and a batch of updates by message_id
    touches a few B-tree pages instead of one random page per row: about a third less
    SQLite time for a 100,000-row job than random (version 4) ids."""
    return new_message_ids(1)[0]


def new_message_ids(n: int) -> list[str]:
    """``n`` ids as :func:`new_message_id` makes them, for one page of rows: one clock
    reading and one read of random bytes for the page instead of one each per row."""
    ms = (int(clock.now() * 1000) & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | 0b10 << 62
    rand = os.urandom(10 * n)
    out = []
    for i in range(0, 10 * n, 10):
        r = int.from_bytes(rand[i:i + 10])
        h = f"{ms | (r >> 68) << 64 | (r & 0x3FFF_FFFF_FFFF_FFFF):032x}"  # str(uuid.UUID(int=...)) without the object
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def _insert_deliveries(conn: sqlite3.Connection, job_id: str, rows: list[tuple[str, str | None]], state: str,
                       error: str | None, now: float) -> int:
    if not rows:
        return 0
    # One statement for the page: the rows go in as one JSON array ([message_id, device_id,
    # route] each) that SQLite walks itself (json_each, in order), instead of a statement
    # step with seven bound values per row; the per-row work then runs in SQLite, without
    # the GIL the event loop needs.
    ids = new_message_ids(len(rows))
    cur = conn.execute(
        "INSERT OR IGNORE INTO deliveries(message_id, job_id, device_id, state, next_at, last_error, route) "
        "SELECT value->>0, ?, value->>1, ?, ?, ?, value->>2 FROM json_each(?)",
        (job_id, state, now, error, json.dumps([[m, d, route] for m, (d, route) in zip(ids, rows)])))
    if cur.rowcount == len(rows):  # every row is in, as written (platform key: its route)
        counts: dict[tuple[str, str], int] = {}
        for _, route in rows:
            k = (route or "", state)
            counts[k] = counts.get(k, 0) + 1
        stats.apply_counts(conn, counts, {})
    else:  # some were already there (same job and device): count the rows that went in
        stats.apply_changes(conn, {}, stats.snapshot(conn, ids))  # the ids are new
    return cur.rowcount


def settle_jobs(conn: sqlite3.Connection, job_ids: Iterable[str], now: float) -> None:
    """Move jobs to completed / acknowledged from their counts (contract §6)."""
    for job_id in job_ids:
        conn.execute(
            "UPDATE jobs SET state = CASE "
            " WHEN expanded = 1 AND queued = 0 AND targets > 0 AND acknowledged = targets THEN 'acknowledged' "
            " WHEN expanded = 1 AND queued = 0 THEN 'completed' ELSE state END, "
            f" updated_at = ?, {_DIRTY} WHERE job_id = ? AND state != 'rejected'",
            (now, job_id),
        )


# ------------------------------------------------------------------ dispatch
@dataclass(slots=True)  # not frozen: one per fetched row (see Route)
class DueDelivery:
    message_id: str
    job_id: str
    device_id: str
    attempts: int
    channels: list[dict[str, Any]] | None  # None: the device was removed (shared with other rows: read only)
    invalid: dict[str, Any]
    route: str | None = None
    resend: bool = False  # already sent, unacked: this is a resend on ``route``


_DUE_COLUMNS = ("SELECT d.message_id, d.job_id, d.device_id, d.attempts, v.channels, v.invalid, d.route "
                "FROM deliveries d LEFT JOIN devices v ON v.device_id = d.device_id ")


def _due_rows(rows: Iterable[Any], resend: bool = False,
              skip: frozenset[str] | set[str] = frozenset()) -> list[DueDelivery]:
    # Rows in ``skip`` (being sent or recorded) are dropped before their JSON is decoded:
    # under a large job most fetched rows are still in flight, and this runs on the
    # database thread, where every microsecond delays the next commit.
    return [DueDelivery(r[0], r[1], r[2], r[3], _channels(r[4]) if r[4] else None,
                        json.loads(r[5]) if r[5] and r[5] != "{}" else {}, r[6], resend)
            for r in rows if r[0] not in skip]


# The states are literals: a partial index is used only for a WHERE that plainly implies its own.
_DUE_SKIPPING = (_DUE_COLUMNS + "WHERE d.state = '{state}' AND d.route = ? AND d.{at} <= ? "
                 "AND d.message_id NOT IN (SELECT value FROM json_each(?)) ORDER BY d.{at} LIMIT ?")
_DUE_QUEUED = _DUE_SKIPPING.format(state="queued", at="next_at")
_DUE_RESEND = _DUE_SKIPPING.format(state="sent", at="resend_at")


def due_for_route(conn: sqlite3.Connection, route: str, now: float, limit: int,
                  resends: bool = True, skip: frozenset[str] | set[str] = frozenset()) -> list[DueDelivery]:
    """Due work of one bridge, up to ``limit`` rows not in ``skip``: queued deliveries first,
    then sent ones due for a resend.

    Under a large job many due rows are still in flight (being sent or recorded; they stay
    due in the table until their result commits). They are left out by SQLite itself
    (``NOT IN`` the ids handed over as one JSON array, looked up in a temporary index), in
    one statement per kind that walks the due index and joins the device's channels only
    for the rows it returns: no Python object per skipped row, no second lookup per row,
    and the work runs in SQLite, which lets the event loop's thread run meanwhile (the
    database thread's Python holds the GIL)."""
    ids = json.dumps(list(skip)) if skip else "[]"
    out = _due_rows(conn.execute(_DUE_QUEUED, (route, now, ids, limit)))
    if resends and len(out) < limit:
        out += _due_rows(conn.execute(_DUE_RESEND, (route, now, ids, limit - len(out))), resend=True)
    return out


def due_deliveries(conn: sqlite3.Connection, now: float, limit: int) -> list[DueDelivery]:
    """Every due queued delivery, whatever its route (for tools and tests; the dispatcher
    fetches per route). Reads the queued rows' index, ``deliveries_route_due``, whole."""
    return _due_rows(conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.next_at <= ? "
                                  "ORDER BY d.next_at LIMIT ?", (now, limit)))


def movable_for_route(conn: sqlite3.Connection, route: str, now: float, usable: Iterable[str], limit: int,
                      skip: frozenset[str] | set[str] = frozenset()) -> list[DueDelivery]:
    """Due queued deliveries of a down bridge whose device has a channel on one of the
    ``usable`` platforms (the only ones that can move: the rest wait for the bridge)."""
    rows = conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route = ? AND d.next_at <= ? "
                        "AND d.message_id NOT IN (SELECT value FROM json_each(?)) "
                        "AND EXISTS (SELECT 1 FROM json_each(v.channels) c "
                        "WHERE c.value->>'platform' IN (SELECT value FROM json_each(?))) LIMIT ?",
                        (route, now, json.dumps(list(skip)), json.dumps(list(usable)), limit))
    return _due_rows(rows)


def unexplained_for_route(conn: sqlite3.Connection, route: str, now: float, limit: int,
                          skip: frozenset[str] | set[str] = frozenset()) -> list[DueDelivery]:
    """Due queued deliveries of an unhealthy bridge that do not say yet why they wait."""
    rows = conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route = ? AND d.next_at <= ? "
                        "AND d.last_error IS NULL AND d.message_id NOT IN (SELECT value FROM json_each(?)) LIMIT ?",
                        (route, now, json.dumps(list(skip)), limit))
    return _due_rows(rows)


def next_due_for_route(conn: sqlite3.Connection, route: str, now: float, resends: bool = True) -> float | None:
    """When the bridge's next delivery (or resend) falls due after ``now``."""
    a = conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route = ? AND next_at > ?",
                     (route, now)).fetchone()[0]
    b = conn.execute("SELECT MIN(resend_at) FROM deliveries WHERE state = 'sent' AND route = ? AND resend_at > ?",
                     (route, now)).fetchone()[0] if resends else None
    return min((t for t in (a, b) if t is not None), default=None)


def unrouted_due(conn: sqlite3.Connection, now: float, routable: Iterable[str], limit: int) -> list[DueDelivery]:
    """Due queued deliveries without a route, or routed to a bridge that is not enabled
    (the config changed, or expansion found no usable channel): to be routed again."""
    enabled = set(routable)
    out = _due_rows(conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route IS NULL AND d.next_at <= ? "
                                 "LIMIT ?", (now, limit)))
    for platform in PLATFORMS:
        if platform not in enabled and len(out) < limit:
            out += _due_rows(conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route = ? AND d.next_at <= ? "
                                          "LIMIT ?", (platform, now, limit - len(out))))
    return out


def next_due_at(conn: sqlite3.Connection) -> float | None:
    """The earliest due time of any queued delivery: the least of one probe of
    ``deliveries_route_due`` per route (NULL: not routed yet), the routes found by walking
    that index from one route to the next."""
    times = [conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route IS NULL").fetchone()[0]]
    route = conn.execute("SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route IS NOT NULL").fetchone()[0]
    while route is not None:
        times.append(conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route = ?",
                                  (route,)).fetchone()[0])
        route = conn.execute("SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route > ?",
                             (route,)).fetchone()[0]
    return min((t for t in times if t is not None), default=None)


def expiring(conn: sqlite3.Connection, now: float, paused: Iterable[str], limit: int = 500) -> list[DueDelivery]:
    """Queued deliveries that must expire although no bridge will fetch them: those of jobs
    whose TTL has passed (their bridge may be paused or saturated), and those of ``ttl = 0``
    jobs ("now or never") whose bridge is paused now."""
    paused = sorted(set(paused))
    out: list[DueDelivery] = []
    jobs = conn.execute("SELECT job_id, ttl, expires_at FROM jobs WHERE state IN ('accepted', 'dispatching') "
                        "AND queued > 0 AND (expires_at <= ? OR ttl = 0) ORDER BY expires_at LIMIT 100",
                        (now,)).fetchall()
    for job in jobs:
        if len(out) >= limit:
            break
        if job["expires_at"] <= now and job["ttl"] > 0:
            rows = conn.execute(_DUE_COLUMNS + "WHERE d.job_id = ? AND d.state = 'queued' LIMIT ?",
                                (job["job_id"], limit - len(out)))
        elif paused:
            marks = ",".join("?" * len(paused))
            rows = conn.execute(_DUE_COLUMNS + f"WHERE d.job_id = ? AND d.state = 'queued' AND d.route IN ({marks}) "
                                "LIMIT ?", (job["job_id"], *paused, limit - len(out)))
        else:
            continue
        out += _due_rows(rows)
    return out


def next_expiry(conn: sqlite3.Connection, now: float) -> float | None:
    return conn.execute("SELECT MIN(expires_at) FROM jobs WHERE state IN ('accepted', 'dispatching') AND queued > 0 "
                        "AND expires_at > ?", (now,)).fetchone()[0]


def job_rows(conn: sqlite3.Connection, job_ids: Iterable[str]) -> dict[str, sqlite3.Row]:
    ids = list(job_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return {r["job_id"]: r for r in conn.execute(f"SELECT * FROM jobs WHERE job_id IN ({marks})", ids)}


@dataclass(slots=True)
class Result:
    """What one attempt decided for a delivery; applied in batches by the recorder."""

    message_id: str
    job_id: str
    device_id: str
    state: str  # queued (retry later) | sent | failed | expired | invalid_address
    platform: str | None = None
    attempts: int = 0
    next_at: float = 0.0
    error: str | None = None
    invalid_key: str | None = None  # channel to mark invalid on the device
    route: str | None = None  # queued: the bridge of the next attempt (None: unchanged)
    resend_at: float | None = None  # sent: when to send it again if still unacked (None: never)
    resend: bool = False  # the delivery was already sent; it stays sent whatever this attempt gave
    moved: str | None = None  # queued: why it left its channel for the next one (kept once sent)


@dataclass(slots=True)
class AckResult:
    accepted: bool
    reason: str = ""
    job_id: str | None = None
    latency_ms: float | None = None
    first: bool = False
    not_stored: bool = False  # raised NotStored (e.g. the upstream buffer refuses new acks)


@dataclass
class _Deltas:
    by_job: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def move(self, job_id: str, old: str, new: str) -> None:
        if old != new:
            self.by_job[job_id][old] -= 1
            self.by_job[job_id][new] += 1

    def apply(self, conn: sqlite3.Connection, now: float) -> None:
        for job_id, deltas in self.by_job.items():
            sets = ", ".join(f"{k} = {k} + ?" for k in deltas)
            conn.execute(f"UPDATE jobs SET {sets}, updated_at = ?, {_DIRTY} WHERE job_id = ?",
                         (*deltas.values(), now, job_id))
        settle_jobs(conn, self.by_job.keys(), now)


def apply_results(conn: sqlite3.Connection, results: list[Result], now: float) -> None:
    sends = [r for r in results if r.state == "sent" and not r.resend and not r.invalid_key]
    others = [r for r in results if r.state != "sent" or r.resend or r.invalid_key] if len(sends) < len(results) else []
    if sends and len({r.message_id for r in results}) == len(results):
        _apply_sends(conn, sends, now)
        results = others
    if results:
        # Resends change neither state nor platform: the aggregates need not look at them.
        with stats.tracking(conn, [r.message_id for r in results if not r.resend]):
            _apply_results(conn, results, now)


def _apply_sends(conn: sqlite3.Connection, sends: list[Result], now: float) -> None:
    """Plain "sent" results (the bulk of every fan-out), written as :func:`_apply_results`
    writes them, with one read of the rows before (``stats.snapshot``) and ``executemany``:
    what the updates leave is known from that read (a queued row becomes sent on the send's
    platform; a row acked before its result keeps its state and takes the send's platform;
    any other row is left alone), so the aggregates move without a second read."""
    before = stats.snapshot(conn, [r.message_id for r in sends])
    after: dict[str, tuple[str, str, Any]] = {}
    deltas = _Deltas()
    sent: list[tuple[Any, ...]] = []
    acked: list[tuple[Any, ...]] = []
    for r in sends:
        old = before.get(r.message_id)
        if old is None:
            continue  # pruned meanwhile: nothing to update
        if old[1] == "queued":
            sent.append((r.platform, r.platform, r.attempts, now, r.resend_at, r.message_id))
            after[r.message_id] = (r.platform or "", "sent", old[2])
            deltas.move(r.job_id, "queued", "sent")
        elif old[1] == "acknowledged":  # acked before this result was recorded: keep what the send was
            acked.append((r.platform, r.platform, r.attempts, now, r.message_id))
            after[r.message_id] = (r.platform or "", "acknowledged", old[2])
        else:
            after[r.message_id] = old
    if sent:
        conn.executemany("UPDATE deliveries SET state = 'sent', platform = ?, route = ?, attempts = ?, sent_at = ?, "
                         "resend_at = ?, last_error = NULL WHERE message_id = ? AND state = 'queued'", sent)
    if acked:
        conn.executemany("UPDATE deliveries SET platform = ?, route = ?, attempts = MAX(attempts, ?), "
                         "sent_at = COALESCE(sent_at, ?) WHERE message_id = ? AND state = 'acknowledged'", acked)
    stats.apply_changes(conn, before, after)
    deltas.apply(conn, now)


def _apply_results(conn: sqlite3.Connection, results: list[Result], now: float) -> None:
    deltas = _Deltas()
    for r in results:
        if r.invalid_key:
            mark_invalid(conn, r.device_id, r.invalid_key, r.error or "invalid address", now)
        if r.resend:
            # Already counted as sent; a resend changes attempts and the next resend only. The
            # attempt counts even if the device's ack (to this very resend) was stored first.
            conn.execute("UPDATE deliveries SET attempts = MAX(attempts, ?), "
                         "resend_at = CASE WHEN state = 'sent' THEN ? END, "
                         "last_error = CASE WHEN state = 'sent' THEN ? ELSE last_error END WHERE message_id = ?",
                         (r.attempts, r.resend_at, r.error, r.message_id))
            continue
        if r.state == "sent":
            cur = conn.execute(
                "UPDATE deliveries SET state = 'sent', platform = ?, route = ?, attempts = ?, sent_at = ?, "
                "resend_at = ?, last_error = NULL WHERE message_id = ? AND state = 'queued'",
                (r.platform, r.platform, r.attempts, now, r.resend_at, r.message_id))
            if not cur.rowcount:  # acked before this result was recorded: keep what the send was
                conn.execute("UPDATE deliveries SET platform = ?, route = ?, attempts = MAX(attempts, ?), "
                             "sent_at = COALESCE(sent_at, ?) WHERE message_id = ? AND state = 'acknowledged'",
                             (r.platform, r.platform, r.attempts, now, r.message_id))
        elif r.state == "queued":
            conn.execute(
                "UPDATE deliveries SET platform = COALESCE(?, platform), route = COALESCE(?, route), attempts = ?, "
                "next_at = ?, last_error = ?, moved = COALESCE(?, moved) WHERE message_id = ? AND state = 'queued'",
                (r.platform, r.route, r.attempts, r.next_at, r.error, r.moved, r.message_id))
            continue  # no count changes
        else:
            cur = conn.execute(
                "UPDATE deliveries SET state = ?, platform = COALESCE(?, platform), attempts = ?, last_error = ? "
                "WHERE message_id = ? AND state = 'queued'", (r.state, r.platform, r.attempts, r.error, r.message_id))
        if cur.rowcount:
            deltas.move(r.job_id, "queued", r.state)
    deltas.apply(conn, now)


def apply_batch(conn: sqlite3.Connection, results: list[Result], acks: list[tuple[str, Ack | AckIn]], now: float,
                forward: Forwarder | None = None, acks_topic: str | None = None) -> list[AckResult]:
    """One recorder batch: the dispatcher's results, then the acks, in one transaction.

    A delivery whose "sent" result and first ack arrive in the same batch (a fast device
    acks before the result is recorded) is written once: the ack's update also records the
    send (platform, route, attempts, sent_at = now, as the result would have), instead of
    moving it to ``sent`` and then to ``acknowledged`` (half the row and index writes, one
    aggregate change instead of two). What is stored is the same as applying them one by one."""
    merged: dict[str, Result] = {}
    if acks and results:
        acked = {ack.message_id for _, ack in acks}
        for r in results:
            if r.state == "sent" and not r.resend and not r.invalid_key and r.message_id in acked:
                merged[r.message_id] = r
    if results:
        apply_results(conn, [r for r in results if r.message_id not in merged] if merged else results, now)
    if not acks:
        return []
    out = apply_acks(conn, acks, now, forward, acks_topic, merged)
    if merged:  # not used by a first ack (refused, or acked before): recorded as a plain send
        apply_results(conn, list(merged.values()), now)
    return out


def _chunks(items: list[Any], n: int = 500) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def apply_acks(conn: sqlite3.Connection, acks: list[tuple[str, Ack | AckIn]], now: float,
               forward: Forwarder | None = None, acks_topic: str | None = None,
               sends: dict[str, Result] | None = None) -> list[AckResult]:
    """Store every ack; the first valid one moves its delivery to acknowledged.

    The batch is read with one query per 500 acks and written with ``executemany``; acks of
    the same delivery in one batch are applied in order (only the first moves it). With a
    forwarder, each accepted ack's copy for the cloud is queued in its own SAVEPOINT: one
    that cannot be stored (the upstream buffer raising NotStored under
    ``overflow = "refuse-new"``) is rolled back alone, not written at all and reported as
    ``not_stored``; the rest of the batch commits.

    ``sends``: "sent" results of the same batch not yet applied (see :func:`apply_batch`);
    a first ack of one of them records the send too, and takes it out of ``sends``."""
    rows: dict[str, list[Any]] = {}
    ids = list({ack.message_id for _, ack in acks})
    key = stats.platform_key(conn)
    # The ids as one JSON array: the same statement text for every batch size, so it is
    # prepared once and found in the connection's statement cache (an IN list of n marks
    # is a new statement for every n a batch happens to have).
    for r in conn.execute(f"SELECT message_id, job_id, device_id, state, sent_at, {key} FROM deliveries "
                          "WHERE message_id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)):
        # job_id, device_id, state (kept current), sent_at, platform key (for gateway.stats)
        rows[r[0]] = [r[1], r[2], r[3], r[4], r[5]]
    # What the first acks move in gateway.stats: (platform key, state) → rows, and
    # (platform key, latency bucket) → [acks, sum of ms]. The updates below are unconditional
    # by message_id, so what they leave is known without a second read.
    counts: dict[tuple[str, str], int] = {}
    latency_sums: dict[tuple[str, float], list[float]] = {}
    bucket_of = stats.bucket_of
    deltas = _Deltas()
    out: list[AckResult] = []
    inserts: list[tuple[Any, ...]] = []
    plain: list[tuple[Any, ...]] = []
    with_send: list[tuple[Any, ...]] = []
    refused = 0
    nul = False  # an error text with a NUL: SQLite's JSON functions would cut it there
    sends = sends if sends is not None else {}
    forwarding = forward is not None and acks_topic is not None
    for device_id, ack in acks:
        row = rows.get(ack.message_id)
        if row is None or row[1] != device_id:
            refused += 1
            out.append(AckResult(False, "unknown message_id" if row is None
                                 else "message_id was not sent to this device"))
            continue
        job_id, _, state, sent_at, platform_key = row
        first = state in ("queued", "sent")
        at_ts = ack.at.timestamp()
        at_iso = ack.at_text if type(ack) is Ack else _iso_utc(ack.at)
        send = sends.get(ack.message_id) if first and state == "queued" else None
        latency = None
        if first:
            base = sent_at if sent_at is not None else now
            latency = max(0.0, (at_ts - base) * 1000.0)
        if forwarding:
            payload = {"message_id": ack.message_id, "status": ack.status, "at": at_iso,
                       **({"error": ack.error} if ack.error is not None else {}),
                       "device_id": device_id, "job_id": job_id,
                       "latency_ms": round(latency, 3) if latency is not None else None}
            conn.execute("SAVEPOINT ack")
            try:
                forward.enqueue(conn, "ack", acks_topic, json.dumps(payload).encode(), False, None)  # type: ignore[union-attr]
            except NotStored as exc:
                conn.execute("ROLLBACK TO ack")
                conn.execute("RELEASE ack")
                out.append(AckResult(False, f"not stored: {exc}", not_stored=True))
                continue
            conn.execute("RELEASE ack")
        inserts.append((ack.message_id, device_id, ack.status, at_iso, ack.error, getattr(ack, "via", AckVia.MQTT)))
        if ack.error is not None and "\x00" in ack.error:
            nul = True
        if first:
            if send is not None:
                del sends[ack.message_id]
                with_send.append((ack.message_id, at_ts, latency, send.platform, send.attempts))
                new_key = send.platform or ""  # route = platform
            else:
                plain.append((ack.message_id, at_ts, latency))
                new_key = platform_key
            k = (platform_key, state)
            counts[k] = counts.get(k, 0) - 1
            k = (new_key, "acknowledged")
            counts[k] = counts.get(k, 0) + 1
            slot = latency_sums.get((new_key, bucket := bucket_of(latency)))  # type: ignore[arg-type]
            if slot is None:
                latency_sums[(new_key, bucket)] = [1, latency]
            else:
                slot[0] += 1
                slot[1] += latency  # type: ignore[operator]
            deltas.move(job_id, state, "acknowledged")
            row[2] = "acknowledged"
        out.append(AckResult(True, job_id=job_id, latency_ms=latency, first=first))
    # The batch's rows go to SQLite as one JSON array each (json_each walks them in order),
    # not a statement step with bound values per row: see _insert_deliveries.
    if inserts and nul:
        conn.executemany("INSERT INTO acks(message_id, device_id, status, at, error, via, received_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", [(*i, now) for i in inserts])
    elif inserts:
        conn.execute("INSERT INTO acks(message_id, device_id, status, at, error, via, received_at) "
                     "SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, ? FROM json_each(?)",
                     (now, json.dumps(inserts)))
    if inserts:
        bump(conn, "acks_stored", len(inserts))
    if refused:
        bump(conn, "acks_refused", refused)
    _acknowledge(conn, plain, with_send, now)
    stats.apply_counts(conn, counts, latency_sums)  # in the same transaction as the rows
    deltas.apply(conn, now)
    return out


def _acknowledge(conn: sqlite3.Connection, plain: list[tuple[Any, ...]], with_send: list[tuple[Any, ...]],
                 now: float) -> None:
    """First acks: ``plain`` [message_id, acked_at, latency_ms], ``with_send`` the same and
    the send's platform and attempts (its route is its platform, its sent_at the batch's
    time). One UPDATE … FROM json_each per list, each row found by primary key; the ids
    are distinct (only a delivery's first ack is here). Floats keep their value through the
    JSON text (Python writes the shortest text that reads back to the same double)."""
    if plain:
        conn.execute("UPDATE deliveries SET state = 'acknowledged', acked_at = j.value->>1, "
                     "latency_ms = j.value->>2, resend_at = NULL "
                     "FROM json_each(?) AS j WHERE deliveries.message_id = j.value->>0", (json.dumps(plain),))
    if with_send:
        conn.execute("UPDATE deliveries SET state = 'acknowledged', acked_at = j.value->>1, "
                     "latency_ms = j.value->>2, resend_at = NULL, last_error = NULL, platform = j.value->>3, "
                     "route = j.value->>3, attempts = j.value->>4, sent_at = ? "
                     "FROM json_each(?) AS j WHERE deliveries.message_id = j.value->>0", (now, json.dumps(with_send)))


# ------------------------------------------------------------------ retention
def prune(conn: sqlite3.Connection, cutoff: float, now: float, max_rows: int = 2000) -> list[str]:
    """Delete finished jobs last changed before ``cutoff`` with their deliveries and acks,
    touching about ``max_rows`` rows (one small transaction; a big job takes several).
    Returns the job_ids whose job row went: their retained status is now owed a clear
    (``status_clears``), published by the status publisher."""
    pruned: list[str] = []
    budget = max_rows
    marks_states = ",".join("?" * len(FINAL_JOB_STATES))
    jobs = conn.execute(f"SELECT job_id FROM jobs WHERE state IN ({marks_states}) AND updated_at < ? "
                        "ORDER BY updated_at LIMIT 100", (*FINAL_JOB_STATES, cutoff)).fetchall()
    for (job_id,) in jobs:
        if budget <= 0:
            break
        ids = [r[0] for r in conn.execute("SELECT message_id FROM deliveries WHERE job_id = ? LIMIT ?",
                                          (job_id, budget))]
        if ids:
            marks = ",".join("?" * len(ids))
            conn.execute(f"DELETE FROM acks WHERE message_id IN ({marks})", ids)
            with stats.tracking(conn, ids):
                conn.execute(f"DELETE FROM deliveries WHERE message_id IN ({marks})", ids)
        if len(ids) >= budget:
            break  # more rows of this job next time
        budget -= len(ids) + 1
        conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        conn.execute("INSERT OR REPLACE INTO status_clears(job_id, at) VALUES (?, ?)", (job_id, now))
        pruned.append(job_id)
    if pruned:
        bump(conn, "jobs_pruned", len(pruned))
    return pruned


def owed_clears(conn: sqlite3.Connection, limit: int = 200) -> list[str]:
    return [r[0] for r in conn.execute("SELECT job_id FROM status_clears ORDER BY at LIMIT ?", (limit,))]


def clears_done(conn: sqlite3.Connection, job_ids: list[str]) -> None:
    conn.executemany("DELETE FROM status_clears WHERE job_id = ?", [(j,) for j in job_ids])


def delivery_rows(conn: sqlite3.Connection, job_id: str, limit: int = 100000) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT message_id, device_id, state, platform, route, attempts, last_error, latency_ms, "
                        "moved, next_at FROM deliveries WHERE job_id = ? ORDER BY device_id LIMIT ?", (job_id, limit))
    from gateway import clock  # next_at is on the gateway's clock

    now = clock.now()
    out = []
    for r in rows:
        row = dict(r)
        row["reason"] = wait_reason(row["state"], row.pop("next_at"), row["last_error"], row["moved"], now)
        out.append(row)
    return out


def wait_reason(state: str, next_at: float | None, last_error: str | None, moved: str | None,
                now: float) -> str | None:
    """Why a queued delivery waits (contract §8), from what its row holds: a bridge that
    is unhealthy, a retry's backoff, a move to the device's next channel."""
    if state != "queued":
        return None
    if last_error and " unhealthy" in last_error:
        return f"bridge {last_error}"  # "bridge fcm unhealthy: <why>"
    if last_error and next_at is not None and next_at > now:
        return f"backoff until {_iso_ts(next_at)}: {last_error}"
    if moved:
        return moved
    return last_error
