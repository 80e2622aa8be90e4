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
schema registry). The SQL is the owners': this module asks the pipeline's table modules
(registry, jobs, deliveries, acks) and the alarm store for rows, and shapes what the page
shows from them. The functions here run on the API's read-only connection, inside one
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
from gateway.alarms import store as alarm_store
from gateway.alarms.summary import AlarmSummary
from gateway.alarms.summary import summary as alarm_summary
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline import deliveries, jobs, registry
from gateway.states import DELIVERY_STATES, PROBLEM_DELIVERY_STATES, AlarmState, DeliveryState
from gateway.timeutil import iso_ts
from gateway.upstream import outbox

COUNT_KEYS = DELIVERY_STATES
PROBLEM_STATES = PROBLEM_DELIVERY_STATES
# The page lists what needs an operator first.
ALARM_STATES = (AlarmState.FIRING, AlarmState.ACKNOWLEDGED, AlarmState.PENDING, AlarmState.CLEARED)
ID_CHARS = re.compile(r"^[A-Za-z0-9._:-]{0,128}$")
MAX_PAGE = 200
EXACT_PERCENTILES_UP_TO = 20_000
ID_UPPER = "\x7f"  # above every character an id may contain: the end of a prefix range

class QueryError(ValueError):
    """A query parameter the page cannot use; the message names it."""


# ------------------------------------------------------------------ helpers
def check_id_prefix(value: str, name: str) -> str:
    if not ID_CHARS.fullmatch(value):
        raise QueryError(f"{name}: an id (prefix) has only letters, digits and . _ : - (up to 128)")
    return value


def _limit(limit: int) -> int:
    return max(1, min(MAX_PAGE, limit))


# ------------------------------------------------------------------ jobs
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
    cursor = decode_job_cursor(before) if before else None
    rows = jobs.jobs_newest_first(conn, limit + 1, cursor, state, prefix, ID_UPPER)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"jobs": [job_summary(r) for r in rows],
            "next": encode_job_cursor(rows[-1]["created_at"], rows[-1]["job_id"]) if more else None}


def jobs_changed_since(conn: sqlite3.Connection, since: float, limit: int = 500) -> list[sqlite3.Row]:
    return jobs.jobs_updated_since(conn, since, limit)


def job_detail(conn: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    row = jobs.job_view(conn, job_id)
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
    n, mean, top = deliveries.acked_latency(conn, job_id)
    out: dict[str, Any] = {"count": n, "mean_ms": mean, "max_ms": top, "p50_ms": None, "p95_ms": None,
                           "exact": True}
    if n == 0:
        return out
    if n <= EXACT_PERCENTILES_UP_TO:
        values = deliveries.acked_latencies(conn, job_id)
        out["p50_ms"] = values[min(len(values) - 1, int(0.50 * len(values)))]
        out["p95_ms"] = values[min(len(values) - 1, int(0.95 * len(values)))]
        return out
    bounds = stats.LATENCY_BUCKETS_MS
    hist = deliveries.acked_latency_histogram(conn, job_id, bounds)
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
    rows = deliveries.job_deliveries_after(conn, job_id, after, limit + 1, states)
    more = len(rows) > limit
    rows = rows[:limit]
    acks = pipeline_acks.acks_of(conn, [r["message_id"] for r in rows])
    now = clock.now()
    return {"deliveries": [{"message_id": r["message_id"], "device_id": r["device_id"], "state": r["state"],
                            "platform": r["platform"], "attempts": r["attempts"],
                            "reason": deliveries.wait_reason(r["state"], r["next_at"], r["last_error"], r["moved"], now)
                            if r["state"] == DeliveryState.QUEUED else r["last_error"], "moved": r["moved"],
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
    try:
        full = registry.device_json(row)["channels"]
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
    total, rows = registry.matching(conn, prefix, segment, tag, after, limit + 1, ID_UPPER)
    more = len(rows) > limit
    rows = rows[:limit]
    acks = last_acks(conn, [r["device_id"] for r in rows])
    return {"devices": [device_summary(r, acks.get(r["device_id"])) for r in rows], "total": total,
            "next": rows[-1]["device_id"] if more else None}


def last_acks(conn: sqlite3.Connection, device_ids: list[str]) -> dict[str, float]:
    """device_id → when its latest acknowledged delivery was acked (index deliveries_by_device)."""
    return deliveries.last_acked_at(conn, device_ids)


def device_detail(conn: sqlite3.Connection, device_id: str, recent: int = 20) -> dict[str, Any] | None:
    row = registry.device_row(conn, device_id)
    if row is None:
        return None
    out = device_summary(row, last_acks(conn, [device_id]).get(device_id))
    ack = pipeline_acks.last_of_device(conn, device_id)
    # via: the channel it came by (mqtt, ack-url, simulation): an ack URL may be used by
    # anyone who holds it, so the page says when an ack did not come from the device itself.
    out["last_ack"] = ({"status": ack["status"], "at": ack["at"], "received_at": iso_ts(ack["received_at"]),
                        "job_id": ack["job_id"], "via": ack["via"]} if ack else None)
    rows = deliveries.recent_of_device(conn, device_id, recent)
    out["recent"] = [{"job_id": r["job_id"], "state": r["state"], "platform": r["platform"], "attempts": r["attempts"],
                      "reason": r["last_error"], "latency_ms": r["latency_ms"], "created_at": iso_ts(r["created_at"])}
                     for r in rows]
    return out


def known_devices(conn: sqlite3.Connection, device_ids: list[str]) -> set[str]:
    return registry.known(conn, device_ids)


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
            "jobs": loads(row["jobs"]) or [], "next_escalation_at": iso_ts(row["due_at"]) if row["state"] == AlarmState.FIRING else None}


def _counts(summary: AlarmSummary | None) -> dict[str, int]:
    """Every state the page shows, zero when none (or no alarms table)."""
    return {state: summary.count(state) if summary is not None else 0 for state in ALARM_STATES}


def alarm_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return _counts(alarm_summary(conn, firing_limit=0))


def alarms_digest(conn: sqlite3.Connection) -> tuple[Any, ...]:
    """Changes whenever an alarm changes state or escalates (what the page must refetch on)."""
    return alarm_store.digest(conn)


def alarms_page(conn: sqlite3.Connection, state: str = AlarmState.FIRING, after: tuple[str, str] | None = None,
                limit: int = 50) -> dict[str, Any]:
    limit = _limit(limit)
    if not alarm_store.has_tables(conn):
        return {"alarms": [], "next": None, "counts": alarm_counts(conn)}
    rows = alarm_store.rows_in_state(conn, state, after or ("", ""), limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"alarms": [_alarm_json(r) for r in rows], "counts": alarm_counts(conn),
            "next": [rows[-1]["rule"], rows[-1]["akey"]] if more else None}




def alarm(conn: sqlite3.Connection, rule: str, key: str) -> dict[str, Any] | None:
    row = alarm_store.stored_row(conn, rule, key)
    return _alarm_json(row) if row is not None and row["state"] != AlarmState.IDLE else None


# ------------------------------------------------------------------ now
def now_from_db(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """The database half of the "now" view: a handful of rows whatever the fleet size."""
    now = clock.now() if now is None else now
    counts = stats.delivery_counts(conn)
    by_state = dict.fromkeys(DELIVERY_STATES, 0)
    queued_by_platform: dict[str, int] = {}
    for (platform, state), n in counts.items():
        by_state[state] = by_state.get(state, 0) + n
        if state == DeliveryState.QUEUED and n:
            queued_by_platform[platform or "unassigned"] = n
    latency = {}
    for platform, h in stats.ack_latency(conn).items():
        if h["count"]:
            latency[platform or "unassigned"] = {"count": h["count"], "mean_ms": h["sum_ms"] / h["count"],
                                                 "p50_le_ms": _bucket_quantile(h, 0.5), "p95_le_ms": _bucket_quantile(h, 0.95)}
    active = jobs.open_job_count(conn)
    created = jobs.oldest_with_queued(conn)
    oldest = None if created is None else max(0.0, now - created)
    return {
        "deliveries": by_state,
        "queue": {"depth": by_state.get("queued", 0), "by_platform": queued_by_platform,
                  "oldest_age_s": None if oldest is None else round(oldest, 1)},
        "ack_latency": latency,
        "devices": registry.count(conn),
        "jobs_active": active,
        "upstream_backlog": outbox.backlog(conn),
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
