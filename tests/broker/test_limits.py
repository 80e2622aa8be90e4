"""The pieces of ``[broker.limits]`` on their own (policy, rate bucket, retained quota, shared
message bodies on disk) and, in-process, what must survive a restart: the gateway's own
retained status past a full retained store, and a session's expiry clock."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.broker.clients import Message
from gateway.broker.limits import (MAX_CONNECT_PACKET, MIN_PAUSE_S, SMALL_PACKET, SMALL_PUBLISH_RATE, UNLIMITED, Limit, LimitPolicy, LimitVerdict,
                                   RateBucket, RetainedQuota)
from gateway.broker.state import StateStore
from gateway.config import BrokerLimits
from gateway.storage import Database
from tests.broker.helpers import PUBACK, PUBLISH, RawClient, start_broker, until, write_accounts


def test_policy_per_role_admin_and_gateway():
    policy = LimitPolicy(BrokerLimits.model_validate({
        "max_packet_size": 500_000, "max_publish_rate": 5,
        "device": {"max_publish_rate": 50}, "monitor": {"max_packet_size": 1000},
        "admin": {"max_connections": 7}}))
    tech = policy.for_role("technician")
    assert (tech.max_packet_size, tech.max_publish_rate, tech.max_sessions_per_account) == (500_000, 5, 10)
    device = policy.for_role("device")
    assert (device.max_packet_size, device.max_publish_rate) == (SMALL_PACKET, 50)   # small by default
    assert policy.for_role("anonymous").max_packet_size == SMALL_PACKET
    # Devices and anonymous clients are rate-limited by default; the base rate applies when lower;
    # their role table may lift it (0).
    assert LimitPolicy().for_role("device").max_publish_rate == SMALL_PUBLISH_RATE == 1000
    assert policy.for_role("anonymous").max_publish_rate == 5
    assert LimitPolicy().for_role("technician").max_publish_rate == 0
    assert LimitPolicy(BrokerLimits.model_validate({"device": {"max_publish_rate": 0}})).for_role(
        "device").max_publish_rate == 0
    assert policy.for_role("monitor").max_packet_size == 1000
    admin = policy.for_role("admin")     # only what [broker.limits.admin] names
    assert admin.max_connections == 7 and admin.max_packet_size == UNLIMITED.max_packet_size
    assert admin.max_publish_rate == 0 and admin.max_retained_per_principal == 0
    assert policy.for_role("device", gateway=True) is UNLIMITED
    assert LimitPolicy().for_role("admin") == UNLIMITED
    assert Limit.PACKET_SIZE.verdict is LimitVerdict.PACKET_TOO_LARGE and LimitVerdict.PACKET_TOO_LARGE.v5_reason == 0x95
    assert Limit.RATE.verdict.v5_reason == 0x96 and Limit.RETAINED.verdict is LimitVerdict.QUOTA_EXCEEDED
    assert MAX_CONNECT_PACKET <= SMALL_PACKET


def test_rate_bucket_allows_a_seconds_burst_then_paces():
    now = [100.0]
    bucket = RateBucket(10, 0, clock=lambda: now[0])
    assert [bucket.take(1) for _ in range(10)] == [0.0] * 10
    assert bucket.take(1) == pytest.approx(0.1)
    now[0] += 0.1
    assert bucket.take(1) == pytest.approx(0.1)   # paid off one, owes the next
    now[0] += 10
    assert bucket.take(1) == 0.0
    by_bytes = RateBucket(0, 1000, clock=lambda: now[0])
    assert by_bytes.take(600) == 0.0
    assert by_bytes.take(2400) == pytest.approx(2.0)   # a debt larger than the burst: paid by waiting


def test_a_flooder_over_its_rate_is_paused_in_bursts_not_per_message():
    """At 1000 messages/s, a client that always has the next PUBLISH ready is paused about 20
    times a second (each pause a timer and a wake-up of the broker's loop), not 1000 times, and
    still gets no more than its rate."""
    now = [0.0]
    bucket = RateBucket(1000, 0, clock=lambda: now[0])
    for _ in range(1000):
        assert bucket.take(64) == 0.0   # a second's burst
    pauses = sent = 0
    while now[0] < 5.0:
        wait = bucket.take(64)
        sent += 1
        if wait:
            assert wait >= MIN_PAUSE_S
            pauses += 1
            now[0] += wait
    assert pauses <= 5 * (1 / MIN_PAUSE_S) + 2, pauses
    assert sent <= 5 * 1000 + 1000 // 20 + 1, sent


def test_retained_quota_counts_topics_and_bytes_per_principal():
    quota = RetainedQuota()
    limits = LimitPolicy(BrokerLimits(max_retained_per_principal=2, max_retained_bytes_per_principal=100)).for_role("x")
    assert quota.admits("a", "p", 60, limits)
    quota.stored("a", "p", 60)
    assert quota.admits("a", "p", 100, limits)           # replacing its own topic
    assert not quota.admits("b", "p", 50, limits)        # 60 + 50 > 100
    quota.stored("b", "p", 40)
    assert not quota.admits("c", "p", 1, limits)         # a third topic
    quota.stored("c", "q", 10)
    quota.stored("b", "q", 5)                            # q took over p's topic b
    assert quota.usage("p") == (1, 60) and quota.usage("q") == (2, 15)
    quota.removed("a")
    assert quota.usage("p") == (0, 0) and quota.owner("b") == "q"
    quota.stored("z", None, 10**9)                       # the gateway's: no one's
    assert quota.admits("z", None, 10**9, limits)


async def test_a_message_for_many_sessions_is_stored_once(tmp_path: Path):
    db = await Database(tmp_path / "gateway.db").open()
    store = StateStore(db)
    await store.open()
    msg = Message("t/x", b"B" * 5000)
    try:
        for n in range(50):
            store.session(f"s{n}", None, "monitor", "anonymous@l")
            store.queue_shared(f"s{n}", n + 1, msg, 1)
        await store.flush()
        conn = sqlite3.connect(tmp_path / "gateway.db")
        assert conn.execute("SELECT count(*), sum(length(payload)) FROM broker_messages").fetchone() == (50, 0)
        assert conn.execute("SELECT count(*), sum(length(payload)) FROM broker_bodies").fetchone() == (1, 5000)
        loaded = await store.open()
        assert {m.payload for s in loaded.sessions.values() for m in s.messages} == {b"B" * 5000}
        for n in range(49):
            store.message_done(f"s{n}", n + 1)
            store.release_body(msg)
        await store.flush()
        assert conn.execute("SELECT count(*) FROM broker_bodies").fetchone() == (1,)
        store.message_done("s49", 50)
        store.release_body(msg)
        await store.flush()
        assert conn.execute("SELECT count(*) FROM broker_bodies").fetchone() == (0,)
        # Queued and finished within one commit: neither body nor row is ever written.
        other = Message("t/y", b"C")
        store.queue_shared("s1", 99, other, 1)
        store.message_done("s1", 99)
        store.release_body(other)
        assert store.backlog == 0
        # A body no row names (a crash between deletes) is removed at start.
        conn.execute("INSERT INTO broker_bodies (id, payload) VALUES (777, x'00')")
        conn.commit()
        await store.open()
        assert conn.execute("SELECT count(*) FROM broker_bodies").fetchone() == (0,)
        conn.close()
    finally:
        await store.close()
        await db.close()


async def test_gateway_status_stays_retained_past_a_full_store_and_a_restart(tmp_path: Path):
    """Other clients fill the retained store; the gateway's own retained status is still kept,
    and is there again after a restart (the store's limits applied at start spare it too)."""
    b = await start_broker(tmp_path, options={"max_retained": 3, "reserved_client_id": "gw-own"})
    port = b.port
    try:
        other = RawClient(port)
        await other.connect("filler")
        for n in range(5):
            other.publish(f"fill/{n}", b"v", 1, retain=True)
            await other.expect(PUBACK)
        own = RawClient(port)
        await own.connect("gw-own", username=b.internal.username, password=b.internal.password)
        own.publish("homepot/site-t/gateway/status", b'{"state":"online"}', 1, retain=True)
        await own.expect(PUBACK)
        assert b.metrics()["retained"] == 4 and b.metrics()["retained_refused"] == 2
        other.disconnect()
        own.disconnect()
    finally:
        await b.stop()
    b = await start_broker(tmp_path, port=port, options={"max_retained": 3, "reserved_client_id": "gw-own"})
    try:
        late = RawClient(port)
        await late.connect("late")
        await late.subscribe(("homepot/site-t/gateway/status", 1))
        assert (await late.expect(PUBLISH)).payload == b'{"state":"online"}'
        late.disconnect()
    finally:
        await b.stop()


async def test_session_expiry_counts_from_the_last_disconnect_across_restarts(tmp_path: Path):
    extra = {"broker": {"limits": {"admin": {"session_expiry_s": 1.5}}}}   # anonymous clients are admin here
    b = await start_broker(tmp_path, **extra)
    port = b.port
    try:
        c = RawClient(port)
        await c.connect("exp-1", clean=False)
        await c.subscribe(("e/#", 1))
        c.disconnect()
        await until(lambda: b.metrics()["clients_connected"] == 0)
        await b.broker._store.flush()
        row = sqlite3.connect(tmp_path / "var" / "gateway.db").execute(
            "SELECT seen_at FROM broker_sessions WHERE client_id = 'exp-1'").fetchone()
        assert row is not None and abs(row[0] - time.time()) < 5
    finally:
        await b.stop()
    await asyncio.sleep(1.6)  # the broker is down: the session's offline time goes on
    b = await start_broker(tmp_path, port=port, **extra)
    try:
        await until(lambda: b.metrics()["sessions_expired"] == 1)
        again = RawClient(port)
        assert await again.connect("exp-1", clean=False) == (False, 0)
        again.disconnect()
    finally:
        await b.stop()


async def test_retained_verdict_for_a_wire_that_can_answer_it(tmp_path: Path):
    """A device at its retained quota: replacing its own topic is fine, a new one is
    QUOTA_EXCEEDED (MQTT 5 PUBACK 0x97), and route() keeps only what the verdict allows."""
    write_accounts(tmp_path / "var" / "passwd", {"d1": "device"})
    b = await start_broker(tmp_path, broker={"limits": {"device": {"max_retained_per_principal": 1}}})
    try:
        d = RawClient(b.port)
        await d.connect("d1", username="d1", password="pw")
        topic = "homepot/site-t/devices/d1/telemetry/"
        d.publish(topic + "a", b"1", 1, retain=True)
        await d.expect(PUBACK)
        cs = b.broker._clients["d1"]
        assert b.broker.retained_verdict(cs, topic + "a", b"2") is None
        assert b.broker.retained_verdict(cs, topic + "b", b"2") is LimitVerdict.QUOTA_EXCEEDED
        d.publish(topic + "b", b"2", 1, retain=True)
        await d.expect(PUBACK)
        assert b.metrics()["limited_retained"] == 1 and b.metrics()["retained"] == 1
        d.disconnect()
    finally:
        await b.stop()


def test_limits_config_errors_name_the_key():
    from gateway.config import ConfigError, parse_config

    listeners = [{"name": "l", "bind": "127.0.0.1:1"}]

    def problems(limits: dict, environ: dict | None = None) -> list[str]:
        try:
            parse_config({"broker": {"listeners": listeners, "limits": limits}}, environ or {})
        except ConfigError as exc:
            return exc.lines()
        return []

    assert problems({"max_pakcet_size": 3}) == ["broker.limits.max_pakcet_size: unknown key"]
    assert problems({"device": {"max_x": 1}}) == ["broker.limits.device.max_x: unknown key"]
    assert problems({"device": {"max_packet_size": 1}}) == [
        "broker.limits.device.max_packet_size: Input should be greater than or equal to 16"]
    assert "[broker.limits.nosuchrole] names no role" in problems({"nosuchrole": {"max_connections": 1}})[0]
    cfg = parse_config({"broker": {"listeners": listeners, "acl": {"kiosk": {}},
                                   "limits": {"kiosk": {"max_publish_rate": 2}}}},
                       {"HOMEPOT_BROKER_LIMITS_MAX_CONNECTIONS": "50"}).config
    assert cfg.broker.limits.max_connections == 50 and cfg.broker.limits.roles["kiosk"].max_publish_rate == 2


async def test_sockets_waiting_for_their_connect_are_capped(tmp_path: Path):
    """max_connections also bounds connections that have not sent CONNECT yet."""
    b = await start_broker(tmp_path, broker={"limits": {"max_connections": 2}})
    try:
        idle = [await RawClient(b.port).open() for _ in range(2)]
        await until(lambda: len(b.broker.connecting) == 2)
        third = await RawClient(b.port).open()
        assert await third.closed(timeout=5)
        assert b.metrics()["limited_connections"] == 1
        for c in idle:
            c.drop()
        await until(lambda: not b.broker.connecting)
        ok = RawClient(b.port)
        assert await ok.connect("after") == (False, 0)
        ok.disconnect()
    finally:
        await b.stop()


async def test_sessions_over_the_limit_from_before_are_trimmed_at_start(tmp_path: Path):
    """Sessions a principal left behind before the limit existed: at start its 3 most
    recently seen are kept, the rest forgotten with their rows."""
    b = await start_broker(tmp_path)      # no per-account limit for admin (anonymous here)
    port = b.port
    try:
        for n in range(6):
            c = RawClient(port)
            await c.connect(f"old-{n}", clean=False)
            await c.subscribe(("t/#", 1))
            c.disconnect()
            await until(lambda: b.metrics()["clients_connected"] == 0)
    finally:
        await b.stop()
    b = await start_broker(tmp_path, port=port, broker={"limits": {"admin": {"max_sessions_per_account": 3}}})
    try:
        assert b.metrics()["sessions_evicted"] == 3
        await b.broker._store.flush()
        rows = sqlite3.connect(tmp_path / "var" / "gateway.db").execute(
            "SELECT client_id FROM broker_sessions ORDER BY client_id").fetchall()
        assert rows == [("old-3",), ("old-4",), ("old-5",)]
    finally:
        await b.stop()


async def test_concurrent_connects_cannot_overshoot_the_role_connection_cap(tmp_path: Path):
    """Twenty CONNECTs of one role at once (each awaits its argon2 check in a thread) against
    max_connections = 3 for that role: exactly three are accepted, the rest refused (0x03), and
    a slot freed by a disconnect is taken by exactly one of the next wave."""
    write_accounts(tmp_path / "var" / "passwd", {f"t{i}": "technician" for i in range(20)})
    b = await start_broker(tmp_path, broker={"limits": {"technician": {"max_connections": 3}}})
    try:
        async def attempt(i: int, wave: int = 1) -> tuple[RawClient, int]:
            c = RawClient(b.port)  # client ids unique across waves: a reused one would take its session over
            _, code = await c.connect(f"c{wave}-{i}", username=f"t{i}", password="pw")
            return c, code

        results = await asyncio.gather(*(attempt(i) for i in range(20)))
        accepted = [c for c, code in results if code == 0]
        assert len(accepted) == 3 and all(code in (0, 3) for _, code in results)
        assert b.broker.connections.by_role["technician"] == 3
        accepted[0].disconnect()
        await until(lambda: b.broker.connections.by_role["technician"] == 2)
        again = await asyncio.gather(*(attempt(i, wave=2) for i in range(3, 13)))
        assert sum(code == 0 for _, code in again) == 1
        assert b.broker.connections.by_role["technician"] == 3
        assert b.metrics()["limited_connections"] == 17 + 9
    finally:
        await b.stop()
