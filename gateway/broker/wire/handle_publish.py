"""PUBLISH from a client and the QoS 1/2 acknowledgements in both directions (§3.3–§3.7, §4.3).

A PUBLISH is checked, routed at once (in arrival order, no task) and acknowledged after
whatever it needed on disk is committed: no PUBACK/PUBREC before the message is durable.
QoS 2 uses "method B" of §4.3.3: the packet id is remembered until PUBREL, so a resent
PUBLISH is not routed twice.

MQTT 3.1.1 has no negative acknowledgement: a publish the client's role may not make is
acknowledged and dropped [MQTT-3.3.5-2]. A 5.0 client is told: PUBACK/PUBREC 0x87 (not
authorized), 0x90 (topic name invalid), 0x99 (payload not UTF-8 although the Payload
Format Indicator says so) [MQTT-3.3.2-13]... A 5.0 client's Topic Alias is resolved here
[MQTT-3.3.2-10..12], its Receive Maximum enforced [MQTT-3.3.4-7] (0x93), and the
properties that go to subscribers are kept encoded on the message.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from gateway.broker.matching import valid_topic_name
from gateway.broker.wire import properties as P
from gateway.broker.wire.codec import (
    PUBACK, PUBACK_B, PUBCOMP, PUBCOMP_B, PUBLISH, PUBREC, PUBREC_B, PUBREL, V5, Body, Malformed, Reason, send_ack,
)
from gateway.broker.wire.properties import Prop

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState
    from gateway.broker.wire.connection import Connection

log = structlog.get_logger(__name__)


def on_publish(conn: Connection, cs: ClientState, flags: int, body: bytes) -> asyncio.Task[None] | None:
    """Decode, check and route one PUBLISH; queue or schedule its acknowledgement."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise Malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    if len(body) < 2:
        raise Malformed("PUBLISH without a topic")
    end = 2 + int.from_bytes(body[:2], "big")
    packet_id = None
    if qos:
        if len(body) < end + 2:
            raise Malformed("PUBLISH shorter than its topic and packet id")
        packet_id = int.from_bytes(body[end:end + 2], "big")
        if not packet_id:
            raise Malformed("PUBLISH with packet id 0")  # [MQTT-2.3.1-1]
        start = end + 2
    else:
        if len(body) < end:
            raise Malformed("PUBLISH shorter than its topic")
        start = end
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("topic name is not UTF-8") from None  # [MQTT-1.5.3-1]
    retain = bool(flags & 1)
    gw = conn.gw
    if conn.version != V5:
        payload = body[start:]
        return _accept(conn, cs, topic, packet_id, qos, payload, retain, b"", None)
    if start < len(body) and body[start] == 0:
        props: P.Properties = {}   # the common case: an empty property block
        payload = body[start + 1:]
        forwarded = b""
    else:
        props, forwarded, end_props = P.decode_publish(body, start)
        payload = body[end_props:]
    if qos:
        conn.unacked_in += 1
        if conn.unacked_in > conn.receive_maximum:
            gw.metrics.receive_maximum_exceeded += 1
            raise Malformed("more unacknowledged QoS 1/2 PUBLISHes than the Receive Maximum",
                            Reason.RECEIVE_MAXIMUM_EXCEEDED)  # [MQTT-3.3.4-7]
    reason = 0
    if props:
        if Prop.SUBSCRIPTION_IDENTIFIER in props:
            raise Malformed("PUBLISH from a client with a Subscription Identifier",
                            Reason.PROTOCOL_ERROR)  # [MQTT-3.3.4-6]
        alias = props.get(Prop.TOPIC_ALIAS)
        if alias is not None:
            if alias > conn.topic_alias_maximum:
                raise Malformed(f"topic alias {alias} above the maximum", Reason.TOPIC_ALIAS_INVALID)
            if topic:
                conn.aliases[alias] = topic     # [MQTT-3.3.2-12]
            else:
                known = conn.aliases.get(alias)
                if known is None:
                    raise Malformed(f"unknown topic alias {alias}", Reason.PROTOCOL_ERROR)
                topic = known
        if props.get(Prop.PAYLOAD_FORMAT_INDICATOR) == 1:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                reason = Reason.PAYLOAD_FORMAT_INVALID
    if not topic:
        raise Malformed("PUBLISH without a topic name or alias", Reason.PROTOCOL_ERROR)
    if reason:
        gw.metrics.messages_in += 1
        log.info("PUBLISH refused: payload is not UTF-8 although its Payload Format Indicator says so",
                 client_id=cs.client_id, topic=topic)
        return _answer(conn, qos, packet_id, reason, False)
    if not props:
        return _accept(conn, cs, topic, packet_id, qos, payload, retain, b"", None)
    return _accept(conn, cs, topic, packet_id, qos, payload, retain, forwarded,
                   props.get(Prop.MESSAGE_EXPIRY_INTERVAL))


def _accept(conn: Connection, cs: ClientState, topic: str, packet_id: int | None, qos: int, payload: bytes,
            retain: bool, props: bytes, expiry: int | None) -> asyncio.Task[None] | None:
    """Everything a PUBLISH does before its acknowledgement, without awaiting: checks, QoS 2
    bookkeeping, ACL, routing (and queueing the durable writes it needs)."""
    gw = conn.gw
    metrics = gw.metrics
    metrics.messages_in += 1
    metrics.bytes_in += len(payload)
    v5 = conn.version == V5
    if not valid_topic_name(topic):
        # [MQTT-4.7.3-1], [MQTT-3.3.2-2]: wildcards, NUL, empty.
        if v5 and qos:
            metrics.protocol_errors += 1
            log.info("PUBLISH refused: topic name invalid", client_id=cs.client_id, topic=topic)
            return _answer(conn, qos, packet_id, Reason.TOPIC_NAME_INVALID, False)
        raise Malformed(f"invalid topic name {topic!r}", Reason.TOPIC_NAME_INVALID)
    store = cs.store
    if qos == 2:
        assert packet_id is not None
        if packet_id in cs.qos2_in:
            # Resent: not routed again; its first PUBREC may have been held back by a failed
            # write, so the same barrier applies.
            if v5:
                conn.unacked_in -= 1   # the same exchange, counted once
            return _answer(conn, qos, packet_id, 0, True)
    acl = cs.acl
    reason = 0
    if topic.startswith("$SYS") or (acl is not None and not acl.may_publish(topic)):
        metrics.denied_publish += 1
        gw.log_denied_publish(cs, topic, v5)
        if v5:
            return _answer(conn, qos, packet_id, Reason.NOT_AUTHORIZED, False)   # the exchange ends here
        # Dropped and counted; still acknowledged: 3.1.1 has no negative PUBACK [MQTT-3.3.5-2].
        durable = False
    else:
        if retain and v5 and qos:
            # Over the publisher's retained quota: routed, not kept; a 5.0 client is told (0x97).
            verdict = gw.retained_verdict(cs, topic, payload)
            if verdict is not None:
                reason = int(verdict)
        expires_at = time.monotonic() + expiry if expiry is not None else None
        durable = gw.route(topic, payload, qos, retain, props, expires_at, cs)
        if reason:
            # The exchange ends with this answer (a refusing PUBREC too: no PUBREL follows, so
            # the packet id is not remembered).
            return _answer(conn, qos, packet_id, reason, durable)
    if qos == 2:
        assert packet_id is not None
        cs.qos2_in.add(packet_id)
        if store is not None:
            store.qos2_received(cs.client_id, packet_id)
            durable = True
    if qos == 0:
        return None
    return _answer(conn, qos, packet_id, 0, durable)


def _answer(conn: Connection, qos: int, packet_id: int | None, reason: int,
            durable: bool) -> asyncio.Task[None] | None:
    """The PUBACK/PUBREC: at once (with the others of this read), or after the commit."""
    if qos == 0:
        return None
    assert packet_id is not None
    if (qos == 1 or reason) and conn.version == V5:
        # The exchange ends with this PUBACK (or refusing PUBREC): no longer counted against our
        # Receive Maximum. Counted off when decided rather than when written (after a commit): a
        # client is never disconnected for acknowledgements it has not seen yet.
        conn.unacked_in -= 1
    ack = send_ack(PUBACK_B if qos == 1 else PUBREC_B, packet_id, reason)
    if durable:
        shared = conn.gw.shared_commit_barrier()
        if shared is not None:
            # Wait for the commit without a task: the acks of everything routed before this
            # commit starts go out in one write once it is on disk.
            conn.ack_after_commit(shared, ack)
            return None
    conn.queue_ack(ack)
    return None


def on_ack(conn: Connection, cs: ClientState, kind: int, body: bytes) -> asyncio.Task[None] | None:
    """PUBACK, PUBREC, PUBREL or PUBCOMP from the client."""
    n = len(body)
    if conn.version == V5:
        if n < 2:
            raise Malformed(f"packet type {kind} shorter than a packet id")
        reason = body[2] if n > 2 else 0
        if n > 3:
            cursor = Body(body, 3)
            P.decode(cursor, kind)
            if cursor.remaining:
                raise Malformed(f"bytes after the properties of packet type {kind}")
    else:
        if n != 2:
            raise Malformed(f"packet type {kind} with remaining length {n}, not 2")
        reason = 0
    packet_id = int.from_bytes(body[:2], "big")
    if kind == PUBACK:
        cs.on_puback(packet_id)
        return None
    if kind == PUBCOMP:
        cs.on_pubcomp(packet_id)
        return None
    if kind == PUBREC:
        if reason >= 0x80:
            cs.on_pubrec_refused(packet_id)   # the exchange ends: no PUBREL [MQTT-4.3.3-4]
            return None
        return asyncio.get_running_loop().create_task(cs.on_pubrec(packet_id, conn))
    assert kind == PUBREL
    return asyncio.get_running_loop().create_task(on_pubrel(conn, cs, packet_id))


async def on_pubrel(conn: Connection, cs: ClientState, packet_id: int) -> None:
    needed = False
    known = packet_id in cs.qos2_in
    if known:
        cs.qos2_in.discard(packet_id)
        store = cs.store
        if store is not None:
            store.qos2_released(cs.client_id, packet_id)
            needed = True
    # PUBCOMP only once the release is on disk: otherwise a restart would remember the id as
    # unreleased and swallow the client's next message with the same id.
    if await conn.gw.durable(conn, needed):
        if known and conn.unacked_in > 0:
            conn.unacked_in -= 1
        # Always answered [MQTT-4.3.3-2]; a 5.0 client learns an unknown id (0x92).
        reason = Reason.PACKET_IDENTIFIER_NOT_FOUND if (conn.version == V5 and not known) else 0
        conn.write(send_ack(PUBCOMP_B, packet_id, reason))
