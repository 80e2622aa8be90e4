"""The schema registry (gateway.migrations): one place runs every component's migrations,
records their versions, upgrades a database made before it existed in place, and refuses a
database from a newer gateway.

``tests/fixtures/gateway-2c3a5d9.db`` was made by the gateway's own code at commit 2c3a5d9
(the last one before the registry; ``tests/fixtures/make_old_db.py`` says how)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from gateway import migrations, stats
from gateway.alarms import store as alarm_store
from gateway.pipeline import jobs, registry
from gateway.storage import Database, connect
from gateway.upstream import outbox
from tests.helpers import cli_in_process as cli  # the operator's commands, in this process: no interpreter start each

FIXTURE = Path(__file__).parent / "fixtures" / "gateway-2c3a5d9.db"
LATEST = {c.name: c.version for c in migrations.components()}


def _old_copy(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / "gateway.db"
    shutil.copyfile(FIXTURE, path)
    return path


def _read(path: Path, fn):  # noqa: ANN001, ANN202
    conn = connect(path, readonly=True)
    try:
        return fn(conn)
    finally:
        conn.close()


def _grouped(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(r[0], r[1]): r[2] for r in conn.execute(
        f"SELECT {stats.PLATFORM_KEY}, state, COUNT(*) FROM deliveries GROUP BY 1, 2") if r[2]}


async def test_a_database_made_by_main_at_2c3a5d9_is_upgraded_in_place(tmp_path: Path):
    path = _old_copy(tmp_path)
    before = _read(path, lambda c: {
        "jobs": {j: jobs.job_status(c, j) for j in ("old-done", "old-half")},
        "devices": list(registry.iter_devices(c)),
        "deliveries": c.execute("SELECT message_id, state, platform, attempts, sent_at, acked_at, latency_ms "
                                "FROM deliveries ORDER BY message_id").fetchall(),
        "acks": c.execute("SELECT message_id, status, COUNT(*), MIN(id) FROM acks GROUP BY 1, 2").fetchall(),
        "counters": jobs.counters(c),
    })
    assert migrations.versions(sqlite3.connect(FIXTURE)) == {}  # made before the registry
    assert sum(n for _, _, n, _ in before["acks"]) == 8  # the old code stored every ack

    db = await Database(path).open()
    try:
        after = await db.run(lambda c: {
            "versions": migrations.versions(c),
            "jobs": {j: jobs.job_status(c, j) for j in ("old-done", "old-half")},
            "devices": list(registry.iter_devices(c)),
            "deliveries": c.execute("SELECT message_id, state, platform, attempts, sent_at, acked_at, latency_ms "
                                    "FROM deliveries ORDER BY message_id").fetchall(),
            "acks": c.execute("SELECT message_id, status, repeats, id FROM acks").fetchall(),
            "counters": jobs.counters(c),
            "stats": stats.delivery_counts(c), "grouped": _grouped(c), "stale": stats.stale(c),
            "tags": c.execute("SELECT tag, COUNT(*) FROM ui_device_tags GROUP BY tag ORDER BY tag").fetchall(),
            "indexes": {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")},
            "firing": alarm_store.firing(c),
            "outbox": outbox.stats(c).rows,
            "retained": c.execute("SELECT topic, payload FROM broker_retained").fetchall(),
        })
    finally:
        await db.close()
    assert after["versions"] == LATEST == {"people": 1, "pipeline": 6, "stats": 1, "alarms": 2, "broker": 4, "upstream": 1,
                                           "clock": 1, "storage": 1}
    # What the old gateway kept is kept: jobs, devices, deliveries, counters.
    assert after["jobs"] == before["jobs"] and after["devices"] == before["devices"]
    assert [tuple(r) for r in after["deliveries"]] == [tuple(r) for r in before["deliveries"]]
    assert after["counters"] == before["counters"]
    # Each status of a delivery once, the first kept, the others counted as its repeats.
    assert sorted((m, s, r, i) for m, s, r, i in after["acks"]) == sorted(
        (m, s, n - 1, first) for m, s, n, first in before["acks"])
    assert "acks_once" in after["indexes"] and "acks_by_message" not in after["indexes"]
    # The aggregates, the page's tag table, the alarm, the broker's and the outbox's rows.
    assert after["stats"] == after["grouped"] == {("simulation", "acknowledged"): 5, ("simulation", "queued"): 3}
    assert not after["stale"]
    assert [tuple(r) for r in after["tags"]] == [("old", 8), ("t0", 3), ("t1", 3), ("t2", 2)]
    assert after["firing"] == [{"rule": "door", "key": "hall", "value": '"open"', "since": pytest.approx(
        after["firing"][0]["since"]), "fired_at": after["firing"][0]["fired_at"]}]
    assert after["outbox"] == 1 and [tuple(r) for r in after["retained"]] == [("site/state", b"on")]

    # A second start has nothing to do: the same versions, the same rows.
    again = await Database(path).open()
    try:
        assert await again.run(migrations.versions) == LATEST
        assert await again.run(lambda c: c.execute("SELECT COUNT(*) FROM acks").fetchone()[0]) == len(after["acks"])
    finally:
        await again.close()


@pytest.mark.slow
def test_the_daemon_finishes_the_old_gateways_half_sent_job(gateway_factory, tmp_path: Path):
    _old_copy(tmp_path / "var")
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "ack": True}}})
    deadline_s = 60

    def half() -> dict:
        res = cli(gw.config, "jobs", "show", "old-half", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    import time

    deadline = time.monotonic() + deadline_s
    while half()["state"] != "acknowledged":
        assert time.monotonic() < deadline, half()
        time.sleep(0.2)
    assert half()["counts"] == {"targets": 3, "queued": 0, "sent": 0, "acknowledged": 3, "failed": 0, "expired": 0,
                                "invalid_address": 0, "suppressed": 0}
    shown = json.loads(cli(gw.config, "jobs", "show", "old-done", "--deliveries", "--json").stdout)
    repeated = [d["acks"] for d in shown["deliveries"] if len(d["acks"]) > 1]
    assert [[(a["status"], a["repeats"]) for a in acks] for acks in repeated] == [[("received", 2), ("opened", 0)]]
    assert _read(tmp_path / "var" / "gateway.db", migrations.versions) == LATEST
    assert gw.stop() == 0


async def test_a_database_from_a_newer_gateway_is_refused_unchanged(gateway_factory, tmp_path: Path):
    path = _old_copy(tmp_path / "var")
    db = await Database(path).open()
    await db.run(lambda c: c.execute("UPDATE schema_versions SET version = 99 WHERE component = 'pipeline'"))
    await db.close()
    schema_before = _read(path, lambda c: c.execute("SELECT type, name, sql FROM sqlite_master").fetchall())

    with pytest.raises(migrations.SchemaTooNew, match=f"pipeline schema version 99, this gateway knows up to {LATEST['pipeline']}"):
        await Database(path).open()
    gw = gateway_factory(start=False)
    res = cli(gw.config, "devices", "list")
    errors = [line for line in res.stderr.splitlines() if not line.startswith("note: ")]  # (files made private)
    assert res.returncode == 1 and len(errors) == 1, res.stderr
    assert "written by a newer gateway: pipeline schema version 99" in errors[0]
    gw.start(wait_ready=False)
    assert gw.wait(timeout=30) == 2
    assert "database schema is newer than this gateway" in gw.log()
    assert _read(path, lambda c: c.execute("SELECT type, name, sql FROM sqlite_master").fetchall()) == schema_before


def test_no_table_is_created_outside_the_modules_of_registered_migrations():
    """Schema statements live only where a registered migration lives: a service that
    creates its own table (run by whoever starts first) cannot come back unnoticed."""
    import inspect
    import re

    root = Path(migrations.__file__).parent
    owners = {Path(inspect.getfile(step)).resolve() for c in migrations.components() for step in c.migrations}
    ddl = re.compile(r"\bCREATE\s+(?:TEMP\s+|TEMPORARY\s+)?TABLE\b", re.IGNORECASE)
    offenders = sorted(str(p.relative_to(root.parent)) for p in root.rglob("*.py")
                       if p.resolve() not in owners and p.resolve() != Path(migrations.__file__).resolve()
                       and ddl.search(p.read_text()))
    assert offenders == []


async def test_after_the_migrations_no_service_start_or_write_changes_the_schema(tmp_path: Path):
    """The former self-creators (the clock's time base, the outbox, the write probe) run
    their start and hot paths on a migrated database without one schema statement."""
    from gateway import clock

    db = await Database(tmp_path / "gateway.db").open()
    denied: list[tuple[int, str | None]] = []
    schema_actions = {sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_CREATE_INDEX, sqlite3.SQLITE_CREATE_TRIGGER,
                      sqlite3.SQLITE_ALTER_TABLE, sqlite3.SQLITE_DROP_TABLE, sqlite3.SQLITE_CREATE_VIEW}

    def guard(action: int, arg1: str | None, *_: object) -> int:
        if action in schema_actions:
            denied.append((action, arg1))
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    ob = outbox.Outbox()
    try:
        await db.run(lambda c: c.set_authorizer(guard))
        await clock.start(db)
        await db.run(clock.save)
        await db.run(ob.prepare)
        await db.run(lambda c: ob.enqueue(c, "ack", "p/acks", b'{"message_id": "m1"}', False))
        assert await db.run(lambda c: outbox.stats(c).rows) == 1
        await db.probe()
    finally:
        await db.run(lambda c: c.set_authorizer(None))
        await db.close()
    assert denied == []
