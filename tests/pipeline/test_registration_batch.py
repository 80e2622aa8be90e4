"""The recorder writes a batch of registrations with registry.upsert_devices (one SELECT per
500 devices, one executemany; issue 11). Whatever the batch, the registry must end
exactly as one registry.upsert_device per registration, in arrival order, leaves it:
last registration wins, and a channel's invalid mark survives only while every later
registration in the batch keeps that channel's address."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.models import Device
from gateway import migrations
from gateway.pipeline import registry, routing
from gateway.storage import connect, transaction
from tests.helpers.fuzz import examples


IDS = ["d-1", "d-2", "d-3", "d-4"]
CHANNELS = [
    {"platform": "simulation"},
    {"platform": "mqtt"},
    {"platform": "fcm", "token": "tok-a"},
    {"platform": "fcm", "token": "tok-b"},
    {"platform": "apns", "token": "ab" * 32},
    {"platform": "webpush", "subscription": {"endpoint": "https://push.example/1", "keys": {"p256dh": "p", "auth": "a"}}},
]

devices = st.builds(
    lambda device_id, segment, tags, channels: Device.model_validate(
        {"device_id": device_id, "segment": segment, "tags": tags, "channels": channels}),
    st.sampled_from(IDS), st.one_of(st.none(), st.sampled_from(["s1", "s2"])),
    st.lists(st.sampled_from(["t1", "t2", "ü"]), max_size=3),
    st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3))
# What is in the registry before the batch: a device with some channels marked invalid.
before = st.lists(st.tuples(devices, st.lists(st.integers(0, 2), max_size=3)), max_size=4)


_TEMPLATE: list[bytes] = []


def _db(path: Path) -> sqlite3.Connection:
    """A fresh database at ``path``: a copy of one migrated once for the module (building
    the whole schema twice per example was most of this module's time); ``migrate`` still
    runs on the copy, finding nothing to do but its start-up steps."""
    if not _TEMPLATE:
        template = path.with_name("template.db")
        conn = connect(template)
        migrations.migrate(conn)
        conn.commit()
        conn.close()
        _TEMPLATE.append(template.read_bytes())
        template.unlink()
    path.write_bytes(_TEMPLATE[0])
    conn = connect(path)
    # What rows the upserts leave is the subject here, not durability: no fsync per commit
    # (hundreds of examples, each committing to two databases).
    conn.execute("PRAGMA synchronous = OFF")
    migrations.migrate(conn)
    return conn


def _fill(conn: sqlite3.Connection, existing: list[tuple[Device, list[int]]]) -> None:
    def work(c: sqlite3.Connection) -> None:
        for device, marked in existing:
            registry.upsert_device(c, device, "old", 1.0)
            for n in marked:
                if n < len(device.channels):
                    registry.mark_invalid(c, device.device_id, routing.channel_key(device.channels[n]), f"bad {n}", 2.0)
    transaction(conn, work)


def _rows(conn: sqlite3.Connection) -> list[tuple]:
    return [tuple(r) for r in conn.execute("SELECT * FROM devices ORDER BY device_id")]


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(existing=before, batch=st.lists(st.tuples(devices, st.sampled_from(["mqtt", "http"])), min_size=1, max_size=8))
def test_batched_upserts_leave_what_one_upsert_each_leaves(tmp_path_factory, existing, batch):
    d = tmp_path_factory.mktemp("reg")
    one, many = _db(d / "one.db"), _db(d / "many.db")
    try:
        _fill(one, existing)
        _fill(many, existing)
        transaction(one, lambda c: [registry.upsert_device(c, device, source, 5.0) for device, source in batch])
        transaction(many, lambda c: registry.upsert_devices(c, batch, 5.0))
        assert _rows(many) == _rows(one)
    finally:
        one.close()
        many.close()


def test_a_batch_larger_than_one_select(tmp_path):
    """Over 500 distinct devices: the SELECT of existing marks is cut into chunks, and a
    mark on a device in a later chunk still survives when its channel is unchanged."""
    conn = _db(tmp_path / "g.db")
    try:
        fcm = {"platform": "fcm", "token": "t"}
        batch = [(Device.model_validate({"device_id": f"d-{i:04}", "channels": [fcm]}), "mqtt") for i in range(1200)]
        transaction(conn, lambda c: registry.upsert_devices(c, batch[:1], 1.0))
        transaction(conn, lambda c: registry.upsert_devices(c, batch[1100:1101], 1.0))
        transaction(conn, lambda c: registry.mark_invalid(c, "d-1100", "fcm|t", "gone", 2.0))
        transaction(conn, lambda c: registry.upsert_devices(c, batch, 3.0))
        assert conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 1200
        assert '"reason": "gone"' in conn.execute("SELECT invalid FROM devices WHERE device_id = 'd-1100'").fetchone()[0]
        assert conn.execute("SELECT invalid FROM devices WHERE device_id = 'd-0000'").fetchone()[0] == "{}"
    finally:
        conn.close()


async def test_the_recorder_keeps_arrival_order_across_removals(tmp_path):
    """One recorder batch: register, remove, register again (with a mark in between
    from before the batch). Runs of registrations are cut at the removal, so the device
    exists at the end, its old mark is gone with the removal, and remove says it existed."""
    from gateway.pipeline.recorder import Recorder
    from gateway.storage import Database

    db = await Database(tmp_path / "gw.db").open()
    try:
        fcm = lambda tok: Device.model_validate({"device_id": "d-1", "channels": [{"platform": "fcm", "token": tok}]})
        await db.run(lambda c: registry.upsert_device(c, fcm("t"), "old", 1.0))
        await db.run(lambda c: registry.mark_invalid(c, "d-1", "fcm|t", "gone", 2.0))
        recorder = Recorder(db)
        runner = asyncio.create_task(recorder.run())
        first = asyncio.ensure_future(recorder.register(fcm("t"), "mqtt"))
        removed = asyncio.ensure_future(recorder.remove("d-1"))
        again = asyncio.ensure_future(recorder.register(fcm("t"), "http:x"))
        gone = asyncio.ensure_future(recorder.remove("d-2"))
        assert await asyncio.gather(first, removed, again, gone) == [None, True, None, False]
        assert recorder.batches == 1
        row = await db.run(lambda c: tuple(c.execute("SELECT source, invalid FROM devices WHERE device_id = 'd-1'").fetchone()))
        assert row == ("http:x", "{}")
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    finally:
        await db.close()
