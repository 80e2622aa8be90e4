"""A PUBLISH fanned out to many subscribers is encoded once per distinct form and shared.

What differs between receivers of one message is the protocol level, the first byte (QoS,
RETAIN, DUP), the packet id, a 5.0 receiver's Subscription Identifiers and the whole seconds of
Message Expiry left. Receivers that agree on all but the packet id share one encoding; the bytes
each one gets must still be exactly what the standard asks of its own copy.
"""

from __future__ import annotations

import itertools
import time

from gateway.broker import clients
from gateway.broker.clients import ENCODED_MAX, Message
from gateway.broker.wire.codec import send_publish, utf8, varint
from tests.broker.helpers import PUBACK, PUBLISH, RawClient
from tests.broker.v5 import RawClient5, ack_reason


def _reference(msg: Message, version: int, qos: int, retain: bool, dup: bool, packet_id: int | None,
               sub_ids: tuple[int, ...], remaining: int | None) -> bytes:
    """The packet built field by field, nothing shared."""
    props = None
    if version == 5:
        props = msg.props
        if remaining is not None:
            props += b"\x02" + remaining.to_bytes(4, "big")
        for sub_id in sub_ids:
            props += b"\x0b" + varint(sub_id)
    return send_publish(utf8(msg.topic), msg.payload, qos, retain, dup, packet_id, props)


def test_every_form_of_a_shared_message_is_the_packet_of_its_own_receiver():
    """Every combination of level, QoS, RETAIN, DUP, packet id, Subscription Identifiers and expiry,
    asked of one message in turn, gets its own exact bytes, and the message keeps at most
    ENCODED_MAX encodings however many forms it met (a QoS 0 one holds a copy of the payload);
    a message routed to one session keeps none."""
    for payload, props, expiry, shared in itertools.product((b"", b"x" * 64, b"y" * 200_000),
                                                            (b"", b"\x03\x00\x0atext/plain"), (None, 60.4),
                                                            (True, False)):
        msg = Message("a/b", payload, props, None if expiry is None else time.monotonic() + expiry)
        msg.shared = shared   # routed to several sessions: forms are kept; to one: encoded each time
        for version, qos, retain, dup, sub_ids, pid in itertools.product(
                (4, 5), (0, 1, 2), (False, True), (False, True), ((), (1,), (3, 200_000)), (1, 65535)):
            packet_id = pid if qos else None
            remaining = None if expiry is None else msg.remaining_expiry()
            got = msg.packet(version, qos, retain, dup, packet_id, sub_ids)
            assert got == _reference(msg, version, qos, retain, dup, packet_id, sub_ids, remaining), \
                (version, qos, retain, dup, sub_ids, pid, props, expiry)
            assert len(msg._encoded) <= (ENCODED_MAX if shared else 0)   # noqa: SLF001


async def test_a_fan_out_builds_each_distinct_property_block_once(broker, monkeypatch):
    """20 MQTT 5.0 subscribers with Subscription Identifier 7, 3 with 9, 3 without and 3 on 3.1.1
    get one QoS 1 message with a Message Expiry Interval: each gets its own packet id, its own
    identifier and what is left of the expiry (5.0), no properties at all (3.1.1), the payload
    intact; the 5.0 property blocks are built once per distinct identifier set, not once per
    subscriber (26 times before)."""
    built = []
    original = Message.v5_props

    def counting(self: Message, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a spy that calls through
        built.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(clients.Message, "v5_props", counting)
    port = broker.port
    subs5: list[tuple[RawClient5, list[int]]] = []
    for i, ids in enumerate([[7]] * 20 + [[9]] * 3 + [[]] * 3):
        c = RawClient5(port)
        assert (await c.connect5(f"s5-{i}"))[1] == 0
        assert await c.subscribe5(("fan/#", 1), props={0x0B: ids} if ids else None) == [1]
        subs5.append((c, ids))
    subs3 = []
    for i in range(3):
        c3 = RawClient(port)
        await c3.connect(f"s3-{i}")
        assert await c3.subscribe(("fan/#", 1)) == [1]
        subs3.append(c3)
    pub = RawClient5(port)
    assert (await pub.connect5("pub"))[1] == 0
    built.clear()
    payload = b"p" * 300
    pub.publish5("fan/x", payload, 1, props={0x02: 60, 0x03: "text/plain"})
    assert ack_reason(await pub.expect(PUBACK)) == 0
    for c, ids in subs5:
        got = await c.next_publish()
        assert (got.topic, got.payload, got.qos) == ("fan/x", payload, 1)
        assert got.props.get(0x0B, []) == ids
        assert got.props[0x03] == "text/plain" and 59 <= got.props[0x02] <= 60
        c.send(bytes([PUBACK << 4, 2]) + got.packet_id.to_bytes(2, "big"))
    for c3 in subs3:
        got3 = await c3.expect(PUBLISH)
        assert (got3.topic, got3.payload, got3.qos) == ("fan/x", payload, 1)   # no property block
        c3.ack(PUBACK, got3.packet_id)
    # Three identifier sets; a second boundary passed during the fan-out may add one of each.
    assert len(built) <= 6, built
    for c, _ in subs5:
        c.disconnect5()
    for c3 in subs3:
        c3.disconnect()
    pub.disconnect5()
