"""A test guard for the deliveries' one writer: SQLite's authorizer, installed on a
connection, refuses any INSERT, UPDATE or DELETE on ``deliveries`` whose statement is not
issued by a method of :class:`gateway.pipeline.deliveries.DeliveryWriter`, and records it.

The authorizer runs when a statement is prepared (installing it expires the prepared
ones), with the Python caller's frames on the stack: the writer's methods are found there
by their code object."""

from __future__ import annotations

import sqlite3
import sys

from gateway.pipeline import deliveries

WRITES = {sqlite3.SQLITE_INSERT: "INSERT", sqlite3.SQLITE_UPDATE: "UPDATE", sqlite3.SQLITE_DELETE: "DELETE"}


def guard_deliveries(conn: sqlite3.Connection) -> list[str]:
    """Install the guard on ``conn``; the list it returns fills with each refused write
    (``"UPDATE deliveries.attempts from test_x.py:12 (fn)"``)."""
    violations: list[str] = []
    writer_file = deliveries.__file__

    def authorizer(action: int, arg1: str | None, arg2: str | None, dbname: str | None, source: str | None) -> int:
        if action not in WRITES or arg1 != "deliveries":
            return sqlite3.SQLITE_OK
        frame = sys._getframe(1)
        caller = frame
        while frame is not None:
            code = frame.f_code
            if code.co_filename == writer_file and code.co_qualname.startswith("DeliveryWriter."):
                return sqlite3.SQLITE_OK
            frame = frame.f_back
        column = f".{arg2}" if arg2 else ""
        violations.append(f"{WRITES[action]} deliveries{column} from {caller.f_code.co_filename}:{caller.f_lineno} "
                          f"({caller.f_code.co_qualname})")
        return sqlite3.SQLITE_DENY

    conn.set_authorizer(authorizer)
    return violations
