"""The gateway's SQLite database: one file, WAL, one writer thread.

Every component (pipeline, broker state, upstream buffer) keeps its tables here so
that one transaction can span them (a job's status and its upstream copy commit
together). All SQL runs on one dedicated thread: SQLite writes with ``synchronous=FULL``
fsync, and the event loop must never wait on a disk. Callers hand a function that gets
the connection and runs inside one transaction::

    rows = await db.run(lambda conn: conn.execute("SELECT ...").fetchall())

Readers in other processes (the CLI) open their own connection; WAL lets them read
while the daemon writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

Migration = Callable[[sqlite3.Connection], None]


class NotStored(Exception):
    """An item could not be committed now (disk full, database locked or read-only, a full
    upstream buffer under ``overflow = "refuse-new"``). Whoever received it must not
    acknowledge it (no PUBACK, no HTTP 2xx): the sender keeps it and tries again later.
    """


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the gateway's pragmas (also used by the CLI)."""
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


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``fn(conn)`` in one write transaction (BEGIN IMMEDIATE: no upgrade deadlocks)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class Database:
    """Serialises all access on one thread; ``run`` wraps each call in a transaction."""

    def __init__(self, path: Path):
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._thread_id: int | None = None

    def _open(self) -> None:
        self._conn = connect(self.path)
        self._thread_id = threading.get_ident()

    async def open(self, migrations: list[Migration] | None = None) -> "Database":
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open)
        for migrate in migrations or []:
            await self.run(migrate)
        return self

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._conn is not None, "database not open"
        return transaction(self._conn, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in one transaction on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """For code already on the database thread (nested use is a bug)."""
        if threading.get_ident() == self._thread_id:
            raise RuntimeError("run_sync called on the database thread")
        return self._executor.submit(self._call, fn).result()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await loop.run_in_executor(self._executor, _close)
        self._executor.shutdown(wait=True)
