"""The broker's durable state (StateStore) on a real SQLite file: batch ordering, and a
commit that fails must fail its barrier and be retried, never silently dropped."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.broker.state import StateNotStored, StateStore
from gateway.storage import Database, NotStored
from tests.helpers import until


async def _store(tmp_path: Path) -> tuple[Database, StateStore]:
    db = await Database(tmp_path / "gateway.db").open()
    store = StateStore(db, retry_initial_s=0.05, retry_max_s=0.1)
    await store.open()
    return db, store


async def _read_only(db: Database, on: bool) -> None:
    """Make SQLite refuse (or accept again) writes on the database's own connection, on its
    thread and outside a transaction (``Database.run`` always opens a write transaction)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(db._executor, lambda: db._conn.execute(f"PRAGMA query_only = {int(on)}"))


def _rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_session_delete_then_put_in_one_batch_keeps_the_delete(tmp_path):
    """A CleanSession=1 connect (delete) followed by a CleanSession=0 one (put) of the same
    client id in one group commit must leave none of the old session's rows behind."""
    db, store = await _store(tmp_path)
    try:
        store.session("plc-1", "plc-1", "device", "user:plc-1")
        store.subscribe("plc-1", "old/#", 1)
        store.queue_message("plc-1", 1, "old/x", b"stale", 1)
        store.qos2_received("plc-1", 7)
        await store.flush()

        # One batch: forget the session, then create it again with a new subscription.
        store.forget_session("plc-1")
        store.session("plc-1", "plc-1", "device", "user:plc-1")
        store.subscribe("plc-1", "new/#", 1)
        await store.flush()

        loaded = await store.open()
        session = loaded.sessions["plc-1"]
        assert session.subscriptions == {"new/#": 1}
        assert session.messages == []
        assert session.qos2_in == set()
        assert session.owner == "user:plc-1"
    finally:
        await store.close()
        await db.close()


async def test_failed_commit_fails_its_barrier_then_is_retried_in_order(tmp_path):
    """SQLite refuses writes (a read-only connection, as on a failed disk): the barrier
    raises NotStored (nobody may acknowledge), the failure is counted, and once writes
    work again the operations are committed in their original order, none lost."""
    errors: list[int] = []
    db = await Database(tmp_path / "gateway.db").open()
    store = StateStore(db, on_error=lambda: errors.append(1), retry_initial_s=0.05, retry_max_s=0.1)
    await store.open()
    try:
        await _read_only(db, True)
        store.retain("cfg/a", b"v1", 1)
        store.session("keeper", None, "admin", "anonymous@local")
        store.queue_message("keeper", 1, "cfg/a", b"v1", 1)
        with pytest.raises(StateNotStored) as failure:
            await store.barrier()
        assert isinstance(failure.value, NotStored)
        assert store.failing and store.backlog == 3
        # More work while failing: a later state of the same row, and a delete of one that
        # never reached the disk. Applied after the failed batch, they must win.
        store.message_state("keeper", 1, 5, 1)
        store.retain("cfg/a", b"v2", 1)
        store.retain("cfg/b", b"gone", 0)
        store.clear_retained("cfg/b")
        with pytest.raises(StateNotStored):
            await store.barrier()
        assert len(errors) >= 2

        await _read_only(db, False)
        await asyncio.wait_for(store.barrier(), 5)  # the retry loop gets through on its own
        assert not store.failing and store.backlog == 0
    finally:
        await store.close()
        await db.close()
    path = tmp_path / "gateway.db"
    assert _rows(path, "SELECT topic, payload FROM broker_retained ORDER BY topic") == [("cfg/a", b"v2")]
    assert _rows(path, "SELECT client_id, seq, packet_id, state FROM broker_messages") == [("keeper", 1, 5, 1)]
    assert _rows(path, "SELECT client_id, owner FROM broker_sessions") == [("keeper", "anonymous@local")]


async def test_retry_happens_without_new_work(tmp_path):
    """Nobody publishes after the failure: the queued operations still reach the disk."""
    db, store = await _store(tmp_path)
    try:
        await _read_only(db, True)
        store.retain("t", b"x", 0)
        with pytest.raises(StateNotStored):
            await store.barrier()
        await _read_only(db, False)
        # The retry backs off (0.2 s doubling): on a loaded machine it may come after 2 s.
        await until(lambda: not store.backlog, what="the queued operations retried")
        assert store.backlog == 0 and not store.failing
    finally:
        await store.close()
        await db.close()
    assert _rows(tmp_path / "gateway.db", "SELECT topic FROM broker_retained") == [("t",)]


async def test_databases_from_before_owners_are_migrated(tmp_path):
    path = tmp_path / "gateway.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE broker_sessions (client_id TEXT PRIMARY KEY, username TEXT, role TEXT,"
                 " created_at REAL NOT NULL, dropped INTEGER NOT NULL DEFAULT 0)")
    conn.execute("INSERT INTO broker_sessions VALUES ('old', 'plc-1', 'device', 0, 0)")
    conn.commit()
    conn.close()
    db, store = await _store(tmp_path)
    try:
        loaded = await store.open()
        assert loaded.sessions["old"].owner is None and loaded.sessions["old"].username == "plc-1"
    finally:
        await store.close()
        await db.close()
