"""All pipeline SQL, as plain functions on a connection.

They run inside one transaction each: on the daemon's database thread (via
``Database.run``) or in the CLI process. Nothing here awaits or logs; callers decide.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from devices.models import Device, channel_address
from gateway.pipeline.models import AckIn, ParsedJob
from gateway.timeutil import iso, utcnow
from datetime import UTC, datetime

COUNT_KEYS = ("queued", "sent", "acknowledged", "failed", "expired", "invalid_address")
FINAL_DELIVERY_STATES = frozenset({"acknowledged", "failed", "expired", "invalid_address"})


class Forwarder(Protocol):
    """Where status changes and acks go besides the local broker (the upstream outbox)."""

    def enqueue(self, conn: sqlite3.Connection, kind: str, topic: str, payload: bytes,
                retain: bool, coalesce_key: str | None = None) -> None: ...


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
         source, now or time.time()),
    )


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


# ------------------------------------------------------------------ jobs
def insert_job(conn: sqlite3.Connection, parsed: ParsedJob, source: str, now: float | None = None) -> bool:
    """Store an accepted job; False if the job_id was seen before (idempotency key)."""
    now = now or time.time()
    job = parsed.job
    n = job.notification
    cur = conn.execute(
        "INSERT OR IGNORE INTO jobs(job_id, state, source, target, notification, options, created_at, "
        "updated_at, expires_at, ttl) VALUES (?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?)",
        (parsed.job_id, source, json.dumps(job.target.as_json()), n.model_dump_json(),
         job.options.model_dump_json(exclude_none=True), now, now, now + n.ttl, n.ttl),
    )
    if cur.rowcount:
        bump(conn, "jobs_accepted")
    return cur.rowcount > 0


def submit_job(conn: sqlite3.Connection, parsed: ParsedJob, source: str) -> bool:
    """Store a new job (True), or ask for a known job's status to be re-published (False)."""
    if insert_job(conn, parsed, source):
        return True
    mark_dirty(conn, parsed.job_id)
    return False


def status_from_row(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "job_id": row["job_id"],
        "state": row["state"],
        "error": None,
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


def list_jobs(conn: sqlite3.Connection, limit: int = 1000) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
    return [status_from_row(r) for r in rows]


def mark_dirty(conn: sqlite3.Connection, job_id: str) -> None:
    conn.execute("UPDATE jobs SET status_dirty = 1, status_published_at = 0 WHERE job_id = ?", (job_id,))


# ------------------------------------------------------------------ expansion
def jobs_to_expand(conn: sqlite3.Connection, limit: int = 10) -> list[str]:
    rows = conn.execute("SELECT job_id FROM jobs WHERE expanded = 0 ORDER BY created_at LIMIT ?", (limit,))
    return [r["job_id"] for r in rows]


def expand_page(conn: sqlite3.Connection, job_id: str, batch_size: int, now: float) -> bool:
    """Turn the next page of the job's target into delivery rows; True when done.

    The cursor (last device_id) is committed with the rows, so a crash mid-job resumes
    at the next page, and ``UNIQUE(job_id, device_id)`` makes a repeated page harmless.
    """
    job = conn.execute("SELECT target, expand_cursor, expanded FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    if job is None or job["expanded"]:
        return True
    target = json.loads(job["target"])
    cursor = job["expand_cursor"] or ""
    unknown: list[str] = []
    if "devices" in target:
        wanted: list[str] = target["devices"]
        start = bisect.bisect_right(wanted, cursor) if cursor else 0
        page = wanted[start:start + batch_size]
        known = set()
        if page:
            marks = ",".join("?" * len(page))
            known = {r[0] for r in conn.execute(f"SELECT device_id FROM devices WHERE device_id IN ({marks})", page)}
        ids = [d for d in page if d in known]
        unknown = [d for d in page if d not in known]
        done = start + batch_size >= len(wanted)
    else:
        if "segment" in target:
            rows = conn.execute("SELECT device_id FROM devices WHERE segment = ? AND device_id > ? "
                                "ORDER BY device_id LIMIT ?", (target["segment"], cursor, batch_size))
        else:
            rows = conn.execute("SELECT device_id FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?",
                                (cursor, batch_size))
        ids = [r[0] for r in rows]
        page = ids
        done = len(ids) < batch_size
    queued = _insert_deliveries(conn, job_id, ids, "queued", None, now)
    failed = _insert_deliveries(conn, job_id, unknown, "failed", "unknown device", now)
    conn.execute(
        "UPDATE jobs SET targets = targets + ?, queued = queued + ?, failed = failed + ?, expand_cursor = ?, "
        "expanded = ?, state = CASE WHEN state = 'accepted' THEN 'dispatching' ELSE state END, "
        "updated_at = ?, status_dirty = 1 WHERE job_id = ?",
        (queued + failed, queued, failed, page[-1] if page else cursor, int(done), now, job_id),
    )
    if done:
        settle_jobs(conn, [job_id], now)
    return done


def _insert_deliveries(conn: sqlite3.Connection, job_id: str, device_ids: list[str], state: str,
                       error: str | None, now: float) -> int:
    if not device_ids:
        return 0
    # rowcount counts the rows this statement inserted, not the writes of triggers on
    # deliveries (gateway.stats keeps its aggregates with triggers); total_changes would.
    cur = conn.executemany(
        "INSERT OR IGNORE INTO deliveries(message_id, job_id, device_id, state, next_at, last_error) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(str(uuid.uuid4()), job_id, d, state, now, error) for d in device_ids],
    )
    return cur.rowcount


def settle_jobs(conn: sqlite3.Connection, job_ids: Iterable[str], now: float) -> None:
    """Move jobs to completed / acknowledged from their counts (contract §6)."""
    for job_id in job_ids:
        conn.execute(
            "UPDATE jobs SET state = CASE "
            " WHEN expanded = 1 AND queued = 0 AND targets > 0 AND acknowledged = targets THEN 'acknowledged' "
            " WHEN expanded = 1 AND queued = 0 THEN 'completed' ELSE state END, "
            " updated_at = ?, status_dirty = 1 WHERE job_id = ?",
            (now, job_id),
        )


# ------------------------------------------------------------------ dispatch
@dataclass(frozen=True, slots=True)
class DueDelivery:
    message_id: str
    job_id: str
    device_id: str
    attempts: int
    channels: list[dict[str, Any]] | None  # None: the device was removed
    invalid: dict[str, Any]


def due_deliveries(conn: sqlite3.Connection, now: float, limit: int) -> list[DueDelivery]:
    rows = conn.execute(
        "SELECT d.message_id, d.job_id, d.device_id, d.attempts, v.channels, v.invalid FROM deliveries d "
        "LEFT JOIN devices v ON v.device_id = d.device_id "
        "WHERE d.state = 'queued' AND d.next_at <= ? ORDER BY d.next_at LIMIT ?", (now, limit))
    return [DueDelivery(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None,
                        json.loads(r[5]) if r[5] else {}) for r in rows]


def next_due_at(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued'").fetchone()
    return row[0]


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


@dataclass(slots=True)
class AckResult:
    accepted: bool
    reason: str = ""
    job_id: str | None = None
    latency_ms: float | None = None
    first: bool = False


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
            conn.execute(f"UPDATE jobs SET {sets}, updated_at = ?, status_dirty = 1 WHERE job_id = ?",
                         (*deltas.values(), now, job_id))
        settle_jobs(conn, self.by_job.keys(), now)


def apply_results(conn: sqlite3.Connection, results: list[Result], now: float) -> None:
    deltas = _Deltas()
    for r in results:
        if r.invalid_key:
            mark_invalid(conn, r.device_id, r.invalid_key, r.error or "invalid address", now)
        if r.state == "sent":
            cur = conn.execute(
                "UPDATE deliveries SET state = 'sent', platform = ?, attempts = ?, sent_at = ?, last_error = NULL "
                "WHERE message_id = ? AND state = 'queued'", (r.platform, r.attempts, now, r.message_id))
        elif r.state == "queued":
            cur = conn.execute(
                "UPDATE deliveries SET platform = ?, attempts = ?, next_at = ?, last_error = ? "
                "WHERE message_id = ? AND state = 'queued'", (r.platform, r.attempts, r.next_at, r.error, r.message_id))
            continue  # no count changes
        else:
            cur = conn.execute(
                "UPDATE deliveries SET state = ?, platform = ?, attempts = ?, last_error = ? "
                "WHERE message_id = ? AND state = 'queued'", (r.state, r.platform, r.attempts, r.error, r.message_id))
        if cur.rowcount:
            deltas.move(r.job_id, "queued", r.state)
    deltas.apply(conn, now)


def postpone(conn: sqlite3.Connection, message_ids: list[str], until: float) -> None:
    """Deliveries whose bridge is paused wait; attempts are not spent."""
    conn.executemany("UPDATE deliveries SET next_at = ? WHERE message_id = ? AND state = 'queued'",
                     [(until, m) for m in message_ids])


def apply_acks(conn: sqlite3.Connection, acks: list[tuple[str, AckIn]], now: float,
               forward: Forwarder | None = None, acks_topic: str | None = None) -> list[AckResult]:
    """Store every ack; the first valid one moves its delivery to acknowledged."""
    deltas = _Deltas()
    out: list[AckResult] = []
    for device_id, ack in acks:
        row = conn.execute("SELECT job_id, device_id, state, sent_at FROM deliveries WHERE message_id = ?",
                           (ack.message_id,)).fetchone()
        if row is None or row["device_id"] != device_id:
            bump(conn, "acks_refused")
            out.append(AckResult(False, "unknown message_id" if row is None else "message_id was not sent to this device"))
            continue
        conn.execute("INSERT INTO acks(message_id, device_id, status, at, error, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                     (ack.message_id, device_id, ack.status, iso(ack.at), ack.error, now))
        bump(conn, "acks_stored")
        first = row["state"] in ("queued", "sent")
        latency = None
        if first:
            sent_at = row["sent_at"] if row["sent_at"] is not None else now
            latency = max(0.0, (ack.at.timestamp() - sent_at) * 1000.0)
            conn.execute("UPDATE deliveries SET state = 'acknowledged', acked_at = ?, latency_ms = ? WHERE message_id = ?",
                         (ack.at.timestamp(), latency, ack.message_id))
            deltas.move(row["job_id"], row["state"], "acknowledged")
        result = AckResult(True, job_id=row["job_id"], latency_ms=latency, first=first)
        out.append(result)
        if forward is not None and acks_topic is not None:
            payload = {"message_id": ack.message_id, "status": ack.status, "at": iso(ack.at),
                       **({"error": ack.error} if ack.error is not None else {}),
                       "device_id": device_id, "job_id": row["job_id"],
                       "latency_ms": round(latency, 3) if latency is not None else None}
            forward.enqueue(conn, "ack", acks_topic, json.dumps(payload).encode(), False, None)
    deltas.apply(conn, now)
    return out


def delivery_rows(conn: sqlite3.Connection, job_id: str, limit: int = 100000) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT message_id, device_id, state, platform, attempts, last_error, latency_ms FROM deliveries "
                        "WHERE job_id = ? ORDER BY device_id LIMIT ?", (job_id, limit))
    return [dict(r) for r in rows]
