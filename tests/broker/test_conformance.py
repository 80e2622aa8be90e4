"""MQTT 3.1.1 conformance of the embedded broker, statement by statement.

Each test names the normative statements ``[MQTT-x.y.z-n]`` of the OASIS standard it
checks. Clients: paho-mqtt and mosquitto_pub/sub (independent implementations) and a
raw byte-level client where flags, packet ids and withheld acks must be visible.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.broker.helpers import (
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Paho,
    RawClient,
    mosquitto_pub,
    mosquitto_sub,
    until,
)

needs_mosquitto = pytest.mark.usefixtures("mosquitto_clients")  # fails without them (tests/conftest.py)


@needs_mosquitto
async def test_delivered_qos_is_min_of_publish_and_subscription(broker):
    """[MQTT-3.8.4-6] QoS of a delivered message = min(published QoS, granted QoS)."""
    sub2 = await Paho(broker.port, "sub-q2").connect()
    sub1 = await Paho(broker.port, "sub-q1").connect()
    assert await sub2.subscribe("qos/t", 2) == [2]
    assert await sub1.subscribe("qos/t", 1) == [1]
    for qos in (0, 1, 2):
        await mosquitto_pub(broker.port, "qos/t", f"q{qos}".encode(), qos)
    await until(lambda: len(sub2.messages) == 3 and len(sub1.messages) == 3)
    assert [(m.payload, m.qos) for m in sub2.messages] == [(b"q0", 0), (b"q1", 1), (b"q2", 2)]
    assert [(m.payload, m.qos) for m in sub1.messages] == [(b"q0", 0), (b"q1", 1), (b"q2", 1)]
    await sub1.stop()
    await sub2.stop()


@needs_mosquitto
async def test_retained_go_only_to_the_new_subscription_with_retain_set(broker):
    """[MQTT-3.3.1-5] stored, [MQTT-3.3.1-6] sent on a new matching subscription only,
    [MQTT-3.3.1-8] with RETAIN=1, [MQTT-3.3.1-9] live forwards carry RETAIN=0."""
    other = await Paho(broker.port, "other", clean=False).connect()
    await other.subscribe("private/#", 1)  # someone else's filter
    await mosquitto_pub(broker.port, "private/x", b"secret", 1, True)
    await mosquitto_pub(broker.port, "shared/y", b"hello", 1, True)
    await until(lambda: len(other.messages) == 1)
    assert other.messages[0].retain is False  # [MQTT-3.3.1-9] live forward, although published retained

    newcomer = await Paho(broker.port, "newcomer").connect()
    await newcomer.subscribe("shared/#", 1)
    await until(lambda: newcomer.messages)
    await asyncio.sleep(0.2)
    assert [(m.topic, m.payload, m.retain) for m in newcomer.messages] == [("shared/y", b"hello", True)]

    # A persistent session that reconnects gets no retained replay: its subscription is not new.
    await other.stop()
    again = await Paho(broker.port, "other", clean=False).connect()
    assert again.session_present is True
    await asyncio.sleep(0.3)
    assert again.messages == []
    await again.stop()
    await newcomer.stop()


@needs_mosquitto
async def test_retained_set_replace_and_clear_with_empty_payload(broker):
    """[MQTT-3.3.1-5] set, replace; [MQTT-3.3.1-12] RETAIN=0 neither stores nor removes;
    [MQTT-3.3.1-10] an empty retained payload clears, [MQTT-3.3.1-11] and is not stored;
    [MQTT-3.1.2-7] retained messages are not session state."""
    port = broker.port
    await mosquitto_pub(port, "ret/t", b"v1", 1, True)
    assert await mosquitto_sub(port, "ret/t", 1) == ["ret/t v1"]
    await mosquitto_pub(port, "ret/t", b"v2", 0, True)  # [MQTT-3.3.1-7] QoS 0 replaces too
    await mosquitto_pub(port, "ret/t", b"live only", 1, False)
    assert await mosquitto_sub(port, "ret/t", 1) == ["ret/t v2"]

    watcher = await Paho(port, "watcher").connect()
    await watcher.subscribe("ret/t", 1)
    await until(lambda: watcher.messages)
    await mosquitto_pub(port, "ret/t", None, 1, True)  # clear
    # The empty message itself is still forwarded, as a normal message [MQTT-3.3.1-10].
    await until(lambda: len(watcher.messages) == 2)
    assert (watcher.messages[1].payload, watcher.messages[1].retain) == (b"", False)
    assert await mosquitto_sub(port, "ret/t", 1, 1) == []
    assert broker.metrics()["retained"] == 0
    await watcher.stop()


async def test_will_published_on_abnormal_disconnect_not_on_disconnect(broker):
    """[MQTT-3.1.2-8] will sent when the connection closes without DISCONNECT,
    [MQTT-3.1.2-17] as retained when asked; [MQTT-3.14.4-3], [MQTT-3.1.2-10] discarded on DISCONNECT."""
    watcher = await Paho(broker.port, "watcher").connect()
    await watcher.subscribe("wills/#", 1)

    polite = RawClient(broker.port)
    await polite.connect("polite", will=("wills/polite", b"gone", 1, False))
    polite.disconnect()

    crash = RawClient(broker.port)
    await crash.connect("crash", will=("wills/crash", b"lost", 1, True))
    crash.drop()

    await until(lambda: watcher.messages)
    await asyncio.sleep(0.3)
    assert [(m.topic, m.payload) for m in watcher.messages] == [("wills/crash", b"lost")]
    late = await Paho(broker.port, "late").connect()
    await late.subscribe("wills/#", 1)
    await until(lambda: late.messages)
    assert (late.messages[0].topic, late.messages[0].retain) == ("wills/crash", True)
    assert broker.metrics()["wills_published"] == 1
    await watcher.stop()
    await late.stop()


async def test_keepalive_enforced_half_open_connection_gets_its_will(broker):
    """[MQTT-3.1.2-24] no packet for 1.5 x keepalive: disconnected as if the network failed,
    so the will is published [MQTT-3.1.2-8]. The socket stays open (a half-open link)."""
    watcher = await Paho(broker.port, "watcher").connect()
    await watcher.subscribe("plc/+/state", 1)
    plc = RawClient(broker.port)
    await plc.connect("plc-7", keepalive=1, will=("plc/plc-7/state", b"offline", 1, False))
    t0 = time.monotonic()
    await until(lambda: watcher.messages, timeout=5)
    elapsed = time.monotonic() - t0
    assert 1.4 <= elapsed < 3.5, elapsed
    assert watcher.messages[0].payload == b"offline"
    assert await plc.closed(timeout=2)
    assert broker.metrics()["keepalive_timeouts"] == 1

    # A client that pings in time stays connected.
    alive = RawClient(broker.port)
    await alive.connect("alive", keepalive=1)
    for _ in range(4):
        await asyncio.sleep(0.6)
        alive.send(b"\xc0\x00")  # PINGREQ
        assert (await alive.expect(13)).type == 13  # PINGRESP [MQTT-3.12.4-1]
    assert broker.metrics()["keepalive_timeouts"] == 1
    alive.disconnect()
    await watcher.stop()


async def test_persistent_session_keeps_subscriptions_and_queues_qos1_qos2(broker):
    """[MQTT-3.1.2-4] resumed, [MQTT-3.2.2-2] session present, [MQTT-3.1.2-5] QoS 1/2 stored
    while offline (QoS 0 not), delivered in order [MQTT-4.6.0-6] with RETAIN=0 [MQTT-3.3.1-9]."""
    sensor = await Paho(broker.port, "sensor-1", clean=False).connect()
    assert sensor.session_present is False  # [MQTT-3.2.2-3]
    await sensor.subscribe("cmd/#", 2)
    await sensor.stop()
    pub = await Paho(broker.port, "pub").connect()
    await pub.publish("cmd/a", b"zero", 0)
    for i in range(5):
        await pub.publish("cmd/a", f"one-{i}".encode(), 1, retain=(i == 0))
    await pub.publish("cmd/b", b"two", 2)
    assert broker.metrics()["queued"] == 6

    back = await Paho(broker.port, "sensor-1", clean=False).connect()
    assert back.session_present is True
    await until(lambda: len(back.messages) == 6)
    assert [m.payload for m in back.messages] == [b"one-0", b"one-1", b"one-2", b"one-3", b"one-4", b"two"]
    assert all(m.retain is False for m in back.messages)
    assert [m.qos for m in back.messages] == [1, 1, 1, 1, 1, 2]
    await back.stop()
    await pub.stop()


async def test_named_session_on_anonymous_listener_gets_an_offline_queue(tmp_path):
    """amqtt treated every session as anonymous when allow_anonymous was on, and queued nothing."""
    from tests.broker.helpers import start_broker
    from tests.helpers import write_accounts

    write_accounts(tmp_path / "var" / "passwd", {"plc-1": ("admin", "pw-1")})
    b = await start_broker(tmp_path)
    try:
        plc = await Paho(b.port, "plc-1", clean=False, username="plc-1", password="pw-1").connect()
        await plc.subscribe("x/#", 1)
        await plc.stop()
        anon = await Paho(b.port, "anon-persistent", clean=False).connect()
        await anon.subscribe("x/#", 1)
        await anon.stop()
        pub = await Paho(b.port, "p").connect()
        await pub.publish("x/1", b"queued", 1)
        for cid, user in (("plc-1", "plc-1"), ("anon-persistent", None)):
            c = await Paho(b.port, cid, clean=False, username=user, password="pw-1" if user else None).connect()
            await until(lambda: c.messages)
            assert c.messages[0].payload == b"queued"
            await c.stop()
        await pub.stop()
    finally:
        await b.stop()


async def test_clean_session_discards_previous_state(broker):
    """[MQTT-3.1.2-6] CleanSession=1 discards the stored session, [MQTT-3.2.2-1] session present 0,
    and the state is not reused by a later CleanSession=0 connection [MQTT-3.2.2-3]."""
    c = RawClient(broker.port)
    assert await c.connect("dev", clean=False) == (False, 0)
    assert await c.subscribe(("d/#", 1)) == [1]
    c.disconnect()
    await asyncio.sleep(0.05)
    await (await Paho(broker.port, "p").connect()).publish("d/1", b"x", 1)

    c = RawClient(broker.port)
    assert await c.connect("dev", clean=True) == (False, 0)
    assert await c.read(timeout=0.3) is None  # the queued message went with the old session
    c.disconnect()
    await asyncio.sleep(0.05)
    c = RawClient(broker.port)
    assert await c.connect("dev", clean=False) == (False, 0)
    await (await Paho(broker.port, "p2").connect()).publish("d/1", b"y", 1)
    assert await c.read(timeout=0.3) is None  # no subscription survived
    c.disconnect()


async def test_inflight_messages_resent_with_dup_on_reconnect(broker):
    """[MQTT-4.4.0-1] unacknowledged PUBLISH (QoS 1, 2) resent with the original packet id and
    DUP=1 [MQTT-3.3.1-1]; a PUBREL whose PUBCOMP is missing is resent too."""
    dev = RawClient(broker.port)
    await dev.connect("dev-dup", clean=False)
    await dev.subscribe(("dup/#", 2))
    pub = await Paho(broker.port, "p").connect()
    await pub.publish("dup/one", b"m1", 1)
    await pub.publish("dup/two", b"m2", 2)
    first = [await dev.expect(PUBLISH), await dev.expect(PUBLISH)]
    assert [(p.topic, p.qos, p.dup) for p in first] == [("dup/one", 1, False), ("dup/two", 2, False)]
    dev.drop()  # no PUBACK, no PUBREC

    dev = RawClient(broker.port)
    assert await dev.connect("dev-dup", clean=False) == (True, 0)
    again = [await dev.expect(PUBLISH), await dev.expect(PUBLISH)]
    assert [(p.topic, p.payload, p.dup, p.packet_id) for p in again] == [
        (p.topic, p.payload, True, p.packet_id) for p in first]
    dev.ack(PUBACK, again[0].packet_id)
    dev.ack(PUBREC, again[1].packet_id)
    rel = await dev.expect(PUBREL)
    assert rel.packet_id == again[1].packet_id and rel.flags == 2  # [MQTT-3.6.1-1]
    dev.drop()  # before PUBCOMP

    dev = RawClient(broker.port)
    assert await dev.connect("dev-dup", clean=False) == (True, 0)
    rel = await dev.expect(PUBREL)
    assert rel.packet_id == again[1].packet_id
    dev.ack(PUBCOMP, rel.packet_id)
    assert await dev.read(timeout=0.3) is None  # the PUBACKed QoS 1 message is not sent again
    assert broker.metrics()["inflight"] == 0
    dev.disconnect()
    await pub.stop()


async def test_qos2_exactly_once_across_publisher_reconnect(broker):
    """[MQTT-4.3.3-2] a QoS 2 message resent (DUP=1, same id) before PUBREL is not delivered
    twice, also across a reconnect [MQTT-4.4.0-1]; PUBCOMP answers PUBREL."""
    sub = await Paho(broker.port, "sub").connect()
    await sub.subscribe("once/#", 2)
    pub = RawClient(broker.port)
    await pub.connect("pub-q2", clean=False)
    pid = pub.publish("once/x", b"exactly", 2)
    assert (await pub.expect(PUBREC)).packet_id == pid
    pub.drop()  # the PUBREC got "lost": the client will resend the PUBLISH

    pub = RawClient(broker.port)
    assert await pub.connect("pub-q2", clean=False) == (True, 0)
    pub.publish("once/x", b"exactly", 2, dup=True, packet_id=pid)
    assert (await pub.expect(PUBREC)).packet_id == pid
    pub.drop()

    pub = RawClient(broker.port)
    await pub.connect("pub-q2", clean=False)
    pub.ack(PUBREL, pid)
    assert (await pub.expect(PUBCOMP)).packet_id == pid
    # After PUBCOMP the id is free: the same id is a new message [MQTT-4.3.3-2].
    pub.publish("once/x", b"second", 2, packet_id=pid)
    assert (await pub.expect(PUBREC)).packet_id == pid
    pub.ack(PUBREL, pid)
    await pub.expect(PUBCOMP)
    await until(lambda: len(sub.messages) == 2)
    await asyncio.sleep(0.2)
    assert [m.payload for m in sub.messages] == [b"exactly", b"second"]
    pub.disconnect()
    await sub.stop()


async def test_overlapping_subscriptions_deliver_once_at_max_qos(broker):
    """[MQTT-3.3.5-1] overlapping subscriptions: delivered respecting the maximum QoS of all
    matching subscriptions (one copy here); [MQTT-3.3.2-3] the topic is the published one."""
    sub = await Paho(broker.port, "overlap").connect()
    await sub.subscribe("site/+/temp", 0)
    await sub.subscribe("site/#", 2)
    await sub.subscribe("site/a/temp", 1)
    pub = await Paho(broker.port, "p").connect()
    await pub.publish("site/a/temp", b"21.5", 2)
    await until(lambda: sub.messages)
    await asyncio.sleep(0.2)
    assert [(m.topic, m.qos) for m in sub.messages] == [("site/a/temp", 2)]
    await sub.stop()
    await pub.stop()


async def test_dollar_topics_not_matched_by_leading_wildcards(broker):
    """[MQTT-4.7.2-1] filters starting with '#' or '+' do not match topics starting with '$'."""
    everything = await Paho(broker.port, "all").connect()
    await everything.subscribe("#", 1)
    await everything.subscribe("+/x", 1)
    dollar = await Paho(broker.port, "dollar").connect()
    await dollar.subscribe("$internal/#", 1)
    pub = await Paho(broker.port, "p").connect()
    await pub.publish("$internal/x", b"hidden", 1)
    await pub.publish("normal/x", b"seen", 1)
    await until(lambda: dollar.messages and len(everything.messages) >= 1)
    await asyncio.sleep(0.2)
    assert [m.topic for m in dollar.messages] == ["$internal/x"]
    assert [m.topic for m in everything.messages] == ["normal/x"]
    for c in (everything, dollar, pub):
        await c.stop()


async def test_zero_length_client_id_rules(broker):
    """[MQTT-3.1.3-6] a zero-length id with CleanSession=1 is accepted and given a unique id;
    [MQTT-3.1.3-8] with CleanSession=0 it is refused with 0x02 and the connection closed."""
    a, b = RawClient(broker.port), RawClient(broker.port)
    assert await a.connect("", clean=True) == (False, 0)
    assert await b.connect("", clean=True) == (False, 0)
    assert await a.subscribe(("z/a", 0)) == [0]
    assert await b.subscribe(("z/b", 0)) == [0]
    assert broker.metrics()["clients_connected"] == 2  # two distinct sessions, not a take-over
    c = RawClient(broker.port)
    assert await c.connect("", clean=False) == (False, 2)
    assert await c.closed()
    a.disconnect()
    b.disconnect()


async def test_session_takeover_closes_the_old_connection(broker):
    """[MQTT-3.1.4-2] a second connection with the same client id disconnects the first."""
    first = RawClient(broker.port)
    await first.connect("same-id", clean=False)
    second = RawClient(broker.port)
    assert await second.connect("same-id", clean=False) == (True, 0)
    assert await first.closed()
    assert broker.metrics()["clients_connected"] == 1
    second.disconnect()


async def test_subscribe_return_codes_and_unsubscribe(broker):
    """[MQTT-3.8.4-4/5] one SUBACK with a return code per filter, in order; [MQTT-4.7.1-2/3]
    malformed wildcards get 0x80; [MQTT-3.10.4-2] after UNSUBSCRIBE nothing more is delivered."""
    c = RawClient(broker.port)
    await c.connect("subber")
    assert await c.subscribe(("u/#", 1), ("u/#/x", 1), ("u/a+", 0), ("u/+/y", 2)) == [1, 0x80, 0x80, 2]
    c.publish("u/1", b"a", 0)
    assert (await c.expect(PUBLISH)).payload == b"a"
    await c.unsubscribe("u/#", "u/+/y")
    c.publish("u/1", b"b", 0)
    assert await c.read(timeout=0.3) is None
    c.disconnect()


async def test_ordered_topic_keeps_publisher_order(broker):
    """[MQTT-4.6.0-6] messages of one publisher on one topic arrive in the order sent."""
    sub = await Paho(broker.port, "ordered").connect()
    await sub.subscribe("seq", 1)
    pub = RawClient(broker.port)
    await pub.connect("pub-seq")
    for i in range(300):
        pub.publish("seq", str(i).encode(), 1)
    await until(lambda: len(sub.messages) == 300)
    assert [int(m.payload) for m in sub.messages] == list(range(300))
    pub.disconnect()
    await sub.stop()


async def test_malformed_input_never_takes_the_broker_down(broker):
    """[MQTT-3.1.0-1] the first packet must be CONNECT, [MQTT-3.3.1-4] QoS 3 is a protocol
    error, [MQTT-4.7.3-1] an empty topic too: the connection is closed, the broker lives on."""
    junk = RawClient(broker.port)
    await junk.open()
    junk.send(b"\x00\xff\xff\xff\x7f garbage")
    assert await junk.closed()
    half = RawClient(broker.port)
    await half.open()
    half.send(b"\x10\x20\x00\x04MQ")  # a CONNECT cut short, then nothing
    half.drop()
    qos3 = RawClient(broker.port)
    await qos3.connect("qos3")
    qos3.send(b"\x36\x05\x00\x01a\x00\x01")
    assert await qos3.closed()
    empty = RawClient(broker.port)
    await empty.connect("empty")
    empty.publish("", b"x", 1)
    assert await empty.closed()
    ok = RawClient(broker.port)
    assert await ok.connect("ok") == (False, 0)
    assert await ok.subscribe(("fine", 1)) == [1]
    ok.publish("fine", b"still here", 1)
    assert (await ok.expect(PUBLISH)).payload == b"still here"
    assert broker.metrics()["protocol_errors"] >= 2
    ok.disconnect()


async def test_ill_formed_packets_after_connect_close_the_connection(broker):
    """The broker's own reader (gateway/broker/wire/connection.py): [MQTT-1.5.3-1] a topic that is not
    UTF-8, [MQTT-3.1.0-2] a second CONNECT, an acknowledgement whose remaining length is not 2
    and a remaining length over 4 bytes [MQTT-2.2.3] close the connection (the stream can
    no longer be trusted); nothing is routed, the broker serves everyone else."""
    sub = RawClient(broker.port)
    await sub.connect("watcher")
    assert await sub.subscribe(("#", 0)) == [0]
    cases = {
        "bad-utf8": b"\x30\x05\x00\x02\xff\xfex",            # PUBLISH, topic bytes ff fe
        "second-connect": b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",
        "long-puback": b"\x40\x03\x00\x01\x00",             # PUBACK with 3 bytes
        "long-length": b"\x30\xff\xff\xff\xff\x01",           # 5 remaining-length bytes
    }
    before = broker.metrics()["protocol_errors"]
    for name, data in cases.items():
        c = RawClient(broker.port)
        await c.connect(name)
        c.send(data)
        assert await c.closed(), name
    assert broker.metrics()["protocol_errors"] >= before + 3
    # Nothing of the above was routed; the barrier is a later message on the same subscription.
    ok = RawClient(broker.port)
    await ok.connect("ok-after")
    ok.publish("after", b"still here", 1)
    await ok.expect(PUBACK)
    got = await sub.expect(PUBLISH)
    assert (got.topic, got.payload) == ("after", b"still here")
    ok.disconnect()
    sub.disconnect()
