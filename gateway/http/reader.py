"""Reads for the HTTP API on their own read-only SQLite connection.

The daemon's :class:`~gateway.storage.Database` has one thread, and every commit on it
waits for an fsync. A request that only reads (a job's status, a device, which device a
message_id was sent to) must not queue behind those commits: with 32 acks in flight,
each ack's lookup waiting for the previous ack's commit turns the recorder's batching into
one fsync per ack. WAL lets this connection read the last committed state while the
writer works.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.storage import connect

T = TypeVar("T")


class Reader:
    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-read")
        self._conn: sqlite3.Connection | None = None

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = connect(self.db_path, readonly=True)
        self._conn.execute("BEGIN")  # one snapshot for the whole function
        try:
            return fn(self._conn)
        finally:
            self._conn.execute("COMMIT")

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(_close)
        self._executor.shutdown(wait=True)


__all__ = ["Reader"]
