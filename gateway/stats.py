"""Delivery aggregates for ``/metrics`` and ``status``, kept by SQLite triggers.

Counting deliveries per (platform, state) with ``GROUP BY`` is a scan of the deliveries
table: millions of rows on a site that keeps 30 days of jobs to 100,000 devices, on every
Prometheus scrape. Instead, triggers on ``deliveries`` keep two small tables exact in the
same transaction as each change (an insert, a state or platform change, a deletion by
retention), whichever process or component makes it:

- ``delivery_stats(platform, state, n)``: deliveries now in each state, per platform (the
  bridge a queued delivery is routed to where the pipeline keeps ``route``, else the
  channel of the last attempt; ``''`` when neither is known yet).
- ``ack_latency_stats(platform, le, n, total_ms)``: first acks per platform and latency
  bucket (``le`` in ms, -1 = above the last bound); only ever grows, like a Prometheus
  histogram, also when old deliveries are pruned.

``migrate`` creates them and, at a daemon start where the triggers are missing or differ from
what the deliveries table's columns call for, re-creates them and rebuilds both tables from
the deliveries table, so they heal themselves if anything ever bypassed the triggers. The triggers' writes count in
``Connection.total_changes``: code counting its own inserts must use ``cursor.rowcount``. Everything else
here is a read that costs a handful of rows whatever the fleet size.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

# Ack latency bucket bounds (ms): a push shown on a phone within 100 ms .. a PLC that was
# offline for an hour.
LATENCY_BUCKETS_MS = (50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
                      60000.0, 300000.0, 3600000.0)
UNASSIGNED = ""  # platform of a delivery that no bridge has attempted yet

_BUCKET_CASE = "CASE " + " ".join(f"WHEN {{v}} <= {b!r} THEN {b!r}" for b in LATENCY_BUCKETS_MS) + " ELSE -1.0 END"

TABLES = """
CREATE TABLE IF NOT EXISTS delivery_stats (
    platform TEXT NOT NULL,
    state    TEXT NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (platform, state)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ack_latency_stats (
    platform TEXT NOT NULL,
    le       REAL NOT NULL,
    n        INTEGER NOT NULL,
    total_ms REAL NOT NULL,
    PRIMARY KEY (platform, le)
) WITHOUT ROWID;
"""

# Re-created at every start from the deliveries table's columns (see platform_columns()).
TRIGGERS = ("delivery_stats_insert", "delivery_stats_delete", "delivery_stats_update", "ack_latency_stats_update")
QUEUED_INDEX = "deliveries_queued_by_platform"

DERIVED = """
CREATE INDEX IF NOT EXISTS {index} ON deliveries(job_id, {key}) WHERE state = 'queued';
CREATE TRIGGER delivery_stats_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_stats(platform, state, n) VALUES ({key_new}, NEW.state, 1)
    ON CONFLICT(platform, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_stats_delete AFTER DELETE ON deliveries BEGIN
    UPDATE delivery_stats SET n = n - 1 WHERE platform = {key_old} AND state = OLD.state;
END;
CREATE TRIGGER delivery_stats_update AFTER UPDATE OF state, {watched} ON deliveries
WHEN OLD.state IS NOT NEW.state OR {key_old} IS NOT {key_new} BEGIN
    UPDATE delivery_stats SET n = n - 1 WHERE platform = {key_old} AND state = OLD.state;
    INSERT INTO delivery_stats(platform, state, n) VALUES ({key_new}, NEW.state, 1)
    ON CONFLICT(platform, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER ack_latency_stats_update AFTER UPDATE OF state ON deliveries
WHEN NEW.state = 'acknowledged' AND OLD.state IS NOT 'acknowledged' AND NEW.latency_ms IS NOT NULL BEGIN
    INSERT INTO ack_latency_stats(platform, le, n, total_ms)
    VALUES ({key_new}, {bucket_new}, 1, NEW.latency_ms)
    ON CONFLICT(platform, le) DO UPDATE SET n = n + 1, total_ms = total_ms + excluded.total_ms;
END;
"""


def platform_columns(conn: sqlite3.Connection) -> list[str]:
    """Which delivery columns name its platform, in order of precedence.

    ``platform`` is the channel of the last attempt. A pipeline that also keeps ``route``
    (the bridge a queued delivery is due on) gives queued work its platform before the first
    attempt; it is preferred when present."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(deliveries)")}
    return [c for c in ("route", "platform") if c in cols]


def platform_key(conn: sqlite3.Connection, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return "COALESCE(" + ", ".join(f"{prefix}{c}" for c in platform_columns(conn)) + ", '')"


def migrate(conn: sqlite3.Connection) -> None:
    """Create the tables, (re)create the triggers and index for the deliveries table as it is
    now, and recount both aggregates from it.

    When every trigger and the index are already there exactly as they would be made now,
    nothing is re-created or recounted: triggers fire for every writer, so the aggregates
    can only have drifted while a trigger was missing or different (an older gateway, a
    changed deliveries table). The recount is a scan of every delivery kept (0.3 s for
    100,000 rows on the development machine) on the way to READY."""
    for statement in _statements(TABLES):
        conn.execute(statement)
    key = platform_key(conn)
    ddl = DERIVED.format(index=QUEUED_INDEX, key=key, key_new=platform_key(conn, "NEW"),
                         key_old=platform_key(conn, "OLD"), watched=", ".join(platform_columns(conn)),
                         bucket_new=_BUCKET_CASE.format(v="NEW.latency_ms"))
    wanted = {_normal(st) for st in _statements(ddl) if st.lstrip().upper().startswith("CREATE TRIGGER")}
    have = {_normal(r[0]) for r in conn.execute(
        f"SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name IN ({','.join('?' * len(TRIGGERS))})",
        TRIGGERS)}
    index = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?",
                         (QUEUED_INDEX,)).fetchone()
    if have == wanted and index is not None and key in index[0]:
        return  # exact since they were made: no recount
    for name in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    if index is not None and key not in index[0]:
        conn.execute(f"DROP INDEX {QUEUED_INDEX}")  # the columns changed: index the new key
    conn.execute("DROP INDEX IF EXISTS deliveries_queued_by_job")  # this module's earlier name
    for statement in _statements(ddl):
        conn.execute(statement)
    conn.execute("DELETE FROM delivery_stats")
    conn.execute(f"INSERT INTO delivery_stats(platform, state, n) SELECT {key}, state, COUNT(*) "
                 "FROM deliveries GROUP BY 1, 2")
    conn.execute("DELETE FROM ack_latency_stats")
    conn.execute(f"INSERT INTO ack_latency_stats(platform, le, n, total_ms) "
                 f"SELECT {key}, {_BUCKET_CASE.format(v='latency_ms')} AS le, COUNT(*), "
                 f"SUM(latency_ms) FROM deliveries WHERE state = 'acknowledged' AND latency_ms IS NOT NULL "
                 f"GROUP BY 1, 2")


def _normal(sql: str) -> str:
    """A statement's text without whitespace differences (sqlite_master keeps it as written)."""
    return " ".join(sql.replace("IF NOT EXISTS ", "").split()).rstrip(";")


def _statements(script: str) -> list[str]:
    """Split the DDL on ';' at the end of a line, keeping trigger bodies whole."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        stripped = line.strip()
        if stripped.endswith(";") and (not any("CREATE TRIGGER" in c for c in current) or stripped == "END;"):
            out.append("\n".join(current))
            current = []
    return out


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def delivery_counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """(platform, state) → deliveries now in that state (platform '' = not attempted yet)."""
    if not has_table(conn, "delivery_stats"):
        return {}
    return {(r[0], r[1]): int(r[2]) for r in conn.execute("SELECT platform, state, n FROM delivery_stats WHERE n != 0")}


def ack_latency(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    """platform → {"buckets": [(le_ms, cumulative count)...], "count", "sum_ms"} (le inf last)."""
    if not has_table(conn, "ack_latency_stats"):
        return {}
    raw: dict[str, dict[float, tuple[int, float]]] = {}
    for platform, le, n, total in conn.execute("SELECT platform, le, n, total_ms FROM ack_latency_stats"):
        raw.setdefault(platform, {})[float("inf") if le < 0 else le] = (int(n), float(total))
    out: dict[str, dict[str, Any]] = {}
    for platform, by_le in raw.items():
        cumulative, buckets = 0, []
        for bound in (*LATENCY_BUCKETS_MS, float("inf")):
            cumulative += by_le.get(bound, (0, 0.0))[0]
            buckets.append((bound, cumulative))
        out[platform] = {"buckets": buckets, "count": cumulative, "sum_ms": sum(t for _, t in by_le.values())}
    return out


def oldest_queued(conn: sqlite3.Connection, now: float | None = None) -> dict[str, float]:
    """platform → age (s) of the oldest queued delivery, counted from its job's creation.

    Only jobs with queued deliveries are visited (their count is kept on the job row), and
    each platform's oldest is found from the oldest job down, one probe of the partial
    index :data:`QUEUED_INDEX` (queued rows only) each.
    """
    now = time.time() if now is None else now
    platforms = [p for (p, s), n in delivery_counts(conn).items() if s == "queued" and n > 0]
    if not platforms:
        return {}
    key = platform_key(conn)
    out: dict[str, float] = {}
    for job_id, created_at in conn.execute("SELECT job_id, created_at FROM jobs WHERE queued > 0 ORDER BY created_at"):
        for platform in platforms:
            if platform in out:
                continue
            hit = conn.execute(f"SELECT 1 FROM deliveries WHERE job_id = ? AND state = 'queued' "
                               f"AND {key} = ? LIMIT 1", (job_id, platform)).fetchone()
            if hit is not None:
                out[platform] = max(0.0, now - created_at)
        if len(out) == len(platforms):
            break
    return out


def oldest_queued_overall(conn: sqlite3.Connection, now: float | None = None) -> float | None:
    now = time.time() if now is None else now
    row = conn.execute("SELECT MIN(created_at) FROM jobs WHERE queued > 0").fetchone()
    return None if row is None or row[0] is None else max(0.0, now - row[0])


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    if not has_table(conn, "counters"):
        return {}
    return {r[0]: int(r[1]) for r in conn.execute("SELECT name, value FROM counters")}


def jobs_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}


def device_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0])


def upstream_backlog(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The cloud link's outbox (rows, bytes, oldest age, dropped), or None without one."""
    if not has_table(conn, "upstream_outbox_state"):
        return None
    try:
        from gateway.upstream import outbox

        return outbox.stats(conn).as_dict()
    except (sqlite3.Error, ValueError, TypeError, AttributeError):
        return None  # a schema the upstream link changed: the link's own metrics still count


def alarms_firing(conn: sqlite3.Connection) -> list[dict[str, Any]] | None:
    """Alarms in state ``firing`` when the alarms table exists (issue 10), else None."""
    if not has_table(conn, "alarms"):
        return None
    try:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(alarms)")}
        if "state" not in cols:
            return None
        # gateway.alarms.store names the key column ``akey``; shown as ``key`` (AlarmState).
        names = [(c, "key" if c == "akey" else c) for c in ("rule", "akey", "key", "value", "since", "fired_at")
                 if c in cols]
        select = ", ".join(c for c, _ in names) or "state"
        rows = conn.execute(f"SELECT {select} FROM alarms WHERE state = 'firing' ORDER BY rule").fetchall()
        return [{label: v for (_, label), v in zip(names, r)} for r in rows]
    except sqlite3.Error:
        return None


def alarms_by_state(conn: sqlite3.Connection) -> dict[str, int] | None:
    """Alarm records per state (pending, firing, acknowledged, ...), or None without alarms."""
    if not has_table(conn, "alarms"):
        return None
    try:
        return {r[0]: int(r[1]) for r in conn.execute("SELECT state, COUNT(*) FROM alarms GROUP BY state")}
    except sqlite3.Error:
        return None


__all__ = ["LATENCY_BUCKETS_MS", "UNASSIGNED", "ack_latency", "alarms_by_state", "alarms_firing", "counters", "delivery_counts",
           "device_count", "jobs_by_state", "migrate", "oldest_queued", "oldest_queued_overall",
           "upstream_backlog"]
