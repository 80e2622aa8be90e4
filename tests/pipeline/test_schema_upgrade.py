"""A database made by an older gateway opens, loses the indexes issue 11 dropped, and
keeps working: the dispatcher's queries still use an index, and a job that was mid-work
when the old gateway stopped is finished by the new one with exact counts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway import migrations, stats
from gateway.pipeline import deliveries
from gateway.storage import Database

from .test_policies import Harness, ScriptedBridge, job, sim

# What the gateway before issue 11's index change created on top of today's tables.
OLD_INDEXES = (
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_at) WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS deliveries_job_queued ON deliveries(job_id, route) WHERE state = 'queued'",
)


def _indexes(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                       "AND tbl_name = 'deliveries' AND name NOT LIKE 'sqlite_%'")}


def _plan(conn: sqlite3.Connection, sql: str, args: tuple = ()) -> str:
    return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))


async def test_an_older_database_drops_the_wasted_indexes_and_finishes_its_job(tmp_path: Path):
    path = tmp_path / "gw.db"
    # The old gateway: its schema, a job expanded and half sent, then stopped.
    old = await Database(path).open()
    await old.run(lambda conn: [conn.execute(sql) for sql in OLD_INDEXES])
    h = Harness(old, {"simulation": ScriptedBridge("simulation")}, batch_size=10)
    await h.add_devices([sim(f"d{i:03}") for i in range(40)])
    job_id = await h.submit(job({"all": True}, ttl=600))
    await old.run(lambda conn: deliveries.expand_page(conn, job_id, 40, time.time(), ["simulation"]))
    due = await old.run(lambda conn: deliveries.due_for_route(conn, "simulation", time.time() + 1, 20))
    await old.run(lambda conn: deliveries.apply_results(conn, [
        deliveries.Result(r.message_id, r.job_id, r.device_id, "sent", platform="simulation", attempts=1) for r in due],
        time.time()))
    assert {"deliveries_due", "deliveries_job_queued"} <= await old.run(_indexes)
    await old.run(lambda conn: conn.execute("DROP TABLE schema_versions"))  # it had no schema registry
    await old.close()

    # The new gateway opens the same file (as the daemon does: the schema registry's migrations).
    db = await Database(path).open()
    try:
        names = await db.run(_indexes)
        assert not names & {"deliveries_due", "deliveries_job_queued"}, names
        assert {"deliveries_route_due", stats.QUEUED_INDEX} <= names
        plans = await db.run(lambda conn: [
            _plan(conn, "SELECT rowid, message_id FROM deliveries WHERE state = 'queued' AND route = ? "
                        "AND next_at <= ? ORDER BY next_at LIMIT 10", ("simulation", 1.0)),
            _plan(conn, "SELECT 1 FROM deliveries d WHERE d.job_id = ? AND d.state = 'queued' LIMIT 5", (job_id,)),
            _plan(conn, "SELECT MIN(next_at) FROM deliveries WHERE state = 'queued' AND route IS NULL"),
            _plan(conn, "SELECT MIN(route) FROM deliveries WHERE state = 'queued' AND route > ?", ("a",)),
        ])
        for p in plans:
            assert "USING" in p and "SCAN" not in p, plans
        assert await db.run(deliveries.next_due_at) is not None  # 20 rows still queued, due now
        h2 = Harness(db, {"simulation": ScriptedBridge("simulation")})
        status = await h2.run_until_complete(job_id)
        assert status["counts"] == {"targets": 40, "queued": 0, "sent": 40, "acknowledged": 0, "failed": 0,
                                    "expired": 0, "invalid_address": 0, "suppressed": 0}
        assert len(h2.dispatcher.slots["simulation"].bridge.calls) == 20  # the other half, once each
        assert await db.run(deliveries.next_due_at) is None
        counts = await db.run(stats.delivery_counts)
        assert counts == {("simulation", "sent"): 40} and not await db.run(stats.stale)
    finally:
        await db.close()


def test_next_due_at_is_the_earliest_over_every_route():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrations.migrate(conn)
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl) VALUES ('j', 'dispatching', 't', '{}', '{}', '{}', 0, 0, 9e9, 60)")
    rows = [("m1", "d1", "queued", 50.0, "fcm"), ("m2", "d2", "queued", 40.0, None), ("m3", "d3", "queued", 30.0, "wns"),
            ("m4", "d4", "sent", 1.0, "apns"), ("m5", "d5", "queued", 20.0, "zz-unknown")]
    conn.executemany("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route) "
                     "VALUES (?, 'j', ?, ?, ?, ?)", rows)
    assert deliveries.next_due_at(conn) == 20.0
    conn.execute("DELETE FROM deliveries WHERE message_id = 'm5'")
    assert deliveries.next_due_at(conn) == 30.0
    conn.execute("UPDATE deliveries SET state = 'sent' WHERE route IS NOT NULL")
    assert deliveries.next_due_at(conn) == 40.0
    conn.execute("DELETE FROM deliveries WHERE route IS NULL")
    assert deliveries.next_due_at(conn) is None
