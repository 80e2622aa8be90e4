"""MQTT 5.0 on the embedded broker, written from the standard's normative statements
(OASIS MQTT Version 5.0, cited as [MQTT-x.y.z-n]) with a raw 5.0 client that sees every
byte, beside 3.1.1 clients on the same broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.broker.helpers import PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, RawClient, start_broker, until
from tests.broker.v5 import DISCONNECT, RawClient5, ack_reason, decode_props, disconnect_reason, encode_props, varint

P = "homepot/site-t"
USER = 0x26


async def _client(port: int, client_id: str, **kw) -> RawClient5:  # noqa: ANN003
    c = RawClient5(port)
    present, code = await c.connect5(client_id, **kw)
    assert code == 0, hex(code)
    return c


async def test_connack_properties_and_assigned_client_identifier(broker):
    """[MQTT-3.2.2-16]: an empty client id gets one, told in Assigned Client Identifier; the
    CONNACK carries the broker's Receive Maximum and Topic Alias Maximum (§3.2.2.3)."""
    a, b = RawClient5(broker.port), RawClient5(broker.port)
    assert await a.connect5("") == (False, 0)
    assert await b.connect5("") == (False, 0)
    ida, idb = a.connack_props[0x12], b.connack_props[0x12]
    assert ida and idb and ida != idb
    assert a.connack_props[0x21] >= 1 and a.connack_props[0x22] >= 1
    # A 5.0 client may not reuse the session of a 3.1.1 client id it does not own... but
    # its own assigned id is a real session: subscribing works.
    assert await a.subscribe5(("x/#", 1)) == [1]
    a.disconnect5()
    b.disconnect5()


async def test_enhanced_authentication_is_refused_with_0x8c(broker):
    """Enhanced authentication is not supported: an Authentication Method gets CONNACK 0x8C
    (Bad authentication method) and the connection is closed [MQTT-3.2.2-7]."""
    c = RawClient5(broker.port)
    assert await c.connect5("scram", props={0x15: "SCRAM-SHA-1"}) == (False, 0x8C)
    assert await c.closed()


async def test_unsupported_protocol_level_is_refused(broker):
    """[MQTT-3.1.2-2]: protocol level 3 (MQTT 3.1) is answered 0x01 and closed."""
    c = RawClient(broker.port)
    await c.open()
    var = b"\x00\x06MQIsdp\x03\x02\x00\x3c"
    c.send(b"\x10" + bytes([len(var) + 4]) + var + b"\x00\x02id")
    pkt = await c.read()
    assert pkt is not None and pkt.body == b"\x00\x01"
    assert await c.closed()


async def test_denied_publish_and_subscribe_get_0x87_and_bad_topic_0x90(tmp_path):
    """A 5.0 client is told what 3.1.1 cannot say: a publish its role may not make gets
    PUBACK/PUBREC 0x87 (§3.4.2.1, §3.5.2.1) and is not routed; a refused filter 0x87 in the
    SUBACK (§3.9.3); an invalid filter 0x8F; a topic name with a wildcard PUBACK 0x90."""
    from tests.support import free_port

    port = free_port()
    b = await start_broker(tmp_path, port=port, broker={"listeners": [
        {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
         "anonymous_role": "monitor"}]})
    try:
        mon = await _client(port, "mon5")
        assert await mon.subscribe5((f"{P}/#", 1), ("elsewhere/#", 1), (f"{P}/a/#/b", 0)) == [1, 0x87, 0x8F]
        pid = mon.publish5(f"{P}/jobs", b"{}", 1)
        ack = await mon.expect(PUBACK)
        assert (ack.packet_id, ack_reason(ack)) == (pid, 0x87)
        pid = mon.publish5(f"{P}/jobs", b"{}", 2)
        rec = await mon.expect(PUBREC)
        assert (rec.packet_id, ack_reason(rec)) == (pid, 0x87)
        # The exchange ended with the refusing PUBREC (§4.3.3: a Reason Code of 0x80 or more ends it).
        pid = mon.publish5(f"{P}/x/+/y", b"{}", 1)
        assert ack_reason(await mon.expect(PUBACK)) == 0x90
        assert await mon.read(timeout=0.3) is None   # nothing routed back to its own subscription
        assert b.metrics()["denied_publish"] == 2
        mon.disconnect5()
    finally:
        await b.stop()


async def test_properties_pass_through_and_message_expiry_is_lowered(broker):
    """[MQTT-3.3.2-4] Payload Format Indicator, [MQTT-3.3.2-15] Response Topic, [MQTT-3.3.2-16]
    Correlation Data, [MQTT-3.3.2-17] User Properties (order kept, [MQTT-3.3.2-18]),
    [MQTT-3.3.2-20] Content Type reach the subscriber unaltered; [MQTT-3.3.2-6] the Message
    Expiry Interval is what is left of it; a 3.1.1 subscriber gets the same message without them."""
    sub5 = await _client(broker.port, "sub5", clean_start=False, props={0x11: 300})
    assert await sub5.subscribe5(("props/#", 1)) == [1]
    sub5.disconnect5()
    sub3 = RawClient(broker.port)
    await sub3.connect("sub3")
    assert await sub3.subscribe(("props/#", 1)) == [1]
    pub = await _client(broker.port, "pub5")
    props = {0x01: 1, 0x02: 30, 0x03: "text/plain", 0x08: "reply/here", 0x09: b"\x00corr\xff",
             USER: [("a", "1"), ("b", "2"), ("a", "3")]}
    pub.publish5("props/x", "grüße".encode(), 1, props=props)
    assert ack_reason(await pub.expect(PUBACK)) == 0
    got3 = await sub3.expect(PUBLISH)
    assert (got3.topic, got3.payload) == ("props/x", "grüße".encode())   # 3.1.1: no property block
    await asyncio.sleep(1.2)   # queued for the offline 5.0 session meanwhile
    sub5 = RawClient5(broker.port)
    assert await sub5.connect5("sub5", clean_start=False, props={0x11: 300}) == (True, 0)
    msg = await sub5.next_publish()
    assert msg.payload == "grüße".encode()
    assert msg.props[0x01] == 1 and msg.props[0x03] == "text/plain" and msg.props[0x08] == "reply/here"
    assert msg.props[0x09] == b"\x00corr\xff" and msg.props[USER] == [("a", "1"), ("b", "2"), ("a", "3")]
    assert 1 <= msg.props[0x02] <= 29
    sub5.ack(4, msg.packet_id)
    sub5.disconnect5()
    sub3.disconnect()
    pub.disconnect5()


async def test_expired_messages_are_dropped_from_queues_and_retained(broker):
    """[MQTT-3.3.2-5]: a message whose Message Expiry Interval passed is not delivered: not
    from an offline session's queue, not as a retained message."""
    sub = await _client(broker.port, "late5", clean_start=False, props={0x11: 300})
    assert await sub.subscribe5(("exp/#", 1)) == [1]
    sub.disconnect5()
    pub = await _client(broker.port, "pubexp")
    pub.publish5("exp/short", b"gone", 1, props={0x02: 1})
    pub.publish5("exp/long", b"kept", 1, props={0x02: 100})
    pub.publish5("exp/retained", b"gone too", 1, retain=True, props={0x02: 1})
    for _ in range(3):
        await pub.expect(PUBACK)
    await asyncio.sleep(2.2)
    sub = RawClient5(broker.port)
    assert await sub.connect5("late5", clean_start=False, props={0x11: 300}) == (True, 0)
    got = await sub.next_publish()
    assert got.payload == b"kept"
    sub.ack(4, got.packet_id)
    assert await sub.read(timeout=0.3) is None
    fresh = await _client(broker.port, "fresh")
    assert await fresh.subscribe5(("exp/#", 1)) == [1]
    assert await fresh.read(timeout=0.3) is None
    assert broker.metrics()["expired"] >= 2
    for c in (sub, fresh, pub):
        c.disconnect5()


async def test_no_local_retain_as_published_and_retain_handling(broker):
    """[MQTT-3.8.3-3] No Local: not sent back to its publisher; [MQTT-3.3.1-12] Retain As
    Published keeps RETAIN on live messages; Retain Handling 0 sends retained messages,
    1 only for a new subscription [MQTT-3.3.1-10], 2 never [MQTT-3.3.1-11]."""
    pub = await _client(broker.port, "rp")
    pub.publish5("rh/t", b"kept", 1, retain=True)
    await pub.expect(PUBACK)
    c = await _client(broker.port, "opts")
    # No Local | QoS 1 on nl/#, RAP on rap/#
    assert await c.subscribe5(("nl/#", 0x04 | 1), ("rap/#", 0x08 | 1), ("plain/#", 1)) == [1, 1, 1]
    c.publish5("nl/x", b"mine", 1)
    await c.expect(PUBACK)
    c.publish5("plain/x", b"echo", 0)
    assert (await c.next_publish()).payload == b"echo"   # without No Local it comes back
    pub.publish5("rap/x", b"r", 0, retain=True)
    got = await c.next_publish()
    assert (got.topic, got.retain) == ("rap/x", True)
    pub.publish5("plain/y", b"r", 0, retain=True)
    got = await c.next_publish()
    assert (got.topic, got.retain) == ("plain/y", False)   # [MQTT-3.3.1-13]
    assert await c.read(timeout=0.3) is None   # nl/x never came back
    # Retain Handling
    assert await c.subscribe5(("rh/#", 0x20 | 1)) == [1]   # 2: never
    assert await c.read(timeout=0.3) is None
    assert await c.subscribe5(("rh/t", 0x10 | 1)) == [1]   # 1: new subscription → sent
    assert (await c.next_publish()).retain
    assert await c.subscribe5(("rh/t", 0x10 | 1)) == [1]   # 1: existed → not sent
    assert await c.read(timeout=0.3) is None
    assert await c.subscribe5(("rh/t", 0x00 | 1)) == [1]   # 0: every time
    assert (await c.next_publish()).payload == b"kept"
    c.disconnect5()
    pub.disconnect5()


async def test_subscription_identifiers_and_unsuback_reason_codes(broker):
    """[MQTT-3.3.4-3]: a message is sent with the Subscription Identifier of the subscription
    it matched; UNSUBACK 0x00 for a removed subscription, 0x11 when there was none (§3.11.3)."""
    c = await _client(broker.port, "ids")
    assert await c.subscribe5(("id/a/#", 1), props={0x0B: [42]}) == [1]
    assert await c.subscribe5(("id/b", 0)) == [0]
    pub = RawClient(broker.port)
    await pub.connect("pub3")
    pub.publish("id/a/1", b"x", 1)
    got = await c.next_publish()
    assert got.props.get(0x0B) == [42]
    pub.publish("id/b", b"y", 0)
    assert 0x0B not in (await c.next_publish()).props
    assert await c.unsubscribe5("id/a/#", "never/subscribed") == [0x00, 0x11]
    c.disconnect5()
    pub.disconnect()


async def test_overlapping_subscriptions_send_one_copy_with_every_identifier(tmp_path):
    """[MQTT-3.3.4-3/4]: a client whose subscriptions overlap gets one copy, at the highest
    granted QoS [MQTT-3.3.4-2], carrying the Subscription Identifier of every matching
    subscription that has one (order not significant); a matching subscription without one adds
    none. The identifiers of a message queued for an offline session survive a restart."""
    broker = await start_broker(tmp_path)
    port = broker.port
    c = await _client(port, "overlap", clean_start=False, props={0x11: 3600})
    assert await c.subscribe5(("ov/#", 0), props={0x0B: [1]}) == [0]
    assert await c.subscribe5(("ov/+/x", 1), props={0x0B: [2]}) == [1]
    assert await c.subscribe5(("ov/a/x", 0)) == [0]
    pub = await _client(port, "ovpub")
    pub.publish5("ov/a/x", b"one", 1, packet_id=1)
    got = await c.next_publish()
    assert got.qos == 1 and got.payload == b"one"
    assert sorted(got.props[0x0B]) == [1, 2]
    c.send(bytes([PUBACK << 4, 2]) + got.packet_id.to_bytes(2, "big"))
    assert await c.read(timeout=0.3) is None   # one copy, not one per filter
    pub.publish5("ov/b/y", b"two", 0)          # only ov/# matches: its identifier alone
    assert (await c.next_publish()).props[0x0B] == [1]
    c.disconnect5()
    await until(lambda: broker.broker._clients["overlap"].handler is None)  # noqa: SLF001 - offline before the publish
    pub.publish5("ov/q/x", b"queued", 1, packet_id=2)
    assert ack_reason(await pub.read()) == 0
    pub.disconnect5()
    await broker.stop()
    broker = await start_broker(tmp_path, port)
    try:
        c = RawClient5(port)
        assert await c.connect5("overlap", clean_start=False, props={0x11: 3600}) == (True, 0)
        got = await c.next_publish()
        assert got.payload == b"queued" and sorted(got.props[0x0B]) == [1, 2]
        c.disconnect5()
    finally:
        await broker.stop()


def _subscribe_packet(packet_id: int, topic_filter: str, options: int, sub_id: int) -> bytes:
    body = (packet_id.to_bytes(2, "big") + encode_props({0x0B: [sub_id]}) + len(topic_filter).to_bytes(2, "big")
            + topic_filter.encode() + bytes([options]))
    return bytes([0x82]) + varint(len(body)) + body


def _publish_packet(topic: str, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    body = (len(topic).to_bytes(2, "big") + topic.encode() + (packet_id.to_bytes(2, "big") if qos else b"")
            + encode_props(None) + payload)
    return bytes([0x30 | qos << 1]) + varint(len(body)) + body


def _unsubscribe_packet(packet_id: int, topic_filter: str) -> bytes:
    body = packet_id.to_bytes(2, "big") + encode_props(None) + len(topic_filter).to_bytes(2, "big") + topic_filter.encode()
    return bytes([0xA2]) + varint(len(body)) + body


@pytest.mark.parametrize("session_expiry", [0, 3600])
async def test_subscribe_and_unsubscribe_take_effect_before_the_next_packet(broker, session_expiry):
    """A client's packets take effect in the order it sent them: a SUBSCRIBE followed, in the
    same TCP segment, by a PUBLISH the new filter matches routes that PUBLISH with the new
    subscription too (one copy carrying both Subscription Identifiers [MQTT-3.3.4-4]); an
    UNSUBSCRIBE followed by a PUBLISH to that filter delivers nothing [MQTT-3.10.4-2] ("MUST
    stop adding any new messages ... for delivery to the Client"). The SUBACK, which waits for
    the commit of a persistent session, must not hold the subscription back. (The Eclipse Paho
    interoperability suite's subscription identifier test sends exactly this.)"""
    c = await _client(broker.port, f"order-{session_expiry}", props={0x11: session_expiry})
    assert await c.subscribe5(("ord/a", 1), props={0x0B: [1]}) == [1]
    c.send(_subscribe_packet(c.next_pid(), "ord/#", 1, 2) + _publish_packet("ord/a", b"both", 1, packet_id=500))
    got = await c.next_publish()
    assert got.payload == b"both" and sorted(got.props[0x0B]) == [1, 2]
    c.send(bytes([PUBACK << 4, 2]) + got.packet_id.to_bytes(2, "big"))
    await c.expect(SUBACK)
    assert (await c.expect(PUBACK)).packet_id == 500

    assert await c.subscribe5(("gone/x", 0), ("gone/y", 0)) == [0, 0]
    c.send(_unsubscribe_packet(c.next_pid(), "gone/x") + _publish_packet("gone/x", b"after unsubscribe", 0)
           + _publish_packet("gone/y", b"barrier", 0))
    got = await c.next_publish()
    assert got.payload == b"barrier", got   # the message to gone/x would have come first
    c.disconnect5()


async def test_disconnect_reason_reaches_a_client_that_keeps_sending(broker):
    """[MQTT-3.3.4-7]: a client over the Receive Maximum is sent DISCONNECT 0x93, and it must be
    able to read it although it is still answering the PUBRECs before it with PUBRELs, as every
    client does. Closed outright, the broker's socket answered those PUBRELs with a TCP reset,
    which made the client's kernel drop the PUBRECs and the DISCONNECT it had not read yet: the
    client saw "connection reset", never the reason (the Eclipse Paho interoperability suite's
    test_flow_control2). The broker half-closes and reads what still comes until the client
    closes too."""
    c = RawClient5(broker.port)
    await c.connect5("pipelining")
    maximum = c.connack_props[0x21]
    for _ in range(maximum + 1):
        c.publish5("flood/x", b"x", 2)
    await c.writer.drain()
    reasons = []
    while not reasons:
        pkt = await c.read(timeout=5)
        assert pkt is not None, "connection ended without the DISCONNECT"
        if pkt.type == PUBREC:
            c.ack(PUBREL, pkt.packet_id)
        elif pkt.type == DISCONNECT:
            reasons.append(disconnect_reason(pkt))
    assert reasons == [0x93]
    assert await c.closed()


async def test_session_expiry_and_clean_start(broker):
    """[MQTT-3.1.2-23]: Session Expiry Interval 0 ends the session with the connection; a
    session with an interval is resumed within it (session present [MQTT-3.2.2-3]) and gone
    after it; Clean Start=1 discards it [MQTT-3.1.2-4]."""
    c = await _client(broker.port, "exp0")
    await c.subscribe5(("s/#", 1))
    c.disconnect5()
    c = RawClient5(broker.port)
    assert await c.connect5("exp0", clean_start=False) == (False, 0)
    c.disconnect5()
    c = await _client(broker.port, "exp1", props={0x11: 1})
    c.disconnect5()
    c = RawClient5(broker.port)
    assert await c.connect5("exp1", clean_start=False, props={0x11: 1}) == (True, 0)
    c.disconnect5()
    await until(lambda: broker.metrics()["sessions_expired"] >= 1, timeout=5)
    c = RawClient5(broker.port)
    assert await c.connect5("exp1", clean_start=False, props={0x11: 1}) == (False, 0)
    c.disconnect5(props={0x11: 60})   # changed on DISCONNECT [MQTT-3.14.2-2]: allowed (was 1, not 0)
    c = RawClient5(broker.port)
    assert await c.connect5("exp1", clean_start=True, props={0x11: 60}) == (False, 0)
    c.disconnect5()


async def test_disconnect_may_not_set_an_expiry_after_zero(broker):
    """[MQTT-3.14.2-2]: Session Expiry 0 on CONNECT and non-zero on DISCONNECT is a protocol
    error: the broker answers DISCONNECT 0x82 and the will is published."""
    watcher = await _client(broker.port, "w")
    await watcher.subscribe5(("will/#", 0))
    c = await _client(broker.port, "bad-exp", will=("will/bad", b"gone", 0, False, {}))
    c.send(bytes([0xE0, 7, 0x00, 5, 0x11, 0, 0, 0, 60]))
    pkt = await c.expect(DISCONNECT)
    assert disconnect_reason(pkt) == 0x82
    assert (await watcher.next_publish()).payload == b"gone"
    watcher.disconnect5()


async def test_receive_maximum_both_ways(broker):
    """[MQTT-3.3.4-7]: more unacknowledged QoS 1/2 PUBLISHes than the broker's Receive Maximum
    is answered DISCONNECT 0x93. [MQTT-3.3.4-9]: the broker keeps at most the client's Receive
    Maximum of QoS 1/2 messages unacknowledged towards it."""
    slow = await _client(broker.port, "slow", props={0x21: 3})
    await slow.subscribe5(("rm/#", 1))
    pub = await _client(broker.port, "rm-pub")
    for i in range(10):
        pub.publish5("rm/x", str(i).encode(), 1)
    for _ in range(10):
        await pub.expect(PUBACK)
    first = [await slow.next_publish() for _ in range(3)]
    assert await slow.read(timeout=0.3) is None   # the fourth waits for an acknowledgement
    slow.ack(4, first[0].packet_id)
    assert (await slow.next_publish()).payload == b"3"
    slow.disconnect5()
    pub.disconnect5()

    limit = RawClient5(broker.port)
    await limit.connect5("flood")
    maximum = limit.connack_props[0x21]
    for _ in range(maximum + 1):
        limit.publish5("flood/x", b"x", 2)   # QoS 2, no PUBREL: every one stays unacknowledged
    reasons = []
    while True:
        pkt = await limit.read(timeout=5)
        assert pkt is not None
        if pkt.type == DISCONNECT:
            reasons.append(disconnect_reason(pkt))
            break
    assert reasons == [0x93]
    assert await limit.closed()
    assert broker.metrics()["receive_maximum_exceeded"] == 1


async def test_maximum_packet_size_of_the_client_is_respected(broker):
    """[MQTT-3.1.2-25]: a message larger than the client's Maximum Packet Size is not sent to it
    (and counted); smaller ones are."""
    c = await _client(broker.port, "small-max", props={0x27: 200})
    await c.subscribe5(("mp/#", 1))
    pub = RawClient(broker.port)
    await pub.connect("mp-pub")
    pub.publish("mp/big", b"x" * 500, 1)
    pub.publish("mp/small", b"y" * 10, 1)
    got = await c.next_publish()
    assert got.topic == "mp/small"
    assert broker.metrics()["dropped_too_large"] == 1
    c.disconnect5()
    pub.disconnect()


async def test_topic_alias_from_the_client(broker):
    """[MQTT-3.3.2-12]: a Topic Alias set with a topic name is used for later PUBLISHes with an
    empty topic; an alias above the broker's Topic Alias Maximum is DISCONNECT 0x94."""
    sub = await _client(broker.port, "alias-sub")
    await sub.subscribe5(("alias/#", 0))
    c = await _client(broker.port, "alias-pub")
    c.publish5("alias/one", b"1", 0, props={0x23: 1})
    c.publish5("", b"2", 0, props={0x23: 1})
    assert [(m.topic, m.payload) for m in [await sub.next_publish(), await sub.next_publish()]] == [
        ("alias/one", b"1"), ("alias/one", b"2")]
    c.publish5("", b"3", 0, props={0x23: c.connack_props[0x22] + 1})
    assert disconnect_reason(await c.expect(DISCONNECT)) == 0x94
    assert await c.closed()
    sub.disconnect5()


async def test_will_delay_interval(broker):
    """[MQTT-3.1.3-9]: the will waits for its Will Delay Interval and is not published if the
    client reconnects first; otherwise it is published after the delay."""
    watcher = await _client(broker.port, "ww")
    await watcher.subscribe5(("wd/#", 0))
    a = await _client(broker.port, "wd-a", props={0x11: 60}, will=("wd/a", b"a-gone", 0, False, {0x18: 1}))
    b = await _client(broker.port, "wd-b", props={0x11: 60}, will=("wd/b", b"b-gone", 0, False, {0x18: 1}))
    t0 = time.monotonic()
    a.drop()
    b.drop()
    await asyncio.sleep(0.2)
    back = RawClient5(broker.port)
    assert await back.connect5("wd-b", clean_start=False, props={0x11: 60}) == (True, 0)
    got = await watcher.next_publish(timeout=5)
    assert got.payload == b"a-gone" and time.monotonic() - t0 >= 0.9
    assert await watcher.read(timeout=1.3) is None   # wd-b came back in time
    back.disconnect5()
    watcher.disconnect5()


async def test_takeover_and_shutdown_tell_the_client_why(tmp_path):
    """[MQTT-3.1.4-3]: a session taken over is told DISCONNECT 0x8E; at shutdown the broker
    sends DISCONNECT 0x8B (Server shutting down) before closing."""
    b = await start_broker(tmp_path)
    first = await _client(b.port, "dup")
    second = await _client(b.port, "dup")
    assert disconnect_reason(await first.expect(DISCONNECT)) == 0x8E
    assert await first.closed()
    await b.stop()
    assert disconnect_reason(await second.expect(DISCONNECT)) == 0x8B


async def test_payload_format_indicator_is_checked(broker):
    """§3.3.2.3.2: with Payload Format Indicator 1 the payload must be UTF-8; the broker
    checks it and answers PUBACK 0x99 (Payload format invalid) without routing it."""
    sub = await _client(broker.port, "pfi-sub")
    await sub.subscribe5(("pfi/#", 1))
    c = await _client(broker.port, "pfi")
    c.publish5("pfi/x", b"\xff\xfe", 1, props={0x01: 1})
    assert ack_reason(await c.expect(PUBACK)) == 0x99
    c.publish5("pfi/x", b"\xff\xfe", 1, props={0x01: 0})
    assert ack_reason(await c.expect(PUBACK)) == 0
    assert (await sub.next_publish()).payload == b"\xff\xfe"
    c.disconnect5()
    sub.disconnect5()


async def test_shared_subscription_delivers_each_message_to_one_member(broker):
    """§4.8.2: a message matching ``$share/<group>/<filter>`` goes to one member of the group;
    members of different groups and plain subscribers each get it."""
    m1 = await _client(broker.port, "m1")
    m2 = await _client(broker.port, "m2")
    plain = RawClient(broker.port)
    await plain.connect("plain3")
    assert await m1.subscribe5(("$share/g/sh/#", 1)) == [1]
    assert await m2.subscribe5(("$share/g/sh/#", 1)) == [1]
    assert await plain.subscribe(("$share/other/sh/#", 1)) == [1]   # 3.1.1 clients may share too
    pub = await _client(broker.port, "sh-pub")
    for i in range(10):
        pub.publish5("sh/x", str(i).encode(), 1)
    for _ in range(10):
        await pub.expect(PUBACK)
    got1: list[bytes] = []
    got2: list[bytes] = []

    async def drain(c: RawClient5, out: list[bytes]) -> None:
        while (pkt := await c.read(timeout=0.5)) is not None:
            if pkt.type == PUBLISH:
                out.append(pkt.body[-1:])
                c.ack(4, pkt.packet_id)

    await asyncio.gather(drain(m1, got1), drain(m2, got2))
    assert sorted(got1 + got2) == sorted(str(i).encode() for i in range(10))
    assert got1 and got2
    others = [await plain.expect(PUBLISH) for _ in range(10)]
    assert len(others) == 10
    # $share with No Local is a protocol error [MQTT-3.8.3-4]
    m1.send(b"\x82" + bytes([2 + 1 + 2 + 11 + 1]) + b"\x00\x09\x00" + b"\x00\x0b$share/g/x/" + b"\x05")
    assert disconnect_reason(await m1.expect(DISCONNECT)) == 0x82
    for c in (m2, pub):
        c.disconnect5()
    plain.disconnect()


@pytest.mark.parametrize("case, data, reason", [
    ("duplicate property", b"\x30\x08\x00\x01t\x04\x01\x00\x01\x00", 0x82),
    ("unknown property", b"\x30\x06\x00\x01t\x02\x7f\x00", 0x81),
    ("property not allowed in PUBLISH", b"\x30\x09\x00\x01t\x05\x11\x00\x00\x00\x01", 0x81),
    ("payload format 2", b"\x30\x06\x00\x01t\x02\x01\x02", 0x82),
    ("subscription id from a client", b"\x30\x06\x00\x01t\x02\x0b\x01", 0x82),
    ("truncated property", b"\x30\x07\x00\x01t\x03\x02\x00\x00", 0x81),
    ("second CONNECT", b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00", 0x82),
    ("AUTH without a method", b"\xf0\x00", 0x82),
])
async def test_malformed_v5_packets_are_answered_with_a_reason_and_closed(broker, case, data, reason):
    """[MQTT-4.13.1-1]: a Malformed Packet or Protocol Error closes the connection, after a
    DISCONNECT with the reason code (0x81 malformed, 0x82 protocol error); nothing is routed.
    §2.2.2.2: a property given twice is a Protocol Error, an identifier not valid for the packet
    type makes it Malformed; [MQTT-3.3.4-6] a Subscription Identifier from a client, [MQTT-3.1.0-2]
    a second CONNECT and an AUTH without an agreed method are Protocol Errors."""
    watcher = await _client(broker.port, "watch")
    await watcher.subscribe5(("t", 0))
    c = await _client(broker.port, "bad")
    c.send(data)
    pkt = await c.expect(DISCONNECT)
    assert disconnect_reason(pkt) == reason, case
    assert await c.closed(), case
    assert await watcher.read(timeout=0.2) is None, case
    watcher.disconnect5()


async def test_qos2_flow_with_reason_codes_and_unknown_pubrel(broker):
    """§4.3.3: QoS 2 exchange of a 5.0 client; a PUBREL for an unknown packet id is answered
    PUBCOMP 0x92 (Packet Identifier not found)."""
    sub = await _client(broker.port, "q2s")
    await sub.subscribe5(("q2/#", 2))
    c = await _client(broker.port, "q2p")
    pid = c.publish5("q2/x", b"once", 2)
    assert ack_reason(await c.expect(PUBREC)) == 0
    c.ack(PUBREL, pid)
    assert ack_reason(await c.expect(PUBCOMP)) == 0
    c.ack(PUBREL, 999)
    comp = await c.expect(PUBCOMP)
    assert (comp.packet_id, ack_reason(comp)) == (999, 0x92)
    got = await sub.next_publish()
    assert (got.payload, got.qos) == (b"once", 2)
    c.disconnect5()
    sub.disconnect5()


async def test_role_max_packet_size_is_the_connack_maximum_and_disconnects_0x95(tmp_path):
    """The role's ``max_packet_size`` is told to a 5.0 client as the CONNACK's Maximum Packet
    Size (§3.2.2.3.6); a packet over it is answered DISCONNECT 0x95 (Packet too large) from its
    fixed header (a client must not exceed it [MQTT-3.2.2-15]), and the client's will is published."""
    b = await start_broker(tmp_path, broker={"limits": {"admin": {"max_packet_size": 1000}}})
    try:
        watcher = await _client(b.port, "w95")
        await watcher.subscribe5(("big/#", 0))
        c = await _client(b.port, "big", will=("big/will", b"gone", 0, False, {}))
        assert c.connack_props[0x27] == 1005
        c.send(b"\x30\xff\xff\x03" + b"\x00\x05big/x")   # announces ~64 KiB, sends a few bytes
        assert disconnect_reason(await c.expect(DISCONNECT)) == 0x95
        assert await c.closed()
        assert (await watcher.next_publish()).payload == b"gone"
        assert b.metrics()["limited_packet_size"] == 1
        watcher.disconnect5()
    finally:
        await b.stop()


async def test_a_leaving_shared_member_hands_its_unacknowledged_messages_over(broker):
    """§4.8.2: at-least-once hand-over: messages a member of ``$share/<group>/...`` received and
    did not acknowledge go to another member when its connection ends."""
    lazy = await _client(broker.port, "lazy", props={0x11: 300})
    busy = await _client(broker.port, "busy")
    assert await lazy.subscribe5(("$share/work/task/#", 1)) == [1]
    assert await busy.subscribe5(("$share/work/task/#", 1)) == [1]
    pub = await _client(broker.port, "boss")
    for i in range(6):
        pub.publish5("task/x", str(i).encode(), 1)
    for _ in range(6):
        await pub.expect(PUBACK)
    got_busy: list[bytes] = []
    got_lazy: list[bytes] = []
    while (pkt := await busy.read(timeout=0.5)) is not None:
        if pkt.type == PUBLISH:
            got_busy.append(pkt.body[-1:])
            busy.ack(4, pkt.packet_id)
    while (pkt := await lazy.read(timeout=0.3)) is not None:
        if pkt.type == PUBLISH:
            got_lazy.append(pkt.body[-1:])   # received, never acknowledged
    assert got_lazy and sorted(got_busy + got_lazy) == [str(i).encode() for i in range(6)]
    lazy.drop()
    handed: list[bytes] = []
    while len(handed) < len(got_lazy):
        pkt = await busy.expect(PUBLISH)
        handed.append(pkt.body[-1:])
        busy.ack(4, pkt.packet_id)
    assert sorted(handed) == sorted(got_lazy)
    assert broker.metrics()["shared_handed_over"] == len(got_lazy)
    busy.disconnect5()
    pub.disconnect5()


async def test_retained_over_quota_is_delivered_and_answered_0x97(tmp_path):
    """A retained message over its publisher's quota (``max_retained_per_principal``) reaches
    current subscribers but is not kept; a 5.0 publisher is told PUBACK 0x97 (Quota exceeded)."""
    b = await start_broker(tmp_path, broker={"limits": {"admin": {"max_retained_per_principal": 1}}})
    try:
        sub = await _client(b.port, "q-sub")
        await sub.subscribe5(("quota/#", 1))
        c = await _client(b.port, "q-pub")
        c.publish5("quota/a", b"1", 1, retain=True)
        assert ack_reason(await c.expect(PUBACK)) == 0
        c.publish5("quota/b", b"2", 1, retain=True)
        assert ack_reason(await c.expect(PUBACK)) == 0x97
        assert [m.payload for m in [await sub.next_publish(), await sub.next_publish()]] == [b"1", b"2"]
        late = await _client(b.port, "q-late")
        await late.subscribe5(("quota/#", 1))
        assert (await late.next_publish()).payload == b"1"
        assert await late.read(timeout=0.3) is None   # quota/b was not kept
        for x in (sub, c, late):
            x.disconnect5()
    finally:
        await b.stop()


async def test_topic_aliases_towards_a_client_that_allows_them(broker):
    """§3.3.2.3.4: to a client whose CONNECT allows topic aliases the broker sends the topic once
    with an alias, then the alias with an empty topic name; never more aliases than the client's
    Topic Alias Maximum [MQTT-3.3.2-9], and none to a client that allows none."""
    c = await _client(broker.port, "alias-to", props={0x22: 1})
    plain = await _client(broker.port, "no-alias")
    for x in (c, plain):
        await x.subscribe5(("ta/#", 1))
    pub = RawClient(broker.port)
    await pub.connect("ta-pub")
    for topic, qos in (("ta/one", 0), ("ta/one", 1), ("ta/two", 1), ("ta/one", 2)):
        pub.publish(topic, b"x", qos)
    got = [await c.next_publish() for _ in range(4)]
    assert [(m.topic, m.props.get(0x23)) for m in got] == [("ta/one", 1), ("", 1), ("ta/two", None), ("", 1)]
    seen = [await plain.next_publish() for _ in range(4)]
    assert all(0x23 not in m.props and m.topic for m in seen)
    for m in got + seen:
        if m.qos == 1:
            (c if m in got else plain).ack(4, m.packet_id)
    c.disconnect5()
    plain.disconnect5()
    pub.disconnect()


async def test_server_keep_alive_above_the_roles_maximum(tmp_path):
    """``[broker.limits] max_keepalive``: a 5.0 client asking for more, or for none, is told the
    maximum as Server Keep Alive, which it MUST use [MQTT-3.2.2-21], and the broker holds it to
    that (DISCONNECT 0x8D after 1.5 x); a client within it gets no Server Keep Alive and keeps
    its own [MQTT-3.2.2-22]. A 3.1.1 client cannot be told: CONNACK 0x02, as Mosquitto does."""
    b = await start_broker(tmp_path, broker={"limits": {"admin": {"max_keepalive": 2}}})
    try:
        long = RawClient5(b.port)
        assert await long.connect5("ka-long", keepalive=600) == (False, 0)
        assert long.connack_props[0x13] == 2
        none = RawClient5(b.port)
        assert await none.connect5("ka-none", keepalive=0) == (False, 0)
        assert none.connack_props[0x13] == 2
        short = RawClient5(b.port)
        assert await short.connect5("ka-short", keepalive=1) == (False, 0)
        assert 0x13 not in short.connack_props
        started = time.monotonic()
        pkt = await long.expect(DISCONNECT, timeout=10)   # silent: held to 2 s, not its 600
        assert disconnect_reason(pkt) == 0x8D
        assert time.monotonic() - started < 6
        v3 = RawClient(b.port)
        assert await v3.connect("ka-v3", keepalive=600) == (False, 0x02)
        ok = RawClient(b.port)
        assert await ok.connect("ka-v3-ok", keepalive=2) == (False, 0)
        ok.disconnect()
    finally:
        await b.stop()


async def test_refusals_carry_a_reason_string_unless_problem_information_is_off(tmp_path):
    """A refused CONNECT and a refused PUBLISH tell a 5.0 client why in a Reason String
    (§3.2.2.3.9, §3.4.2.2.2); a client that set Request Problem Information to 0 gets none on the
    PUBACK [MQTT-3.1.2-29]. Request Response Information 1 gets no Response Information: it is
    the server's choice (§3.1.2.11.7), and request/response here is Response Topic + Correlation
    Data, passed through."""
    from tests.support import free_port

    port = free_port()
    b = await start_broker(tmp_path, port=port, broker={"listeners": [
        {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
         "anonymous_role": "monitor"}]})
    try:
        told = await _client(port, "told", props={0x19: 1})
        assert 0x1A not in told.connack_props
        told.publish5(f"{P}/jobs", b"{}", 1, packet_id=1)
        ack = await told.expect(PUBACK)
        assert ack_reason(ack) == 0x87
        assert "not authorized" in decode_props(ack.body, 3)[0][0x1F]
        quiet = await _client(port, "quiet", props={0x17: 0})
        quiet.publish5(f"{P}/jobs", b"{}", 1, packet_id=1)
        ack = await quiet.expect(PUBACK)
        assert ack_reason(ack) == 0x87 and len(ack.body) == 3   # no properties at all
        told.disconnect5()
        quiet.disconnect5()
        c = RawClient5(port)
        assert await c.connect5("auth", props={0x15: "SCRAM-SHA-1"}) == (False, 0x8C)
        assert "not supported" in c.connack_props[0x1F]
        c = RawClient5(port)
        assert await c.connect5("auth2", props={0x15: "SCRAM-SHA-1", 0x17: 0}) == (False, 0x8C)
        assert 0x1F not in c.connack_props
    finally:
        await b.stop()


async def test_a_delayed_will_survives_a_broker_restart(tmp_path):
    """[MQTT-3.1.3-9] across a restart: a will waiting for its Will Delay Interval when the broker
    stops is published when it is due after the start (the delay counted from the client's drop,
    not from the start), and not at all for a client that came back in time."""
    b = await start_broker(tmp_path)
    a = await _client(b.port, "wr-a", props={0x11: 60}, will=("wr/a", b"a-gone", 0, False, {0x18: 3}))
    c = await _client(b.port, "wr-c", props={0x11: 60}, will=("wr/c", b"c-gone", 0, False, {0x18: 3}))
    t0 = time.monotonic()
    a.drop()
    c.drop()
    await until(lambda: b.metrics()["clients_connected"] == 0)
    await b.stop()
    assert time.monotonic() - t0 < 2.5, "the broker must stop before the wills are due"
    b2 = await start_broker(tmp_path)
    try:
        watcher = await _client(b2.port, "wr-w")
        await watcher.subscribe5(("wr/#", 0))
        back = RawClient5(b2.port)
        assert await back.connect5("wr-c", clean_start=False, props={0x11: 60}) == (True, 0)
        got = await watcher.next_publish(timeout=10)
        assert got.payload == b"a-gone" and time.monotonic() - t0 >= 2.9
        assert b2.metrics()["wills_published"] == 1
        assert await watcher.read(timeout=1.5) is None   # wr-c came back in time
        back.disconnect5()
        watcher.disconnect5()
    finally:
        await b2.stop()
    b3 = await start_broker(tmp_path)   # published or cancelled: nothing is left to publish again
    try:
        await asyncio.sleep(0.5)
        assert b3.metrics()["wills_published"] == 0
    finally:
        await b3.stop()


async def test_shared_messages_of_a_member_are_handed_over_after_a_restart(tmp_path):
    """§4.8.2 across a restart: messages a member of ``$share/<group>/...`` received and did not
    acknowledge before the broker stopped go to another member of the group when it connects
    after the start, although their first member never comes back (they stayed with it)."""
    b = await start_broker(tmp_path)
    lazy = await _client(b.port, "lazy-r", props={0x11: 300})
    busy = await _client(b.port, "busy-r", props={0x11: 300})
    assert await lazy.subscribe5(("$share/work/task/#", 1)) == [1]
    assert await busy.subscribe5(("$share/work/task/#", 1)) == [1]
    busy.disconnect5()   # persistent, offline: every message goes to the connected member
    await until(lambda: b.metrics()["clients_connected"] == 1)
    pub = await _client(b.port, "boss-r")
    for i in range(4):
        pub.publish5("task/x", str(i).encode(), 1)
    for _ in range(4):
        await pub.expect(PUBACK)
    got = []
    while len(got) < 4:
        pkt = await lazy.expect(PUBLISH)
        got.append(pkt.body[-1:])    # received, never acknowledged
    pub.disconnect5()
    await b.stop()                   # lazy's connection ends with the broker: nothing handed over
    b2 = await start_broker(tmp_path)
    try:
        back = RawClient5(b2.port)
        assert await back.connect5("busy-r", clean_start=False, props={0x11: 300}) == (True, 0)
        handed = []
        while len(handed) < 4:
            pkt = await back.expect(PUBLISH)
            handed.append(pkt.body[-1:])
            back.ack(4, pkt.packet_id)
        assert sorted(handed) == sorted(got)
        assert b2.metrics()["shared_handed_over"] == 4
        back.disconnect5()
        # The first member comes back: they are no longer its (it would get them twice).
        again = RawClient5(b2.port)
        assert await again.connect5("lazy-r", clean_start=False, props={0x11: 300}) == (True, 0)
        assert await again.read(timeout=1) is None
        again.disconnect5()
    finally:
        await b2.stop()
