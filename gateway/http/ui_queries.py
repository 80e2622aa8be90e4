"""Read-only queries of the operator page, paged and indexed for 100,000 devices and
thousands of jobs.

Nothing here loads a table whole. Every list is a keyset page (``WHERE key > cursor ORDER
BY key LIMIT n``) on an index, so page 1 and page 2,000 cost the same:

- jobs, newest first: ``ui_jobs_by_created (created_at, job_id)``; the changes the event
  stream sends: ``ui_jobs_by_updated (updated_at)``;
- a job's deliveries: the ``UNIQUE (job_id, device_id)`` index of the pipeline's table;
- devices by id prefix: the primary key; by segment: ``devices_by_segment``; by tag:
  ``ui_device_tags (tag, device_id)``, which the pipeline keeps with its ``devices`` table
  (tags are a JSON list in the devices row, which no index can reach);
- alarms: ``alarms_by_state (state, rule, akey)`` and the primary key.

Those indexes and the tag table are the pipeline's (``gateway.pipeline.schema``, run by the
schema registry). The functions here run on the API's read-only connection, inside one
snapshot each.

Device addresses are shown shortened (:func:`redact_channel`): the page has no need for a
whole push token or subscription, and the page must carry nothing secret.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from typing import Any
from urllib.parse import urlsplit

from gateway import clock
from gateway import stats
from gateway.alarms.summary import AlarmSummary
from gateway.alarms.summary import summary as alarm_summary
from gateway.pipeline import store
from gateway.states import DELIVERY_STATES, PROBLEM_DELIVERY_STATES
from gateway.timeutil import iso_ts

COUNT_KEYS = DELIVERY_STATES
PROBLEM_STATES = PROBLEM_DELIVERY_STATES
ALARM_STATES = ("firing", "acknowledged", "pending", "cleared")
ID_CHARS = re.compile(r"^[A-Za-z0-9._:-]{0,128}$")
MAX_PAGE = 200
EXACT_PERCENTILES_UP_TO = 20_000
ID_UPPER = "\x7f"  # above every character an id may contain: the end of a prefix range

class QueryError(ValueError):
    """A query parameter the page cannot use; the message names it."""


# ------------------------------------------------------------------ helpers
def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def check_id_prefix(value: str, name: str) -> str:
    if not ID_CHARS.fullmatch(value):
        raise QueryError(f"{name}: an id (prefix) has only letters, digits and . _ : - (up to 128)")
    return value


def _limit(limit: int) -> int:
    return max(1, min(MAX_PAGE, limit))


# ------------------------------------------------------------------ jobs
JOB_COLUMNS = ("job_id, state, source, target, notification, created_at, updated_at, expires_at, ttl, targets, "
               + ", ".join(COUNT_KEYS))


def _job_select(conn: sqlite3.Connection) -> str:
    extra = ", error" if "error" in _columns(conn, "jobs") else ""
    return f"SELECT {JOB_COLUMNS}{extra} FROM jobs"


def job_summary(row: sqlite3.Row) -> dict[str, Any]:
    """A JobStatus (contract §6) plus what the list shows: source, title, priority."""
    try:
        notification = json.loads(row["notification"]) or {}
    except (TypeError, ValueError):
        notification = {}
    error = row["error"] if "error" in row.keys() else None
    return {
        "job_id": row["job_id"], "state": row["state"],
        "error": json.loads(error) if error else None,
        "counts": {"targets": row["targets"], **{k: row[k] for k in COUNT_KEYS}},
        "created_at": iso_ts(row["created_at"]), "updated_at": iso_ts(row["updated_at"]),
        "source": row["source"], "title": notification.get("title"), "priority": notification.get("priority"),
        "cursor": encode_job_cursor(row["created_at"], row["job_id"]),  # a page that ends here continues from it
    }


def encode_job_cursor(created_at: float, job_id: str) -> str:
    return f"{created_at!r}~{job_id}"


def decode_job_cursor(cursor: str) -> tuple[float, str]:
    stamp, sep, job_id = cursor.partition("~")
    try:
        value = float(stamp)
    except ValueError:
        value = float("nan")
    if not sep or value != value or not ID_CHARS.fullmatch(job_id):
        raise QueryError("before: not a cursor this page gave out")
    return value, job_id


def jobs_page(conn: sqlite3.Connection, limit: int = 20, before: str | None = None, state: str | None = None,
              prefix: str = "") -> dict[str, Any]:
    """The newest jobs first, ``limit`` at a time; ``next`` is the cursor of the following page."""
    limit = _limit(limit)
    where, args = [], []
    if before:
        created, job_id = decode_job_cursor(before)
        where.append("(created_at, job_id) < (?, ?)")  # a row value: a range on ui_jobs_by_created
        args += [created, job_id]
    if state:
        where.append("state = ?")
        args.append(state)
    if prefix:
        where.append("job_id >= ? AND job_id < ?")
        args += [prefix, prefix + ID_UPPER]
    sql = _job_select(conn) + (" WHERE " + " AND ".join(where) if where else "")
    rows = conn.execute(sql + " ORDER BY created_at DESC, job_id DESC LIMIT ?", (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return {"jobs": [job_summary(r) for r in rows],
            "next": encode_job_cursor(rows[-1]["created_at"], rows[-1]["job_id"]) if more else None}


def jobs_changed_since(conn: sqlite3.Connection, since: float, limit: int = 500) -> list[sqlite3.Row]:
    return conn.execute(_job_select(conn) + " WHERE updated_at > ? ORDER BY updated_at LIMIT ?",
                        (since, limit)).fetchall()


def job_detail(conn: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    row = conn.execute(_job_select(conn) + " WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    out = job_summary(row)
    try:
        out["target"] = json.loads(row["target"])
        notification = json.loads(row["notification"]) or {}
    except (TypeError, ValueError):
        notification = {}
    out["notification"] = {k: notification.get(k) for k in ("title", "body", "priority", "ttl", "collapse_key", "data")}
    out["expires_at"] = iso_ts(row["expires_at"])
    out["latency"] = job_latency(conn, job_id)
    return out


def job_latency(conn: sqlite3.Connection, job_id: str) -> dict[str, Any]:
    """Ack latency of a job's acknowledged deliveries: count, mean, max, percentiles.

    Exact percentiles up to :data:`EXACT_PERCENTILES_UP_TO` acks; above that the upper bound
    of the latency bucket they fall in (one pass, no sort of 100,000 rows)."""
    row = conn.execute("SELECT COUNT(latency_ms), AVG(latency_ms), MAX(latency_ms) FROM deliveries "
                       "WHERE job_id = ? AND state = 'acknowledged'", (job_id,)).fetchone()
    n = int(row[0] or 0)
    out: dict[str, Any] = {"count": n, "mean_ms": row[1], "max_ms": row[2], "p50_ms": None, "p95_ms": None,
                           "exact": True}
    if n == 0:
        return out
    if n <= EXACT_PERCENTILES_UP_TO:
        values = [r[0] for r in conn.execute("SELECT latency_ms FROM deliveries WHERE job_id = ? AND "
                                             "state = 'acknowledged' AND latency_ms IS NOT NULL", (job_id,))]
        values.sort()
        out["p50_ms"] = values[min(len(values) - 1, int(0.50 * len(values)))]
        out["p95_ms"] = values[min(len(values) - 1, int(0.95 * len(values)))]
        return out
    bounds = stats.LATENCY_BUCKETS_MS
    case = "CASE " + " ".join(f"WHEN latency_ms <= {b!r} THEN {i}" for i, b in enumerate(bounds)) + f" ELSE {len(bounds)} END"
    hist = dict(conn.execute(f"SELECT {case} AS b, COUNT(*) FROM deliveries WHERE job_id = ? AND state = "
                             "'acknowledged' AND latency_ms IS NOT NULL GROUP BY b", (job_id,)).fetchall())
    out["exact"] = False
    for key, q in (("p50_ms", 0.50), ("p95_ms", 0.95)):
        seen = 0
        for i in range(len(bounds) + 1):
            seen += hist.get(i, 0)
            if seen >= q * n:
                out[key] = bounds[i] if i < len(bounds) else out["max_ms"]
                break
    return out


def deliveries_page(conn: sqlite3.Connection, job_id: str, states: tuple[str, ...] = (), after: str = "",
                    limit: int = 50) -> dict[str, Any]:
    """One page of a job's deliveries by device_id, optionally only some states."""
    limit = _limit(limit)
    where = "job_id = ? AND device_id > ?"
    args: list[Any] = [job_id, after]
    if states:
        where += f" AND state IN ({','.join('?' * len(states))})"
        args += list(states)
    rows = conn.execute("SELECT message_id, device_id, state, platform, attempts, last_error, latency_ms, sent_at, "
                        f"acked_at, moved, next_at FROM deliveries WHERE {where} ORDER BY device_id LIMIT ?",
                        (*args, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    acks = store.acks_of(conn, [r["message_id"] for r in rows])
    now = clock.now()
    return {"deliveries": [{"message_id": r["message_id"], "device_id": r["device_id"], "state": r["state"],
                            "platform": r["platform"], "attempts": r["attempts"],
                            "reason": store.wait_reason(r["state"], r["next_at"], r["last_error"], r["moved"], now)
                            if r["state"] == "queued" else r["last_error"], "moved": r["moved"],
                            "latency_ms": r["latency_ms"], "sent_at": iso_ts(r["sent_at"]),
                            "acked_at": iso_ts(r["acked_at"]), "acks": acks.get(r["message_id"], [])}
                           for r in rows],
            "next": rows[-1]["device_id"] if more else None}


# ------------------------------------------------------------------ devices
def _short(text: str, head: int = 6, tail: int = 4) -> str:
    return text if len(text) <= head + tail + 1 else f"{text[:head]}…{text[-tail:]}"


def redact_channel(channel: dict[str, Any]) -> str:
    """What the page shows of a channel's address: enough to tell two apart, not to use one."""
    platform = channel.get("platform")
    if platform in ("fcm", "apns"):
        return _short(str(channel.get("token", "")))
    if platform == "wns":
        return (urlsplit(str(channel.get("channel_uri", ""))).hostname or "?") + " …"
    if platform == "webpush":
        endpoint = str((channel.get("subscription") or {}).get("endpoint", ""))
        return (urlsplit(endpoint).hostname or "?") + " …"
    return ""


def _channels(row: sqlite3.Row) -> list[dict[str, Any]]:
    from gateway.pipeline import store

    try:
        full = store.device_json(row)["channels"]
    except (ValueError, TypeError, KeyError):
        full = []
    return [{"platform": c.get("platform"), "address": redact_channel(c), "invalid": c.get("invalid")} for c in full]


def device_summary(row: sqlite3.Row, last_ack: float | None) -> dict[str, Any]:
    try:
        tags = json.loads(row["tags"])
    except (TypeError, ValueError):
        tags = []
    return {"device_id": row["device_id"], "segment": row["segment"], "tags": tags, "channels": _channels(row),
            "updated_at": iso_ts(row["updated_at"]), "last_ack_at": iso_ts(last_ack)}


def devices_page(conn: sqlite3.Connection, prefix: str = "", segment: str = "", tag: str = "", after: str = "",
                 limit: int = 50) -> dict[str, Any]:
    """Devices by device_id matching an id prefix, a segment and a tag (each optional), with
    the total that match and each one's last ack."""
    limit = _limit(limit)
    source, key = "devices d", "d.device_id"
    tag_table = bool(tag) and stats.has_table(conn, "ui_device_tags")
    if tag_table:
        # Driven by the tag index: the range and the cursor go on its device_id column.
        source, key = "ui_device_tags t JOIN devices d ON d.device_id = t.device_id", "t.device_id"
    where: list[str] = []
    args: list[Any] = []
    if tag_table:
        where.append("t.tag = ?")
        args.append(tag)
    elif tag:  # the API could not create its table (read-only start): slower, still right
        where.append("EXISTS (SELECT 1 FROM json_each(CASE WHEN json_valid(d.tags) THEN d.tags ELSE '[]' END) "
                     "WHERE value = ?)")
        args.append(tag)
    if prefix:
        where.append(f"{key} >= ? AND {key} < ?")
        args += [prefix, prefix + ID_UPPER]
    if segment:
        where.append("d.segment = ?")
        args.append(segment)
    cond = " AND ".join(where) or "1"
    total = conn.execute(f"SELECT COUNT(*) FROM {source} WHERE {cond}", args).fetchone()[0]
    rows = conn.execute(f"SELECT d.* FROM {source} WHERE {cond} AND {key} > ? ORDER BY {key} LIMIT ?",
                        (*args, after, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    acks = last_acks(conn, [r["device_id"] for r in rows])
    return {"devices": [device_summary(r, acks.get(r["device_id"])) for r in rows], "total": total,
            "next": rows[-1]["device_id"] if more else None}


def last_acks(conn: sqlite3.Connection, device_ids: list[str]) -> dict[str, float]:
    """device_id → when its latest acknowledged delivery was acked (index deliveries_by_device)."""
    if not device_ids:
        return {}
    marks = ",".join("?" * len(device_ids))
    return {r[0]: r[1] for r in conn.execute(
        f"SELECT device_id, MAX(acked_at) FROM deliveries WHERE device_id IN ({marks}) AND acked_at IS NOT NULL "
        "GROUP BY device_id", device_ids)}


def device_detail(conn: sqlite3.Connection, device_id: str, recent: int = 20) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    if row is None:
        return None
    out = device_summary(row, last_acks(conn, [device_id]).get(device_id))
    via = "a.via" if "via" in _columns(conn, "acks") else "NULL"
    ack = conn.execute(f"SELECT a.status, a.at, a.received_at, a.message_id, {via} AS via, d.job_id FROM acks a "
                       "JOIN deliveries d ON d.message_id = a.message_id WHERE d.device_id = ? "
                       "ORDER BY a.received_at DESC LIMIT 1", (device_id,)).fetchone()
    # via: the channel it came by (mqtt, ack-url, simulation): an ack URL may be used by
    # anyone who holds it, so the page says when an ack did not come from the device itself.
    out["last_ack"] = ({"status": ack["status"], "at": ack["at"], "received_at": iso_ts(ack["received_at"]),
                        "job_id": ack["job_id"], "via": ack["via"]} if ack else None)
    rows = conn.execute("SELECT d.job_id, d.state, d.platform, d.attempts, d.last_error, d.latency_ms, j.created_at "
                        "FROM deliveries d JOIN jobs j ON j.job_id = d.job_id WHERE d.device_id = ? "
                        "ORDER BY j.created_at DESC LIMIT ?", (device_id, recent)).fetchall()
    out["recent"] = [{"job_id": r["job_id"], "state": r["state"], "platform": r["platform"], "attempts": r["attempts"],
                      "reason": r["last_error"], "latency_ms": r["latency_ms"], "created_at": iso_ts(r["created_at"])}
                     for r in rows]
    return out


def known_devices(conn: sqlite3.Connection, device_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(device_ids), 500):
        chunk = device_ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        found.update(r[0] for r in conn.execute(f"SELECT device_id FROM devices WHERE device_id IN ({marks})", chunk))
    return found


# ------------------------------------------------------------------ alarms
def _alarm_json(row: Any) -> dict[str, Any]:
    """An alarm row (the table's, or a summary's with ``key``) as the page shows it."""
    def loads(text: str | None) -> Any:
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return text

    key = row["key"] if isinstance(row, dict) else row["akey"]
    return {"rule": row["rule"], "key": key, "state": row["state"], "value": loads(row["value"]),
            "since": iso_ts(row["since"]), "fired_at": iso_ts(row["fired_at"]),
            "acknowledged_by": row["acknowledged_by"], "note": row["note"], "escalation_step": row["escalation_step"],
            "jobs": loads(row["jobs"]) or [], "next_escalation_at": iso_ts(row["due_at"]) if row["state"] == "firing" else None}


def _counts(summary: AlarmSummary | None) -> dict[str, int]:
    """Every state the page shows, zero when none (or no alarms table)."""
    return {state: summary.count(state) if summary is not None else 0 for state in ALARM_STATES}


def alarm_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return _counts(alarm_summary(conn, firing_limit=0))


def alarms_digest(conn: sqlite3.Connection) -> tuple[Any, ...]:
    """Changes whenever an alarm changes state or escalates (what the page must refetch on)."""
    if not stats.has_table(conn, "alarms"):
        return ()
    return tuple(conn.execute("SELECT state, COUNT(*), MAX(updated_at), SUM(version) FROM alarms "
                              "WHERE state != 'idle' GROUP BY state ORDER BY state").fetchall())


def alarms_page(conn: sqlite3.Connection, state: str = "firing", after: tuple[str, str] | None = None,
                limit: int = 50) -> dict[str, Any]:
    limit = _limit(limit)
    if not stats.has_table(conn, "alarms"):
        return {"alarms": [], "next": None, "counts": alarm_counts(conn)}
    rule, key = after or ("", "")
    rows = conn.execute("SELECT * FROM alarms WHERE state = ? AND (rule, akey) > (?, ?) "
                        "ORDER BY rule, akey LIMIT ?", (state, rule, key, limit + 1)).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return {"alarms": [_alarm_json(r) for r in rows], "counts": alarm_counts(conn),
            "next": [rows[-1]["rule"], rows[-1]["akey"]] if more else None}




def alarm(conn: sqlite3.Connection, rule: str, key: str) -> dict[str, Any] | None:
    if not stats.has_table(conn, "alarms"):
        return None
    row = conn.execute("SELECT * FROM alarms WHERE rule = ? AND akey = ?", (rule, key)).fetchone()
    return _alarm_json(row) if row is not None and row["state"] != "idle" else None


# ------------------------------------------------------------------ now
def now_from_db(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """The database half of the "now" view: a handful of rows whatever the fleet size."""
    now = clock.now() if now is None else now
    counts = stats.delivery_counts(conn)
    by_state = dict.fromkeys(DELIVERY_STATES, 0)
    queued_by_platform: dict[str, int] = {}
    for (platform, state), n in counts.items():
        by_state[state] = by_state.get(state, 0) + n
        if state == "queued" and n:
            queued_by_platform[platform or "unassigned"] = n
    latency = {}
    for platform, h in stats.ack_latency(conn).items():
        if h["count"]:
            latency[platform or "unassigned"] = {"count": h["count"], "mean_ms": h["sum_ms"] / h["count"],
                                                 "p50_le_ms": _bucket_quantile(h, 0.5), "p95_le_ms": _bucket_quantile(h, 0.95)}
    active = conn.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('accepted', 'dispatching')").fetchone()[0]
    oldest = stats.oldest_queued_overall(conn, now)
    return {
        "deliveries": by_state,
        "queue": {"depth": by_state.get("queued", 0), "by_platform": queued_by_platform,
                  "oldest_age_s": None if oldest is None else round(oldest, 1)},
        "ack_latency": latency,
        "devices": stats.device_count(conn),
        "jobs_active": active,
        "upstream_backlog": stats.upstream_backlog(conn),
        "alarms": _alarms_now(conn),
    }


def _alarms_now(conn: sqlite3.Connection, firing_limit: int = 10) -> dict[str, Any]:
    """Counts by state and the longest-firing alarms, from the one alarm summary."""
    summary = alarm_summary(conn, firing_limit)
    return {"counts": _counts(summary), "firing": [_alarm_json(a) for a in summary.firing] if summary else []}


def _bucket_quantile(h: dict[str, Any], q: float) -> float | None:
    for bound, cumulative in h["buckets"]:
        if cumulative >= q * h["count"]:
            return None if bound == float("inf") else bound
    return None


__all__ = ["QueryError", "alarm", "alarms_digest", "alarms_page", "check_id_prefix", "deliveries_page",
           "device_detail", "devices_page", "job_detail", "job_latency", "jobs_changed_since", "jobs_page",
           "known_devices", "now_from_db"]
