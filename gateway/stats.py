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

Every write to ``deliveries`` (gateway/pipeline/store.py is the only writer: expansion,
results, acks, retention) moves the aggregates in its own transaction, once per batch:
:func:`tracking` reads the rows a batch touches before and after its statements (``IN``
lookups by primary key) and :func:`apply_changes` makes one upsert per (platform, state)
whose count moved and per latency bucket that grew. Where the store already knows both
sides (the rows it inserts as written; the acks, whose rows it has just read and whose
updates are unconditional) it calls :func:`apply_changes` without the reads. Not row-level
triggers: those cost two or three trigger statements per changed row (SQLite has no
statement-level triggers), several times the cost of the row update itself.

``migrate`` creates the tables, drops those triggers where an older gateway made them, and
recounts both tables from the deliveries table at a start where they cannot be trusted: the
platform key changed, or the cheap check of :func:`stale` (the total, and the queued rows
per platform, read from indexes) disagrees. That is what a writer that bypassed
:func:`tracking` (a hand-made repair, an older tool) leaves behind when it inserted or
deleted rows or touched the queue; a bypass that only moves rows between final states or
platforms is not seen by that check: ``DELETE FROM delivery_stats`` forces a full recount
at the next start. Everything else here
is a read that costs a handful of rows whatever the fleet size.
"""

from __future__ import annotations

import bisect
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from gateway import clock

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


def bucket_of(latency_ms: float) -> float:
    """The histogram bucket (``le``) of a latency; -1.0 above the last bound."""
    i = bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)
    return LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else -1.0


_Row = tuple[str, str, Any]  # platform key, state, latency_ms


def snapshot(conn: sqlite3.Connection, ids: list[str]) -> dict[str, _Row]:
    """message_id → (platform key, state, latency_ms) of those of ``ids`` that exist."""
    key = platform_key(conn)  # one PRAGMA per batch; the columns may differ between databases
    out: dict[str, _Row] = {}
    # The ids as one JSON array: one statement text whatever their number, prepared once
    # (an IN list of n marks is a new statement for every n).
    for r in conn.execute(f"SELECT message_id, {key}, state, latency_ms FROM deliveries "
                          "WHERE message_id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)):
        out[r[0]] = (r[1], r[2], r[3])
    return out


@contextmanager
def tracking(conn: sqlite3.Connection, message_ids: Iterable[str], inserted: bool = False) -> Iterator[None]:
    """Keep the aggregates exact across the deliveries writes made inside the block.

    ``message_ids`` are every delivery the block may insert, change or delete (others are
    not looked at). ``inserted=True`` says the ids are new (fresh primary keys), so there is
    nothing to read before. Must run inside the writes' transaction: the aggregates commit
    or roll back with the rows, so they stay exact after a crash (kill -9) too."""
    ids = list(dict.fromkeys(message_ids))
    if not ids:
        yield
        return
    before = {} if inserted else snapshot(conn, ids)
    yield
    after = snapshot(conn, ids)
    apply_changes(conn, before, after)


def apply_changes(conn: sqlite3.Connection, before: dict[str, _Row], after: dict[str, _Row]) -> None:
    """One upsert per (platform, state) whose count moved and per latency bucket that grew."""
    counts: Counter[tuple[str, str]] = Counter()
    latency: dict[tuple[str, float], list[float]] = {}
    for mid, old in before.items():
        new = after.get(mid)
        if new is None or new[:2] != old[:2]:
            counts[old[:2]] -= 1
    for mid, new in after.items():
        old = before.get(mid)
        if old is None or new[:2] != old[:2]:
            counts[new[:2]] += 1
        if new[1] == "acknowledged" and (old is None or old[1] != "acknowledged") and new[2] is not None:
            slot = latency.setdefault((new[0], bucket_of(float(new[2]))), [0, 0.0])
            slot[0] += 1
            slot[1] += float(new[2])
    apply_counts(conn, counts, latency)


def apply_counts(conn: sqlite3.Connection, counts: dict[tuple[str, str], int],
                 latency: dict[tuple[str, float], list[float]]) -> None:
    """Move the aggregates by what a batch changed: ``counts`` (platform key, state) → rows
    gained (negative: lost), ``latency`` (platform key, bucket) → [acks, sum of ms]. For
    writers that know the changes without a before/after pair (the store's hot paths:
    expansion, acks); :func:`apply_changes` ends here too."""
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
    key = platform_key(conn)
    kept = {(p, s): n for p, s, n in conn.execute("SELECT platform, state, n FROM delivery_stats")}
    total = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    queued = {p: n for p, n in conn.execute(f"SELECT {key}, COUNT(*) FROM deliveries INDEXED BY {QUEUED_INDEX} "
                                            f"WHERE state = 'queued' GROUP BY 1")}
    kept_queued = {p: n for (p, s), n in kept.items() if s == "queued" and n}
    return sum(kept.values()) != total or kept_queued != queued


def recount(conn: sqlite3.Connection) -> None:
    """Rebuild both aggregates from the deliveries table (a scan of every delivery kept)."""
    key = platform_key(conn)
    conn.execute("DELETE FROM delivery_stats")
    conn.execute(f"INSERT INTO delivery_stats(platform, state, n) SELECT {key}, state, COUNT(*) "
                 "FROM deliveries GROUP BY 1, 2")
    conn.execute("DELETE FROM ack_latency_stats")
    conn.execute(f"INSERT INTO ack_latency_stats(platform, le, n, total_ms) "
                 f"SELECT {key}, {_BUCKET_CASE.format(v='latency_ms')} AS le, COUNT(*), "
                 f"SUM(latency_ms) FROM deliveries WHERE state = 'acknowledged' AND latency_ms IS NOT NULL "
                 f"GROUP BY 1, 2")


def prepare(conn: sqlite3.Connection) -> None:
    """Create the tables and drop an older gateway's triggers (they kept the counts exact up
    to here, so this needs no recount). Run by the pipeline's ``schema.migrate`` too, so
    that no writer of deliveries ever runs with both the triggers and :func:`tracking`, or
    without the tables.

    It also makes sure the queued index exists (created on the platform key as it is now
    when missing; :func:`migrate` re-makes it when the key changed): besides this module's
    reads, the pipeline's per-job lookups of queued rows (``store.expiring``) use it, so it
    is the one index on queued rows by job (a second one would cost a B-tree write per delivery)."""
    for statement in TABLES.strip().split(";"):
        if statement.strip():
            conn.execute(statement)
    for name in OLD_TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    if has_table(conn, "deliveries"):
        conn.execute(f"CREATE INDEX IF NOT EXISTS {QUEUED_INDEX} ON deliveries(job_id, {platform_key(conn)}) "
                     "WHERE state = 'queued'")


def migrate(conn: sqlite3.Connection) -> None:
    """Create the tables and the queued index for the deliveries table as it is now, drop an
    older gateway's triggers, and recount both aggregates when they cannot be trusted.

    A recount happens when the platform key changed (a ``route`` column appeared: the index
    is re-made on it) or :func:`stale` finds the counts off. Otherwise nothing is recounted:
    the recount is a scan of every delivery kept (0.3 s for 100,000 rows on the development
    machine) on the way to READY."""
    prepare(conn)
    key = platform_key(conn)
    conn.execute("DROP INDEX IF EXISTS deliveries_queued_by_job")  # this module's earlier name
    index = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?",
                         (QUEUED_INDEX,)).fetchone()
    changed = index is not None and key not in index[0]
    if changed:
        conn.execute(f"DROP INDEX {QUEUED_INDEX}")  # the columns changed: index the new key
    conn.execute(f"CREATE INDEX IF NOT EXISTS {QUEUED_INDEX} ON deliveries(job_id, {key}) WHERE state = 'queued'")
    if changed or stale(conn):
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


def oldest_queued(conn: sqlite3.Connection, now: float | None = None) -> dict[str, float]:
    """platform → age (s) of the oldest queued delivery, counted from its job's creation.

    Only jobs with queued deliveries are visited (their count is kept on the job row), and
    each platform's oldest is found from the oldest job down, one probe of the partial
    index :data:`QUEUED_INDEX` (queued rows only) each.
    """
    now = clock.now() if now is None else now
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
    now = clock.now() if now is None else now
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
    """Alarms in state ``firing`` when the alarms table exists, else None."""
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
           "device_count", "jobs_by_state", "migrate", "oldest_queued", "oldest_queued_overall", "prepare", "recount",
           "snapshot", "apply_changes", "stale", "tracking", "upstream_backlog"]
