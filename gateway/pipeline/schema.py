"""The pipeline's tables (devices, jobs, deliveries, acks, counters, status_clears) and
their migrations, run by the schema registry (:mod:`gateway.migrations`). Counts per job
are kept incrementally in ``jobs`` (one row update per batch) so status never needs a scan
of a 100,000-row job.

The DDL below is the schema as of the first migration: later changes are migrations of
their own (the acks' repeat count, the page's tag table), not edits of it."""

from __future__ import annotations

import sqlite3

from gateway.storage import run_script

TABLES = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    segment     TEXT,
    tags        TEXT NOT NULL DEFAULT '[]',
    channels    TEXT NOT NULL,            -- JSON list, in order of preference
    invalid     TEXT NOT NULL DEFAULT '{}', -- JSON {"<platform>|<address>": {"at": iso, "reason": str}}
    source      TEXT NOT NULL DEFAULT 'cli',
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_segment ON devices(segment, device_id);

CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    state         TEXT NOT NULL,          -- accepted | rejected | dispatching | completed | acknowledged
    source        TEXT NOT NULL,
    target        TEXT NOT NULL,          -- JSON
    notification  TEXT NOT NULL,          -- JSON
    options       TEXT NOT NULL,          -- JSON
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    ttl           INTEGER NOT NULL,
    expand_cursor TEXT,                   -- last device_id expanded (NULL = not started)
    expanded      INTEGER NOT NULL DEFAULT 0,
    targets       INTEGER NOT NULL DEFAULT 0,
    queued        INTEGER NOT NULL DEFAULT 0,
    sent          INTEGER NOT NULL DEFAULT 0,
    acknowledged  INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    expired       INTEGER NOT NULL DEFAULT 0,
    invalid_address INTEGER NOT NULL DEFAULT 0,
    status_dirty  INTEGER NOT NULL DEFAULT 1,
    status_published_at REAL NOT NULL DEFAULT 0,
    status_published_state TEXT,
    error         TEXT,                   -- JSON {"code", "message"} (rejected, no_targets)
    cloud_dirty   INTEGER NOT NULL DEFAULT 0,  -- a status snapshot is owed to the cloud
    cloud_published_at REAL NOT NULL DEFAULT 0,
    cloud_published_state TEXT,
    logged_state  TEXT,                   -- last lifecycle state written to the log
    expanded_rows INTEGER NOT NULL DEFAULT 0    -- delivery rows made so far
);

CREATE TABLE IF NOT EXISTS deliveries (
    message_id  TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs(job_id),
    device_id   TEXT NOT NULL,
    state       TEXT NOT NULL,            -- queued | sent | acknowledged | failed | expired | invalid_address
    platform    TEXT,                     -- channel of the last attempt
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,
    sent_at     REAL,
    acked_at    REAL,
    latency_ms  REAL,
    last_error  TEXT,
    route       TEXT,                     -- bridge of the next attempt (queued) or of the send (sent)
    resend_at   REAL,                     -- sent, unacked: when to send it again (NULL = never)
    UNIQUE (job_id, device_id)
);

CREATE TABLE IF NOT EXISTS acks (        -- version 2: one row per status of a delivery
    id          INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    status      TEXT NOT NULL,
    at          TEXT NOT NULL,
    error       TEXT,
    received_at REAL NOT NULL,
    via         TEXT                      -- the channel it came by: mqtt | ack-url | simulation (NULL: older)
);

CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS status_clears (  -- pruned jobs whose retained status is still to clear
    job_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
"""

# Columns added after version 1: (table, column, declaration, back-fill for existing rows).
ADDED_COLUMNS = [
    ("jobs", "error", "TEXT", None),
    ("jobs", "cloud_dirty", "INTEGER NOT NULL DEFAULT 0", None),
    ("jobs", "cloud_published_at", "REAL NOT NULL DEFAULT 0", None),
    ("jobs", "cloud_published_state", "TEXT", None),
    ("jobs", "logged_state", "TEXT", "UPDATE jobs SET logged_state = state"),
    ("jobs", "expanded_rows", "INTEGER NOT NULL DEFAULT 0",
     "UPDATE jobs SET expanded_rows = (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = jobs.job_id)"),
    ("deliveries", "route", "TEXT", None),
    ("deliveries", "resend_at", "REAL", None),
    ("deliveries", "moved", "TEXT", None),  # why it left its channel for the device's next one
    ("acks", "via", "TEXT", None),
]

# Indexes an older gateway kept on ``deliveries`` that cost a B-tree insert and delete per
# delivery for nothing: ``deliveries_due(next_at)`` is served by
# ``deliveries_route_due`` (the earliest due time is a MIN per route), and
# ``deliveries_job_queued(job_id, route)`` by gateway.stats' queued index on
# ``(job_id, <platform key>)``, the same rows with the job first.
DROPPED_INDEXES = ("deliveries_due", "deliveries_job_queued")

INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_to_expand ON jobs(expanded, created_at) WHERE expanded = 0;
CREATE INDEX IF NOT EXISTS jobs_dirty ON jobs(status_dirty) WHERE status_dirty = 1;
CREATE INDEX IF NOT EXISTS jobs_cloud_dirty ON jobs(cloud_dirty) WHERE cloud_dirty = 1;
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(expires_at) WHERE state IN ('accepted', 'dispatching');
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(updated_at) WHERE state IN ('completed', 'acknowledged', 'rejected');
CREATE INDEX IF NOT EXISTS deliveries_route_due ON deliveries(route, next_at) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS deliveries_resend ON deliveries(route, resend_at) WHERE state = 'sent' AND resend_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_by_device ON deliveries(device_id, message_id);
CREATE INDEX IF NOT EXISTS acks_by_message ON acks(message_id);
"""


def _v1_base(conn: sqlite3.Connection) -> None:
    """The tables as the gateway kept them before the schema registry, from any older
    layout (columns added when missing, the wasted indexes dropped)."""
    run_script(conn, TABLES)
    for table, column, decl, backfill in ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if backfill:
                conn.execute(backfill)
    for name in DROPPED_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    run_script(conn, INDEXES)


def _v2_acks_once(conn: sqlite3.Connection) -> None:
    """Each status of a delivery is stored once (``acks_once``); later acks of it are
    counted on that row (``repeats``, ``last_received_at``). Acks stored before keep the
    first of each status and count the others as its repeats; the unique index replaces
    the plain one on message_id."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(acks)")}
    if "repeats" not in have:
        conn.execute("ALTER TABLE acks ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0")
    if "last_received_at" not in have:
        conn.execute("ALTER TABLE acks ADD COLUMN last_received_at REAL")
    conn.execute("CREATE TEMP TABLE acks_kept AS SELECT MIN(id) AS id, COUNT(*) - 1 AS repeats, "
                 "MAX(received_at) AS last_received_at FROM acks GROUP BY message_id, status HAVING COUNT(*) > 1")
    conn.execute("UPDATE acks SET repeats = k.repeats, last_received_at = k.last_received_at "
                 "FROM acks_kept AS k WHERE acks.id = k.id")
    conn.execute("DELETE FROM acks WHERE id NOT IN (SELECT MIN(id) FROM acks GROUP BY message_id, status)")
    conn.execute("DROP TABLE temp.acks_kept")
    conn.execute("DROP INDEX IF EXISTS acks_by_message")
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS acks_once ON acks(message_id, status)")


# Read paths of the operator page over the pipeline's tables: jobs newest first and by last
# change, and devices by tag. Tags are a JSON list in the devices row, which no index can
# reach, so ``device_tags`` keeps (tag, device_id) pairs, written by triggers on
# ``devices`` in the same statement as the row (a malformed tags value must never make a
# registration fail: it counts as no tags). The names are those the HTTP package gave them
# when it kept them (a database it made has them already).
DEVICE_TAGS = """
CREATE INDEX IF NOT EXISTS ui_jobs_by_created ON jobs(created_at, job_id);
CREATE INDEX IF NOT EXISTS ui_jobs_by_updated ON jobs(updated_at);
CREATE TABLE IF NOT EXISTS ui_device_tags (
    tag       TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (tag, device_id)
) WITHOUT ROWID;
"""
_TAGS = "(CASE WHEN json_valid({r}.tags) THEN {r}.tags ELSE '[]' END)"
DEVICE_TAG_TRIGGERS = {
    "ui_device_tags_insert": f"""
CREATE TRIGGER ui_device_tags_insert AFTER INSERT ON devices BEGIN
    INSERT INTO ui_device_tags(tag, device_id)
    SELECT value, NEW.device_id FROM json_each({_TAGS.format(r="NEW")}) WHERE type = 'text' ON CONFLICT DO NOTHING;
END""",
    "ui_device_tags_update": f"""
CREATE TRIGGER ui_device_tags_update AFTER UPDATE OF tags, device_id ON devices BEGIN
    DELETE FROM ui_device_tags WHERE device_id = OLD.device_id
        AND tag IN (SELECT value FROM json_each({_TAGS.format(r="OLD")}) WHERE type = 'text');
    INSERT INTO ui_device_tags(tag, device_id)
    SELECT value, NEW.device_id FROM json_each({_TAGS.format(r="NEW")}) WHERE type = 'text' ON CONFLICT DO NOTHING;
END""",
    "ui_device_tags_delete": f"""
CREATE TRIGGER ui_device_tags_delete AFTER DELETE ON devices BEGIN
    DELETE FROM ui_device_tags WHERE device_id = OLD.device_id
        AND tag IN (SELECT value FROM json_each({_TAGS.format(r="OLD")}) WHERE type = 'text');
END""",
}


def _v3_device_tags(conn: sqlite3.Connection) -> None:
    """The page's read paths (:data:`DEVICE_TAGS`), kept by the registry's owner. The tag
    table is counted again from ``devices`` unless it and every trigger were already there
    (made by the HTTP package of an older gateway, which kept it exact since). The triggers
    are made anew either way: the HTTP package's used ``INSERT OR IGNORE``, which the
    registry's own upsert of a device overrides (SQLite applies the outer statement's
    conflict rule inside triggers), so a device whose tags repeat one failed to register."""
    fresh = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ui_device_tags'").fetchone() is None
    run_script(conn, DEVICE_TAGS)
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    for name, ddl in DEVICE_TAG_TRIGGERS.items():
        if name not in have:
            fresh = True
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
        conn.execute(ddl)
    if fresh:
        conn.execute("DELETE FROM ui_device_tags")
        conn.execute(f"INSERT OR IGNORE INTO ui_device_tags(tag, device_id) SELECT j.value, d.device_id "
                     f"FROM devices d, json_each({_TAGS.format(r='d')}) j WHERE j.type = 'text'")


def _v4_error_until_ack(conn: sqlite3.Connection) -> None:
    """``deliveries.error_until_ack``: the delivery's ``last_error`` is a note that an ack
    makes untrue (the resends' "no ack after N sends"), so the first ack clears it by this
    flag, not by the note's wording. Rows that hold the note now are flagged."""
    if "error_until_ack" not in {r[1] for r in conn.execute("PRAGMA table_info(deliveries)")}:
        conn.execute("ALTER TABLE deliveries ADD COLUMN error_until_ack INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE deliveries SET error_until_ack = 1 WHERE state = 'sent' "
                 "AND last_error LIKE 'no ack after % sends; no more resends'")


# People (contract §12): a device's owner; a job that targets people keeps one row per
# (job, person) in ``job_people`` (whether and by which device the person was reached), the
# person each delivery is for (``deliveries.person_id``, NULL for other jobs: the partial
# index costs nothing for them) and the person counts of its JobStatus (``people_targets``
# NULL = the job targets no people).
PEOPLE = """
CREATE TABLE IF NOT EXISTS job_people (
    job_id     TEXT NOT NULL,
    person_id  TEXT NOT NULL,
    state      TEXT NOT NULL,         -- gateway.states.ReachState
    reached_at REAL,
    reached_by TEXT,                  -- the device whose ack reached the person
    note       TEXT,                  -- why the person was not (or not yet) reached
    PRIMARY KEY (job_id, person_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_person ON deliveries(person_id, job_id) WHERE person_id IS NOT NULL;
"""
PEOPLE_COLUMNS = [
    ("devices", "owner", "TEXT"),
    ("deliveries", "person_id", "TEXT"),
    ("jobs", "people_targets", "INTEGER"),
    ("jobs", "people_reached", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "people_held", "INTEGER NOT NULL DEFAULT 0"),
]


def _v5_people(conn: sqlite3.Connection) -> None:
    """Devices' owners, and what a job that targets people keeps (:data:`PEOPLE`)."""
    for table, column, decl in PEOPLE_COLUMNS:
        if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    run_script(conn, PEOPLE)


def _v6_suppressed(conn: sqlite3.Connection) -> None:
    """A job counts its ``suppressed`` deliveries (those for a person who muted the job's
    segment or alarm rule) beside the other states; older jobs had none."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    if "suppressed" not in have:
        conn.execute("ALTER TABLE jobs ADD COLUMN suppressed INTEGER NOT NULL DEFAULT 0")


# The pipeline's migrations, oldest first (gateway.migrations): never edit one that was
# released. Each is idempotent too (a database restored without its schema_versions row
# runs them again harmlessly).
MIGRATIONS = (_v1_base, _v2_acks_once, _v3_device_tags, _v4_error_until_ack, _v5_people, _v6_suppressed)
