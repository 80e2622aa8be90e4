"""Acknowledgements wait for the disk, stalled clients are timed out, the retained store is
bounded, and ``$SYS/broker/...`` is published (issue 9 items 3, 5, 6; issue 12's $SYS)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from tests.broker.helpers import (
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Paho,
    RawClient,
    start_broker,
    until,
    write_accounts,
)

PINGRESP = 13


def _gate(broker) -> asyncio.Event:  # noqa: ANN001
    """Hold the broker's state commits until the returned event is set."""
    db = broker._store._db
    original = db.run
    gate = asyncio.Event()
    gate.set()

    async def gated(fn):  # noqa: ANN001, ANN202
        await gate.wait()
        return await original(fn)

    db.run = gated
    return gate


async def test_pubcomp_waits_until_the_release_is_on_disk(tmp_path):
    """[MQTT-4.3.3-2] after PUBCOMP the packet id is free for a new message: if the release
    were not on disk, a restart would still hold the id and swallow that new message."""
    b = await start_broker(tmp_path)
    gate = _gate(b)
    try:
        pub = RawClient(b.port)
        await pub.connect("q2-pub", clean=False)
        pid = pub.publish("q2/x", b"once", 2)
        assert (await pub.expect(PUBREC)).packet_id == pid
        gate.clear()                     # the disk is slow now
        pub.ack(PUBREL, pid)
        pub.send(b"\xc0\x00")            # PINGREQ: a barrier on the same connection
        first = await pub.read()
        assert first is not None and first.type == PINGRESP, first  # no PUBCOMP before the commit
        gate.set()
        assert (await pub.expect(PUBCOMP)).packet_id == pid
        pub.disconnect()
    finally:
        gate.set()
        await b.stop()
    rows = sqlite3.connect(tmp_path / "var" / "gateway.db").execute("SELECT * FROM broker_qos2_in").fetchall()
    assert rows == []


async def test_a_failed_state_write_is_not_acknowledged_and_the_publisher_resends(tmp_path):
    """The state commit fails: no PUBACK, the connection is closed (no will: the client did
    nothing wrong), the broker keeps serving; the resent message is acknowledged once the
    disk works again and reaches the persistent subscriber."""
    b = await start_broker(tmp_path)
    db = b._store._db
    original = db.run
    broken = True

    async def failing(fn):  # noqa: ANN001, ANN202
        if broken:
            raise sqlite3.OperationalError("database or disk is full")
        return await original(fn)

    try:
        keeper = RawClient(b.port)
        await keeper.connect("keeper", clean=False)
        await keeper.subscribe(("cfg/#", 1))
        keeper.disconnect()
        watcher = await Paho(b.port, "watcher").connect()
        await watcher.subscribe("wills/#", 1)

        db.run = failing
        pub = RawClient(b.port)
        await pub.connect("pub", clean=False, will=("wills/pub", b"gone", 1, False))
        pid = pub.publish("cfg/a", b"v1", 1, retain=True)
        assert await pub.read(timeout=8) is None        # no PUBACK: the next thing is the close
        assert await pub.closed()
        assert b.metrics()["not_acknowledged"] == 1 and b.metrics()["persist_errors"] >= 1
        other = RawClient(b.port)                       # the broker still serves
        assert await other.connect("other") == (False, 0)

        broken = False
        pub = RawClient(b.port)
        assert await pub.connect("pub", clean=False) == (True, 0)
        pub.publish("cfg/a", b"v1", 1, retain=True, dup=True, packet_id=pid)
        assert (await pub.expect(PUBACK)).packet_id == pid
        keeper = RawClient(b.port)
        assert await keeper.connect("keeper", clean=False) == (True, 0)
        got = await keeper.expect(PUBLISH)
        assert (got.topic, got.payload) == ("cfg/a", b"v1")
        assert watcher.messages == []                   # no will for a client we closed
        for c in (pub, keeper, other):
            c.disconnect()
        await watcher.stop()
    finally:
        broken = False
        await b.stop()


async def test_a_client_stalled_in_the_middle_of_a_packet_is_timed_out(tmp_path):
    """[MQTT-3.1.2-24] a fixed header and half a body, then silence: closed after 1.5 x
    keepalive like an idle client, will published [MQTT-3.1.2-8]. With keepalive 0 the
    broker's packet timeout bounds it; an idle keepalive-0 client may stay."""
    b = await start_broker(tmp_path, options={"packet_timeout_s": 1.0})
    try:
        watcher = await Paho(b.port, "watcher").connect()
        await watcher.subscribe("state/#", 1)
        stalled = RawClient(b.port)
        await stalled.connect("stalled", keepalive=1, will=("state/stalled", b"offline", 1, False))
        idle0 = RawClient(b.port)
        await idle0.connect("idle0", keepalive=0)
        stalled0 = RawClient(b.port)
        await stalled0.connect("stalled0", keepalive=0)
        t0 = time.monotonic()
        half = b"\x32\x20\x00\x07state/x\x00\x01half"   # PUBLISH QoS 1, 32 bytes announced, 14 sent
        stalled.send(half)
        stalled0.send(half)
        await until(lambda: watcher.messages, timeout=6)
        assert 1.4 <= time.monotonic() - t0 < 4.0
        assert watcher.messages[0].payload == b"offline"
        assert await stalled.closed(timeout=2)
        assert await stalled0.closed(timeout=3)
        assert b.metrics()["packet_timeouts"] == 2
        # idle0 sent nothing for longer than the packet timeout and is still served.
        idle0.send(b"\xc0\x00")
        assert (await idle0.expect(PINGRESP)).type == PINGRESP
        idle0.disconnect()
        await watcher.stop()
    finally:
        await b.stop()


async def test_the_retained_store_is_bounded_and_refusals_are_counted(tmp_path):
    b = await start_broker(tmp_path, options={"max_retained": 3})
    try:
        sub = await Paho(b.port, "live").connect()
        await sub.subscribe("r/#", 1)
        pub = RawClient(b.port)
        await pub.connect("pub")
        for i in range(5):
            pub.publish(f"r/{i}", b"v", 1, retain=True)
            await pub.expect(PUBACK)
        await until(lambda: len(sub.messages) == 5)       # still delivered live
        m = b.metrics()
        assert (m["retained"], m["retained_refused"]) == (3, 2)
        pub.publish("r/0", b"v2", 1, retain=True)          # replacing is not growing
        await pub.expect(PUBACK)
        pub.publish("r/1", b"", 1, retain=True)            # clearing frees a place...
        await pub.expect(PUBACK)
        pub.publish("r/9", b"new", 1, retain=True)         # ...that a new topic may take
        await pub.expect(PUBACK)
        late = RawClient(b.port)
        await late.connect("late")
        await late.subscribe(("r/#", 1))
        got = sorted((p.topic, p.payload) for p in [await late.expect(PUBLISH) for _ in range(3)])
        assert got == [("r/0", b"v2"), ("r/2", b"v"), ("r/9", b"new")]
        assert b.metrics()["retained_refused"] == 2
        await sub.stop()
        pub.disconnect()
        late.disconnect()
    finally:
        await b.stop()
    rows = sqlite3.connect(tmp_path / "var" / "gateway.db").execute(
        "SELECT topic FROM broker_retained ORDER BY topic").fetchall()
    assert rows == [("r/0",), ("r/2",), ("r/9",)]


async def test_sys_topics_for_admin_and_monitor_only(tmp_path):
    """Mosquitto's $SYS names, retained (RETAIN=1 for a new subscription [MQTT-3.3.1-8]),
    QoS 0, refreshed on the interval; never stored and not counted as retained."""
    passwd = tmp_path / "var" / "passwd"
    write_accounts(passwd, {"mon": "monitor", "tech": "technician"})
    b = await start_broker(tmp_path, options={"sys_interval_s": 0.2})
    try:
        mon = RawClient(b.port)
        await mon.connect("mon", username="mon", password="pw")
        assert await mon.subscribe(("$SYS/#", 0)) == [0]
        first = {}
        while len(first) < 9:
            p = await mon.expect(PUBLISH)
            assert (p.retain, p.qos) == (True, 0)
            first[p.topic] = p.payload.decode()
        assert sorted(first) == sorted(f"$SYS/broker/{n}" for n in (
            "version", "uptime", "clients/connected", "clients/total", "messages/received", "messages/sent",
            "messages/dropped", "subscriptions/count", "retained messages/count"))
        assert first["$SYS/broker/version"].startswith("homepot-gateway ")
        assert first["$SYS/broker/uptime"].endswith(" seconds")
        # A second client connects: the next round reports it, as a live (RETAIN=0) message.
        other = RawClient(b.port)
        await other.connect("other")
        while True:
            p = await mon.expect(PUBLISH)
            if p.topic == "$SYS/broker/clients/connected" and p.payload == b"2":
                assert p.retain is False
                break
        tech = RawClient(b.port)
        await tech.connect("tech", username="tech", password="pw")
        assert await tech.subscribe(("$SYS/#", 0), ("$SYS/broker/uptime", 0)) == [0x80, 0x80]
        m = b.metrics()
        assert m["retained"] == 0 and m["denied_subscribe"] == 2
        for c in (mon, other, tech):
            c.disconnect()
    finally:
        await b.stop()
    rows = sqlite3.connect(tmp_path / "var" / "gateway.db").execute("SELECT topic FROM broker_retained").fetchall()
    assert rows == []
