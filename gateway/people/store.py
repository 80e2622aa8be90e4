"""The person registry: the ``persons`` table and its device index ``person_devices``.
Plain functions on a connection, inside the caller's transaction (the CLI's, or the
daemon's database thread through :class:`gateway.people.service.PeopleWriter`).

``persons`` holds each Person as its JSON (the model is the schema; a new optional field
needs no migration), with ``account`` in a column of its own: one account logs in as one
person. ``person_devices`` lists (device_id, person_id, position) so that "whose device is
this" is an index lookup; it is written only here, with the person's row.

A person's devices may name devices that are not registered (yet, or any more): the list
is the person's reach order, kept as they gave it; a job skips a device it cannot find,
with a reason (:mod:`gateway.pipeline.reach`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

from gateway import clock
from gateway.people.model import Person
from gateway.storage import run_script
from gateway.timeutil import iso_ts

TABLES = """
CREATE TABLE IF NOT EXISTS persons (
    person_id  TEXT PRIMARY KEY,
    account    TEXT,                  -- broker account (role user) that logs in as this person
    body       TEXT NOT NULL,         -- the Person as JSON (contract §12)
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS persons_by_account ON persons(account) WHERE account IS NOT NULL;
CREATE TABLE IF NOT EXISTS person_devices (
    device_id TEXT NOT NULL,
    person_id TEXT NOT NULL,
    position  INTEGER NOT NULL,       -- 0 = reached first
    PRIMARY KEY (device_id, person_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS person_devices_by_person ON person_devices(person_id, position);
"""


def _v1_persons(conn: sqlite3.Connection) -> None:
    run_script(conn, TABLES)


MIGRATIONS = (_v1_persons,)  # gateway.migrations: never edit one that was released


class AccountTaken(ValueError):
    """The account already logs in as another person."""

    def __init__(self, account: str, person_id: str):
        super().__init__(f"account: {account!r} is already the account of person {person_id!r}")
        self.account = account
        self.person_id = person_id


def put(conn: sqlite3.Connection, person: Person, now: float | None = None) -> bool:
    """Insert or replace a person; True if new. Raises :class:`AccountTaken` when its
    account belongs to another person (nothing is written)."""
    now = now or clock.now()
    if person.account is not None:
        row = conn.execute("SELECT person_id FROM persons WHERE account = ? AND person_id != ?",
                           (person.account, person.person_id)).fetchone()
        if row is not None:
            raise AccountTaken(person.account, row[0])
    body = person.as_json()
    del body["person_id"]
    existed = conn.execute("SELECT 1 FROM persons WHERE person_id = ?", (person.person_id,)).fetchone() is not None
    conn.execute("INSERT INTO persons(person_id, account, body, updated_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT(person_id) DO UPDATE SET account = excluded.account, body = excluded.body, "
                 "updated_at = excluded.updated_at",
                 (person.person_id, person.account, json.dumps(body, separators=(",", ":")), now))
    conn.execute("DELETE FROM person_devices WHERE person_id = ?", (person.person_id,))
    conn.executemany("INSERT INTO person_devices(device_id, person_id, position) VALUES (?, ?, ?)",
                     [(d, person.person_id, i) for i, d in enumerate(person.devices)])
    return not existed


def _person(row: sqlite3.Row | tuple[Any, ...]) -> Person:
    return Person.model_validate({"person_id": row[0], **json.loads(row[1])})


person_of_row = _person  # (person_id, body) as read from ``persons``: for readers of the whole table


def fingerprint(conn: sqlite3.Connection) -> tuple[Any, ...]:
    """Changes whenever a person is added, changed or removed (the pipeline's people gate
    reads the registry again only then); two small tables, one statement."""
    return tuple(conn.execute("SELECT COUNT(*), MAX(updated_at), (SELECT COUNT(*) FROM person_devices) "
                              "FROM persons").fetchone())


def raw_rows(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Every (person_id, body) as stored, for :data:`person_of_row` one by one (a reader
    that must survive one unreadable person)."""
    return [(r[0], r[1]) for r in conn.execute("SELECT person_id, body FROM persons")]


def device_index(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Every (device_id, person_id) of the persons' reach orders."""
    return [(r[0], r[1]) for r in conn.execute("SELECT device_id, person_id FROM person_devices "
                                               "ORDER BY device_id, person_id")]


def get(conn: sqlite3.Connection, person_id: str) -> Person | None:
    row = conn.execute("SELECT person_id, body FROM persons WHERE person_id = ?", (person_id,)).fetchone()
    return _person(row) if row else None


def updated_at(conn: sqlite3.Connection, person_id: str) -> str | None:
    row = conn.execute("SELECT updated_at FROM persons WHERE person_id = ?", (person_id,)).fetchone()
    return iso_ts(row[0]) if row else None


def list_all(conn: sqlite3.Connection, after: str = "", limit: int = 10_000) -> list[Person]:
    """Persons by person_id, after ``after``."""
    rows = conn.execute("SELECT person_id, body FROM persons WHERE person_id > ? ORDER BY person_id LIMIT ?",
                        (after, limit))
    return [_person(r) for r in rows]


def iter_all(conn: sqlite3.Connection) -> Iterator[Person]:
    for row in conn.execute("SELECT person_id, body FROM persons ORDER BY person_id"):
        yield _person(row)


def get_many(conn: sqlite3.Connection, person_ids: list[str]) -> dict[str, Person]:
    """person_id → Person of those that exist."""
    if not person_ids:
        return {}
    rows = conn.execute("SELECT person_id, body FROM persons WHERE person_id IN (SELECT value FROM json_each(?))",
                        (json.dumps(person_ids),))
    return {r[0]: _person(r) for r in rows}


def remove(conn: sqlite3.Connection, person_id: str) -> bool:
    """Delete the person's row (and device index); what it leaves in open jobs is the
    pipeline's to end (:func:`gateway.pipeline.reach.remove_person` does both)."""
    conn.execute("DELETE FROM person_devices WHERE person_id = ?", (person_id,))
    return conn.execute("DELETE FROM persons WHERE person_id = ?", (person_id,)).rowcount > 0


def by_account(conn: sqlite3.Connection, account: str) -> Person | None:
    """The person an account logs in as (None: the account is nobody's)."""
    row = conn.execute("SELECT person_id, body FROM persons WHERE account = ?", (account,)).fetchone()
    return _person(row) if row else None


def persons_of_device(conn: sqlite3.Connection, device_id: str) -> list[tuple[str, int]]:
    """(person_id, position in their reach order) of every person who lists the device."""
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT person_id, position FROM person_devices WHERE device_id = ? ORDER BY person_id", (device_id,))]


def count(conn: sqlite3.Connection, prefix: str = "", upper: str = "\x7f") -> int:
    """How many persons there are (whose person_id starts with ``prefix``: the range up to
    ``prefix + upper``, a character above every one an id may hold), on the primary key."""
    if not prefix:
        return conn.execute("SELECT COUNT(*) FROM persons").fetchone()[0]
    return conn.execute("SELECT COUNT(*) FROM persons WHERE person_id >= ? AND person_id < ?",
                        (prefix, prefix + upper)).fetchone()[0]


def page(conn: sqlite3.Connection, prefix: str, after: str, limit: int, upper: str = "\x7f") -> list[Person]:
    """Persons by person_id after ``after`` whose id starts with ``prefix`` (the operator
    page's People tab), a keyset page on the primary key."""
    rows = conn.execute("SELECT person_id, body FROM persons WHERE person_id >= ? AND person_id < ? AND person_id > ? "
                        "ORDER BY person_id LIMIT ?", (prefix, prefix + upper, after, limit))
    return [_person(r) for r in rows]


__all__ = ["AccountTaken", "MIGRATIONS", "by_account", "count", "get", "get_many", "iter_all", "list_all", "page",
           "persons_of_device", "put", "remove", "updated_at"]
