"""The pipeline's tables. Counts per job are kept incrementally in ``jobs`` (one row
update per batch) so status never needs a scan of a 100,000-row job."""

from __future__ import annotations

import sqlite3

from gateway import stats

VERSION = 2

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

CREATE TABLE IF NOT EXISTS acks (
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


def migrate(conn: sqlite3.Connection) -> None:
    """Create or upgrade the tables in the caller's transaction (idempotent; also run by the CLI)."""
    _run_script(conn, TABLES)
    for table, column, decl, backfill in ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if backfill:
                conn.execute(backfill)
    for name in DROPPED_INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    _run_script(conn, INDEXES)
    stats.prepare(conn)  # the aggregates every write of deliveries keeps (gateway.stats.tracking)
    if conn.execute("PRAGMA user_version").fetchone()[0] != VERSION:
        conn.execute(f"PRAGMA user_version = {VERSION}")


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the caller's transaction; run statements one by one.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
