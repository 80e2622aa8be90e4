"""Every write of ``deliveries`` goes through its one writer (DeliveryWriter), which keeps
the aggregates and the jobs' counts: a fan-out with retries, invalid addresses, failures,
acks (first, later statuses, repeats, one in the batch of its send), a device removed
while its delivery waits, and retention, under SQLite's authorizer refusing any other
write; and the aggregates stay exactly what the rows say."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridges.base import Outcome
from gateway import stats
from gateway.pipeline import deliveries, jobs, registry, retention
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline.models import Ack
from gateway.storage import Database

from .test_policies import Harness, ScriptedBridge, job, sim
from .writer_guard import guard_deliveries


def _grouped(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(r[0], r[1]): r[2] for r in conn.execute(
        f"SELECT {stats.PLATFORM_KEY}, state, COUNT(*) FROM deliveries GROUP BY 1, 2")}


def _job_counts(conn: sqlite3.Connection) -> list[tuple[str, dict[str, int]]]:
    """Each job's kept counts next to its rows counted."""
    out = []
    for (job_id,) in conn.execute("SELECT job_id FROM jobs ORDER BY job_id").fetchall():
        kept = jobs.job_status(conn, job_id)["counts"]
        rows = dict(conn.execute("SELECT state, COUNT(*) FROM deliveries WHERE job_id = ? GROUP BY state",
                                 (job_id,)).fetchall())
        out.append((job_id, {k: kept[k] for k in jobs.COUNT_KEYS}, {k: rows.get(k, 0) for k in jobs.COUNT_KEYS}))
    return out


def _ack(message_id: str, status: str, at: float) -> Ack:
    when = datetime.fromtimestamp(at, UTC)
    return Ack(message_id, status, when, None, when.isoformat(timespec="milliseconds")[:-6] + "Z")


async def test_a_fan_out_with_acks_removal_and_retention_writes_deliveries_only_through_its_writer(tmp_path: Path):
    db = await Database(tmp_path / "gw.db").open()
    violations = await db.run(guard_deliveries)
    try:
        # The guard refuses a write from anywhere else (and would fail the whole scenario).
        with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
            await db.run(lambda conn: conn.execute("UPDATE deliveries SET attempts = attempts + 1"))
        assert len(violations) == 1 and "test_one_writer.py" in violations[0], violations
        violations.clear()

        script = {"d003": [Outcome.retry("503")], "d004": [Outcome.invalid_address("gone")],
                  "d005": [Outcome.failed("rejected")]}
        h = Harness(db, {"simulation": ScriptedBridge("simulation", script), "fcm": ScriptedBridge("fcm")},
                    batch_size=16)
        await h.add_devices([sim(f"d{i:03}", "simulation", *(["fcm"] if i == 4 else [])) for i in range(40)])
        fan_out = await h.submit(job({"all": True}, ttl=600))
        status = await h.run_until_complete(fan_out)
        assert status["counts"]["sent"] == 39 and status["counts"]["failed"] == 1, status
        rows = await db.run(lambda conn: conn.execute(
            "SELECT message_id, device_id, sent_at FROM deliveries WHERE job_id = ? AND state = 'sent' "
            "ORDER BY device_id", (fan_out,)).fetchall())

        # Acks: first ones, a later status, repeats, an unknown id, in two batches.
        acks = [(d, _ack(m, "received", s + 0.05)) for m, d, s in rows[:30]]
        acks += [(rows[0][1], _ack(rows[0][0], "received", rows[0][2] + 0.06)),
                 (rows[0][1], _ack(rows[0][0], "opened", rows[0][2] + 1)),
                 (rows[1][1], _ack("00000000-0000-7000-8000-000000000000", "received", time.time()))]
        out = await db.run(lambda conn: pipeline_acks.apply_acks(conn, acks, time.time()))
        assert sum(o.first for o in out) == 30 and sum(o.repeat for o in out) == 1 and not out[-1].accepted
        await db.run(lambda conn: pipeline_acks.apply_acks(conn, acks[:5], time.time()))  # all repeats now

        # A delivery whose send result and ack meet in one batch (one update writes both).
        await h.add_devices([sim("late")])
        second = await h.submit(job({"devices": ["late", "d010"]}, ttl=600))
        await db.run(lambda conn: deliveries.expand_page(conn, second, 10, time.time(), ["simulation"]))
        mid_late = await db.run(lambda conn: conn.execute(
            "SELECT message_id FROM deliveries WHERE job_id = ? AND device_id = 'late'", (second,)).fetchone()[0])
        sent_at = time.time()
        await db.run(lambda conn: pipeline_acks.apply_batch(
            conn, [deliveries.Result(mid_late, second, "late", "sent", "simulation", 1, sent_at=sent_at)],
            [("late", _ack(mid_late, "displayed", sent_at + 0.02))], sent_at + 0.5))

        # A device removed while its delivery waits: the dispatcher fails it.
        await db.run(lambda conn: registry.remove_device(conn, "d010"))
        h2 = Harness(db, {"simulation": ScriptedBridge("simulation")})
        status = await h2.run_until_complete(second)
        assert status["counts"]["acknowledged"] == 1 and status["counts"]["failed"] == 1, status

        counts = await db.run(lambda conn: (stats.delivery_counts(conn), _grouped(conn), stats.stale(conn)))
        assert counts[0] == counts[1] and not counts[2], counts
        for job_id, kept, rows_counted in await db.run(_job_counts):
            assert kept == rows_counted, job_id
        latency = await db.run(stats.ack_latency)  # d004's delivery went on to fcm
        assert {p: v["count"] for p, v in latency.items()} == {"simulation": 30, "fcm": 1}

        # Retention deletes both jobs in small transactions (their rows and acks with them).
        await db.run(lambda conn: conn.execute("UPDATE jobs SET updated_at = 0"))
        pruned: list[str] = []
        for _ in range(100):
            pruned += await db.run(lambda conn: retention.prune(conn, time.time(), time.time(), max_rows=7))
            if len(pruned) == 2:
                break
        assert sorted(pruned) == sorted([fan_out, second])
        assert await db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]) == 0
        assert await db.run(stats.delivery_counts) == {}
        assert sum(v["count"] for v in (await db.run(stats.ack_latency)).values()) == 31  # a histogram only grows
        assert violations == []
    finally:
        await db.close()
