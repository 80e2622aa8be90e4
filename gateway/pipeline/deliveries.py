"""Deliveries: the ``deliveries`` table, its one writer, and the reads that find due work.

**One writer.** :class:`DeliveryWriter` is the only code that inserts, updates or deletes
delivery rows (a test's SQLite authorizer fails any other). Every row it touches it has
read once in the transaction (or written itself), so it knows each change's before and
after without reading again, and it moves what depends on the rows in the same
transaction, once per batch: the aggregates of :mod:`gateway.stats` (deliveries per
platform and state, the ack latency histogram) and the jobs' per-state counts
(:func:`gateway.pipeline.jobs.move_counts`, which also settles the jobs). A new kind of
write is a new method here, and cannot forget them.

Every write is a batch; a single item is a batch of one. Rows go to SQLite as one JSON
array per statement (``json_each`` walks it in order) or with ``executemany``: one
statement step per row, not one Python round trip.
"""

from __future__ import annotations

import bisect
import json
import os
import sqlite3

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway import clock
from gateway import stats
from gateway.pipeline import jobs, registry
from gateway.states import DeliveryState
from gateway.pipeline.routing import ChannelCache, decode, route_of
from gateway.timeutil import iso

QUIET_HOLD = "quiet hours until "  # gateway.people.quiet.HOLD_PREFIX: a person's quiet hours hold it

# Bound once: an enum member read through its class costs ~4x a name on the per-row paths.
_IS_QUEUED, _IS_SENT, _IS_ACKED = DeliveryState.QUEUED, DeliveryState.SENT, DeliveryState.ACKNOWLEDGED
FINAL_DELIVERY_STATES = frozenset(state.value for state in DeliveryState if state is not DeliveryState.QUEUED
                                  and state is not DeliveryState.SENT)


# ------------------------------------------------------------------ what a batch writes
@dataclass(slots=True)
class Result:
    """What one attempt decided for a delivery; applied in batches by the recorder."""

    message_id: str
    job_id: str
    device_id: str
    state: str  # queued (retry later) | sent | failed | expired | invalid_address | suppressed
    platform: str | None = None
    attempts: int = 0
    next_at: float = 0.0
    error: str | None = None
    invalid_key: str | None = None  # channel to mark invalid on the device
    route: str | None = None  # queued: the bridge of the next attempt (None: unchanged)
    resend_at: float | None = None  # sent: when to send it again if still unacked (None: never)
    resend: bool = False  # the delivery was already sent; it stays sent whatever this attempt gave
    until_ack: bool = False  # a resend's error is a note an ack makes untrue ("no ack after N sends")
    # sent: when the send was handed to the bridge; the ack latency is counted from it.
    # None: the time the result is recorded (tools and tests that write results by hand).
    sent_at: float | None = None
    moved: str | None = None  # queued: why it left its channel for the next one (kept once sent)


# A delivery's first ack, as DeliveryWriter.acknowledge records it: (message_id, when the
# device acked, the latency from the send in ms, the send itself when its result is in the
# same batch and not yet recorded: one update writes both). A tuple: one per ack.
FirstAck = tuple[str, float, float, "Result | None"]


# A delivery as the writer knows it: [job_id, device_id, state, route, platform, sent_at, person_id].
# Its platform for the aggregates (gateway.stats.PLATFORM_KEY) is route, else platform, else ''.


_SENT = ("UPDATE deliveries SET state = 'sent', platform = ?, route = ?, attempts = ?, sent_at = ?, resend_at = ?, "
         "last_error = NULL, error_until_ack = 0 WHERE message_id = ? AND state = 'queued'")
_SENT_AFTER_ACK = ("UPDATE deliveries SET platform = ?, route = ?, attempts = MAX(attempts, ?), "
                   "sent_at = COALESCE(sent_at, ?) WHERE message_id = ? AND state = 'acknowledged'")
_RESENT = ("UPDATE deliveries SET attempts = MAX(attempts, ?), resend_at = CASE WHEN state = 'sent' THEN ? END, "
           "last_error = CASE WHEN state = 'sent' THEN ? ELSE last_error END, "
           "error_until_ack = CASE WHEN state = 'sent' THEN ? ELSE error_until_ack END WHERE message_id = ?")
_REQUEUED = ("UPDATE deliveries SET platform = COALESCE(?, platform), route = COALESCE(?, route), attempts = ?, "
             "next_at = ?, last_error = ?, moved = COALESCE(?, moved) WHERE message_id = ? AND state = 'queued'")
_FINISHED = ("UPDATE deliveries SET state = ?, platform = COALESCE(?, platform), attempts = ?, last_error = ? "
             "WHERE message_id = ? AND state = 'queued'")
# First acks, each row found by primary key: [message_id, acked_at, latency_ms] each, or
# with the send of the same batch [..., platform, attempts, sent_at] (its route is its
# platform; its error is cleared). Two shapes, not one statement with COALESCEs: SQLite
# parses a row's JSON again for every ->> (3.40 keeps no parse), and a fan-out has 100,000
# of them. Floats keep their value through the JSON text (Python writes the shortest text
# that reads back to the same double).
# A note that only held until an ack (``error_until_ack``: the resends' "no ack after N
# sends") is no longer true once the ack is in; any other error stays.
_ACKNOWLEDGED = ("UPDATE deliveries SET state = 'acknowledged', acked_at = j.value->>1, latency_ms = j.value->>2, "
                 "resend_at = NULL, last_error = CASE WHEN error_until_ack THEN NULL ELSE last_error END, "
                 "error_until_ack = 0 FROM json_each(?) AS j WHERE deliveries.message_id = j.value->>0")
_ACKNOWLEDGED_WITH_SEND = (
    "UPDATE deliveries SET state = 'acknowledged', acked_at = j.value->>1, latency_ms = j.value->>2, "
    "resend_at = NULL, last_error = NULL, error_until_ack = 0, platform = j.value->>3, route = j.value->>3, attempts = j.value->>4, "
    "sent_at = j.value->>5 FROM json_each(?) AS j WHERE deliveries.message_id = j.value->>0")


class DeliveryWriter:
    """The only writer of ``deliveries``, for one transaction (see the module's docstring).

    Use it as a context manager around a batch: what the batch moved in the aggregates and
    the jobs' counts is written when the block ends without an error (an error rolls the
    whole transaction back anyway)::

        with DeliveryWriter(conn, now) as writer:
            writer.record(results)
    """

    __slots__ = ("conn", "now", "_rows", "_counts", "_latency", "_jobs", "_touched")

    def __init__(self, conn: sqlite3.Connection, now: float):
        self.conn = conn
        self.now = now
        self._rows: dict[str, list[Any]] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, float], list[float]] = {}
        self._jobs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._touched: set[str] = set()  # jobs whose deliveries' results were recorded (people_held)

    def __enter__(self) -> "DeliveryWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.flush()

    # ------------------------------------------------------------ what it knows
    def read(self, message_ids: Iterable[str]) -> dict[str, list[Any]]:
        """The rows of ``message_ids`` that exist (read once per transaction; later reads
        come from what the writer knows): message_id → [job_id, device_id, state, route,
        platform, sent_at, person_id]. Read only: the writer keeps them current."""
        rows = self._rows
        missing = [m for m in message_ids if m not in rows] if rows else list(message_ids)
        if missing:
            # The ids as one JSON array: one statement text whatever their number, prepared
            # once (an IN list of n marks is a new statement for every n). Plain tuples, not
            # the connection's Row objects: one list per row, made by the unpacking.
            cur = self.conn.cursor()
            cur.row_factory = None
            for mid, *row in cur.execute("SELECT message_id, job_id, device_id, state, route, platform, sent_at, "
                                         "person_id "
                                         "FROM deliveries WHERE message_id IN (SELECT value FROM json_each(?))",
                                         (json.dumps(missing),)):
                rows[mid] = row
        return rows

    def _move(self, row: list[Any], state: str, route: str | None, platform: str | None) -> None:
        """Change what the writer knows of a row, and what the change moves."""
        old_state = row[2]
        old_key = row[3] if row[3] is not None else (row[4] if row[4] is not None else "")
        new_key = route if route is not None else (platform if platform is not None else "")
        row[2], row[3], row[4] = state, route, platform
        if old_state != state:
            by_state = self._jobs[row[0]]
            by_state[old_state] -= 1
            by_state[state] += 1
        elif old_key == new_key:
            return
        counts = self._counts
        k = (old_key, old_state)
        counts[k] = counts.get(k, 0) - 1
        k = (new_key, state)
        counts[k] = counts.get(k, 0) + 1

    def shift_deadlines(self, delta: float) -> int:
        """Move queued rows' due times and sent rows' resend times by ``delta`` s (the
        gateway clock was re-anchored at start); states and aggregates do not change."""
        return (clock.shift_columns(self.conn, "deliveries", "next_at", delta, "state = 'queued'")
                + clock.shift_columns(self.conn, "deliveries", "resend_at", delta, "state = 'sent'"))

    def flush(self) -> None:
        """Write what the batch moved: the aggregates, then the jobs' counts (and settle them)."""
        stats.apply_counts(self.conn, self._counts, self._latency)
        if self._touched:
            jobs.count_held(self.conn, self._touched, QUIET_HOLD, self.now)
            self._touched = set()
        if self._jobs:
            jobs.move_counts(self.conn, self._jobs, self.now)
        self._counts, self._latency = {}, {}
        self._jobs = defaultdict(lambda: defaultdict(int))

    # ------------------------------------------------------------ writes
    def insert(self, job_id: str, rows: list[tuple[str, str | None]], state: str, error: str | None,
               next_at: float) -> int:
        """New rows of a job, (device_id, route) each, all in ``state``; a device that
        already has a row in the job is left alone (``UNIQUE(job_id, device_id)``: a page
        expanded again after a crash). How many went in. The job's counts are expansion's
        (:func:`gateway.pipeline.jobs.expanded_page`): set when it was accepted."""
        if not rows:
            return 0
        ids = new_message_ids(len(rows))
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO deliveries(message_id, job_id, device_id, state, next_at, last_error, route) "
            "SELECT value->>0, ?, value->>1, ?, ?, ?, value->>2 FROM json_each(?)",
            (job_id, state, next_at, error, json.dumps([[m, d, route] for m, (d, route) in zip(ids, rows)])))
        counts = self._counts
        if cur.rowcount == len(rows):  # every row is in, as written
            for _, route in rows:
                k = (route or "", state)
                counts[k] = counts.get(k, 0) + 1
        else:  # some were there already: count the rows that went in (their ids are new)
            known = self.read(ids)
            for m in ids:
                row = known.get(m)
                if row is not None:
                    k = (row[3] if row[3] is not None else (row[4] if row[4] is not None else ""), row[2])
                    counts[k] = counts.get(k, 0) + 1
        return cur.rowcount

    def insert_steps(self, job_id: str, rows: list[tuple[str, str | None, str, float, str, str | None]]
                     ) -> tuple[int, int]:
        """A people job's rows (:mod:`gateway.pipeline.reach`): (device_id, route, person_id,
        next_at, state, error) each, ``queued`` or ``failed``; a device that already has a
        row in the job is left alone (a page expanded again after a crash, or a device two
        persons share). (rows that went in, of which failed). The job's counts are
        expansion's, as for :meth:`insert`."""
        if not rows:
            return 0, 0
        ids = new_message_ids(len(rows))
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO deliveries(message_id, job_id, device_id, person_id, next_at, state, last_error, route) "
            "SELECT value->>0, ?, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6 FROM json_each(?)",
            (job_id, json.dumps([[m, d, p, at, st, err, route] for m, (d, route, p, at, st, err) in zip(ids, rows)])))
        known = self.read(ids)
        counts = self._counts
        failed = 0
        for m in ids:
            row = known.get(m)
            if row is not None:
                k = (row[3] if row[3] is not None else "", row[2])
                counts[k] = counts.get(k, 0) + 1
                failed += row[2] == DeliveryState.FAILED
        return cur.rowcount, failed

    def count_reached(self, job_id: str) -> None:
        """A person of the job was reached (``people_reached``, written with the batch)."""
        self._jobs[job_id]["people_reached"] += 1

    def withdraw(self, message_ids: list[str]) -> None:
        """Delete queued rows that were never attempted: a person's later steps once the
        person was reached (:mod:`gateway.pipeline.reach`). They leave the aggregates and the
        job's counts, ``targets`` included: the job did not make those deliveries after all."""
        rows = self.read(message_ids)
        counts = self._counts
        gone = []
        for m in message_ids:
            row = rows.get(m)
            if row is None or row[2] != DeliveryState.QUEUED:
                continue
            gone.append(m)
            rows.pop(m)
            k = (row[3] if row[3] is not None else (row[4] if row[4] is not None else ""), row[2])
            counts[k] = counts.get(k, 0) - 1
            by_job = self._jobs[row[0]]
            by_job["queued"] -= 1
            by_job["targets"] -= 1
            by_job["expanded_rows"] -= 1
            self._touched.add(row[0])  # a withdrawn row may have been held by quiet hours
        if gone:
            self.conn.execute("DELETE FROM deliveries WHERE message_id IN (SELECT value FROM json_each(?)) "
                              "AND state = 'queued'", (json.dumps(gone),))

    def wake_held(self, now: float) -> int:
        """Deliveries held by quiet hours are due now, to be decided again (a person's
        preferences changed, or the daemon started): a due time, no state moves. Those
        still quiet are held again."""
        return self.conn.execute("UPDATE deliveries SET next_at = ? WHERE state = 'queued' AND next_at > ? "
                                 "AND last_error LIKE ? || '%'", (now, now, QUIET_HOLD)).rowcount

    def stop_resends(self, job_id: str, person_id: str) -> None:
        """A reached person's other devices are not sent their notification again."""
        self.conn.execute("UPDATE deliveries SET resend_at = NULL WHERE person_id = ? AND job_id = ? "
                          "AND state = 'sent' AND resend_at IS NOT NULL", (person_id, job_id))

    def record(self, results: list[Result]) -> None:
        """Attempts' outcomes, in order. A delivery moves only from ``queued`` (a result
        for a row that moved on meanwhile changes nothing, but for a send recorded after
        the device's ack, which keeps what the send was); a resend changes its attempts
        and its next resend only. The statements keep their own guards on the state, so
        what they change is what :meth:`_move` predicts from the rows read."""
        rows = self.read([r.message_id for r in results if not r.resend])
        # Statements of one shape go in one executemany; with a delivery twice in the
        # batch, runs of one shape in the batch's order instead.
        ordered = len({r.message_id for r in results}) != len(results)
        groups: list[tuple[str, list[tuple[Any, ...]]]] = []
        by_sql: dict[str, list[tuple[Any, ...]]] = {}
        move, now, conn = self._move, self.now, self.conn
        self._touched.update(r.job_id for r in results if not r.resend)
        dead_steps: list[tuple[str, str]] = []  # (job_id, person_id) whose tried device will never ack
        for r in results:
            if r.invalid_key:
                registry.mark_invalid(conn, r.device_id, r.invalid_key, r.error or "invalid address", now)
            if r.resend:
                # The attempt counts even if the device's ack (to this very resend) came first.
                sql, params = _RESENT, (r.attempts, r.resend_at, r.error, 1 if r.until_ack else 0, r.message_id)
            else:
                row = rows.get(r.message_id)
                if row is None:
                    continue  # pruned meanwhile: nothing to update
                state = row[2]
                if r.state == _IS_SENT:
                    sent_at = r.sent_at or now
                    if state == _IS_QUEUED:
                        sql, params = _SENT, (r.platform, r.platform, r.attempts, sent_at, r.resend_at, r.message_id)
                        move(row, "sent", r.platform, r.platform)
                        row[5] = sent_at
                    elif state == _IS_ACKED:  # acked before this result was recorded: keep what the send was
                        sql, params = _SENT_AFTER_ACK, (r.platform, r.platform, r.attempts, sent_at, r.message_id)
                        move(row, "acknowledged", r.platform, r.platform)
                        if row[5] is None:
                            row[5] = sent_at
                    else:
                        continue
                elif state != _IS_QUEUED:
                    continue
                elif r.state == _IS_QUEUED:  # tried again later, maybe on another bridge
                    sql, params = _REQUEUED, (r.platform, r.route, r.attempts, r.next_at, r.error, r.moved,
                                              r.message_id)
                    move(row, "queued", r.route if r.route is not None else row[3],
                         r.platform if r.platform is not None else row[4])
                else:  # failed | expired | invalid_address | suppressed
                    sql, params = _FINISHED, (r.state, r.platform, r.attempts, r.error, r.message_id)
                    move(row, r.state, row[3], r.platform if r.platform is not None else row[4])
                    if row[6] is not None and r.state != DeliveryState.EXPIRED:
                        dead_steps.append((row[0], row[6]))
            if ordered:
                if groups and groups[-1][0] == sql:
                    groups[-1][1].append(params)
                else:
                    groups.append((sql, [params]))
            else:
                batch = by_sql.get(sql)
                if batch is None:
                    batch = by_sql[sql] = []
                    groups.append((sql, batch))
                batch.append(params)
        for sql, batch in groups:
            conn.executemany(sql, batch)
        if dead_steps:
            self._next_step_now(dead_steps)

    def _next_step_now(self, steps: list[tuple[str, str]]) -> None:
        """A person's device that failed (or whose address is invalid) will not ack: their
        next waiting device is due now instead of at its turn (a due time, no state moves)."""
        now = clock.now()
        self.conn.executemany(
            "UPDATE deliveries SET next_at = ? WHERE message_id = (SELECT message_id FROM deliveries "
            "WHERE person_id = ? AND job_id = ? AND state = 'queued' AND attempts = 0 AND next_at > ? "
            "ORDER BY next_at LIMIT 1)", [(now, p, j, now) for j, p in dict.fromkeys(steps)])

    def acknowledge(self, acks: list[FirstAck]) -> None:
        """Deliveries' first acks (each delivery once, read before and still queued or
        sent): acknowledged, with when and the latency; with its send when the send's
        result is in the same batch. One statement per shape."""
        if not acks:
            return
        rows, latency, bucket_of, move, now = self._rows, self._latency, stats.bucket_of, self._move, self.now
        items: list[list[Any]] = []
        with_send: list[list[Any]] = []
        people: list[tuple[str, str, str, float]] = []
        for mid, acked_at, latency_ms, send in acks:
            row = rows[mid]
            if row[6] is not None:  # a step of reaching a person (gateway.pipeline.reach)
                people.append((row[0], row[6], row[1], acked_at))
            if send is not None and send.platform is not None:
                key = send.platform
                sent_at = send.sent_at or now
                with_send.append([mid, acked_at, latency_ms, key, send.attempts, sent_at])
                move(row, "acknowledged", key, key)
                row[5] = sent_at
            else:
                items.append([mid, acked_at, latency_ms])
                move(row, "acknowledged", row[3], row[4])
                key = row[3] if row[3] is not None else (row[4] if row[4] is not None else "")
            slot = latency.get(k := (key, bucket_of(latency_ms)))
            if slot is None:
                latency[k] = [1, latency_ms]
            else:
                slot[0] += 1
                slot[1] += latency_ms
        if items:
            self.conn.execute(_ACKNOWLEDGED, (json.dumps(items),))
        if with_send:
            self.conn.execute(_ACKNOWLEDGED_WITH_SEND, (json.dumps(with_send),))
        if people:
            from gateway.pipeline import reach

            reach.reached(self, people, clock.now())  # the database thread's now: see reach.reached

    def delete(self, message_ids: list[str]) -> None:
        """Delete rows (retention): they leave the per-state counts; the latency histogram
        only ever grows, like a Prometheus histogram. The jobs are deleted with them."""
        rows = self.read(message_ids)
        counts = self._counts
        gone = [m for m in message_ids if m in rows]
        for m in gone:
            row = rows.pop(m)
            k = (row[3] if row[3] is not None else (row[4] if row[4] is not None else ""), row[2])
            counts[k] = counts.get(k, 0) - 1
        if gone:
            self.conn.execute("DELETE FROM deliveries WHERE message_id IN (SELECT value FROM json_each(?))",
                              (json.dumps(gone),))


# ------------------------------------------------------------------ ids
def new_message_id() -> str:
    """A lowercase UUID (contract §6) whose first 48 bits are the time in ms (the RFC 9562
    version 7 layout; 74 random bits follow). Rows made together get neighbouring keys, so
    the ``deliveries`` primary key grows at its end and a batch of updates by message_id
    touches a few B-tree pages instead of one random page per row: about a third less
    SQLite time for a 100,000-row job than random (version 4) ids."""
    return new_message_ids(1)[0]


def new_message_ids(n: int) -> list[str]:
    """``n`` ids as :func:`new_message_id` makes them, for one page of rows: one clock
    reading and one read of random bytes for the page instead of one each per row."""
    ms = (int(clock.now() * 1000) & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | 0b10 << 62
    rand = os.urandom(10 * n)
    out = []
    for i in range(0, 10 * n, 10):
        r = int.from_bytes(rand[i:i + 10])
        h = f"{ms | (r >> 68) << 64 | (r & 0x3FFF_FFFF_FFFF_FFFF):032x}"  # str(uuid.UUID(int=...)) without the object
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


# ------------------------------------------------------------------ expansion
def expand_page(conn: sqlite3.Connection, job_id: str, batch_size: int, now: float,
                platforms: Iterable[str] | None = None, channels: ChannelCache | None = None,
                reach_after_s: float = 120.0) -> bool:
    """Turn the next page of the job's target into delivery rows; True when done.

    The cursor (last device_id) is committed with the rows, so a crash mid-job resumes
    at the next page, and ``UNIQUE(job_id, device_id)`` makes a repeated page harmless.
    Each row gets its route (the bridge of its first attempt among ``platforms``), so
    the dispatcher can fetch due work per bridge. Rows made now were counted as queued
    when the job was accepted; unknown devices move to failed
    (:func:`gateway.pipeline.jobs.expanded_page`). A people target makes each person's
    steps (:func:`gateway.pipeline.reach.expand_page`; ``reach_after_s``: the
    ``[people]`` default)."""
    job = jobs.expansion_state(conn, job_id)
    if job is None or job["expanded"]:
        return True
    due = min(now, job["expires_at"])  # a stored time is never past the TTL (ttl 0: due at once)
    target = json.loads(job["target"])
    cursor = job["expand_cursor"] or ""
    unknown: list[str] = []
    enabled = set(platforms) if platforms is not None else None
    if "people" in target:
        from gateway.pipeline import reach

        wanted = target["people"]
        start = bisect.bisect_right(wanted, cursor) if cursor else 0
        page = wanted[start:start + max(1, batch_size // 8)]  # up to 32 devices a person
        done = start + len(page) >= len(wanted)
        with DeliveryWriter(conn, now) as writer:
            made, failed = reach.expand_page(writer, job_id, page, due, job["expires_at"], reach_after_s, enabled,
                                             channels)
        jobs.expanded_page(conn, job_id, target, made, failed, page[-1] if page else cursor, done, now)
        return done
    if "devices" in target:
        wanted: list[str] = target["devices"]
        start = bisect.bisect_right(wanted, cursor) if cursor else 0
        page = wanted[start:start + batch_size]
        found = registry.channels_of(conn, page)
        rows = [(d, route_of(*found[d], enabled, channels)) for d in page if d in found]
        unknown = [d for d in page if d not in found]
        done = start + batch_size >= len(wanted)
    else:
        found_rows = registry.page_after(conn, cursor, batch_size, target.get("segment"))
        rows = [(d, route_of(c, i, enabled, channels)) for d, c, i in found_rows]
        page = [r[0] for r in found_rows]
        done = len(found_rows) < batch_size
    with DeliveryWriter(conn, now) as writer:
        queued = writer.insert(job_id, rows, "queued", None, due)
        failed = writer.insert(job_id, [(d, None) for d in unknown], "failed", "unknown device", due)
    jobs.expanded_page(conn, job_id, target, queued + failed, failed, page[-1] if page else cursor, done, now)
    return done


# ------------------------------------------------------------------ due work (reads)
@dataclass(slots=True)  # not frozen: one per fetched row (see routing.Route)
class DueDelivery:
    message_id: str
    job_id: str
    device_id: str
    attempts: int
    channels: list[dict[str, Any]] | None  # None: the device was removed (shared with other rows: read only)
    invalid: dict[str, Any]
    route: str | None = None
    resend: bool = False  # already sent, unacked: this is a resend on ``route``
    person_id: str | None = None  # the person a job that targets people reaches through this delivery


_DUE_COLUMNS = ("SELECT d.message_id, d.job_id, d.device_id, d.attempts, v.channels, v.invalid, d.route, d.person_id "
                "FROM deliveries d LEFT JOIN devices v ON v.device_id = d.device_id ")


def _due_rows(rows: Iterable[Any], resend: bool = False, skip: frozenset[str] | set[str] = frozenset(),
              channels: ChannelCache | None = None) -> list[DueDelivery]:
    # Rows in ``skip`` (being sent or recorded) are dropped before their JSON is decoded:
    # under a large job most fetched rows are still in flight, and this runs on the
    # database thread, where every microsecond delays the next commit.
    return [DueDelivery(r[0], r[1], r[2], r[3], decode(r[4], channels) if r[4] else None,
                        json.loads(r[5]) if r[5] and r[5] != "{}" else {}, r[6], resend, r[7])
            for r in rows if r[0] not in skip]


# The states are literals: a partial index is used only for a WHERE that plainly implies its own.
_DUE_SKIPPING = (_DUE_COLUMNS + "WHERE d.state = '{state}' AND d.route = ? AND d.{at} <= ? "
                 "AND d.message_id NOT IN (SELECT value FROM json_each(?)) ORDER BY d.{at} LIMIT ?")
_DUE_QUEUED = _DUE_SKIPPING.format(state="queued", at="next_at")
_DUE_RESEND = _DUE_SKIPPING.format(state="sent", at="resend_at")


def due_for_route(conn: sqlite3.Connection, route: str, now: float, limit: int, resends: bool = True,
                  skip: frozenset[str] | set[str] = frozenset(), channels: ChannelCache | None = None,
                  ) -> list[DueDelivery]:
    """Due work of one bridge, up to ``limit`` rows not in ``skip``: queued deliveries first,
    then sent ones due for a resend.

    Under a large job many due rows are still in flight (being sent or recorded; they stay
    due in the table until their result commits). They are left out by SQLite itself
    (``NOT IN`` the ids handed over as one JSON array, looked up in a temporary index), in
    one statement per kind that walks the due index and joins the device's channels only
    for the rows it returns: no Python object per skipped row, no second lookup per row,
    and the work runs in SQLite, which lets the event loop's thread run meanwhile (the
    database thread's Python holds the GIL)."""
    ids = json.dumps(list(skip)) if skip else "[]"
    out = _due_rows(conn.execute(_DUE_QUEUED, (route, now, ids, limit)), channels=channels)
    if resends and len(out) < limit:
        out += _due_rows(conn.execute(_DUE_RESEND, (route, now, ids, limit - len(out))), resend=True,
                         channels=channels)
    return out


def due_deliveries(conn: sqlite3.Connection, now: float, limit: int) -> list[DueDelivery]:
    """Every due queued delivery, whatever its route (for tools and tests; the dispatcher
    fetches per route). Reads the queued rows' index, ``deliveries_route_due``, whole."""
    return _due_rows(conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.next_at <= ? "
                                  "ORDER BY d.next_at LIMIT ?", (now, limit)))


# A stored channel's bridge in SQL, as devices.models.raw_bridge_key: "fcm", or "fcm:<app>".
_CHANNEL_BRIDGE = "(c.value->>'platform' || COALESCE(':' || (c.value->>'app'), ''))"


def movable_for_route(conn: sqlite3.Connection, route: str, now: float, usable: Iterable[str], limit: int,
                      skip: frozenset[str] | set[str] = frozenset(), channels: ChannelCache | None = None,
                      ) -> list[DueDelivery]:
    """Due queued deliveries of a down bridge whose device has a channel on one of the
    ``usable`` bridges (the only ones that can move: the rest wait for the bridge)."""
    rows = conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route = ? AND d.next_at <= ? "
                        "AND d.message_id NOT IN (SELECT value FROM json_each(?)) "
                        "AND EXISTS (SELECT 1 FROM json_each(v.channels) c "
                        f"WHERE {_CHANNEL_BRIDGE} IN (SELECT value FROM json_each(?))) LIMIT ?",
                        (route, now, json.dumps(list(skip)), json.dumps(list(usable)), limit))
    return _due_rows(rows, channels=channels)


def unexplained_for_route(conn: sqlite3.Connection, route: str, now: float, limit: int,
                          skip: frozenset[str] | set[str] = frozenset(), channels: ChannelCache | None = None,
                          ) -> list[DueDelivery]:
    """Due queued deliveries of an unhealthy bridge that do not say yet why they wait."""
    rows = conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route = ? AND d.next_at <= ? "
                        "AND d.last_error IS NULL AND d.message_id NOT IN (SELECT value FROM json_each(?)) LIMIT ?",
                        (route, now, json.dumps(list(skip)), limit))
    return _due_rows(rows, channels=channels)


def next_due_for_route(conn: sqlite3.Connection, route: str, now: float, resends: bool = True) -> float | None:
    """When the bridge's next delivery (or resend) falls due after ``now``."""
    a = conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route = ? AND next_at > ?",
                     (route, now)).fetchone()[0]
    b = conn.execute("SELECT MIN(resend_at) FROM deliveries WHERE state = 'sent' AND route = ? AND resend_at > ?",
                     (route, now)).fetchone()[0] if resends else None
    return min((t for t in (a, b) if t is not None), default=None)


def unrouted_due(conn: sqlite3.Connection, now: float, routable: Iterable[str], limit: int,
                 channels: ChannelCache | None = None) -> list[DueDelivery]:
    """Due queued deliveries without a route, or routed to a bridge that is not enabled
    (the config changed, or expansion found no usable channel): to be routed again."""
    enabled = set(routable)
    out = _due_rows(conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route IS NULL AND d.next_at <= ? "
                                 "LIMIT ?", (now, limit)), channels=channels)
    # The routes of queued rows, walked on the index one route to the next (as next_due_at):
    # a platform, or an app of one, that is no longer in the config.
    route = conn.execute("SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route IS NOT NULL").fetchone()[0]
    while route is not None and len(out) < limit:
        if route not in enabled:
            out += _due_rows(conn.execute(_DUE_COLUMNS + "WHERE d.state = 'queued' AND d.route = ? AND d.next_at <= ? "
                                          "LIMIT ?", (route, now, limit - len(out))), channels=channels)
        route = conn.execute("SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route > ?",
                             (route,)).fetchone()[0]
    return out


def next_due_at(conn: sqlite3.Connection) -> float | None:
    """The earliest due time of any queued delivery: the least of one probe of
    ``deliveries_route_due`` per route (NULL: not routed yet), the routes found by walking
    that index from one route to the next."""
    times = [conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route IS NULL").fetchone()[0]]
    route = conn.execute("SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route IS NOT NULL").fetchone()[0]
    while route is not None:
        times.append(conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route = ?",
                                  (route,)).fetchone()[0])
        route = conn.execute("SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route > ?",
                             (route,)).fetchone()[0]
    return min((t for t in times if t is not None), default=None)


def expiring(conn: sqlite3.Connection, now: float, paused: Iterable[str], limit: int = 500,
             channels: ChannelCache | None = None) -> list[DueDelivery]:
    """Queued deliveries that must expire although no bridge will fetch them: those of jobs
    whose TTL has passed (their bridge may be paused or saturated), and those of ``ttl = 0``
    jobs ("now or never") whose bridge is paused now."""
    paused = sorted(set(paused))
    out: list[DueDelivery] = []
    for job in jobs.expiring_jobs(conn, now):
        if len(out) >= limit:
            break
        if job["expires_at"] <= now and job["ttl"] > 0:
            rows = conn.execute(_DUE_COLUMNS + "WHERE d.job_id = ? AND d.state = 'queued' LIMIT ?",
                                (job["job_id"], limit - len(out)))
        elif paused:
            marks = ",".join("?" * len(paused))
            rows = conn.execute(_DUE_COLUMNS + f"WHERE d.job_id = ? AND d.state = 'queued' AND d.route IN ({marks}) "
                                "LIMIT ?", (job["job_id"], *paused, limit - len(out)))
        else:
            continue
        out += _due_rows(rows, channels=channels)
    return out


def device_of(conn: sqlite3.Connection, message_id: str) -> str | None:
    """The device a delivery is for (None: no such delivery, or pruned)."""
    row = conn.execute("SELECT device_id FROM deliveries WHERE message_id = ?", (message_id,)).fetchone()
    return row[0] if row else None


def devices_of_job(conn: sqlite3.Connection, job_id: str) -> list[str]:
    """The devices a job's deliveries are for."""
    return [r[0] for r in conn.execute("SELECT device_id FROM deliveries WHERE job_id = ?", (job_id,))]


def of_job(conn: sqlite3.Connection, job_id: str, limit: int) -> list[str]:
    """Up to ``limit`` message_ids of a job's deliveries (retention deletes them in pages)."""
    return [r[0] for r in conn.execute("SELECT message_id FROM deliveries WHERE job_id = ? LIMIT ?", (job_id, limit))]


def delivery_rows(conn: sqlite3.Connection, job_id: str, limit: int = 100000) -> list[dict[str, Any]]:
    """A job's deliveries by device_id, each with its stored acks (``acks``, as
    :func:`gateway.pipeline.acks.acks_of_job` gives them)."""
    from gateway.pipeline import acks  # acks writes deliveries through this module

    now = clock.now()  # next_at is on the gateway's clock
    rows = []
    for r in conn.execute("SELECT message_id, device_id, state, platform, route, attempts, last_error, latency_ms, "
                          "moved, next_at, person_id FROM deliveries WHERE job_id = ? ORDER BY device_id LIMIT ?",
                          (job_id, limit)):
        row = dict(r)
        if row["person_id"] is None:
            del row["person_id"]  # only a people job's deliveries are for a person
        row["reason"] = wait_reason(row["state"], row.pop("next_at"), row["last_error"], row["moved"], now,
                                    row.get("person_id") is not None and row["attempts"] == 0)
        rows.append(row)
    stored = acks.acks_of_job(conn, job_id)
    for row in rows:
        row["acks"] = stored.get(row["message_id"], [])
    return rows


def wait_reason(state: str, next_at: float | None, last_error: str | None, moved: str | None,
                now: float, step: bool = False) -> str | None:
    """Why a queued delivery waits (contract §8), from what its row holds: a bridge that
    is unhealthy, a retry's backoff, a move to the device's next channel, or (``step``: a
    person's delivery not tried yet) the person's earlier device's turn."""
    if state != _IS_QUEUED:
        return None
    if last_error and last_error.startswith(QUIET_HOLD):
        return last_error  # "quiet hours until 2026-12-08 06:00 CET (Europe/Berlin)"
    if step and not last_error and next_at is not None and next_at > now:
        from gateway.pipeline.reach import WAITING

        return f"{WAITING} until {iso(datetime.fromtimestamp(next_at, UTC))}"
    if last_error and " unhealthy" in last_error:
        return f"bridge {last_error}"  # "bridge fcm unhealthy: <why>"
    if last_error and next_at is not None and next_at > now:
        return f"backoff until {iso(datetime.fromtimestamp(next_at, UTC))}: {last_error}"
    if moved:
        return moved
    return last_error


def _chunks(items: list[Any], n: int = 500) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]



# ------------------------------------------------------------------ reads for other packages
# The operator page's views of deliveries (read-only connections, pages on indexes).
def acked_latency(conn: sqlite3.Connection, job_id: str) -> tuple[int, float | None, float | None]:
    """(count, mean, max) of the ack latency of a job's acknowledged deliveries, ms."""
    row = conn.execute("SELECT COUNT(latency_ms), AVG(latency_ms), MAX(latency_ms) FROM deliveries "
                       "WHERE job_id = ? AND state = 'acknowledged'", (job_id,)).fetchone()
    return int(row[0] or 0), row[1], row[2]


def acked_latencies(conn: sqlite3.Connection, job_id: str) -> list[float]:
    """Every ack latency of a job's acknowledged deliveries, ms, ascending."""
    values = [r[0] for r in conn.execute("SELECT latency_ms FROM deliveries WHERE job_id = ? AND "
                                         "state = 'acknowledged' AND latency_ms IS NOT NULL", (job_id,))]
    values.sort()
    return values


def acked_latency_histogram(conn: sqlite3.Connection, job_id: str, bounds: Iterable[float]) -> dict[int, int]:
    """bucket index → how many of a job's ack latencies fall in it (``latency <= bounds[i]``;
    ``len(bounds)`` above the last), in one pass without sorting."""
    bounds = list(bounds)
    case = ("CASE " + " ".join(f"WHEN latency_ms <= {b!r} THEN {i}" for i, b in enumerate(bounds))
            + f" ELSE {len(bounds)} END")
    return {int(b): int(n) for b, n in conn.execute(
        f"SELECT {case} AS b, COUNT(*) FROM deliveries WHERE job_id = ? AND state = 'acknowledged' "
        "AND latency_ms IS NOT NULL GROUP BY b", (job_id,))}


def job_deliveries_after(conn: sqlite3.Connection, job_id: str, after: str, limit: int,
                         states: tuple[str, ...] = ()) -> list[sqlite3.Row]:
    """Up to ``limit`` of a job's deliveries by device_id after ``after`` (the ``UNIQUE
    (job_id, device_id)`` index), optionally only some states."""
    where = "job_id = ? AND device_id > ?"
    args: list[Any] = [job_id, after]
    if states:
        where += f" AND state IN ({','.join('?' * len(states))})"
        args += list(states)
    return conn.execute("SELECT message_id, device_id, state, platform, attempts, last_error, latency_ms, sent_at, "
                        f"acked_at, moved, next_at FROM deliveries WHERE {where} ORDER BY device_id LIMIT ?",
                        (*args, limit)).fetchall()


def last_acked_at(conn: sqlite3.Connection, device_ids: list[str]) -> dict[str, float]:
    """device_id → when its latest acknowledged delivery was acked (index deliveries_by_device)."""
    if not device_ids:
        return {}
    marks = ",".join("?" * len(device_ids))
    return {r[0]: r[1] for r in conn.execute(
        f"SELECT device_id, MAX(acked_at) FROM deliveries WHERE device_id IN ({marks}) AND acked_at IS NOT NULL "
        "GROUP BY device_id", device_ids)}


def recent_of_device(conn: sqlite3.Connection, device_id: str, limit: int) -> list[sqlite3.Row]:
    """A device's latest deliveries, newest job first, with their job's ``created_at``."""
    return conn.execute("SELECT d.job_id, d.state, d.platform, d.attempts, d.last_error, d.latency_ms, j.created_at "
                        "FROM deliveries d JOIN jobs j ON j.job_id = d.job_id WHERE d.device_id = ? "
                        "ORDER BY j.created_at DESC LIMIT ?", (device_id, limit)).fetchall()


# A person's own notifications (their page, gateway/http/me.py): the deliveries made for
# them (``person_id``) and those to a device in their reach list from jobs for no person.
# A job that reaches them makes a row for each of their devices up front, the later ones
# waiting their turn (gateway.pipeline.reach): such a job is one row here, the delivery that
# got furthest (acknowledged, sent, queued, the rest; the earliest turn first). Keyset order
# (job created_at, message_id) descending. Reads go through deliveries_by_person and
# deliveries_by_device; the one sort is of the person's own rows.
_PERSON_ROWS = """
WITH mine AS (
    SELECT d.message_id, d.job_id, d.device_id, d.state, d.person_id, d.attempts, d.next_at, d.last_error, d.moved,
           ROW_NUMBER() OVER (PARTITION BY d.job_id, d.person_id ORDER BY
               CASE d.state WHEN 'acknowledged' THEN 0 WHEN 'sent' THEN 1 WHEN 'queued' THEN 2 ELSE 3 END,
               d.attempts DESC, d.next_at, d.message_id) AS pick
    FROM deliveries d WHERE {cond})
SELECT m.*, j.notification, j.created_at FROM mine m JOIN jobs j ON j.job_id = m.job_id
"""


def _of_person(person_id: str, device_ids: Iterable[str]) -> tuple[str, list[Any]]:
    """The condition (on ``deliveries d``) that a delivery is the person's, and its values."""
    ids = list(device_ids)
    sql = "(d.person_id = ?"
    if ids:
        sql += f" OR (d.person_id IS NULL AND d.device_id IN ({','.join('?' * len(ids))}))"
    return sql + ")", [person_id, *ids]


def person_page(conn: sqlite3.Connection, person_id: str, device_ids: Iterable[str], limit: int,
                before: str | None = None) -> list[sqlite3.Row] | None:
    """Up to ``limit`` of the person's rows (see above), newest first, after the one whose
    message_id is ``before``; None when ``before`` is not one of the person's deliveries."""
    cond, args = _of_person(person_id, device_ids)
    where, more = "WHERE (m.person_id IS NULL OR m.pick = 1) ", []
    if before is not None:
        cursor = conn.execute(f"SELECT j.created_at FROM deliveries d JOIN jobs j ON j.job_id = d.job_id "
                              f"WHERE d.message_id = ? AND {cond}", [before, *args]).fetchone()
        if cursor is None:
            return None
        where += "AND (j.created_at < ? OR (j.created_at = ? AND m.message_id < ?)) "
        more = [cursor[0], cursor[0], before]
    return conn.execute(_PERSON_ROWS.format(cond=cond) + where + "ORDER BY j.created_at DESC, m.message_id DESC "
                        "LIMIT ?", [*args, *more, limit]).fetchall()


def person_row(conn: sqlite3.Connection, person_id: str, device_ids: Iterable[str],
               message_id: str) -> sqlite3.Row | None:
    """One of the person's deliveries (any row of a job that reaches them), or None."""
    cond, args = _of_person(person_id, device_ids)
    return conn.execute(_PERSON_ROWS.format(cond=f"d.message_id = ? AND {cond}"), [message_id, *args]).fetchone()


def oldest_queued(conn: sqlite3.Connection, now: float | None = None) -> dict[str, float]:
    """platform → age (s) of the oldest queued delivery, counted from its job's creation.

    Only jobs with queued deliveries are visited (their count is kept on the job row), and
    each platform's oldest is found from the oldest job down, one probe of the partial
    index of queued rows each; the platforms with queued rows come from the aggregates.
    """
    now = clock.now() if now is None else now
    platforms = [p for (p, s), n in stats.delivery_counts(conn).items() if s == "queued" and n > 0]
    if not platforms:
        return {}
    out: dict[str, float] = {}
    for job_id, created_at in jobs.with_queued_oldest_first(conn):
        for platform in platforms:
            if platform in out:
                continue
            hit = conn.execute(f"SELECT 1 FROM deliveries WHERE job_id = ? AND state = 'queued' "
                               f"AND {stats.PLATFORM_KEY} = ? LIMIT 1", (job_id, platform)).fetchone()
            if hit is not None:
                out[platform] = max(0.0, now - created_at)
        if len(out) == len(platforms):
            break
    return out


def apply_results(conn: sqlite3.Connection, results: list[Result], now: float) -> None:
    """The dispatcher's results of one batch (:meth:`DeliveryWriter.record`)."""
    with DeliveryWriter(conn, now) as writer:
        writer.record(results)


def shift_deadlines(conn: sqlite3.Connection, delta: float) -> int:
    """Move the deliveries' due and resend times by ``delta`` s (gateway.clock re-anchored;
    :meth:`DeliveryWriter.shift_deadlines`). Times of what already happened (sent_at,
    acked_at) are not moved."""
    with DeliveryWriter(conn, clock.now()) as writer:
        return writer.shift_deadlines(delta)

__all__ = ["DeliveryWriter", "apply_results", "shift_deadlines", "acked_latencies", "acked_latency", "acked_latency_histogram", "job_deliveries_after",
           "last_acked_at", "oldest_queued", "person_page", "person_row", "recent_of_device", "DueDelivery", "FINAL_DELIVERY_STATES", "FirstAck", "Result", "delivery_rows",
           "device_of", "devices_of_job", "due_deliveries", "due_for_route", "movable_for_route", "unexplained_for_route", "wait_reason", "expand_page", "expiring", "new_message_id", "new_message_ids",
           "next_due_at", "next_due_for_route", "of_job", "unrouted_due"]
