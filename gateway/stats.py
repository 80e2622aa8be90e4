"""Delivery aggregates for ``/metrics`` and ``status``, kept by the pipeline's writes.

Counting deliveries per (platform, state) with ``GROUP BY`` is a scan of the deliveries
table: millions of rows on a site that keeps 30 days of jobs to 100,000 devices, on every
Prometheus scrape. Instead, two small tables are kept exact in the same transaction as each
change to the deliveries table (an insert, a state or platform change, a deletion by
retention):

- ``delivery_stats(platform, state, n)``: deliveries now in each state, per platform (the
  bridge a queued delivery is routed to where the pipeline keeps ``route``, else the
  channel of the last attempt; ``''`` when neither is known yet).
- ``ack_latency_stats(platform, le, n, total_ms)``: first acks per platform and latency
  bucket (``le`` in ms, -1 = above the last bound); only ever grows, like a Prometheus
  histogram, also when old deliveries are pruned.

Every write to ``deliveries`` goes through one class,
``gateway.pipeline.deliveries.DeliveryWriter`` (a test's SQLite authorizer fails any
other): it knows each row it changes before and after (it read the row once in the
transaction, or wrote it), and makes one upsert per (platform, state) whose count moved
and per latency bucket that grew (:func:`apply_counts`), once per batch. Not row-level
triggers: those cost two or three trigger statements per changed row (SQLite has no
statement-level triggers), several times the cost of the row update itself.

Its migration (``MIGRATIONS``, run by :mod:`gateway.migrations`) creates the tables and
drops those triggers where an older gateway made them; :func:`check`, at every start,
recounts both tables from the deliveries table where they cannot be trusted: the cheap
check of :func:`stale` (the total, and the queued rows
per platform, read from indexes) disagrees. That is what a writer that bypassed
the one writer (a hand-made repair, an older tool) leaves behind when it inserted or
deleted rows or touched the queue; a bypass that only moves rows between final states or
platforms is not seen by that check: ``DELETE FROM delivery_stats`` forces a full recount
at the next start. Everything else here
is a read that costs a handful of rows whatever the fleet size.
"""

from __future__ import annotations

import bisect
import sqlite3
from typing import Any

from gateway import clock
from gateway.storage import run_script

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

# The row-level triggers an older gateway kept the tables with; dropped by migrate().
OLD_TRIGGERS = ("delivery_stats_insert", "delivery_stats_delete", "delivery_stats_update", "ack_latency_stats_update")
QUEUED_INDEX = "deliveries_queued_by_platform"


# A delivery's platform: ``route`` (the bridge a queued delivery is due on, or the one it was
# sent on), else ``platform`` (the channel of the last attempt), else '' (not routed yet).
# Both columns exist in every database the schema registry migrated.
PLATFORM_KEY = "COALESCE(route, platform, '')"


def platform_key(conn: sqlite3.Connection | None = None, alias: str = "") -> str:
    """:data:`PLATFORM_KEY`, its columns prefixed with ``alias``."""
    if not alias:
        return PLATFORM_KEY
    return f"COALESCE({alias}.route, {alias}.platform, '')"


def bucket_of(latency_ms: float) -> float:
    """The histogram bucket (``le``) of a latency; -1.0 above the last bound."""
    i = bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)
    return LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else -1.0


def apply_counts(conn: sqlite3.Connection, counts: dict[tuple[str, str], int],
                 latency: dict[tuple[str, float], list[float]]) -> None:
    """Move the aggregates by what a batch changed: ``counts`` (platform key, state) → rows
    gained (negative: lost), ``latency`` (platform key, bucket) → [acks, sum of ms]. Called
    by the deliveries' one writer (gateway.pipeline.deliveries.DeliveryWriter) once per
    batch, in the batch's transaction: the aggregates commit or roll back with the rows,
    so they stay exact after a crash (kill -9) too."""
    moved = [(platform, state, n) for (platform, state), n in counts.items() if n]
    if moved:
        conn.executemany("INSERT INTO delivery_stats(platform, state, n) VALUES (?, ?, ?) "
                         "ON CONFLICT(platform, state) DO UPDATE SET n = n + excluded.n", moved)
    if latency:
        conn.executemany("INSERT INTO ack_latency_stats(platform, le, n, total_ms) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(platform, le) DO UPDATE SET n = n + excluded.n, "
                         "total_ms = total_ms + excluded.total_ms",
                         [(p, le, v[0], v[1]) for (p, le), v in latency.items()])


def stale(conn: sqlite3.Connection) -> bool:
    """Whether the kept counts disagree with the deliveries table on its total or on its
    queued rows per platform (the queue that ``/metrics`` and ``/healthz`` watch). Both are
    read from indexes (the queued ones from the partial :data:`QUEUED_INDEX`): a few ms for
    100,000 rows kept, no scan of the table."""
    key = PLATFORM_KEY
    kept = {(p, s): n for p, s, n in conn.execute("SELECT platform, state, n FROM delivery_stats")}
    total = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    queued = {p: n for p, n in conn.execute(f"SELECT {key}, COUNT(*) FROM deliveries INDEXED BY {QUEUED_INDEX} "
                                            f"WHERE state = 'queued' GROUP BY 1")}
    kept_queued = {p: n for (p, s), n in kept.items() if s == "queued" and n}
    return sum(kept.values()) != total or kept_queued != queued


def counted(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """(platform, state) → deliveries, counted from the deliveries table (a scan): for a
    database whose aggregates do not exist yet (made before them, not opened since). The
    platform is the channel of the last attempt, the one column every version had."""
    return {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT COALESCE(platform, ''), state, COUNT(*) FROM deliveries GROUP BY 1, 2")}


def recount(conn: sqlite3.Connection) -> None:
    """Rebuild both aggregates from the deliveries table (a scan of every delivery kept)."""
    key = PLATFORM_KEY
    conn.execute("DELETE FROM delivery_stats")
    conn.execute(f"INSERT INTO delivery_stats(platform, state, n) SELECT {key}, state, COUNT(*) "
                 "FROM deliveries GROUP BY 1, 2")
    conn.execute("DELETE FROM ack_latency_stats")
    conn.execute(f"INSERT INTO ack_latency_stats(platform, le, n, total_ms) "
                 f"SELECT {key}, {_BUCKET_CASE.format(v='latency_ms')} AS le, COUNT(*), "
                 f"SUM(latency_ms) FROM deliveries WHERE state = 'acknowledged' AND latency_ms IS NOT NULL "
                 f"GROUP BY 1, 2")


def _v1_tables(conn: sqlite3.Connection) -> None:
    """The aggregate tables and the queued index on the platform key; an older gateway's
    row triggers dropped (they kept the counts exact up to here). An index made on an
    older key (before deliveries had ``route``) is made again on today's, and the counts
    recounted on it. Besides this module's reads, the pipeline's per-job lookups of queued
    rows (``deliveries.expiring``) use the index: it is the one index on queued rows by job."""
    run_script(conn, TABLES)
    for name in OLD_TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    conn.execute("DROP INDEX IF EXISTS deliveries_queued_by_job")  # this module's earlier name
    index = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?",
                         (QUEUED_INDEX,)).fetchone()
    changed = index is not None and PLATFORM_KEY not in index[0]
    if changed:
        conn.execute(f"DROP INDEX {QUEUED_INDEX}")  # the columns changed: index the new key
    conn.execute(f"CREATE INDEX IF NOT EXISTS {QUEUED_INDEX} ON deliveries(job_id, {PLATFORM_KEY}) "
                 "WHERE state = 'queued'")
    if changed:
        recount(conn)


# This module's migrations, oldest first (gateway.migrations): never edit a released one.
MIGRATIONS = (_v1_tables,)


def check(conn: sqlite3.Connection) -> None:
    """At every start (after the migrations): recount both aggregates when :func:`stale`
    finds them off. Otherwise nothing is recounted: the recount is a scan of every
    delivery kept (0.3 s for 100,000 rows on the development machine) on the way to READY."""
    if stale(conn):
        recount(conn)


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


__all__ = ["LATENCY_BUCKETS_MS", "MIGRATIONS", "PLATFORM_KEY", "UNASSIGNED", "ack_latency", "apply_counts", "check",
           "delivery_counts", "has_table", "recount", "stale"]
