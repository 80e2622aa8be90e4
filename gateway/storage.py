"""The gateway's SQLite database: one file, WAL, one writer thread.

Every component (pipeline, broker state, upstream buffer) keeps its tables here so
that one transaction can span them (a job's status and its upstream copy commit
together). All SQL runs on one dedicated thread: SQLite writes with ``synchronous=FULL``
fsync, and the event loop must never wait on a disk. Callers hand a function that gets
the connection and runs inside one transaction::

    rows = await db.run(lambda conn: conn.execute("SELECT ...").fetchall())

Readers in other processes (the CLI) open their own connection; WAL lets them read
while the daemon writes.

Failures: a full disk, a read-only file or a lock held too long surface as
``sqlite3.Error`` (or ``OSError``) from ``run``; :func:`is_storage_error` tells them
from bugs, and :class:`FailureEpisode` logs them once per episode, not per message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

Migration = Callable[[sqlite3.Connection], None]

log = structlog.get_logger(__name__)

# The daemon waits for another process's write lock in short steps (so a stop can cut
# the wait short) up to LOCK_WAIT_S in all, as a 30 s busy_timeout would.
LOCK_WAIT_S = 30.0
LOCK_STEP_MS = 200

# The daemon's writer connection only (it does every write of a fan-out; the CLI's and the
# HTTP API's short-lived connections keep SQLite's defaults). Durability is unchanged (WAL,
# synchronous=FULL: every commit is on disk before it returns). Measured on the pipeline
# bench's SQLite-only loop, 100,000 deliveries:
# - cache_size: 16 MiB of page cache instead of 2 MiB, so a 100,000-row job's index pages
#   stay in memory instead of being read back from the OS for every batch (-6 % CPU);
#   it fills only as it is used, so idle RSS does not change, and the job's peak stays
#   well inside its +64 MB budget;
# - wal_autocheckpoint: copy the WAL into the database every 10,000 pages (~40 MB of WAL
#   on disk) instead of every 1,000: the hot index pages a fan-out rewrites in every batch
#   are copied (and the database fsynced) a tenth as often (-7 % CPU more). A checkpoint
#   moves committed pages only; a crash replays the WAL at the next open.
WRITER_PRAGMAS = ("PRAGMA cache_size = -16384", "PRAGMA wal_autocheckpoint = 10000")


class NotStored(Exception):
    """An item could not be committed now (disk full, database locked or read-only, a full
    upstream buffer under ``overflow = "refuse-new"``). Whoever received it must not
    acknowledge it (no PUBACK, no HTTP 2xx): the sender keeps it and tries again later.
    """


class DatabaseClosed(NotStored, RuntimeError):
    """The database was shut down (the daemon is stopping): nothing can be committed, so a
    message whose handler meets this is held for redelivery, never set aside as a bug."""


STORAGE_ERRORS: tuple[type[BaseException], ...] = (NotStored, sqlite3.Error, OSError)


def is_storage_error(exc: BaseException) -> bool:
    """True for "could not commit now" (the sender should retry), False for a bug."""
    return isinstance(exc, STORAGE_ERRORS)


class FailureEpisode:
    """Logs a failing dependency once when it starts failing and once when it recovers.

    A full disk makes every message fail; one line per message would flood the journal
    (and, on the same full disk, fail to be written). ``failed`` returns the delay to wait
    before the next try: exponential, capped.
    """

    def __init__(self, logger: Any, what: str, initial: float = 0.5, maximum: float = 10.0):
        self.log = logger
        self.what = what
        self.initial = initial
        self.maximum = maximum
        self.since: float | None = None
        self.failures = 0
        self._delay = initial

    @property
    def failing(self) -> bool:
        return self.since is not None

    def note(self, exc: BaseException, **fields: Any) -> None:
        """Count a failure; logged only if it starts an episode."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self._delay = self.initial
            self.log.error(f"{self.what} failing; will retry", error=f"{exc.__class__.__name__}: {exc}", **fields)

    def failed(self, exc: BaseException, **fields: Any) -> float:
        """Count a failure (see ``note``); the delay before the retry."""
        self.note(exc, **fields)
        return self.delay()

    def delay(self) -> float:
        """The next wait (doubling from ``initial`` up to ``maximum``)."""
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    def ok(self, **fields: Any) -> None:
        """A success: ends an episode (logged once) and resets the delay."""
        self._delay = self.initial
        if self.since is None:
            return
        self.log.warning(f"{self.what} recovered", failures=self.failures,
                         after_s=round(time.monotonic() - self.since, 1), **fields)
        self.since = None
        self.failures = 0


# The pipeline's batched writes use the JSON operator ``->>`` (SQLite 3.38) and
# ``UPDATE … FROM`` (3.33); an older library would fail on the first fan-out with a bare
# syntax error, so it is refused when the database is opened, by name.
MIN_SQLITE = (3, 38, 0)


class SqliteTooOld(RuntimeError):
    pass


def check_sqlite(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    if version < MIN_SQLITE:
        raise SqliteTooOld(
            f"SQLite {'.'.join(map(str, version))} is too old: the gateway needs "
            f"{'.'.join(map(str, MIN_SQLITE))} or newer (the library Python's sqlite3 module "
            f"is linked against; Debian 12's is 3.40)")


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the gateway's pragmas (also used by the CLI)."""
    check_sqlite()
    path.parent.mkdir(parents=True, exist_ok=True)
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is on disk before we acknowledge what it holds (power cuts included).
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def sql_statements(script: str) -> list[str]:
    """The statements of an SQL script, to run one by one with ``execute`` inside the
    caller's transaction (``executescript`` would COMMIT it first). Splits on ``;`` at a
    line's end, keeping a trigger's body (``CREATE TRIGGER … BEGIN …; END;``) whole;
    ``--`` comments are dropped."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines():
        stripped = line.split("--", 1)[0].rstrip()
        if not stripped:
            continue
        current += stripped + "\n"
        in_trigger = current.lstrip().upper().startswith("CREATE TRIGGER")
        if stripped.endswith(";") and (not in_trigger or stripped.strip().upper() == "END;"):
            statements.append(current.strip().rstrip(";"))
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run every statement of ``script`` (:func:`sql_statements`) in the caller's transaction."""
    for statement in sql_statements(script):
        conn.execute(statement)


def _rollback(conn: sqlite3.Connection) -> None:
    # After SQLITE_FULL or an I/O error SQLite may already have rolled back; a second
    # ROLLBACK would raise and hide the real error.
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T],
                begin: Callable[[sqlite3.Connection], None] | None = None) -> T:
    """Run ``fn(conn)`` in one write transaction (BEGIN IMMEDIATE: no upgrade deadlocks).

    A failing COMMIT (disk full) rolls back too, so the connection is never left inside
    a transaction that every later BEGIN would trip over.
    """
    if begin is None:
        conn.execute("BEGIN IMMEDIATE")
    else:
        begin(conn)
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return result


class _DaemonThreadExecutor(concurrent.futures.Executor):
    """One worker thread, a daemon thread: a statement stuck on a dead disk must not keep
    the process from exiting after a stop (SQLite's journal makes an interrupted write safe).
    ``ThreadPoolExecutor`` joins its threads at interpreter exit."""

    def __init__(self, name: str = "sqlite"):
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any] | None] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()
        self._shutdown = False

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, fut = item
            if fut is None:  # Database.run: fn hands its answer over itself
                fn()
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        if self._shutdown:
            raise DatabaseClosed("database executor is shut down")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((lambda: fn(*args, **kwargs), fut))
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._shutdown:
            self._shutdown = True
            self._queue.put(None)
        if wait:
            self._thread.join()


class _Answers:
    """Answers of :meth:`Database.run` calls, handed from the database thread to the event
    loop: the thread appends, and schedules one pick-up on the loop only if none is
    pending; the loop sets every collected answer's future in that one callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._scheduled = False

    def run(self, fut: asyncio.Future[Any], call: Callable[[Any], Any], fn: Any) -> None:
        """On the database thread: run ``call(fn)`` unless its caller is gone, hand over the answer."""
        if fut.cancelled():  # a plain read; a cancel that comes later gets the answer ignored
            return
        try:
            item = (fut, True, call(fn))
        except BaseException as exc:  # handed to the caller
            item = (fut, False, exc)
        with self._lock:
            self._done.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._scheduled = False
        for fut, ok, value in done:
            if fut.done():  # cancelled meanwhile
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _v1_probe_table(conn: sqlite3.Connection) -> None:
    """The one-row table :meth:`Database.probe` rewrites to see whether a write commits."""
    conn.execute("CREATE TABLE IF NOT EXISTS storage_probe (id INTEGER PRIMARY KEY, pad BLOB)")


# The storage layer's own migrations, run by the schema registry (gateway.migrations):
# never edit a released one.
MIGRATIONS = (_v1_probe_table,)


class Database:
    """Serialises all access on one thread; ``run`` wraps each call in a transaction."""

    def __init__(self, path: Path):
        self.path = path
        self._executor = _DaemonThreadExecutor()
        self._conn: sqlite3.Connection | None = None
        self._thread_id: int | None = None
        self._give_up_at: float | None = None  # monotonic; lock waits end here (shutdown)
        self._answers: _Answers | None = None

    def _open(self) -> None:
        self._conn = connect(self.path)
        # Lock waits are done in short steps by _begin (see LOCK_WAIT_S).
        self._conn.execute(f"PRAGMA busy_timeout = {LOCK_STEP_MS}")
        for pragma in WRITER_PRAGMAS:
            self._conn.execute(pragma)
        self._thread_id = threading.get_ident()

    def _begin(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                code = getattr(exc, "sqlite_errorcode", None)
                busy = code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(exc)
                now = time.monotonic()
                give_up = self._give_up_at is not None and now >= self._give_up_at
                if not busy or now >= deadline or give_up:
                    raise

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._conn is not None, "database not open"
        return transaction(self._conn, fn, begin=self._begin)

    async def open(self, *, migrate: bool = True) -> "Database":
        """Open the writer connection and bring the schema up to date: every component's
        pending migrations (:mod:`gateway.migrations`) in one transaction, before anything
        else can use the database. ``migrate=False`` only for a test that builds an old
        database by hand."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open)
        if migrate:
            from gateway import migrations  # every component's schema: imported late, they import this module

            await self.run(migrations.migrate)
        return self

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in one transaction on the database thread.

        The answer comes back on a plain asyncio future, set from the database thread with
        one ``call_soon_threadsafe`` for all answers the loop has not picked up yet
        (:class:`_Answers`), instead of ``run_in_executor``'s concurrent future (a lock and
        a condition each), its chaining callbacks and one write to the loop's wake-up
        socket per call: that write releases the GIL, and the database thread, the
        critical path of a fan-out, then waits to get it back. A call whose caller was cancelled before it started is not run, as
        with ``run_in_executor``."""
        loop = asyncio.get_running_loop()
        answers = self._answers
        if answers is None or answers.loop is not loop:
            answers = self._answers = _Answers(loop)
        fut: asyncio.Future[T] = loop.create_future()
        if self._executor._shutdown:
            raise DatabaseClosed("database executor is shut down")
        self._executor._queue.put((lambda: answers.run(fut, self._call, fn), None))
        return await fut

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """For code already on the database thread (nested use is a bug)."""
        if threading.get_ident() == self._thread_id:
            raise RuntimeError("run_sync called on the database thread")
        return self._executor.submit(self._call, fn).result()

    async def probe(self) -> None:
        """Raise unless a small write commits now (used to pace retries after a failure)."""
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO storage_probe(id, pad) VALUES (1, randomblob(16384))")
        await self.run(write)

    def stop_waiting_for_locks(self, after_s: float = 0.0) -> None:
        """From now (+after_s), a transaction that finds the database locked fails at once
        instead of waiting: shutdown must fit its budget even if another process holds
        the write lock."""
        self._give_up_at = time.monotonic() + after_s

    async def close(self, timeout: float = 1.0) -> None:
        """Close the connection; a thread still stuck (dead disk) is left behind after ``timeout``."""
        self.stop_waiting_for_locks()

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, _close), timeout)
        except TimeoutError:
            log.warning("database thread busy at exit; leaving it", path=str(self.path))
        except sqlite3.Error as exc:
            log.warning("database close failed", error=str(exc))
        except RuntimeError:  # closed before
            pass
        self._executor.shutdown(wait=False)
