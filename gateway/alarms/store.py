"""The alarm tables and every transaction that touches them.

``alarms`` holds one row per (rule, key); ``alarm_jobs`` maps each job an alarm submitted
to its alarm and episode; ``alarm_inbox`` holds acknowledgements that arrive from outside
the engine (the CLI, and ``opened`` acks on an alarm's deliveries); ``alarm_stats`` and
``alarm_meta`` keep per-rule counters and the gateway's last sign of life.

**Opened acks.** The trigger ``alarm_opened_ack`` runs inside the pipeline's own ack
transaction (``gateway.pipeline.acks.apply_acks``, MQTT and HTTP acks alike): an ``opened`` ack on a
delivery of an alarm's job adds an inbox row in the same commit as the ack itself. So the
pipeline needs no knowledge of alarms, and an ack that was acknowledged to the device is
never lost to the alarm. The engine (the only writer of ``alarms``) applies and deletes
inbox rows in its next transaction.

Functions here run inside one transaction (``Database.run`` or the CLI's ``transaction``)
and neither await nor log.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from gateway import clock
from gateway.alarms.engine import AlarmRow, Batch
from gateway.alarms.jobs import build_job, job_id_for
from gateway.pipeline import deliveries as pipeline_deliveries
from gateway.pipeline import jobs as pipeline_jobs
from gateway.pipeline import registry as pipeline_registry
from gateway.pipeline import jobs as pipeline_jobs
from gateway.pipeline.models import InputError
from gateway.states import ALARM_STATES, AlarmState
from gateway.storage import run_script

MAX_NOTIFIED_DEVICES = 100_000

DDL = """
CREATE TABLE IF NOT EXISTS alarms (
    rule            TEXT NOT NULL,
    akey            TEXT NOT NULL,
    state           TEXT NOT NULL,      -- idle | pending | firing | acknowledged | cleared
    topic           TEXT,
    value           TEXT,               -- JSON
    last_value      TEXT,               -- JSON
    since           REAL,
    fired_at        REAL,
    acknowledged_by TEXT,
    note            TEXT,
    escalation_step INTEGER NOT NULL DEFAULT 0,
    episode         INTEGER NOT NULL DEFAULT 0,
    seq             INTEGER NOT NULL DEFAULT 0,
    jobs            TEXT NOT NULL DEFAULT '[]',
    due_at          REAL,
    last_seen       REAL,
    version         INTEGER NOT NULL DEFAULT 0,
    published_version INTEGER NOT NULL DEFAULT 0,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (rule, akey)
);
CREATE INDEX IF NOT EXISTS alarms_by_state ON alarms(state);

CREATE TABLE IF NOT EXISTS alarm_jobs (
    job_id   TEXT PRIMARY KEY,
    rule     TEXT NOT NULL,
    akey     TEXT NOT NULL,
    episode  INTEGER NOT NULL,
    kind     TEXT NOT NULL              -- fire | escalate | clear
);
CREATE INDEX IF NOT EXISTS alarm_jobs_by_alarm ON alarm_jobs(rule, akey);

CREATE TABLE IF NOT EXISTS alarm_inbox (
    id       INTEGER PRIMARY KEY,
    rule     TEXT NOT NULL,
    akey     TEXT NOT NULL,
    episode  INTEGER,                   -- NULL: the alarm's current firing
    by       TEXT NOT NULL,
    note     TEXT,
    at       REAL NOT NULL,
    source   TEXT NOT NULL              -- delivery | cli
);

CREATE TABLE IF NOT EXISTS alarm_stats (
    rule        TEXT PRIMARY KEY,
    evaluated   INTEGER NOT NULL DEFAULT 0,
    unparseable INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS alarm_meta (
    name  TEXT PRIMARY KEY,
    value REAL NOT NULL
);
"""

# ``by`` names the channel the ack came by (acks.via): ``mqtt:<device_id>`` (the device's
# own account: a device may publish on its own ack topic only), ``ack-url`` (whoever holds the
# signed URL: not necessarily the device), ``simulation:<device_id>``.
TRIGGER = """
CREATE TRIGGER alarm_opened_ack AFTER INSERT ON acks
WHEN NEW.status = 'opened'
BEGIN
    INSERT INTO alarm_inbox(rule, akey, episode, by, note, at, source)
    SELECT j.rule, j.akey, j.episode,
           CASE WHEN NEW.via = 'ack-url' THEN 'ack-url' ELSE COALESCE(NEW.via, 'device') || ':' || NEW.device_id END,
           NULL, NEW.received_at, 'delivery'
    FROM deliveries d JOIN alarm_jobs j ON j.job_id = d.job_id
    WHERE d.message_id = NEW.message_id AND j.kind != 'clear';
END""".strip()


def _v1_tables(conn: sqlite3.Connection) -> None:
    """The alarm tables and the opened-ack trigger (the pipeline's ``acks`` and
    ``deliveries`` exist: the registry migrates the pipeline first). An older gateway's
    trigger (one that named every ack ``device:<id>``) is replaced; an equal one is left
    alone (a schema change makes every other connection re-prepare its statements)."""
    run_script(conn, DDL)
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'alarm_opened_ack'").fetchone()
    if row is None or row[0] != TRIGGER:
        conn.execute("DROP TRIGGER IF EXISTS alarm_opened_ack")
        conn.execute(TRIGGER)


def _v2_state_index(conn: sqlite3.Connection) -> None:
    """Alarms of a state in key order from the index alone (the page lists them by rule
    and key, a page at a time): ``alarms_by_state`` gains the key columns."""
    conn.execute("DROP INDEX IF EXISTS alarms_by_state")
    conn.execute("CREATE INDEX alarms_by_state ON alarms(state, rule, akey)")


# The alarm tables' migrations, oldest first (gateway.migrations): never edit a released one.
MIGRATIONS = (_v1_tables, _v2_state_index)


def has_tables(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alarms'").fetchone() is not None


# ------------------------------------------------------------------ rows
_COLUMNS = ("rule", "akey", "state", "topic", "value", "last_value", "since", "fired_at", "acknowledged_by", "note",
            "escalation_step", "episode", "seq", "jobs", "due_at", "last_seen", "version", "published_version",
            "updated_at")
_UPSERT = (f"INSERT INTO alarms({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           "ON CONFLICT(rule, akey) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[2:]))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def row_from_db(r: sqlite3.Row) -> AlarmRow:
    return AlarmRow(
        rule=r["rule"], key=r["akey"], state=AlarmState(r["state"]), topic=r["topic"], value=_loads(r["value"]),
        last_value=_loads(r["last_value"]), since=r["since"], fired_at=r["fired_at"],
        acknowledged_by=r["acknowledged_by"], note=r["note"], escalation_step=r["escalation_step"],
        episode=r["episode"], seq=r["seq"], jobs=json.loads(r["jobs"]), due_at=r["due_at"], last_seen=r["last_seen"],
        version=r["version"], published_version=r["published_version"], updated_at=r["updated_at"])


def _row_params(row: AlarmRow) -> tuple[Any, ...]:
    return (row.rule, row.key, row.state, row.topic, json.dumps(row.value), json.dumps(row.last_value), row.since,
            row.fired_at, row.acknowledged_by, row.note, row.escalation_step, row.episode, row.seq,
            json.dumps(row.jobs), row.due_at, row.last_seen, row.version, row.published_version, row.updated_at)


def write_rows(conn: sqlite3.Connection, rows: list[AlarmRow]) -> None:
    conn.executemany(_UPSERT, [_row_params(r) for r in rows])


def load(conn: sqlite3.Connection) -> tuple[list[AlarmRow], dict[str, tuple[int, int]], float | None]:
    rows = [row_from_db(r) for r in conn.execute("SELECT * FROM alarms")]
    stats = {r["rule"]: (r["evaluated"], r["unparseable"]) for r in conn.execute("SELECT * FROM alarm_stats")}
    alive = conn.execute("SELECT value FROM alarm_meta WHERE name = 'alive_at'").fetchone()
    return rows, stats, alive[0] if alive else None


def delete_rows(conn: sqlite3.Connection, keys: list[tuple[str, str]]) -> None:
    conn.executemany("DELETE FROM alarms WHERE rule = ? AND akey = ?", keys)
    conn.executemany("DELETE FROM alarm_jobs WHERE rule = ? AND akey = ?", keys)


# ------------------------------------------------------------------ the engine's commit
def _notified_target(conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, Any] | None:
    """Everyone an episode's jobs reached or are about to reach, as one job target."""
    if not job_ids:
        return None
    rows = list(pipeline_jobs.job_rows(conn, job_ids).values())
    targets = [json.loads(r["target"]) for r in rows]
    if not targets:
        return None
    if any(t.get("all") for t in targets):
        return {"all": True}
    distinct = {json.dumps(t, sort_keys=True) for t in targets}
    if len(distinct) == 1:
        return targets[0]
    devices: set[str] = set()
    for r, target in zip(rows, targets):
        if r["expanded"]:
            devices.update(pipeline_deliveries.devices_of_job(conn, r["job_id"]))
        elif "devices" in target:
            devices.update(target["devices"])
        elif "segment" in target:
            devices.update(pipeline_registry.in_segment(conn, target["segment"]))
        elif "people" in target:  # not expanded yet: each person's devices, as the job would try them
            from gateway.people import store as people_store

            for person in people_store.get_many(conn, list(target["people"])).values():
                devices.update(person.devices)
    if not devices:
        return None
    return {"devices": sorted(devices)[:MAX_NOTIFIED_DEVICES]}


def commit(conn: sqlite3.Connection, batch: Batch) -> list[str]:
    """Submit the batch's jobs and write its rows, in this one transaction. Returns the
    job ids submitted. Job ids are taken by the alarm's counter; one that exists already
    (a pruned alarm's old job, a hand-made job) is skipped, so no alarm job is swallowed by
    the pipeline's idempotency."""
    submitted: list[str] = []
    for row, plan in batch.jobs:
        target = plan.target if plan.target is not None else _notified_target(conn, list(plan.episode_jobs))
        if target is None:
            continue  # nobody was notified (every earlier job failed validation): nothing to clear
        while True:
            row.seq += 1
            job_id = job_id_for(row.rule, row.key, row.seq)
            try:
                parsed = build_job(job_id, plan, target)
            except InputError:
                # Cannot happen for a checked rule; never let one alarm stop the others.
                pipeline_jobs.bump(conn, "alarm_jobs_invalid")
                job_id = ""
                break
            if pipeline_jobs.insert_job(conn, parsed, "alarm", batch.now):
                break
        if not job_id:
            continue
        conn.execute("INSERT OR REPLACE INTO alarm_jobs(job_id, rule, akey, episode, kind) VALUES (?, ?, ?, ?, ?)",
                     (job_id, row.rule, row.key, plan.episode, plan.kind))
        plan.episode_jobs.append(job_id)
        submitted.append(job_id)
    write_rows(conn, list(batch.drafts.values()))
    if batch.inbox_ids:
        conn.executemany("DELETE FROM alarm_inbox WHERE id = ?", [(i,) for i in batch.inbox_ids])
    return submitted


def rules_of_jobs(conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, str]:
    """job_id → the rule that submitted it, for those of ``job_ids`` that are alarm jobs
    (the pipeline asks: a person may have muted the rule)."""
    rows = conn.execute("SELECT job_id, rule FROM alarm_jobs WHERE job_id IN (SELECT value FROM json_each(?))",
                        (json.dumps(job_ids),))
    return {r[0]: r[1] for r in rows}


def read_inbox(conn: sqlite3.Connection, limit: int = 500) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM alarm_inbox ORDER BY id LIMIT ?", (limit,)).fetchall()


def flush(conn: sqlite3.Connection, rows: list[AlarmRow], stats: dict[str, tuple[int, int]],
          alive_at: float | None, delete: list[tuple[str, str]]) -> None:
    """What is kept lazily: stale watches' ``last_seen``, published versions, counters,
    the gateway's last sign of life, and rows whose retained state has been cleared."""
    write_rows(conn, rows)
    conn.executemany("INSERT INTO alarm_stats(rule, evaluated, unparseable) VALUES (?, ?, ?) ON CONFLICT(rule) "
                     "DO UPDATE SET evaluated = excluded.evaluated, unparseable = excluded.unparseable",
                     [(k, e, u) for k, (e, u) in stats.items()])
    if alive_at is not None:
        conn.execute("INSERT INTO alarm_meta(name, value) VALUES ('alive_at', ?) "
                     "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (alive_at,))
    if delete:
        delete_rows(conn, delete)


# ------------------------------------------------------------------ readers (CLI, status, metrics)
def list_states(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """AlarmState objects (contract §11), by rule and key; stale watches that never alarmed are left out."""
    if not has_tables(conn):
        return []
    rows = conn.execute("SELECT * FROM alarms WHERE state != 'idle' ORDER BY rule, akey")
    return [row_from_db(r).state_json() for r in rows]


def get_row(conn: sqlite3.Connection, rule: str, key: str) -> AlarmRow | None:
    if not has_tables(conn):
        return None
    r = conn.execute("SELECT * FROM alarms WHERE rule = ? AND akey = ?", (rule, key)).fetchone()
    return row_from_db(r) if r else None


def firing(conn: sqlite3.Connection) -> list[dict[str, Any]] | None:
    """Alarms firing now, by rule: ``rule``, ``key``, ``value`` (as stored), ``since`` and
    ``fired_at`` (epoch s), for ``status``; None on a database without the alarm tables."""
    if not has_tables(conn):
        return None
    return [{"rule": r[0], "key": r[1], "value": r[2], "since": r[3], "fired_at": r[4]} for r in conn.execute(
        "SELECT rule, akey, value, since, fired_at FROM alarms WHERE state = 'firing' ORDER BY rule")]


def by_state(conn: sqlite3.Connection) -> dict[str, int] | None:
    """Alarm records per state, idle included (``/metrics``); None without the alarm tables."""
    if not has_tables(conn):
        return None
    return {r[0]: int(r[1]) for r in conn.execute("SELECT state, COUNT(*) FROM alarms GROUP BY state")}


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Alarms per state plus the per-rule counters summed, for ``status`` and ``/metrics``:
    ``{"pending", "firing", "acknowledged", "cleared", "evaluated", "unparseable"}``.
    Works on a database the alarm service never ran on (all zero)."""
    out = {s.value: 0 for s in ALARM_STATES} | {"evaluated": 0, "unparseable": 0}
    if not has_tables(conn):
        return out
    for r in conn.execute("SELECT state, COUNT(*) FROM alarms WHERE state != 'idle' GROUP BY state"):
        if r[0] in out:
            out[r[0]] = r[1]
    r = conn.execute("SELECT COALESCE(SUM(evaluated), 0), COALESCE(SUM(unparseable), 0) FROM alarm_stats").fetchone()
    out["evaluated"], out["unparseable"] = r[0], r[1]
    return out


def rule_stats(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    if not has_tables(conn):
        return {}
    return {r["rule"]: {"evaluated": r["evaluated"], "unparseable": r["unparseable"]}
            for r in conn.execute("SELECT * FROM alarm_stats ORDER BY rule")}


# ------------------------------------------------------------------ readers (the operator page)
def digest(conn: sqlite3.Connection) -> tuple[Any, ...]:
    """Changes whenever an alarm changes state or escalates (what a view must refetch on);
    empty without the alarm tables."""
    if not has_tables(conn):
        return ()
    return tuple(conn.execute("SELECT state, COUNT(*), MAX(updated_at), SUM(version) FROM alarms "
                              "WHERE state != 'idle' GROUP BY state ORDER BY state").fetchall())


def rows_in_state(conn: sqlite3.Connection, state: str, after: tuple[str, str], limit: int) -> list[sqlite3.Row]:
    """Up to ``limit`` stored rows in ``state`` by (rule, key) after ``after`` (index
    ``alarms_by_state``); empty without the alarm tables."""
    if not has_tables(conn):
        return []
    return conn.execute("SELECT * FROM alarms WHERE state = ? AND (rule, akey) > (?, ?) "
                        "ORDER BY rule, akey LIMIT ?", (state, after[0], after[1], limit)).fetchall()


def stored_row(conn: sqlite3.Connection, rule: str, key: str) -> sqlite3.Row | None:
    """One stored row as it is (``idle`` included), or None."""
    if not has_tables(conn):
        return None
    return conn.execute("SELECT * FROM alarms WHERE rule = ? AND akey = ?", (rule, key)).fetchone()


def request_ack(conn: sqlite3.Connection, rule: str, key: str, by: str, note: str | None, now: float) -> None:
    """An operator's ack (the CLI): the running engine applies it within a poll interval."""
    conn.execute("INSERT INTO alarm_inbox(rule, akey, episode, by, note, at, source) VALUES (?, ?, NULL, ?, ?, ?, 'cli')",
                 (rule, key, by, note, now))


def shift_deadlines(conn: sqlite3.Connection, delta: float) -> int:
    """Move the alarm timers by ``delta`` s (gateway.clock re-anchored): ``due_at`` of
    pending (for_s) and firing (next escalation) alarms, stale watches' ``last_seen``, and
    the last sign of life the downtime is counted from. ``since`` and ``fired_at`` are
    history and stay."""
    return (clock.shift_columns(conn, "alarms", "due_at", delta, "state IN ('pending', 'firing')")
            + clock.shift_columns(conn, "alarms", "last_seen", delta)
            + clock.shift_columns(conn, "alarm_meta", "value", delta, "name = 'alive_at'"))
