"""SUBSCRIBE → SUBACK and UNSUBSCRIBE → UNSUBACK, 3.1.1 and 5.0 (§3.8–§3.11).

One return code per filter, in order [MQTT-3.8.4-4/5]. A refused filter is 0x80 in 3.1.1;
5.0 says why: 0x8F (filter invalid), 0x87 (the role may not subscribe). 5.0 subscription
options (No Local, Retain As Published, Retain Handling) and the Subscription Identifier
are kept with the subscription (:mod:`gateway.broker.suboptions`), and on disk with it.
``$share/<group>/<filter>`` is a shared subscription: each message goes to one member of
the group (§4.8.2); retained messages are not sent for it (§4.8.2: "Retained messages are
not sent to the Session when it establishes a new Shared Subscription").
The SUBACK / UNSUBACK is written once the subscription is on disk (persistent sessions).

A SUBSCRIBE or UNSUBSCRIBE takes effect in the reader, before the next packet of the same
connection is looked at: a client that subscribes and at once publishes to a topic the new
filter matches gets that message (with the new Subscription Identifier), and one that
unsubscribes and at once publishes does not [MQTT-3.10.4-2]. Only the acknowledgement (after
the commit) and the retained messages run in a task.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from gateway.broker.matching import valid_topic_filter
from gateway.broker.suboptions import RetainHandling, pack, retain_handling_of
from gateway.broker.wire import properties as P
from gateway.broker.wire.codec import SUBSCRIBE, UNSUBSCRIBE, V5, Body, Malformed, Reason, send_suback, send_unsuback
from gateway.broker.wire.properties import Prop

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState
    from gateway.broker.wire.connection import Connection

log = structlog.get_logger(__name__)

V311_FAILURE = 0x80
SHARE_PREFIX = "$share/"


def split_shared(topic_filter: str) -> tuple[str, str] | None:
    """``$share/<group>/<filter>`` → (group, filter); None when not a shared subscription.
    Raises ValueError for a malformed one (empty group, wildcard in the group, no filter)."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, sep, inner = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not group or not sep or "+" in group or "#" in group or not inner:
        raise ValueError("malformed shared subscription")
    return group, inner


def decode(data: bytes, kind: int, v5: bool) -> tuple[int, P.Properties, list[tuple[str, int]]]:
    """A SUBSCRIBE or UNSUBSCRIBE body: (packet id, properties, [(topic filter, subscription
    options)]); an UNSUBSCRIBE's options are 0. Both packets share this layout (§3.8.2-3, §3.10.2-3)."""
    name = "SUBSCRIBE" if kind == SUBSCRIBE else "UNSUBSCRIBE"
    body = Body(data)
    packet_id = body.u16("packet identifier")
    if not packet_id:
        raise Malformed(f"{name} with packet id 0")   # [MQTT-2.3.1-1]
    props = P.decode(body, kind) if v5 else {}
    entries: list[tuple[str, int]] = []
    while body.remaining:
        topic_filter = body.text("topic filter")
        options = 0
        if kind == SUBSCRIBE:
            options = body.u8("subscription options")
            if options & (0xC0 if v5 else 0xFC):
                raise Malformed("reserved bits of the subscription options set")  # [MQTT-3.8.3-5]
            if v5 and (options >> 4) & 0x03 == 3:
                raise Malformed("retain handling 3", Reason.PROTOCOL_ERROR)
            if v5 and options & 0x03 == 3:
                raise Malformed("subscription QoS 3")
        entries.append((topic_filter, options))
    if not entries:
        # [MQTT-3.8.3-3], [MQTT-3.10.3-2]
        raise Malformed(f"{name} without a topic filter", Reason.PROTOCOL_ERROR)
    return packet_id, props, entries


def on_subscribe(conn: Connection, cs: ClientState, data: bytes) -> asyncio.Task[None]:
    """Apply the subscriptions now (a Malformed is raised to the reader); the task writes the
    SUBACK once they are stored, then the retained messages."""
    gw = conn.gw
    v5 = conn.version == V5
    packet_id, props, requests = decode(data, SUBSCRIBE, v5)
    sub_id = props.get(Prop.SUBSCRIPTION_IDENTIFIER, 0)
    codes: list[int] = []
    granted: list[tuple[str, int, bool]] = []
    store = cs.store
    acl = cs.acl
    for topic_filter, options in requests:
        qos = options & 0x03
        no_local = bool(options & 0x04) if v5 else False
        try:
            shared = split_shared(topic_filter)
        except ValueError:
            codes.append(Reason.TOPIC_FILTER_INVALID if v5 else V311_FAILURE)
            continue
        inner = shared[1] if shared else topic_filter
        if shared and no_local:
            raise Malformed("No Local on a shared subscription", Reason.PROTOCOL_ERROR)  # [MQTT-3.8.3-4]
        if qos == 3 or not valid_topic_filter(inner):
            codes.append(Reason.TOPIC_FILTER_INVALID if v5 else V311_FAILURE)
            continue
        if acl is not None and not acl.may_subscribe(inner):
            gw.metrics.denied_subscribe += 1
            log.info("subscribe denied by ACL", client_id=cs.client_id, username=cs.username, role=cs.role,
                     filter=topic_filter)
            codes.append(Reason.NOT_AUTHORIZED if v5 else V311_FAILURE)
            continue
        packed = pack(qos, no_local=no_local, retain_as_published=bool(options & 0x08) if v5 else False,
                      retain_handling=RetainHandling((options >> 4) & 0x03) if v5 else RetainHandling.SEND,
                      sub_id=sub_id)
        existed = topic_filter in cs.subscriptions
        gw.subscribe(cs, topic_filter, packed)   # an identical filter replaces the old one [MQTT-3.8.4-3]
        if store is not None:
            store.subscribe(cs.client_id, topic_filter, packed)
        codes.append(qos)
        granted.append((topic_filter, packed, existed))
    return asyncio.get_running_loop().create_task(
        _acknowledge_subscribe(conn, cs, packet_id, codes, granted, store is not None and bool(granted)))


async def _acknowledge_subscribe(conn: Connection, cs: ClientState, packet_id: int, codes: list[int],
                                 granted: list[tuple[str, int, bool]], stored: bool) -> None:
    gw = conn.gw
    if not await gw.durable(conn, stored):
        return
    conn.write(send_suback(conn.version, packet_id, codes))
    for topic_filter, packed, existed in granted:
        if topic_filter.startswith(SHARE_PREFIX):
            continue
        handling = retain_handling_of(packed)
        if handling is RetainHandling.NEVER or (handling is RetainHandling.SEND_IF_NEW and existed):
            continue   # [MQTT-3.3.1-10], [MQTT-3.3.1-11]
        gw.send_retained(cs, topic_filter, packed)


def on_unsubscribe(conn: Connection, cs: ClientState, data: bytes) -> asyncio.Task[None]:
    """Remove the subscriptions now (a Malformed is raised to the reader); the task writes the
    UNSUBACK once the removal is stored."""
    gw = conn.gw
    packet_id, _, entries = decode(data, UNSUBSCRIBE, conn.version == V5)
    store = cs.store
    codes: list[int] = []
    for topic_filter, _ in entries:
        if gw.unsubscribe(cs, topic_filter):
            if store is not None:
                store.unsubscribe(cs.client_id, topic_filter)
            codes.append(Reason.SUCCESS)
        else:
            codes.append(Reason.NO_SUBSCRIPTION_EXISTED)
    return asyncio.get_running_loop().create_task(
        _acknowledge_unsubscribe(conn, packet_id, codes, store is not None))


async def _acknowledge_unsubscribe(conn: Connection, packet_id: int, codes: list[int], stored: bool) -> None:
    if not await conn.gw.durable(conn, stored):
        return
    conn.write(send_unsuback(conn.version, packet_id, codes))
