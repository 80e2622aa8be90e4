"""The gateway's own time: Unix seconds that advance with ``CLOCK_MONOTONIC``.

Every time the gateway stores or compares — due times of deliveries (backoff, resends),
the TTL, alarm timers (``for_s``, ``stale_s``, escalation), the timestamps it writes — is
read from :func:`now`. It starts equal to the wall clock and then counts elapsed
seconds, so a step of the system clock (NTP, an operator, a VM resume) neither fires,
freezes nor repeats a timer: a forward step of a day does not make every deadline due, a
backward step of an hour does not hold them for an hour.

Stored deadlines must keep their meaning across a restart, and the times the gateway
shows (``created_at``, ``sent_at``, ``fired_at``, ``expires_at``) should be the real time.
So **every daemon start re-anchors** the clock to the wall clock, and shifts the stored
future deadlines by the difference between the old timeline and the wall clock, in one
transaction before any service runs (:func:`establish`): each remaining duration is kept
exactly, and written times are the system clock's again. Each table's owner shifts its own
deadlines (``shift_deadlines(conn, delta)``, listed in :func:`_shifters`). Historical
times (``created_at``, ``sent_at``, ``fired_at``, ...) are not shifted: they stay as the
timeline they were written on showed them.

Where the old timeline is at the start: the time base (the kernel's boot id and the offset
from ``CLOCK_MONOTONIC``, which is system-wide and counts from boot) is kept in table
``gateway_clock``. On the same boot the old timeline is known exactly (the downtime is
measured by the monotonic clock). After a reboot the monotonic clock starts again, so the
downtime can only be taken from the wall clock: the old timeline is the wall clock plus
the difference it had at the last save, and never before the last saved time (a box that
boots with its clock in 1970 loses no deadline: they are shifted back with it).

A step **while the daemon runs** is detected (:func:`keep_saved` compares the wall clock
with the monotonic one every few seconds) and logged once; the running timeline is kept,
so no timer moves, and the next start re-anchors it.

Outside the daemon (CLI commands that write jobs or acks), :func:`attach` adopts the time
base stored by the daemon on this boot, so both write times on one timeline.

External instants stay on the wall clock: JWTs and OAuth tokens for the push services,
HTTP-date ``Retry-After`` values, times given by devices.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gateway.storage import Database, is_storage_error

log = structlog.get_logger(__name__)

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
SAVE_EVERY_S = 10.0  # how often the daemon records where the timeline is (for the next boot)
CHECK_EVERY_S = 2.0  # how often the daemon looks for a step of the system clock
STEP_S = 2.0  # a change of wall-minus-monotonic larger than this is a step (slewing is far slower)
REANCHOR_MIN_S = 1.0  # a start re-anchors (and shifts deadlines) only when off by more than this

# now() = _offset + time.monotonic(); starts as the wall clock at import.
_offset = time.time() - time.monotonic()


def now() -> float:
    """The gateway's time in Unix seconds (see the module docstring)."""
    return _offset + time.monotonic()


def utcnow() -> datetime:
    return datetime.fromtimestamp(now(), UTC)


def skew() -> float:
    """How far the gateway's time is ahead of the wall clock (negative: behind), seconds."""
    return now() - time.time()


def boot_id() -> str | None:
    try:
        return BOOT_ID_FILE.read_text().strip() or None
    except OSError:
        return None


def _v1_table(conn: sqlite3.Connection) -> None:
    """The time base's one row, as the gateway kept it before the schema registry."""
    conn.execute("CREATE TABLE IF NOT EXISTS gateway_clock (id INTEGER PRIMARY KEY CHECK (id = 1), "
                 "boot_id TEXT, mono_offset REAL NOT NULL, saved_at REAL NOT NULL, saved_wall REAL NOT NULL)")


# The clock's migrations, oldest first, run by the schema registry (gateway.migrations)
# when the database is opened: never edit a released one.
MIGRATIONS = (_v1_table,)


def _stored(conn: sqlite3.Connection) -> tuple[str | None, float, float, float] | None:
    try:
        row = conn.execute("SELECT boot_id, mono_offset, saved_at, saved_wall FROM gateway_clock WHERE id = 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else (row[0], float(row[1]), float(row[2]), float(row[3]))


def _shifters() -> list[Callable[[sqlite3.Connection, float], int]]:
    """The owners of stored deadlines (imported here: they import this module)."""
    from gateway.alarms import store as alarms_store
    from gateway.broker import state as broker_state
    from gateway.pipeline import deliveries, jobs
    from gateway.upstream import outbox

    return [deliveries.shift_deadlines, jobs.shift_deadlines, alarms_store.shift_deadlines,
            broker_state.shift_deadlines, outbox.shift_deadlines]


def shift_columns(conn: sqlite3.Connection, table: str, column: str, delta: float, where: str = "") -> int:
    """``column += delta`` on the rows ``where`` selects; a table or column that does not
    exist yet (an older database, before its owner's migration ran) holds nothing to shift."""
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    if column not in have:
        return 0
    cond = f"{column} IS NOT NULL" + (f" AND ({where})" if where else "")
    return conn.execute(f"UPDATE {table} SET {column} = {column} + ? WHERE {cond}", (delta,)).rowcount


def _stored_timeline(stored: tuple[str | None, float, float, float], boot: str | None, mono: float,
                     wall: float) -> float:
    """Where the stored timeline is now: exact on the same boot; after a reboot, the wall
    clock plus the difference saved last, never before the last saved time."""
    boot_was, mono_offset, saved_at, saved_wall = stored
    if boot is not None and boot_was == boot:
        return mono_offset + mono
    return max(saved_at, wall + (saved_at - saved_wall))


def establish(conn: sqlite3.Connection) -> float:
    """Daemon start, in the caller's transaction: re-anchor the clock to the wall clock and
    shift the stored deadlines by how far that moves the timeline; returns the shift (s).

    The first start of a database takes the wall clock. A timeline within
    ``REANCHOR_MIN_S`` of the wall clock is continued as it is (no rows rewritten)."""
    global _offset
    boot, mono, wall = boot_id(), time.monotonic(), time.time()
    stored = _stored(conn)
    delta = 0.0
    if stored is None:
        offset = wall - mono
    else:
        old_now = _stored_timeline(stored, boot, mono, wall)
        offset = old_now - mono
        if abs(wall - old_now) > REANCHOR_MIN_S:
            delta = wall - old_now
            offset = wall - mono
    _offset = offset
    try:
        shifted = sum(shift(conn, delta) for shift in _shifters()) if delta else 0
        save(conn)
    except BaseException:
        _offset = offset - delta  # not stored (the transaction rolls back): keep the old timeline
        raise
    if delta:
        log.warning("gateway clock re-anchored to the system clock (it was stepped); stored deadlines shifted "
                    "so every remaining duration is kept", step_s=round(delta, 1), rows_shifted=shifted)
    return delta


def save(conn: sqlite3.Connection) -> None:
    """Store the time base and where the timeline is against the wall clock (the latter is
    used only after a reboot)."""
    conn.execute("INSERT INTO gateway_clock(id, boot_id, mono_offset, saved_at, saved_wall) VALUES (1, ?, ?, ?, ?) "
                 "ON CONFLICT(id) DO UPDATE SET boot_id = excluded.boot_id, mono_offset = excluded.mono_offset, "
                 "saved_at = excluded.saved_at, saved_wall = excluded.saved_wall",
                 (boot_id(), _offset, now(), time.time()))


def attach(conn: sqlite3.Connection) -> None:
    """A CLI process: write on the stored timeline (read only): the daemon's time base if it
    was set on this boot, else where the daemon's next start will take the timeline from,
    so that start shifts what this process wrote with everything else."""
    global _offset
    stored = _stored(conn)
    if stored is not None:
        mono = time.monotonic()
        _offset = _stored_timeline(stored, boot_id(), mono, time.time()) - mono


async def start(db: Database) -> None:
    """The daemon's start: :func:`establish` in its own transaction. A database that refuses
    the write (full disk) still lends its stored time base; the next save writes it."""
    try:
        await db.run(establish)
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        log.warning("cannot store the gateway's time base; using the stored one if any", error=str(exc))
        try:
            await db.run(attach)
        except Exception as exc2:
            if not is_storage_error(exc2):
                raise


async def keep_saved(db: Database) -> None:
    """Every SAVE_EVERY_S, :func:`save` (a failed write is retried next time); every
    CHECK_EVERY_S, look for a step of the system clock (until cancelled)."""
    watch = StepWatch()
    last_save = time.monotonic()
    while True:
        await asyncio.sleep(CHECK_EVERY_S)
        watch.check()
        if time.monotonic() - last_save < SAVE_EVERY_S:
            continue
        last_save = time.monotonic()
        try:
            await db.run(save)
        except Exception as exc:
            if not is_storage_error(exc):
                raise


class StepWatch:
    """Notices a step of the system clock: the wall clock minus the monotonic one moves by
    more than STEP_S between two checks. Logged once per step; the gateway keeps its
    timeline (its timers are unaffected) and the next start re-anchors it."""

    def __init__(self) -> None:
        self.base = time.time() - time.monotonic()

    def check(self) -> float | None:
        """The step since the last check (s), or None."""
        base = time.time() - time.monotonic()
        moved, self.base = base - self.base, base
        if abs(moved) <= STEP_S:
            return None
        log.warning("system clock stepped; timers keep the gateway's clock, and times it writes differ from "
                    "the system clock by ahead_s until the next start re-anchors it",
                    step_s=round(moved, 1), ahead_s=round(skew(), 1))
        return moved
