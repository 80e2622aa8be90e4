"""MQTT 5.0 and 3.1.1 on one broker with independent clients (paho-mqtt 2.2 with
``protocol=MQTTv5``, ``mosquitto_pub/sub -V 5``): messages, retained messages and offline
queues cross versions; 5.0 properties survive a restart and ``kill -9`` of the real daemon."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.broker.helpers import PUBACK, Paho, RawClient, mosquitto_pub, mosquitto_sub, start_broker, until
from tests.broker.v5 import Paho5, RawClient5

USER = 0x26


async def test_paho_v5_and_paho_311_exchange_messages_both_ways(broker):
    """A 5.0 publisher's properties reach a 5.0 subscriber [MQTT-3.3.2-15..20]; a 3.1.1
    subscriber gets the same message without them; a 3.1.1 publisher reaches a 5.0 subscriber."""
    sub5 = await Paho5(broker.port, "paho-sub5").connect()
    assert sub5.connack is not None and sub5.connack[0] == 0
    assert await sub5.subscribe("x/#", 1) == [1]
    sub3 = await Paho(broker.port, "paho-sub3").connect()
    await sub3.subscribe("x/#", 1)
    pub5 = await Paho5(broker.port, "paho-pub5").connect()
    await pub5.publish("x/v5", b"from five", 1, ContentType="text/plain", ResponseTopic="x/reply",
                       CorrelationData=b"c-1", UserProperty=[("site", "t"), ("n", "1")], MessageExpiryInterval=120)
    pub3 = await Paho(broker.port, "paho-pub3").connect()
    await pub3.publish("x/v3", b"from three", 1)
    await until(lambda: len(sub5.messages) == 2 and len(sub3.messages) == 2)
    five = {m.topic: m for m in sub5.messages}
    props = five["x/v5"].props
    assert (props["ContentType"], props["ResponseTopic"]) == ("text/plain", "x/reply")
    assert props["UserProperty"] == [("site", "t"), ("n", "1")]
    assert 0 < props["MessageExpiryInterval"] <= 120
    assert five["x/v3"].payload == b"from three" and "UserProperty" not in five["x/v3"].props
    assert sorted((m.topic, m.payload) for m in sub3.messages) == [("x/v3", b"from three"), ("x/v5", b"from five")]
    for c in (sub5, sub3, pub5, pub3):
        await c.stop()


async def test_paho_v5_is_told_a_denied_publish_and_subscription(tmp_path):
    """paho sees the 5.0 reason codes: SUBACK 0x87 for a filter its role may not read, and the
    PUBACK reason of a publish its role may not make (0x87)."""
    from tests.support import free_port

    port = free_port()
    b = await start_broker(tmp_path, port=port, broker={"listeners": [
        {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
         "anonymous_role": "monitor"}]})
    try:
        c = Paho5(port, "mon-paho")
        acks: list[int] = []
        c.client.on_publish = lambda cl, ud, mid, reason, props: acks.append(reason.value)
        await c.connect()
        assert await c.subscribe("elsewhere/#", 1) == [0x87]
        c.client.publish("homepot/site-t/jobs", b"{}", 1)
        await until(lambda: acks)
        assert acks == [0x87]
        await c.stop()
    finally:
        await b.stop()


@pytest.mark.usefixtures("mosquitto_clients")
async def test_mosquitto_clients_v5_properties_and_retained_across_versions(broker):
    """``mosquitto_pub -V 5`` with user properties and a content type; ``mosquitto_sub -V 5``
    prints them; a retained message set by a 3.1.1 client reaches a 5.0 subscriber and one
    set by a 5.0 client a 3.1.1 subscriber (retained flag set, [MQTT-3.3.1-8])."""
    sub = asyncio.create_task(mosquitto_sub(broker.port, "m5/#", 1, 5, "-V", "5", "-F", "%t %p %P %C"))
    await until(lambda: broker.metrics()["subscriptions"] >= 1)
    await mosquitto_pub(broker.port, "m5/live", b"hello", 1, False, "-V", "5", "-D", "publish", "user-property",
                        "k", "v", "-D", "publish", "content-type", "text/plain")
    assert await sub == ["m5/live hello k:v text/plain"]
    await mosquitto_pub(broker.port, "m5/ret3", b"set-by-311", 1, True)
    await mosquitto_pub(broker.port, "m5/ret5", b"set-by-5", 1, True, "-V", "5", "-D", "publish",
                        "user-property", "origin", "five")
    lines5 = await mosquitto_sub(broker.port, "m5/ret3", 1, 3, "-V", "5", "-F", "%r %t %p")
    lines3 = await mosquitto_sub(broker.port, "m5/ret5", 1, 3, "-V", "311", "-F", "%r %t %p")
    assert lines5 == ["1 m5/ret3 set-by-311"] and lines3 == ["1 m5/ret5 set-by-5"]
    # and the 5.0 retained message keeps its user property for a 5.0 subscriber
    assert await mosquitto_sub(broker.port, "m5/ret5", 1, 3, "-V", "5", "-F", "%P") == ["origin:five"]


async def test_offline_queues_cross_versions(broker):
    """A 5.0 session (Session Expiry Interval) queues what a 3.1.1 client publishes while it is
    away, and a 3.1.1 persistent session what a 5.0 client publishes (properties dropped for it)."""
    s5 = await Paho5(broker.port, "q-five", clean_start=False, session_expiry=600).connect()
    await s5.subscribe("q/#", 1)
    await s5.stop()
    s3 = RawClient(broker.port)
    await s3.connect("q-three", clean=False)
    await s3.subscribe(("q/#", 1))
    s3.disconnect()
    pub3 = RawClient(broker.port)
    await pub3.connect("q-pub3")
    pub3.publish("q/a", b"three", 1)
    await pub3.expect(PUBACK)
    pub5 = RawClient5(broker.port)
    await pub5.connect5("q-pub5")
    pub5.publish5("q/b", b"five", 1, props={USER: [("k", "v")]})
    await pub5.expect(PUBACK)
    s5 = await Paho5(broker.port, "q-five", clean_start=False, session_expiry=600).connect()
    assert s5.connack is not None and s5.connack[1] is True   # session present
    await until(lambda: len(s5.messages) == 2)
    assert [(m.topic, m.payload) for m in s5.messages] == [("q/a", b"three"), ("q/b", b"five")]
    assert s5.messages[1].props["UserProperty"] == [("k", "v")]
    s3 = RawClient(broker.port)
    assert await s3.connect("q-three", clean=False) == (True, 0)
    got = [await s3.expect(3) for _ in range(2)]
    assert [(p.topic, p.payload) for p in got] == [("q/a", b"three"), ("q/b", b"five")]
    await s5.stop()
    s3.disconnect()
    pub3.disconnect()
    pub5.disconnect5()


async def test_properties_expiry_and_subscription_ids_survive_a_restart(tmp_path):
    """What the broker keeps on disk keeps its 5.0 parts: a queued message its properties, the
    rest of its Message Expiry Interval and its Subscription Identifier; a retained message its
    properties; a session its Session Expiry Interval and subscription options."""
    b = await start_broker(tmp_path)
    port = b.port
    sub = RawClient5(port)
    await sub.connect5("keeper5", clean_start=True, props={0x11: 3600})
    assert await sub.subscribe5(("r/#", 0x08 | 1), props={0x0B: [9]}) == [1]   # Retain As Published
    sub.disconnect5()
    pub = RawClient5(port)
    await pub.connect5("pub5")
    pub.publish5("r/q", b"queued", 1, props={0x02: 600, 0x03: "text/plain", USER: [("a", "b")]})
    pub.publish5("r/ret", b"retained", 1, retain=True, props={USER: [("r", "1")]})
    await pub.expect(PUBACK)
    await pub.expect(PUBACK)
    pub.disconnect5()
    await asyncio.sleep(0.1)
    await b.stop()

    b = await start_broker(tmp_path, port=port)
    try:
        sub = RawClient5(port)
        assert await sub.connect5("keeper5", clean_start=False, props={0x11: 3600}) == (True, 0)
        got = {m.topic: m for m in [await sub.next_publish(), await sub.next_publish()]}
        q = got["r/q"]
        assert (q.payload, q.props[0x03], q.props[USER], q.props[0x0B]) == (b"queued", "text/plain", [("a", "b")], [9])
        assert 500 < q.props[0x02] <= 600
        assert got["r/ret"].retain   # queued while offline with Retain As Published
        assert got["r/ret"].props[USER] == [("r", "1")]
        for m in got.values():
            sub.ack(4, m.packet_id)
        fresh = RawClient5(port)
        await fresh.connect5("fresh5")
        await fresh.subscribe5(("r/ret", 1))
        ret = await fresh.next_publish()
        assert (ret.payload, ret.retain, ret.props[USER]) == (b"retained", True, [("r", "1")])
        sub.disconnect5()
        fresh.disconnect5()
    finally:
        await b.stop()


@pytest.mark.usefixtures("mosquitto_clients")
async def test_kill_9_keeps_v5_sessions_and_properties_in_flight(gateway_factory):
    """The real daemon, killed with -9 while a 5.0 session holds queued and in-flight messages
    with properties: after the restart the session is present, every acknowledged message is
    delivered with its properties, the unacknowledged one again with DUP=1 [MQTT-4.4.0-1]."""
    gw = gateway_factory()
    port = gw.port
    topic = "homepot/site-t/plc/v5"
    sub = RawClient5(port)
    await sub.connect5("plc-v5", clean_start=True, props={0x11: 3600})
    assert await sub.subscribe5((f"{topic}/#", 1), props={0x0B: [3]}) == [1]
    await mosquitto_pub(port, f"{topic}/inflight", b"first", 1, False, "-V", "5", "-D", "publish",
                        "user-property", "n", "1")
    first = await sub.next_publish()
    assert first.props[USER] == [("n", "1")]   # written, deliberately not acknowledged
    sub.drop()
    await mosquitto_pub(port, f"{topic}/queued", b"second", 1, False, "-V", "5", "-D", "publish",
                        "user-property", "n", "2", "-D", "publish", "message-expiry-interval", "900",
                        "-D", "publish", "correlation-data", "corr")
    gw.proc.send_signal(signal.SIGKILL)
    assert gw.wait() == -signal.SIGKILL

    gw.start()
    sub = RawClient5(port)
    assert await sub.connect5("plc-v5", clean_start=False, props={0x11: 3600}) == (True, 0)
    again = await sub.next_publish(timeout=10)
    later = await sub.next_publish(timeout=10)
    assert (again.topic, again.dup, again.props[USER], again.props[0x0B]) == (f"{topic}/inflight", True, [("n", "1")], [3])
    assert (later.payload, later.props[USER], later.props[0x09]) == (b"second", [("n", "2")], b"corr")
    assert 0 < later.props[0x02] <= 900
    sub.ack(4, again.packet_id)
    sub.ack(4, later.packet_id)
    sub.disconnect5()
    t0 = time.monotonic()
    assert gw.stop() == 0 and time.monotonic() - t0 < 15
