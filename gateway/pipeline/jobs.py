"""Jobs: the ``jobs`` table (a job's target, notification, state and its deliveries'
counts, kept incrementally so a status never scans a 100,000-row job), the retained
status clears owed for pruned jobs (``status_clears``) and the pipeline's event
``counters``. Plain functions on a connection, inside the caller's transaction.

The per-state counts move with every change of a delivery's state; only
:class:`gateway.pipeline.deliveries.DeliveryWriter` moves them (:func:`move_counts`),
besides expansion's own bookkeeping of rows made (:func:`expanded_page`)."""

from __future__ import annotations

import json
import sqlite3

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from gateway import clock
from gateway import states
from gateway.pipeline import registry
from gateway.states import DELIVERY_STATES, JobState
from gateway.pipeline.models import ParsedJob
from gateway.timeutil import iso, iso_ts, utcnow

COUNT_KEYS = tuple(state.value for state in DELIVERY_STATES)



def bump(conn: sqlite3.Connection, name: str, n: int = 1) -> None:
    conn.execute("INSERT INTO counters(name, value) VALUES (?, ?) "
                 "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, n))


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    """The event counters (``/metrics``); empty on a database the pipeline never ran on."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'counters'").fetchone() is None:
        return {}
    return {r[0]: int(r[1]) for r in conn.execute("SELECT name, value FROM counters")}


FINAL_JOB_STATES = tuple(sorted(state.value for state in states.FINAL_JOB_STATES))
_DIRTY = "status_dirty = 1, cloud_dirty = 1"  # a status is owed locally and to the cloud


def insert_job(conn: sqlite3.Connection, parsed: ParsedJob, source: str, now: float | None = None) -> bool:
    """Store an accepted job; False if the job_id was seen before (idempotency key).

    A job_id whose job was *rejected* was never dispatched: a valid job may take it (the
    rejection is replaced), so a technician can fix a typo and send again with the same id.
    """
    now = now or clock.now()
    existing = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (parsed.job_id,)).fetchone()
    if existing is not None:
        if existing["state"] != JobState.REJECTED:
            return False
        conn.execute("DELETE FROM jobs WHERE job_id = ?", (parsed.job_id,))
    job = parsed.job
    n = job.notification
    target = job.target.as_json()
    targets = registry.count_targets(conn, target)
    conn.execute(
        "INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, "
        "updated_at, expires_at, ttl, targets, queued, status_dirty, cloud_dirty, people_targets) "
        "VALUES (?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, 1, ?)",
        (parsed.job_id, source, json.dumps(target), n.model_dump_json(),
         job.options.model_dump_json(exclude_none=True), now, now, now + n.ttl, n.ttl, targets, targets,
         len(target["people"]) if "people" in target else None),
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
    if row is not None and row["state"] != JobState.REJECTED:
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
    keys = row.keys()
    error = row["error"] if "error" in keys else None
    status = {
        "job_id": row["job_id"],
        "state": row["state"],
        "error": json.loads(error) if error else None,
        # A row read before the migration that added a count (suppressed) has none of it.
        "counts": {"targets": row["targets"], **{k: row[k] if k in keys else 0 for k in COUNT_KEYS}},
    }
    if "people_targets" in keys and row["people_targets"] is not None:  # only a job that targets people (§6)
        status["people"] = {"targets": row["people_targets"], "reached": row["people_reached"],
                            "held": row["people_held"]}
    status["created_at"] = iso_ts(row["created_at"])
    status["updated_at"] = iso_ts(row["updated_at"])
    return status


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


def jobs_to_expand(conn: sqlite3.Connection, limit: int = 10) -> list[str]:
    rows = conn.execute("SELECT job_id FROM jobs WHERE expanded = 0 ORDER BY created_at LIMIT ?", (limit,))
    return [r["job_id"] for r in rows]


def expansion_state(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    """target, expand_cursor, expanded, expires_at of a job (None: no such job)."""
    return conn.execute("SELECT target, expand_cursor, expanded, expires_at FROM jobs WHERE job_id = ?",
                        (job_id,)).fetchone()


def expanded_page(conn: sqlite3.Connection, job_id: str, target: dict[str, Any], made: int, failed: int,
                  cursor: str, done: bool, now: float) -> None:
    """Book a page of expansion: ``made`` rows (``failed`` of them unknown devices, already
    failed) under the cursor, committed with the rows. ``targets`` and ``queued`` were set
    when the job was accepted; at the end they are corrected to the rows really made, in
    case the registry changed meanwhile, and the job settles."""
    conn.execute(
        "UPDATE jobs SET expanded_rows = expanded_rows + ?, queued = queued - ?, failed = failed + ?, "
        "expand_cursor = ?, expanded = ?, state = CASE WHEN state = 'accepted' THEN 'dispatching' ELSE state END, "
        f"updated_at = ?, {_DIRTY} WHERE job_id = ?",
        (made, failed, failed, cursor, int(done), now, job_id),
    )
    if done:
        if "segment" in target:
            why = f"target.segment: no registered device is in segment {target['segment']!r}"
        elif "people" in target:
            why = "target.people: no such person, or none of them lists a device"
        else:
            why = "target.all: no device is registered"
        conn.execute(
            "UPDATE jobs SET queued = queued + (expanded_rows - targets), targets = expanded_rows, "
            "error = CASE WHEN expanded_rows = 0 THEN ? ELSE error END WHERE job_id = ?",
            (json.dumps({"code": "no_targets", "message": why}), job_id))
        settle_jobs(conn, [job_id], now)


def move_counts(conn: sqlite3.Connection, by_job: dict[str, dict[str, int]], now: float) -> None:
    """Move jobs' per-state counts (job_id → state → rows gained, negative: lost), mark
    their status owed, and settle them."""
    for job_id, deltas in by_job.items():
        moved = {k: n for k, n in deltas.items() if n}
        sets = "".join(f"{k} = {k} + ?, " for k in moved)
        conn.execute(f"UPDATE jobs SET {sets}updated_at = ?, {_DIRTY} WHERE job_id = ?",
                     (*moved.values(), now, job_id))
    settle_jobs(conn, by_job.keys(), now)


def count_held(conn: sqlite3.Connection, job_ids: Iterable[str], hold_prefix: str, now: float) -> None:
    """``people_held`` of the jobs that target people among ``job_ids``: their persons with
    a delivery held by quiet hours now (queued, its reason ``quiet hours until …``). Counted
    again from the job's rows (a few per person) when a batch recorded results of the job,
    and written, with the status owed, only when it changed; a job of no people costs one
    look-up of its row."""
    held = ("(SELECT COUNT(DISTINCT d.person_id) FROM deliveries d WHERE d.job_id = jobs.job_id "
            "AND d.state = 'queued' AND d.person_id IS NOT NULL AND d.last_error LIKE ? || '%')")
    conn.execute(f"UPDATE jobs SET people_held = {held}, updated_at = ?, {_DIRTY} "
                 f"WHERE job_id IN (SELECT value FROM json_each(?)) AND people_targets IS NOT NULL "
                 f"AND people_held != {held}", (hold_prefix, now, json.dumps(sorted(job_ids)), hold_prefix))


def settle_jobs(conn: sqlite3.Connection, job_ids: Iterable[str], now: float) -> None:
    """Move jobs to completed / acknowledged from their counts (contract §6). A job that
    targets people is acknowledged when every person was reached (a person's devices that
    were tried before the one that acked stay unacked)."""
    for job_id in job_ids:
        conn.execute(
            "UPDATE jobs SET state = CASE "
            " WHEN expanded = 1 AND queued = 0 AND people_targets IS NULL AND targets > 0 AND acknowledged = targets "
            "  THEN 'acknowledged' "
            " WHEN expanded = 1 AND queued = 0 AND people_targets > 0 AND people_reached = people_targets "
            "  THEN 'acknowledged' "
            " WHEN expanded = 1 AND queued = 0 THEN 'completed' ELSE state END, "
            f" updated_at = ?, {_DIRTY} WHERE job_id = ? AND state != 'rejected'",
            (now, job_id),
        )


def job_rows(conn: sqlite3.Connection, job_ids: Iterable[str]) -> dict[str, sqlite3.Row]:
    ids = list(job_ids)
    if not ids:
        return {}
    marks = ",".join("?" * len(ids))
    return {r["job_id"]: r for r in conn.execute(f"SELECT * FROM jobs WHERE job_id IN ({marks})", ids)}


def delete_job(conn: sqlite3.Connection, job_id: str, now: float) -> None:
    """Delete a job whose deliveries are gone (retention); its retained status is owed a
    clear (``status_clears``), published by the status publisher."""
    conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
    conn.execute("INSERT OR REPLACE INTO status_clears(job_id, at) VALUES (?, ?)", (job_id, now))


def finished_before(conn: sqlite3.Connection, cutoff: float, limit: int = 100) -> list[str]:
    """Finished jobs last changed before ``cutoff``, oldest first (retention's candidates)."""
    marks = ",".join("?" * len(FINAL_JOB_STATES))
    return [r[0] for r in conn.execute(f"SELECT job_id FROM jobs WHERE state IN ({marks}) AND updated_at < ? "
                                       "ORDER BY updated_at LIMIT ?", (*FINAL_JOB_STATES, cutoff, limit))]


def owed_clears(conn: sqlite3.Connection, limit: int = 200) -> list[str]:
    return [r[0] for r in conn.execute("SELECT job_id FROM status_clears ORDER BY at LIMIT ?", (limit,))]


def clears_done(conn: sqlite3.Connection, job_ids: list[str]) -> None:
    conn.executemany("DELETE FROM status_clears WHERE job_id = ?", [(j,) for j in job_ids])


def next_expiry(conn: sqlite3.Connection, now: float) -> float | None:
    return conn.execute("SELECT MIN(expires_at) FROM jobs WHERE state IN ('accepted', 'dispatching') AND queued > 0 "
                        "AND expires_at > ?", (now,)).fetchone()[0]


def expiring_jobs(conn: sqlite3.Connection, now: float, limit: int = 100) -> list[sqlite3.Row]:
    """Open jobs with queued deliveries whose TTL has passed, or of ``ttl = 0``."""
    return conn.execute("SELECT job_id, ttl, expires_at FROM jobs WHERE state IN ('accepted', 'dispatching') "
                        "AND queued > 0 AND (expires_at <= ? OR ttl = 0) ORDER BY expires_at LIMIT ?",
                        (now, limit)).fetchall()


def shift_deadlines(conn: sqlite3.Connection, delta: float) -> int:
    """Move the jobs' pending deadlines by ``delta`` s (gateway.clock re-anchored): the TTL
    expiry of open jobs and of completed jobs whose unacked deliveries are still resent
    while the TTL lasts, and the status publishers' throttle bases."""
    return (clock.shift_columns(conn, "jobs", "expires_at", delta,
                                "state IN ('accepted', 'dispatching') OR job_id IN (SELECT job_id FROM deliveries"
                                " WHERE state = 'sent' AND resend_at IS NOT NULL)")
            + clock.shift_columns(conn, "jobs", "status_published_at", delta, "status_published_at > 0")
            + clock.shift_columns(conn, "jobs", "cloud_published_at", delta, "cloud_published_at > 0"))


# ------------------------------------------------------------------ reads for other packages
# The operator page's views of jobs (read-only connections, keyset pages on indexes).
_VIEW_COLUMNS = ("job_id, state, source, target, notification, created_at, updated_at, expires_at, ttl, targets, "
                 + ", ".join(COUNT_KEYS))


def _view_select(conn: sqlite3.Connection) -> str:
    extra = ", error" if "error" in {r[1] for r in conn.execute("PRAGMA table_info(jobs)")} else ""
    return f"SELECT {_VIEW_COLUMNS}{extra} FROM jobs"


def jobs_newest_first(conn: sqlite3.Connection, limit: int, before: tuple[float, str] | None = None,
                      state: str | None = None, prefix: str = "", id_upper: str = "\x7f") -> list[sqlite3.Row]:
    """Up to ``limit`` jobs, newest first, older than the ``(created_at, job_id)`` cursor
    ``before`` (a range on ``ui_jobs_by_created``), of one state and an id prefix."""
    where: list[str] = []
    args: list[Any] = []
    if before is not None:
        where.append("(created_at, job_id) < (?, ?)")  # a row value: a range on ui_jobs_by_created
        args += [before[0], before[1]]
    if state:
        where.append("state = ?")
        args.append(state)
    if prefix:
        where.append("job_id >= ? AND job_id < ?")
        args += [prefix, prefix + id_upper]
    sql = _view_select(conn) + (" WHERE " + " AND ".join(where) if where else "")
    return conn.execute(sql + " ORDER BY created_at DESC, job_id DESC LIMIT ?", (*args, limit)).fetchall()


def jobs_updated_since(conn: sqlite3.Connection, since: float, limit: int = 500) -> list[sqlite3.Row]:
    """Jobs changed after ``since`` (index ``ui_jobs_by_updated``), oldest change first."""
    return conn.execute(_view_select(conn) + " WHERE updated_at > ? ORDER BY updated_at LIMIT ?",
                        (since, limit)).fetchall()


def job_view(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    """One job with the columns the views show (:func:`jobs_newest_first`)."""
    return conn.execute(_view_select(conn) + " WHERE job_id = ?", (job_id,)).fetchone()


def open_job_count(conn: sqlite3.Connection) -> int:
    """Jobs still accepted or dispatching (literals: the partial index ``jobs_open`` covers them)."""
    return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('accepted', 'dispatching')").fetchone()[0])


def people_held(conn: sqlite3.Connection) -> int:
    """Persons held by quiet hours now, summed over the open jobs (``people_held``; a person
    held by two jobs counts twice). The open jobs are an index's rows."""
    row = conn.execute("SELECT SUM(people_held) FROM jobs WHERE state IN ('accepted', 'dispatching')").fetchone()
    return int(row[0] or 0)


def count_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """state → how many jobs are in it."""
    return {r[0]: int(r[1]) for r in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}


def with_queued_oldest_first(conn: sqlite3.Connection) -> Iterator[tuple[str, float]]:
    """(job_id, created_at) of the jobs that still have queued deliveries (their count is
    kept on the row), oldest first."""
    for r in conn.execute("SELECT job_id, created_at FROM jobs WHERE queued > 0 ORDER BY created_at"):
        yield str(r[0]), float(r[1])


def oldest_with_queued(conn: sqlite3.Connection) -> float | None:
    """``created_at`` of the oldest job that still has queued deliveries, or None."""
    row = conn.execute("SELECT MIN(created_at) FROM jobs WHERE queued > 0").fetchone()
    return None if row is None or row[0] is None else float(row[0])
