"""The test database helpers: registry rows the way the CLI writes them, job status and
plain queries on a data dir's ``gateway.db`` (each opens and closes its own connection),
and an open :class:`~gateway.storage.Database` for in-process tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any


def bulk_register(data_dir: Path, devices: list[dict[str, Any]]) -> None:
    """Put many devices in the registry the way `devices add` does (same store code), in one transaction."""
    from devices.models import Device
    from gateway import migrations
    from gateway.pipeline import registry
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    conn.execute("BEGIN IMMEDIATE")
    migrations.migrate(conn)
    for d in devices:
        registry.upsert_device(conn, Device.model_validate(d), "test")
    conn.execute("COMMIT")
    conn.close()


def put_persons(data_dir: Path, persons: list[dict[str, Any]]) -> None:
    """Persons in the registry the way `people add/set` store them (same store code), in one transaction."""
    from gateway import migrations
    from gateway.people import store
    from gateway.people.model import Person
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    conn.execute("BEGIN IMMEDIATE")
    migrations.migrate(conn)
    for p in persons:
        store.put(conn, Person.model_validate(p))
    conn.execute("COMMIT")
    conn.close()


def job_status_from_db(data_dir: Path, job_id: str) -> dict[str, Any] | None:
    from gateway.pipeline import jobs
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        return jobs.job_status(conn, job_id)
    finally:
        conn.close()


def db_rows(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


@asynccontextmanager
async def open_database(data_dir: Path) -> AsyncIterator[Any]:
    """``<data_dir>/gateway.db`` (created with its directory) open as the daemon opens it."""
    from gateway.storage import Database

    data_dir.mkdir(parents=True, exist_ok=True)
    database = await Database(data_dir / "gateway.db").open()
    try:
        yield database
    finally:
        await database.close()
