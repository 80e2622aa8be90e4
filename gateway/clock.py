"""The gateway's own time: Unix seconds that advance with ``CLOCK_MONOTONIC``.

Every time the gateway stores or compares — due times of deliveries (backoff, resends),
the TTL, alarm timers (``for_s``, ``stale_s``, escalation), the timestamps it writes — is
read from :func:`now`. It starts equal to the wall clock and then counts elapsed
seconds, so a step of the system clock (NTP, an operator, a VM resume) neither fires,
freezes nor repeats a timer: a forward step of a day does not make every deadline due, a
backward step of an hour does not hold them for an hour.

Stored times must keep their meaning across a restart, so the time base is kept in the
database (table ``gateway_clock``): the kernel's boot id and the offset from
``CLOCK_MONOTONIC`` (which is system-wide and counts from boot). A restart on the same boot
continues the same timeline exactly, whatever the wall clock did meanwhile (the downtime is
measured by the monotonic clock). After a reboot the monotonic clock starts again, so the
downtime can only be taken from the wall clock: the timeline resumes at the wall clock plus
the difference it had at the last save (a few seconds before shutdown), and never before
the last saved time (a box that boots with its clock in 1970 freezes nothing).

Outside the daemon (CLI commands that write jobs or acks), :func:`attach` adopts the time
base stored by the daemon on this boot, so both write times on one timeline.

External instants stay on the wall clock: JWTs and OAuth tokens for the push services,
HTTP-date ``Retry-After`` values, times given by devices.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from gateway.storage import Database, is_storage_error

log = structlog.get_logger(__name__)

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
SAVE_EVERY_S = 10.0  # how often the daemon records where the timeline is (for the next boot)

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


def migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS gateway_clock (id INTEGER PRIMARY KEY CHECK (id = 1), "
                 "boot_id TEXT, mono_offset REAL NOT NULL, saved_at REAL NOT NULL, saved_wall REAL NOT NULL)")


def _stored(conn: sqlite3.Connection) -> tuple[str | None, float, float, float] | None:
    try:
        row = conn.execute("SELECT boot_id, mono_offset, saved_at, saved_wall FROM gateway_clock WHERE id = 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else (row[0], float(row[1]), float(row[2]), float(row[3]))


def establish(conn: sqlite3.Connection) -> None:
    """Daemon start: continue the stored timeline (same boot), or resume it after a reboot;
    the first start of a database takes the wall clock. Runs in the caller's transaction."""
    global _offset
    migrate(conn)
    boot, mono, wall = boot_id(), time.monotonic(), time.time()
    stored = _stored(conn)
    if stored is None:
        offset = wall - mono
    elif boot is not None and stored[0] == boot:
        offset = stored[1]
    else:
        _, _, saved_at, saved_wall = stored
        offset = max(saved_at, wall + (saved_at - saved_wall)) - mono
    _offset = offset
    save(conn)
    if stored is not None and abs(skew()) > 1.0:
        log.warning("gateway time differs from the system clock (a clock step); timers keep their own",
                    ahead_s=round(skew(), 1))


def save(conn: sqlite3.Connection) -> None:
    """Store the time base and where the timeline is against the wall clock (the latter is
    used only after a reboot)."""
    migrate(conn)
    conn.execute("INSERT INTO gateway_clock(id, boot_id, mono_offset, saved_at, saved_wall) VALUES (1, ?, ?, ?, ?) "
                 "ON CONFLICT(id) DO UPDATE SET boot_id = excluded.boot_id, mono_offset = excluded.mono_offset, "
                 "saved_at = excluded.saved_at, saved_wall = excluded.saved_wall",
                 (boot_id(), _offset, now(), time.time()))


def attach(conn: sqlite3.Connection) -> None:
    """A CLI process: adopt the daemon's time base if it was set on this boot (read only)."""
    global _offset
    stored = _stored(conn)
    boot = boot_id()
    if stored is not None and boot is not None and stored[0] == boot:
        _offset = stored[1]


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
    """Every SAVE_EVERY_S, :func:`save` (until cancelled); a failed write is retried next time."""
    while True:
        await asyncio.sleep(SAVE_EVERY_S)
        try:
            await db.run(save)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
