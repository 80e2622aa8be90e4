"""Sessions belong to their principal (contract §5, issue 9.1), queued messages are checked
against the receiver's ACL when they are sent, and the gateway's own session is never capped.

In-process broker; the daemon-level proof is in ``test_daemon_broker.py``.
"""

from __future__ import annotations

from tests.broker.helpers import PUBACK, PUBLISH, RawClient, start_broker, until, write_accounts

P = "homepot/site-t"


async def test_a_client_id_belongs_to_the_principal_that_made_the_session(tmp_path):
    """[MQTT-3.1.4-2] takeover only by the same principal; anyone else gets 0x05 with the
    owner's connection, subscriptions and queue untouched, whatever its CleanSession flag."""
    passwd = tmp_path / "var" / "passwd"
    write_accounts(passwd, {"alice": "technician", "bob": "technician"})
    b = await start_broker(tmp_path)
    try:
        admin = RawClient(b.port)
        await admin.connect("admin-pub", username=b.internal.username, password=b.internal.password)
        alice = RawClient(b.port)
        assert await alice.connect("shared", clean=False, username="alice", password="pw") == (False, 0)
        assert await alice.subscribe((f"{P}/t/#", 1)) == [1]

        for clean in (False, True):
            bob = RawClient(b.port)
            assert await bob.connect("shared", clean=clean, username="bob", password="pw") == (False, 5)
            assert await bob.closed()
            anon = RawClient(b.port)  # anonymous on the loopback listener (role admin here)
            assert await anon.connect("shared", clean=clean) == (False, 5)
            assert await anon.closed()
        # alice was not kicked off: she still gets what is published.
        admin.publish(f"{P}/t/1", b"live", 1)
        await admin.expect(PUBACK)
        got = await alice.expect(PUBLISH)
        assert got.payload == b"live"
        alice.ack(PUBACK, got.packet_id)

        alice.disconnect()
        admin.publish(f"{P}/t/2", b"queued", 1)
        await admin.expect(PUBACK)
        bob = RawClient(b.port)
        assert await bob.connect("shared", clean=True, username="bob", password="pw") == (False, 5)
        # The owner, from another connection, takes it back with everything queued.
        alice = RawClient(b.port)
        assert await alice.connect("shared", clean=False, username="alice", password="pw") == (True, 0)
        assert (await alice.expect(PUBLISH)).payload == b"queued"
        assert b.metrics()["sessions_refused"] == 5

        # The gateway's own client id: only the gateway's account, even for a valid technician.
        reserved = b.reserved_client_id
        assert reserved == "homepot-gateway-site-t"
        thief = RawClient(b.port)
        assert await thief.connect(reserved, clean=False, username="alice", password="pw") == (False, 5)
        gw = RawClient(b.port)
        assert await gw.connect(reserved, clean=False, username=b.internal.username,
                                password=b.internal.password) == (False, 0)
        for c in (alice, gw, admin):
            c.disconnect()
    finally:
        await b.stop()


async def test_queued_messages_are_checked_against_the_role_when_sent(tmp_path):
    """A session queued messages while its account was a technician; the account is now a
    device: on reconnect it gets only what a device may read (dropped_acl counts the rest)."""
    passwd = tmp_path / "var" / "passwd"
    write_accounts(passwd, {"carol": "technician"})
    b = await start_broker(tmp_path)
    try:
        carol = RawClient(b.port)
        await carol.connect("carol", clean=False, username="carol", password="pw")
        assert await carol.subscribe((f"{P}/#", 1)) == [1]
        carol.disconnect()
        admin = RawClient(b.port)
        await admin.connect("admin-pub", username=b.internal.username, password=b.internal.password)
        for topic in (f"{P}/devices/other/notify", f"{P}/devices/carol/notify", f"{P}/jobs/j1/status"):
            admin.publish(topic, topic.encode(), 1)
            await admin.expect(PUBACK)

        write_accounts(passwd, {"carol": "device"})  # the operator changes her role
        carol = RawClient(b.port)
        assert await carol.connect("carol", clean=False, username="carol", password="pw") == (True, 0)
        first = await carol.expect(PUBLISH)
        assert first.topic == f"{P}/devices/carol/notify"
        carol.ack(PUBACK, first.packet_id)
        # Barrier: a later message on the same connection comes next; nothing withheld came between.
        admin.publish(f"{P}/devices/carol/later", b"later", 1)
        await admin.expect(PUBACK)
        second = await carol.expect(PUBLISH)
        assert second.topic == f"{P}/devices/carol/later"
        assert b.metrics()["dropped_acl"] == 2
        carol.disconnect()
        admin.disconnect()
    finally:
        await b.stop()


async def test_inflight_message_is_not_resent_to_a_role_that_may_no_longer_read_it(tmp_path):
    passwd = tmp_path / "var" / "passwd"
    write_accounts(passwd, {"dave": "technician"})
    b = await start_broker(tmp_path)
    try:
        dave = RawClient(b.port)
        await dave.connect("dave", clean=False, username="dave", password="pw")
        await dave.subscribe((f"{P}/#", 1))
        admin = RawClient(b.port)
        await admin.connect("admin-pub", username=b.internal.username, password=b.internal.password)
        admin.publish(f"{P}/jobs/secret/status", b"s", 1)
        await admin.expect(PUBACK)
        assert (await dave.expect(PUBLISH)).topic == f"{P}/jobs/secret/status"
        dave.drop()  # no PUBACK: in flight
        await until(lambda: b.metrics()["clients_connected"] == 1)  # the broker saw dave go
        write_accounts(passwd, {"dave": "device"})
        admin.publish(f"{P}/devices/dave/notify", b"n", 1)
        await admin.expect(PUBACK)
        dave = RawClient(b.port)
        assert await dave.connect("dave", clean=False, username="dave", password="pw") == (True, 0)
        got = await dave.expect(PUBLISH)
        assert (got.topic, got.dup) == (f"{P}/devices/dave/notify", False)  # the in-flight one was withheld
        assert b.metrics()["inflight"] == 1 and b.metrics()["dropped_acl"] == 1
        dave.disconnect()
        admin.disconnect()
    finally:
        await b.stop()


async def test_connected_queue_cap_counts_beyond_the_inflight_window_and_spares_the_gateway(tmp_path):
    """A connected client that does not acknowledge: 100 in flight plus max_queued_messages
    waiting; beyond that the oldest waiting one is dropped, counted and logged. The gateway's
    reserved session is never capped."""
    b = await start_broker(tmp_path, broker={"max_queued_messages": 10})
    try:
        slow = RawClient(b.port)
        await slow.connect("slow", clean=False)
        await slow.subscribe(("burst/#", 1))
        gw = RawClient(b.port)
        await gw.connect(b.reserved_client_id, clean=False, username=b.internal.username,
                         password=b.internal.password)
        await gw.subscribe(("burst/#", 1))
        pub = RawClient(b.port)
        await pub.connect("pub")
        for i in range(300):
            pub.publish("burst/x", str(i).encode(), 1)
        for _ in range(300):
            await pub.expect(PUBACK)
        m = b.metrics()
        assert m["dropped"] == 300 - 100 - 10  # 100 in flight + 10 queued kept for "slow"
        gw_state = b.broker._clients[b.reserved_client_id]
        assert len(gw_state.inflight) + len(gw_state.pending) == 300 and gw_state.dropped == 0
        # The gateway gets every one, in order, as it acknowledges.
        seen = []
        while len(seen) < 300:
            pkt = await gw.expect(PUBLISH)
            seen.append(int(pkt.payload))
            gw.ack(PUBACK, pkt.packet_id)
        assert seen == list(range(300))
        for c in (slow, gw, pub):
            c.disconnect()
    finally:
        await b.stop()
