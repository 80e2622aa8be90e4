"""The upstream outbox: what the gateway owes the cloud, kept in the gateway's SQLite.

Why a table and not a queue in memory: the cloud may be away for minutes or for days,
and the gateway may be killed meanwhile. The pipeline calls :func:`enqueue` with its own
connection inside the transaction that changes a job's status or stores an ack, so the
forward commits (or rolls back) together with the fact it reports; the drain in
:mod:`gateway.upstream.link` publishes rows in ``seq`` order and deletes each only after
the cloud broker's PUBACK (at least once, never silently lost).

Bounded by ``upstream.buffer_max_mb`` (stored here by :func:`configure`, so ``enqueue``
needs no config). The size of the buffer is kept as a running total in a one-row state
table by triggers, so the hot path is one small read and one INSERT, never a scan:

* below 90 % of the cap nothing but the INSERT happens;
* crossing 90 % logs one warning and coalesces status snapshots oldest first: a snapshot
  of a job that has a newer unsent snapshot is redundant (the status topic is retained,
  the newest one is what the cloud keeps). From then until the buffer drains below 80 %,
  each new snapshot replaces the unsent older ones of its job (one index lookup);
* only when a row would not fit under the cap are rows dropped, oldest acks first, then
  (acks exhausted) the oldest remaining status snapshots, each counted in ``dropped``.
  Acks are never dropped before the cap is reached.

The counters fall back under the warning level at 80 %, so the warning is logged once
per episode, not once per row.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

Kind = Literal["status", "ack"]
KINDS: frozenset[str] = frozenset({"status", "ack"})

NEAR_FRACTION = 0.9  # warn and start coalescing above this share of the cap
CLEAR_FRACTION = 0.8  # below this the episode is over (warning re-armed)
ROW_OVERHEAD = 64  # bytes counted per row besides topic and payload (seq, flags, index)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS upstream_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- never reused: the drain's cursor relies on it
    kind TEXT NOT NULL CHECK (kind IN ('status', 'ack')),
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    coalesce_key TEXT,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS upstream_outbox_by_key
    ON upstream_outbox (coalesce_key, seq) WHERE coalesce_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS upstream_outbox_by_kind ON upstream_outbox (kind, seq);
CREATE TABLE IF NOT EXISTS upstream_outbox_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    bytes INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    coalesced INTEGER NOT NULL DEFAULT 0,
    max_bytes INTEGER NOT NULL,
    near INTEGER NOT NULL DEFAULT 0,        -- above 90 % since last below 80 %
    dropping INTEGER NOT NULL DEFAULT 0     -- the "dropping" warning was logged this episode
);
CREATE TRIGGER IF NOT EXISTS upstream_outbox_added AFTER INSERT ON upstream_outbox BEGIN
    UPDATE upstream_outbox_state SET bytes = bytes + NEW.size, rows = rows + 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS upstream_outbox_removed AFTER DELETE ON upstream_outbox BEGIN
    UPDATE upstream_outbox_state SET bytes = bytes - OLD.size, rows = rows - 1 WHERE id = 1;
END;
"""

# Wake-up hooks of running drains (called from the database thread; must be thread-safe).
_listeners: set[Callable[[], None]] = set()


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    kind: str
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class OutboxStats:
    """The buffer's metrics; also readable by other processes from the state table."""

    bytes: int
    rows: int
    dropped: int
    coalesced: int
    max_bytes: int
    near_cap: bool
    oldest_age_s: float | None = None

    @property
    def fill(self) -> float:
        return self.bytes / self.max_bytes if self.max_bytes else 0.0

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {
            "buffer_bytes": self.bytes,
            "buffer_rows": self.rows,
            "buffer_max_bytes": self.max_bytes,
            "buffer_fill": round(self.fill, 4),
            "buffer_near_cap": self.near_cap,
            "buffer_dropped": self.dropped,
            "buffer_coalesced": self.coalesced,
            "buffer_oldest_age_s": self.oldest_age_s,
        }


# --------------------------------------------------------------------------- schema


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the outbox tables if missing; safe to call any number of times.

    Uses ``execute`` per statement (not ``executescript``, which would commit the
    caller's open transaction).
    """
    for statement in _split_sql(_SCHEMA):
        conn.execute(statement)
    conn.execute(
        "INSERT OR IGNORE INTO upstream_outbox_state (id, max_bytes) VALUES (1, ?)", (DEFAULT_MAX_BYTES,)
    )


def _split_sql(script: str) -> list[str]:
    """Split the schema on statement ends, keeping trigger bodies whole."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].rstrip()
        if not stripped:
            continue
        current += stripped + "\n"
        if stripped.endswith(";") and (not current.lstrip().upper().startswith("CREATE TRIGGER")
                                       or stripped.strip().upper() == "END;"):
            statements.append(current.strip())
            current = ""
    return statements


def _state(conn: sqlite3.Connection, columns: str) -> sqlite3.Row | tuple[int, ...]:
    """Read the state row, creating the schema first if this database has none yet.

    enqueue must work even if the pipeline writes before the link's start ran
    ensure_schema; trying the read first costs nothing on the hot path (the error is
    raised when the statement is prepared and leaves the caller's transaction intact).
    """
    sql = f"SELECT {columns} FROM upstream_outbox_state WHERE id = 1"
    try:
        row = conn.execute(sql).fetchone()
    except sqlite3.OperationalError:
        row = None
    if row is None:
        ensure_schema(conn)
        row = conn.execute(sql).fetchone()
    return row


def configure(conn: sqlite3.Connection, max_bytes: int) -> None:
    """Store the cap (from ``upstream.buffer_max_mb``) so :func:`enqueue` needs no config."""
    _state(conn, "id")
    conn.execute("UPDATE upstream_outbox_state SET max_bytes = ? WHERE id = 1", (int(max_bytes),))
    _rearm(conn)


def row_size(topic: str, payload: bytes) -> int:
    """What one row counts against the cap (an estimate of its size on disk)."""
    return len(payload) + len(topic.encode()) + ROW_OVERHEAD


# --------------------------------------------------------------------------- hot path


def enqueue(conn: sqlite3.Connection, kind: Kind, topic: str, payload: bytes, retain: bool,
            coalesce_key: str | None = None) -> None:
    """Queue one message for the cloud, inside the caller's transaction.

    ``kind="status"`` with ``coalesce_key`` = job_id for JobStatus snapshots (a newer one
    makes older unsent ones redundant when space is short); ``kind="ack"`` without a key.
    Never raises for a full buffer: the pipeline's own commit must not fail because the
    WAN is down; what gives way is counted in ``dropped``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'status' or 'ack', not {kind!r}")
    if kind == "ack" and coalesce_key is not None:
        raise ValueError("acks are never coalesced; pass coalesce_key=None")
    payload = bytes(payload)
    size = row_size(topic, payload)
    used, cap, near = _state(conn, "bytes, max_bytes, near")
    if size > cap:
        conn.execute("UPDATE upstream_outbox_state SET dropped = dropped + 1 WHERE id = 1")
        log.warning("upstream message larger than the whole buffer; dropped", topic=topic, size=size,
                    max_bytes=cap)
        return
    if near or used + size > cap * NEAR_FRACTION:
        if not near:
            conn.execute("UPDATE upstream_outbox_state SET near = 1 WHERE id = 1")
            coalesced = _coalesce_all(conn)
            log.warning("upstream buffer nearly full; coalescing job status snapshots",
                        bytes=used, max_bytes=cap, fill=round(used / cap, 3), coalesced=coalesced)
        if coalesce_key is not None:
            _coalesce_key(conn, coalesce_key)
        used = conn.execute("SELECT bytes FROM upstream_outbox_state WHERE id = 1").fetchone()[0]
        if used + size > cap:
            _make_room(conn, cap, size)
    conn.execute(
        "INSERT INTO upstream_outbox (kind, topic, payload, retain, coalesce_key, size, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (kind, topic, payload, 1 if retain else 0, coalesce_key, size, time.time()),
    )
    for wake in tuple(_listeners):
        wake()


def _count(conn: sqlite3.Connection, column: str, n: int) -> None:
    if n:
        conn.execute(f"UPDATE upstream_outbox_state SET {column} = {column} + ? WHERE id = 1", (n,))


def _coalesce_all(conn: sqlite3.Connection) -> int:
    """Delete every status snapshot that a newer unsent one of the same job supersedes."""
    n = conn.execute(
        "DELETE FROM upstream_outbox WHERE coalesce_key IS NOT NULL AND seq < ("
        " SELECT MAX(newer.seq) FROM upstream_outbox AS newer"
        " WHERE newer.coalesce_key = upstream_outbox.coalesce_key)"
    ).rowcount
    _count(conn, "coalesced", n)
    return n


def _coalesce_key(conn: sqlite3.Connection, key: str) -> int:
    """The snapshot about to be queued supersedes the unsent ones of the same job."""
    n = conn.execute("DELETE FROM upstream_outbox WHERE coalesce_key = ?", (key,)).rowcount
    _count(conn, "coalesced", n)
    return n


def _make_room(conn: sqlite3.Connection, cap: int, size: int) -> None:
    """At the cap: drop the oldest acks, then the oldest status snapshots, until it fits."""
    budget = cap - size
    used, dropping = conn.execute(
        "SELECT bytes, dropping FROM upstream_outbox_state WHERE id = 1").fetchone()
    dropped = {"ack": 0, "status": 0}
    for kind in ("ack", "status"):
        while used > budget:
            victims = conn.execute(
                "SELECT seq, size FROM upstream_outbox WHERE kind = ? ORDER BY seq LIMIT 64", (kind,)
            ).fetchall()
            if not victims:
                break
            chosen: list[int] = []
            for seq, size in victims:
                if used <= budget:
                    break
                chosen.append(seq)
                used -= size
            _delete(conn, chosen)
            dropped[kind] += len(chosen)
    total = dropped["ack"] + dropped["status"]
    _count(conn, "dropped", total)
    if total and not dropping:
        conn.execute("UPDATE upstream_outbox_state SET dropping = 1 WHERE id = 1")
        log.warning("upstream buffer full; dropping the oldest messages", max_bytes=cap,
                    dropped_acks=dropped["ack"], dropped_statuses=dropped["status"])


def _delete(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    seqs = list(seqs)
    n = 0
    for start in range(0, len(seqs), 500):  # stay under SQLite's bound-parameter limit
        chunk = seqs[start:start + 500]
        marks = ",".join("?" * len(chunk))
        n += conn.execute(f"DELETE FROM upstream_outbox WHERE seq IN ({marks})", chunk).rowcount
    return n


def _rearm(conn: sqlite3.Connection) -> None:
    conn.execute(
        "UPDATE upstream_outbox_state SET near = 0, dropping = 0"
        " WHERE id = 1 AND (near OR dropping) AND bytes < max_bytes * ?", (CLEAR_FRACTION,))


# --------------------------------------------------------------------------- drain side


def fetch(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[OutboxRow]:
    """The next rows to publish, oldest first."""
    _state(conn, "id")
    rows = conn.execute(
        "SELECT seq, kind, topic, payload, retain FROM upstream_outbox WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    return [OutboxRow(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), bool(r[4])) for r in rows]


def delete_sent(conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Forget rows the cloud broker acknowledged (PUBACK); rows already coalesced are skipped."""
    _state(conn, "id")
    n = _delete(conn, seqs)
    _rearm(conn)
    return n


def stats(conn: sqlite3.Connection) -> OutboxStats:
    used, rows, dropped, coalesced, cap, near = _state(conn, "bytes, rows, dropped, coalesced, max_bytes, near")
    oldest = conn.execute("SELECT created_at FROM upstream_outbox ORDER BY seq LIMIT 1").fetchone()
    age = max(0.0, time.time() - float(oldest[0])) if oldest else None
    return OutboxStats(int(used), int(rows), int(dropped), int(coalesced), int(cap), bool(near), age)


def add_listener(wake: Callable[[], None]) -> None:
    """Call ``wake`` (thread-safe, cheap) whenever a row is queued in this process."""
    _listeners.add(wake)


def remove_listener(wake: Callable[[], None]) -> None:
    _listeners.discard(wake)
