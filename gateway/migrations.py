"""The one owner of the database schema: every component's ordered migrations, and the
version each has reached in this database.

Each component that keeps tables in ``gateway.db`` lists its migrations here, oldest
first; its version is the number of them applied, recorded in ``schema_versions
(component, version)``. :func:`migrate` runs every pending one, in the order below (a
component's triggers may name the tables of one listed before it), and records each
version in the same transaction as the change it made: the daemon at start before any
service (``Database.open``), and every CLI command that writes. No service creates or
alters a table.

A migration, once released, is never changed: a change of schema is a new migration at
the end of its component's list. The first migration of each component is the schema as
the gateway had it before this registry existed, written to be idempotent (``IF NOT
EXISTS``, columns added when missing), so a database made by that gateway, which has the
tables but no ``schema_versions``, is upgraded in place by running it. A database whose
recorded version is newer than this gateway knows (a downgrade) is refused with the names
of both versions instead of being written with a schema it does not understand.

Some work is not a migration but a check at every start: :attr:`Component.on_start`
(the delivery aggregates are recounted when they disagree with the deliveries table).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

Migration = Callable[[sqlite3.Connection], None]

VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY,
    version   INTEGER NOT NULL
)"""


class SchemaTooNew(RuntimeError):
    """The database was written by a newer gateway (a downgrade): refuse, change nothing."""


@dataclass(frozen=True)
class Component:
    """One owner of tables: its migrations, oldest first (version = how many ran)."""

    name: str
    migrations: tuple[Migration, ...]
    on_start: Migration | None = None  # after the migrations, at every start

    @property
    def version(self) -> int:
        return len(self.migrations)


def components() -> tuple[Component, ...]:
    """Every component, in the order their migrations run. Imported here, not at module
    level: each component's module imports gateway.storage, which opens through this one."""
    from gateway import clock, stats, storage
    from gateway.alarms import store as alarms
    from gateway.broker import state as broker
    from gateway.people import store as people
    from gateway.pipeline import schema as pipeline
    from gateway.upstream import outbox

    return (
        Component("people", people.MIGRATIONS),  # persons (the pipeline's people jobs read them)
        Component("pipeline", pipeline.MIGRATIONS),  # devices, jobs, deliveries, acks, counters
        Component("stats", stats.MIGRATIONS, on_start=stats.check),  # aggregates of deliveries
        Component("alarms", alarms.MIGRATIONS),  # its trigger reads deliveries and acks
        Component("broker", broker.MIGRATIONS),
        Component("upstream", outbox.MIGRATIONS),
        Component("clock", clock.MIGRATIONS),  # the gateway's time base
        Component("storage", storage.MIGRATIONS),  # the write probe's scratch row
    )


def versions(conn: sqlite3.Connection) -> dict[str, int]:
    """component → version recorded in this database (empty for a database from before
    the registry, or a new one)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_versions'").fetchone() is None:
        return {}
    return {r[0]: int(r[1]) for r in conn.execute("SELECT component, version FROM schema_versions")}


def migrate(conn: sqlite3.Connection, only: tuple[Component, ...] | None = None) -> dict[str, int]:
    """Run every pending migration in the caller's transaction; the versions now.

    Raises :class:`SchemaTooNew` before changing anything when a component's recorded
    version is above what this gateway knows."""
    todo = components() if only is None else only
    have = versions(conn)
    for component in todo:
        if have.get(component.name, 0) > component.version:
            raise SchemaTooNew(
                f"the database was written by a newer gateway: {component.name} schema version "
                f"{have[component.name]}, this gateway knows up to {component.version}; use that newer "
                f"gateway or a backup made before it ran")
    conn.execute(VERSIONS_TABLE)
    for component in todo:
        done = have.get(component.name, 0)
        for number, step in enumerate(component.migrations[done:], start=done + 1):
            step(conn)
            conn.execute("INSERT INTO schema_versions(component, version) VALUES (?, ?) "
                         "ON CONFLICT(component) DO UPDATE SET version = excluded.version", (component.name, number))
            have[component.name] = number
        if component.on_start is not None:
            component.on_start(conn)
    return have


__all__ = ["Component", "Migration", "SchemaTooNew", "components", "migrate", "versions"]
