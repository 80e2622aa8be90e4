"""The upstream outbox: what the gateway owes the cloud, kept in the gateway's SQLite.

Why a table and not a queue in memory: the cloud may be away for minutes or for days,
and the gateway may be killed meanwhile. The pipeline calls :meth:`Outbox.enqueue` with its own
connection inside the transaction that changes a job's status or stores an ack, so the
forward commits (or rolls back) together with the fact it reports; the drain
(:mod:`gateway.upstream.drain`) publishes rows in ``seq`` order and deletes only the
prefix the cloud broker has acknowledged (at least once, in order, never silently lost).

Every row goes up with an ``id`` (:func:`wire_payload`): ``<outbox id>-<seq>``, unique per
row across restarts and across a wiped database, so the cloud can de-duplicate a resend.

Bounded by ``upstream.buffer_max_mb`` and governed by ``upstream.overflow`` (both stored
in the state table by :meth:`Outbox.prepare`, so the hot path needs no config). The size of the buffer is kept
as a running total in a one-row state table by triggers, so the hot path is one small read
and one INSERT, never a scan:

* below 90 % of the cap nothing but the INSERT happens;
* crossing 90 % logs one warning and coalesces: a status snapshot of a job that has a newer
  unsent snapshot is redundant (the status topic is retained, the newest one is what the
  cloud keeps); with ``overflow = "drop-oldest"`` the unsent acks of one delivery are also
  merged into its most advanced one (:data:`ACK_RANK`). From then until the buffer drains
  below 80 %, each new row replaces the unsent ones it supersedes (one index lookup);
* when a row still does not fit under the cap: ``drop-oldest`` drops rows, oldest acks
  first, then (acks exhausted) the oldest remaining status snapshots, each counted in
  ``dropped``; ``refuse-new`` drops nothing: an ack is stored and acknowledged locally as
  always, and its upstream copy waits outside the buffer (``upstream_outbox_held``, counted
  in ``refused``) until the cloud has taken enough rows, then joins the buffer in arrival
  order. Refusing the ack itself would make the gateway leave its local broker to have it
  resent, and local deliveries went through that same connection (a local job reached no
  device while the WAN was down). A status snapshot is never held back: it goes in, over
  the cap if need be.

The counters fall back under the warning level at 80 %, so each warning is logged once
per episode, not once per row.
"""

from __future__ import annotations

import enum
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import structlog

from gateway import clock
from gateway.config import UpstreamSection
from gateway.storage import run_script

log = structlog.get_logger(__name__)

Kind = Literal["status", "ack"]
KINDS: frozenset[str] = frozenset({"status", "ack"})
Overflow = Literal["drop-oldest", "refuse-new"]
OVERFLOWS: frozenset[str] = frozenset({"drop-oldest", "refuse-new"})

NEAR_FRACTION = 0.9  # warn and start coalescing above this share of the cap
CLEAR_FRACTION = 0.8  # below this the episode is over (warnings re-armed)
ROW_OVERHEAD = 64  # bytes counted per row besides topic and payload (seq, flags, index)
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
ASIDE_MAX_ROWS = 1000  # rows set aside are kept for inspection, the newest this many
HELD_WARNING_INTERVAL_S = 60.0  # the "held back" warning at most this often

# How far an ack's status got, for coalescing acks of one delivery under drop-oldest: the
# most advanced survives. "opened" is what a sender hopes for; "dismissed" is the other
# thing a user can do with a shown notification; "displayed" means it reached the screen;
# "failed" is the device's verdict after it received the message; "received" is the least.
ACK_RANK: dict[str, int] = {"received": 1, "failed": 2, "displayed": 3, "dismissed": 4, "opened": 5}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS upstream_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- never reused: the drain's cursor relies on it
    kind TEXT NOT NULL CHECK (kind IN ('status', 'ack')),
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    coalesce_key TEXT,                          -- status: the job_id; ack: the message_id
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
    dropping INTEGER NOT NULL DEFAULT 0     -- the "buffer full" warning was logged this episode
);
CREATE TRIGGER IF NOT EXISTS upstream_outbox_added AFTER INSERT ON upstream_outbox BEGIN
    UPDATE upstream_outbox_state SET bytes = bytes + NEW.size, rows = rows + 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS upstream_outbox_removed AFTER DELETE ON upstream_outbox BEGIN
    UPDATE upstream_outbox_state SET bytes = bytes - OLD.size, rows = rows - 1 WHERE id = 1;
END;
CREATE TABLE IF NOT EXISTS upstream_outbox_held (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- arrival order of the acks held back
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    coalesce_key TEXT,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS upstream_outbox_held_added AFTER INSERT ON upstream_outbox_held BEGIN
    UPDATE upstream_outbox_state SET held = held + 1 WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS upstream_outbox_held_removed AFTER DELETE ON upstream_outbox_held BEGIN
    UPDATE upstream_outbox_state SET held = held - 1 WHERE id = 1;
END;
CREATE TABLE IF NOT EXISTS upstream_outbox_aside (
    seq INTEGER PRIMARY KEY,                    -- the row's seq in upstream_outbox
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    created_at REAL NOT NULL,
    set_aside_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

# Columns added after the first release: (name, declaration). Added to older databases.
_STATE_COLUMNS = (
    ("coalesced_acks", "INTEGER NOT NULL DEFAULT 0"),
    ("refused", "INTEGER NOT NULL DEFAULT 0"),
    ("set_aside", "INTEGER NOT NULL DEFAULT 0"),
    ("refuse_new", "INTEGER NOT NULL DEFAULT 0"),   # overflow = "refuse-new"
    ("id_prefix", "TEXT"),                          # random, once per database: ids survive a wipe
    ("held", "INTEGER NOT NULL DEFAULT 0"),         # acks waiting in upstream_outbox_held (refuse-new)
)

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
    coalesced_acks: int = 0
    refused: int = 0
    set_aside: int = 0
    overflow: str = "drop-oldest"
    held: int = 0

    @property
    def fill(self) -> float:
        return self.bytes / self.max_bytes if self.max_bytes else 0.0

    def as_dict(self) -> dict[str, float | int | bool | str | None]:
        return {
            "buffer_bytes": self.bytes,
            "buffer_rows": self.rows,
            "buffer_max_bytes": self.max_bytes,
            "buffer_fill": round(self.fill, 4),
            "buffer_near_cap": self.near_cap,
            "buffer_overflow": self.overflow,
            "buffer_dropped": self.dropped,
            "buffer_coalesced": self.coalesced,
            "buffer_coalesced_acks": self.coalesced_acks,
            "buffer_refused": self.refused,
            "buffer_held": self.held,
            "buffer_set_aside": self.set_aside,
            "buffer_oldest_age_s": self.oldest_age_s,
        }


# --------------------------------------------------------------------------- schema


def _tables(conn: sqlite3.Connection) -> None:
    """The outbox tables, as the gateway kept them before the schema registry, from any
    older layout. No state row: one exists only once a cloud link (or a write for one) used
    the outbox, which is how status and the page tell that there is a link at all."""
    run_script(conn, _SCHEMA)
    have = {r[1] for r in conn.execute("PRAGMA table_info(upstream_outbox_state)")}
    for name, decl in _STATE_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE upstream_outbox_state ADD COLUMN {name} {decl}")


def ensure_state(conn: sqlite3.Connection) -> None:
    """The state row (the tables are the schema registry's); safe to call any number of times."""
    conn.execute(
        "INSERT OR IGNORE INTO upstream_outbox_state (id, max_bytes) VALUES (1, ?)", (DEFAULT_MAX_BYTES,)
    )
    conn.execute("UPDATE upstream_outbox_state SET id_prefix = ? WHERE id = 1 AND id_prefix IS NULL",
                 (secrets.token_hex(4),))


# The outbox's migrations, oldest first, run by the schema registry (gateway.migrations)
# when the database is opened: never edit a released one.
MIGRATIONS = (_tables,)


def _state(conn: sqlite3.Connection, columns: str) -> sqlite3.Row | tuple[int, ...]:
    """Read the state row, creating it first if needed.

    enqueue must work even if the pipeline writes before the link's start ran
    :func:`ensure_state`; the tables themselves exist from the migrations run at open.
    """
    sql = f"SELECT {columns} FROM upstream_outbox_state WHERE id = 1"
    row = conn.execute(sql).fetchone()
    if row is None:
        ensure_state(conn)
        row = conn.execute(sql).fetchone()
    return row


def _store_policy(conn: sqlite3.Connection, max_bytes: int, overflow: str) -> int:
    """Store the cap and the overflow policy (``[upstream]``) in the state table, where the
    hot path reads them with the running size; returns the held acks moved into the buffer."""
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be 'drop-oldest' or 'refuse-new', not {overflow!r}")
    _state(conn, "refuse_new")
    conn.execute("UPDATE upstream_outbox_state SET max_bytes = ?, refuse_new = ? WHERE id = 1",
                 (int(max_bytes), 1 if overflow == "refuse-new" else 0))
    moved = _release_held(conn)
    _rearm(conn)
    return moved


def row_size(topic: str, payload: bytes) -> int:
    """What one row counts against the cap (an estimate of its size on disk)."""
    return len(payload) + len(topic.encode()) + ROW_OVERHEAD


def _ack_fields(payload: bytes) -> tuple[str | None, int, object]:
    """(message_id, rank, latency_ms) of an ack payload; (None, 0, None) if it is not one."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None, 0, None
    if not isinstance(body, dict) or not isinstance(body.get("message_id"), str):
        return None, 0, None
    return body["message_id"], ACK_RANK.get(str(body.get("status")), 0), body.get("latency_ms")


# --------------------------------------------------------------------------- hot path


class Placed(enum.Enum):
    """Where :meth:`Outbox.enqueue` put a message."""

    QUEUED = "queued"      # a row in the buffer
    MERGED = "merged"      # into a more advanced unsent ack of the same delivery (drop-oldest)
    HELD = "held"          # refuse-new at the cap: waits outside the buffer
    TOO_BIG = "too_big"    # larger than the whole buffer: dropped and counted


def _place(conn: sqlite3.Connection, kind: str, topic: str, payload: bytes, retain: bool,
           coalesce_key: str | None = None) -> Placed:
    """Queue one message for the cloud, inside the caller's transaction.

    ``kind="status"`` with ``coalesce_key`` = job_id for JobStatus snapshots (a newer one
    makes older unsent ones redundant when space is short); ``kind="ack"`` with the ack
    payload of contract §5 (its ``message_id`` is read from it when no key is given).

    A full buffer never fails the pipeline's commit: local work must not wait for the WAN.
    A status snapshot goes in (over the cap if need be); for an ack ``drop-oldest`` makes
    room (counted in ``dropped``) and ``refuse-new`` holds its copy back until there is
    room (counted in ``refused``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be 'status' or 'ack', not {kind!r}")
    payload = bytes(payload)
    if kind == "ack" and coalesce_key is None:
        coalesce_key = _ack_fields(payload)[0]  # kept on the row: coalescing must not parse the buffer
    size = row_size(topic, payload)
    used, cap, near, refuse_new, held = _state(conn, "bytes, max_bytes, near, refuse_new, held")
    if size > cap:  # could never fit, under either policy: holding it would hold every later ack
        _drop_too_big(conn, topic, size, cap)
        return Placed.TOO_BIG
    if kind == "ack" and refuse_new and held:  # behind the acks already held back: order kept
        return _hold(conn, topic, payload, coalesce_key, size)
    if near or used + size > cap * NEAR_FRACTION:
        if not near:
            conn.execute("UPDATE upstream_outbox_state SET near = 1 WHERE id = 1")
            coalesced = _coalesce_statuses(conn)
            merged = 0 if refuse_new else _coalesce_all_acks(conn)
            log.warning("upstream buffer nearly full; coalescing", bytes=used, max_bytes=cap,
                        fill=round(used / cap, 3), coalesced_statuses=coalesced, coalesced_acks=merged,
                        overflow="refuse-new" if refuse_new else "drop-oldest")
        if kind == "status" and coalesce_key is not None:
            _coalesce_status(conn, coalesce_key)
        elif kind == "ack" and coalesce_key is not None and not refuse_new:
            merged_payload = _coalesce_ack(conn, coalesce_key, payload)
            if merged_payload is None:
                return Placed.MERGED  # a more advanced ack of this delivery is already waiting
            payload = merged_payload
            size = row_size(topic, payload)
        used = conn.execute("SELECT bytes FROM upstream_outbox_state WHERE id = 1").fetchone()[0]
        if used + size > cap:
            if refuse_new:
                if kind == "ack":
                    return _hold(conn, topic, payload, coalesce_key, size)
                # a status snapshot is never held back: it goes in over the cap
            else:
                _make_room(conn, cap, size)
    conn.execute(
        "INSERT INTO upstream_outbox (kind, topic, payload, retain, coalesce_key, size, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (kind, topic, payload, 1 if retain else 0, coalesce_key, size, clock.now()),
    )
    return Placed.QUEUED


def _count(conn: sqlite3.Connection, column: str, n: int) -> None:
    if n:
        conn.execute(f"UPDATE upstream_outbox_state SET {column} = {column} + ? WHERE id = 1", (n,))


def _coalesce_statuses(conn: sqlite3.Connection) -> int:
    """Delete every status snapshot that a newer unsent one of the same job supersedes."""
    n = conn.execute(
        "DELETE FROM upstream_outbox WHERE kind = 'status' AND coalesce_key IS NOT NULL AND seq < ("
        " SELECT MAX(newer.seq) FROM upstream_outbox AS newer"
        " WHERE newer.kind = 'status' AND newer.coalesce_key = upstream_outbox.coalesce_key)"
    ).rowcount
    _count(conn, "coalesced", n)
    return n


def _coalesce_status(conn: sqlite3.Connection, key: str) -> int:
    """The snapshot about to be queued supersedes the unsent ones of the same job."""
    n = conn.execute("DELETE FROM upstream_outbox WHERE kind = 'status' AND coalesce_key = ?", (key,)).rowcount
    _count(conn, "coalesced", n)
    return n


def _merge_ack(kept: bytes, others: list[bytes]) -> bytes:
    """``kept`` with the delivery's latency from an earlier ack if it has none itself.

    Only the first ack of a delivery carries ``latency_ms`` (the delivery's latency);
    merging it into a later, more advanced one must not lose it.
    """
    body = json.loads(kept)
    if body.get("latency_ms") is None:
        for other in others:
            latency = _ack_fields(other)[2]
            if latency is not None:
                body["latency_ms"] = latency
                return json.dumps(body).encode()
    return kept


def _replace_payload(conn: sqlite3.Connection, seq: int, old: bytes, new: bytes) -> None:
    if new != old:
        conn.execute("UPDATE upstream_outbox SET payload = ?, size = size + ? WHERE seq = ?",
                     (new, len(new) - len(old), seq))
        conn.execute("UPDATE upstream_outbox_state SET bytes = bytes + ? WHERE id = 1", (len(new) - len(old),))


def _keeper(queued: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """The ack of one delivery that coalescing keeps: the most advanced, the oldest on a tie."""
    return max(queued, key=lambda r: (_ack_fields(r[1])[1], -r[0]))


def _coalesce_ack(conn: sqlite3.Connection, key: str, payload: bytes) -> bytes | None:
    """Merge the unsent acks of one delivery with the new one; keep the most advanced.

    Returns the payload to insert, or None when an unsent ack that is at least as advanced
    is already queued: that one keeps its place in the order and the new one is counted as
    coalesced. Equal ranks keep the older, which carries the delivery's latency.
    """
    queued = [(int(r[0]), bytes(r[1])) for r in conn.execute(
        "SELECT seq, payload FROM upstream_outbox WHERE kind = 'ack' AND coalesce_key = ? ORDER BY seq", (key,))]
    if not queued:
        return payload
    best_seq, best = _keeper(queued)
    if _ack_fields(best)[1] >= _ack_fields(payload)[1]:
        others = [r for r in queued if r[0] != best_seq]
        n = _delete(conn, [r[0] for r in others])
        _count(conn, "coalesced_acks", n + 1)  # the older ones merged, and the new one
        _replace_payload(conn, best_seq, best, _merge_ack(best, [r[1] for r in others] + [payload]))
        return None
    n = _delete(conn, [r[0] for r in queued])
    _count(conn, "coalesced_acks", n)
    return _merge_ack(payload, [r[1] for r in queued])


def _coalesce_all_acks(conn: sqlite3.Connection) -> int:
    """Merge every delivery's unsent acks into its most advanced one (drop-oldest only)."""
    rows = conn.execute(
        "SELECT seq, coalesce_key, payload FROM upstream_outbox WHERE kind = 'ack' AND coalesce_key IN ("
        " SELECT coalesce_key FROM upstream_outbox WHERE kind = 'ack' AND coalesce_key IS NOT NULL"
        " GROUP BY coalesce_key HAVING COUNT(*) > 1) ORDER BY seq"
    ).fetchall()
    groups: dict[str, list[tuple[int, bytes]]] = {}
    for seq, key, body in rows:
        groups.setdefault(key, []).append((int(seq), bytes(body)))
    victims: list[int] = []
    for queued in groups.values():
        best_seq, best = _keeper(queued)
        others = [r for r in queued if r[0] != best_seq]
        victims += [r[0] for r in others]
        _replace_payload(conn, best_seq, best, _merge_ack(best, [r[1] for r in others]))
    n = _delete(conn, victims)
    _count(conn, "coalesced_acks", n)
    return n


def _drop_too_big(conn: sqlite3.Connection, topic: str, size: int, cap: int) -> None:
    conn.execute("UPDATE upstream_outbox_state SET dropped = dropped + 1 WHERE id = 1")
    log.warning("upstream message larger than the whole buffer; dropped", topic=topic, size=size, max_bytes=cap)


def _hold(conn: sqlite3.Connection, topic: str, payload: bytes, coalesce_key: str | None, size: int) -> Placed:
    """refuse-new at the cap: the ack's upstream copy waits outside the buffer.

    Written in the caller's transaction, so the ack itself is stored and acknowledged
    like any other (the gateway never leaves its local broker to have it resent, which
    stopped local deliveries); only its copy for the cloud waits, in arrival order, and
    moves into the buffer as the cloud takes rows (:func:`_release_held`). Counted in
    ``refused`` (:class:`Outbox` warns, at most once a minute).
    """
    conn.execute("INSERT INTO upstream_outbox_held (topic, payload, coalesce_key, size, created_at)"
                 " VALUES (?, ?, ?, ?, ?)", (topic, payload, coalesce_key, size, clock.now()))
    _count(conn, "refused", 1)
    return Placed.HELD


def _release_held(conn: sqlite3.Connection) -> int:
    """Move held-back acks into the buffer, oldest first, while they fit under the cap
    (all of them when the policy is no longer refuse-new: enqueue then makes room)."""
    used, cap, refuse_new, held = _state(conn, "bytes, max_bytes, refuse_new, held")
    moved = 0
    while held:
        batch = conn.execute("SELECT seq, topic, payload, coalesce_key, size, created_at FROM upstream_outbox_held"
                             " ORDER BY seq LIMIT 64").fetchall()
        if not batch:
            break
        for seq, topic, payload, key, size, created_at in batch:
            if refuse_new and size <= cap < used + size:
                return moved  # waits for the drain; every ack behind it waits too (order)
            conn.execute("DELETE FROM upstream_outbox_held WHERE seq = ?", (seq,))
            held -= 1
            if size > cap:  # the cap shrank below it (a restart with a smaller buffer_max_mb)
                _drop_too_big(conn, topic, size, cap)
            elif refuse_new:
                conn.execute(
                    "INSERT INTO upstream_outbox (kind, topic, payload, retain, coalesce_key, size, created_at)"
                    " VALUES ('ack', ?, ?, 0, ?, ?, ?)", (topic, payload, key, size, created_at))
                used += size
            else:
                _place(conn, "ack", topic, bytes(payload), False, coalesce_key=key)
            moved += 1
    return moved


def _make_room(conn: sqlite3.Connection, cap: int, size: int) -> None:
    """drop-oldest at the cap: drop the oldest acks, then the oldest status snapshots, until it fits."""
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
            for seq, row_bytes in victims:
                if used <= budget:
                    break
                chosen.append(seq)
                used -= row_bytes
            _delete(conn, chosen)
            dropped[kind] += len(chosen)
    total = dropped["ack"] + dropped["status"]
    _count(conn, "dropped", total)
    if total and not dropping:
        conn.execute("UPDATE upstream_outbox_state SET dropping = 1 WHERE id = 1")
        log.warning("upstream buffer full; dropping the oldest messages (overflow = drop-oldest)", max_bytes=cap,
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


def _delete_sent(conn: sqlite3.Connection, seqs: Iterable[int]) -> tuple[int, int]:
    """Forget rows the cloud broker acknowledged (PUBACK); rows already coalesced are skipped.

    The drain passes only the acknowledged *prefix* (every row before them confirmed too),
    never a row behind one still unconfirmed: see :mod:`gateway.upstream.drain`.
    """
    _state(conn, "id")
    n = _delete(conn, seqs)
    moved = _release_held(conn)
    _rearm(conn)
    return n, moved


def id_prefix(conn: sqlite3.Connection) -> str:
    """This database's random prefix of the ``id`` every row carries upstream (drawn now
    if the state row is older than the prefix: the writer's connection)."""
    prefix = _state(conn, "id_prefix")[0]
    if prefix is None:
        ensure_state(conn)
        prefix = _state(conn, "id_prefix")[0]
    return str(prefix)


def wire_payload(row: OutboxRow, prefix: str) -> bytes:
    """The payload as published: the stored JSON object plus ``"id": "<prefix>-<seq>"``.

    The id is the same on every resend of the row and never reused (seq is AUTOINCREMENT;
    the prefix is random per database), so the cloud de-duplicates on it. A payload that
    is not a JSON object, or already has an ``id`` key, goes as stored. This runs for
    every row sent, so the id is appended as text (where ``json.dumps`` would put it);
    the payload is parsed only when ``"id"`` appears in it, to tell a key from a value.
    """
    payload = row.payload
    if payload[:1] != b"{" or payload[-1:] != b"}":
        return payload
    ident = f'"id": "{prefix}-{row.seq}"'.encode()
    if b'"id"' not in payload:
        if not payload[1:-1].strip():
            return b"{" + ident + b"}"
        return payload[:-1] + b", " + ident + b"}"
    try:
        body = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(body, dict) or "id" in body:
        return payload
    body["id"] = f"{prefix}-{row.seq}"
    return json.dumps(body).encode()


def _set_aside(conn: sqlite3.Connection, seq: int, reason: str) -> tuple[OutboxRow | None, int]:
    """Move one row out of the way (the cloud broker will not take it); keep it, count it.

    Kept in ``upstream_outbox_aside`` (the newest :data:`ASIDE_MAX_ROWS`) for an operator
    to look at; counted in ``set_aside``.
    """
    row = conn.execute("SELECT seq, kind, topic, payload, retain, created_at FROM upstream_outbox WHERE seq = ?",
                       (seq,)).fetchone()
    if row is None:
        return None, 0
    conn.execute(
        "INSERT OR REPLACE INTO upstream_outbox_aside (seq, kind, topic, payload, retain, created_at, set_aside_at,"
        " reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (row[0], row[1], row[2], row[3], row[4], row[5], clock.now(), reason))
    conn.execute("DELETE FROM upstream_outbox_aside WHERE seq NOT IN ("
                 " SELECT seq FROM upstream_outbox_aside ORDER BY seq DESC LIMIT ?)", (ASIDE_MAX_ROWS,))
    _delete(conn, [seq])
    _count(conn, "set_aside", 1)
    moved = _release_held(conn)
    _rearm(conn)
    return OutboxRow(int(row[0]), str(row[1]), str(row[2]), bytes(row[3]), bool(row[4])), moved


def set_aside_rows(conn: sqlite3.Connection) -> list[dict[str, object]]:
    """What was set aside, oldest first (for operators and tests)."""
    _state(conn, "id")
    rows = conn.execute("SELECT seq, kind, topic, payload, set_aside_at, reason FROM upstream_outbox_aside"
                        " ORDER BY seq").fetchall()
    return [{"seq": r[0], "kind": r[1], "topic": r[2], "payload": bytes(r[3]), "set_aside_at": r[4],
             "reason": r[5]} for r in rows]


def stats(conn: sqlite3.Connection) -> OutboxStats:
    """The outbox's figures (nothing is written: readers on their own connections call this too)."""
    _state(conn, "id")
    (used, rows, dropped, coalesced, cap, near, coalesced_acks, refused, aside, refuse_new,
     held) = _state(conn, "bytes, rows, dropped, coalesced, max_bytes, near, coalesced_acks, refused,"
                          " set_aside, refuse_new, held")
    oldest = conn.execute("SELECT created_at FROM upstream_outbox ORDER BY seq LIMIT 1").fetchone()
    age = max(0.0, clock.now() - float(oldest[0])) if oldest else None
    return OutboxStats(int(used), int(rows), int(dropped), int(coalesced), int(cap), bool(near), age,
                       int(coalesced_acks), int(refused), int(aside),
                       "refuse-new" if refuse_new else "drop-oldest", int(held))


def backlog(conn: sqlite3.Connection) -> dict[str, float | int | bool | str | None] | None:
    """The buffer's figures for ``status``, ``/metrics`` and the page (:meth:`OutboxStats.as_dict`),
    or None when no cloud link ever used this database (no state row; nothing is written,
    so a read-only connection will do)."""
    try:
        if conn.execute("SELECT 1 FROM upstream_outbox_state WHERE id = 1").fetchone() is None:
            return None
        return stats(conn).as_dict()
    except (sqlite3.Error, ValueError, TypeError):
        return None  # a database the schema registry has not migrated yet: the link's own metrics still count


class Outbox:
    """The outbox of one gateway: its policy, its listeners and its rate-limited warning.

    One instance is built per daemon and handed to everything that writes the outbox: the
    pipeline queues through :meth:`enqueue` inside its own transactions, the link's drain
    reads, deletes and sets rows aside, and the link applies the policy at start
    (:meth:`prepare`). The rows and the counters live in the database (see the module
    docstring); what lives here is what only this process needs: who to wake when a row
    is queued, and when the "held back" warning was last logged. Nothing is shared between
    two instances, so two daemons (or two tests) in one process never see each other's.

    Methods that take a connection run on the database thread, inside the caller's
    transaction; listeners are called there too (they must be thread-safe and cheap).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, overflow: Overflow = "drop-oldest") -> None:
        self._check(max_bytes, overflow)
        self._max_bytes = int(max_bytes)
        self._overflow: Overflow = overflow
        self._lock = threading.Lock()  # listeners change on the event loop, are called on the database thread
        self._listeners: set[Callable[[], None]] = set()
        self._held_since_warning = 0
        self._held_warned_at: float | None = None

    @classmethod
    def for_upstream(cls, section: UpstreamSection) -> Outbox:
        """The outbox ``[upstream]`` asks for (``buffer_max_mb``, ``overflow``)."""
        return cls(int(section.buffer_max_mb * 1024 * 1024), section.overflow)

    @staticmethod
    def _check(max_bytes: int, overflow: str) -> None:
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be 'drop-oldest' or 'refuse-new', not {overflow!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes!r}")

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def overflow(self) -> Overflow:
        return self._overflow

    # ------------------------------------------------------------------ policy
    def prepare(self, conn: sqlite3.Connection) -> OutboxStats:
        """At start (the writer): the state row, this policy stored, a report."""
        ensure_state(conn)
        self._wake_if(_store_policy(conn, self._max_bytes, self._overflow))
        return stats(conn)

    def configure(self, conn: sqlite3.Connection, max_bytes: int, overflow: Overflow = "drop-oldest") -> None:
        """Change the cap and the policy and store them (the hot path reads them from the
        state table with the running size, so they hold for every writer of the database)."""
        self._check(max_bytes, overflow)
        self._max_bytes, self._overflow = int(max_bytes), overflow
        self._wake_if(_store_policy(conn, self._max_bytes, self._overflow))

    # ------------------------------------------------------------------ writers
    def enqueue(self, conn: sqlite3.Connection, kind: str, topic: str, payload: bytes, retain: bool,
                coalesce_key: str | None = None) -> None:
        """Queue one message for the cloud inside the caller's transaction (see :func:`_place`);
        wakes the listeners. Never fails because the buffer is full."""
        placed = _place(conn, kind, topic, payload, retain, coalesce_key)
        if placed is Placed.HELD:
            self._warn_held(topic)
        self._wake()

    def delete_sent(self, conn: sqlite3.Connection, seqs: Iterable[int]) -> int:
        """Forget rows the cloud broker acknowledged (see :func:`_delete_sent`); held-back
        acks that fit now move in."""
        n, moved = _delete_sent(conn, seqs)
        self._wake_if(moved)
        return n

    def set_aside(self, conn: sqlite3.Connection, seq: int, reason: str) -> OutboxRow | None:
        """Move one row out of the way, kept and counted (see :func:`_set_aside`)."""
        row, moved = _set_aside(conn, seq, reason)
        self._wake_if(moved)
        return row

    # ------------------------------------------------------------------ readers
    def fetch(self, conn: sqlite3.Connection, after_seq: int, limit: int) -> list[OutboxRow]:
        return fetch(conn, after_seq, limit)

    def stats(self, conn: sqlite3.Connection) -> OutboxStats:
        return stats(conn)

    def id_prefix(self, conn: sqlite3.Connection) -> str:
        return id_prefix(conn)

    def set_aside_rows(self, conn: sqlite3.Connection) -> list[dict[str, object]]:
        return set_aside_rows(conn)

    # ------------------------------------------------------------------ listeners
    def add_listener(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (thread-safe, cheap, never raising) whenever a row is queued."""
        with self._lock:
            self._listeners.add(wake)

    def remove_listener(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.discard(wake)

    def _wake(self) -> None:
        with self._lock:
            listeners = tuple(self._listeners)
        for wake in listeners:
            wake()

    def _wake_if(self, moved: int) -> None:
        if moved:
            self._wake()

    def _warn_held(self, topic: str) -> None:
        with self._lock:
            self._held_since_warning += 1
            now = time.monotonic()
            if self._held_warned_at is not None and now - self._held_warned_at < HELD_WARNING_INTERVAL_S:
                return
            held, self._held_since_warning, self._held_warned_at = self._held_since_warning, 0, now
        log.warning("upstream buffer full; device acks are stored and their upstream copies wait until the cloud"
                    " takes some (overflow = refuse-new)", max_bytes=self._max_bytes, topic=topic, held=held)


def shift_deadlines(conn: sqlite3.Connection, delta: float) -> int:
    """Move the queued and held-back rows' ``created_at`` (the base of the outbox's oldest
    age) by ``delta`` s (gateway.clock re-anchored). Rows set aside keep their times (history)."""
    return (clock.shift_columns(conn, "upstream_outbox", "created_at", delta)
            + clock.shift_columns(conn, "upstream_outbox_held", "created_at", delta))
