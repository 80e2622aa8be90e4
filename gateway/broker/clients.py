"""Per-client session state and outgoing delivery of the embedded broker.

A delivery must survive its connection: a message not acknowledged when a persistent
session's connection ends is resent when it is back, and messages queued while offline
are live messages (RETAIN=0). So a :class:`ClientState` outlives connections
(CleanSession=0, or a 5.0 Session Expiry Interval) and owns:

- ``pending``: messages not yet written, oldest first, at most
  ``max_queued_messages`` (the oldest is dropped, counted and logged, rate-limited);
  the in-flight window below is not part of it (Mosquitto counts the same way), and
  the gateway's own session is never capped (``capped = False``): what a publisher
  saw acknowledged for the gateway must reach the gateway;
- ``inflight``: QoS 1/2 messages written and not yet acknowledged, by packet id,
  kept until PUBACK / PUBCOMP and resent with DUP=1 on reconnect [MQTT-4.4.0-1];
- ``qos2_in``: packet ids of QoS 2 PUBLISHes received and not yet released, so a
  resent PUBLISH is never routed twice [MQTT-4.3.3-2].

One sender task per connected client drains ``pending`` in order, batching writes,
so a slow or dead subscriber never stalls the publisher or other subscribers. Every
message is checked against the client's *current* ACL when it is written, not only
when it was queued: a session restored from disk, or resumed after the account's
role changed, gets nothing its role may not read now.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from gateway import clock
from gateway.broker.acl import ClientAcl
from gateway.broker.limits import UNLIMITED, ClientLimits, ConnectionCount, Limit, LimitRecorder, RateBucket
from gateway.broker.presence import Presence
from gateway.broker.wire.codec import PUBREL_B, V5, send_ack, send_publish, utf8, varint
from gateway.broker.metrics import BrokerMetrics
from gateway.broker.state import RELEASED, SENT, StateNotStored, StateStore
from gateway.broker.suboptions import NO_IDS, SubIds
from gateway.broker.throttle import LogThrottle

if TYPE_CHECKING:
    from gateway.broker.shared import SharedGroup
    from gateway.broker.wire.connection import Connection

log = structlog.get_logger(__name__)

MAX_INFLIGHT = 100      # QoS 1/2 messages written and unacknowledged, per client
# The same for the gateway's own session (its reserved client id). Its client acks a message
# only after the message's batched commit, so the window caps that batch: at 100 a burst of
# registrations or telemetry waited a commit round trip per 100 messages. Device clients keep 100: a small device need not take 1000 at once, and
# the messages are in memory (and, for persistent sessions, on disk) either way.
GATEWAY_MAX_INFLIGHT = 1000
BATCH = 256             # packets per write


# Encoded forms of one message kept on it (see Message.packet): one per distinct
# (version, QoS, RETAIN, DUP, Subscription Identifiers, remaining expiry). A fan-out to subscribers
# that differ in none of these shares one; a message that meets more variants than this
# evicts the oldest, so what it holds stays bounded (a QoS 0 form holds a copy of the payload).
ENCODED_MAX = 4


class Message:
    """One application message as routed; shared by every client it goes to.

    ``props`` are the MQTT 5.0 properties passed through from the publisher (encoded);
    ``expires_at`` the end of its Message Expiry Interval on the monotonic clock (None:
    never). A 3.1.1 receiver gets neither; a 5.0 receiver gets the remaining interval
    [MQTT-3.3.2-6] and its Subscription Identifier [MQTT-3.3.4-3].
    """

    __slots__ = ("_encoded", "body_id", "expires_at", "payload", "props", "refs", "shared", "topic", "topic_b")

    def __init__(self, topic: str, payload: bytes, props: bytes = b"", expires_at: float | None = None):
        self.topic = topic
        self.topic_b = utf8(topic)
        self.payload = payload
        self.props = props
        self.expires_at = expires_at
        self._encoded: dict[tuple[int | bool | SubIds, ...], bytes | tuple[bytes, bytes]] = {}
        self.body_id = 0    # its row in broker_bodies while persistent sessions queue it (StateStore.queue_shared)
        self.refs = 0       # how many persistent sessions' rows name that body
        # Routed to more than one session: persistent ones share one stored body. A message for
        # one session keeps its payload in its own row (one write, as before).
        self.shared = False

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def remaining_expiry(self) -> int:
        """Whole seconds left of its Message Expiry Interval, at least 1 (the receiver's copy
        carries what is left [MQTT-3.3.2-6]); only for a message that has one."""
        assert self.expires_at is not None
        return max(1, math.ceil(self.expires_at - time.monotonic()))

    def v5_props(self, sub_ids: SubIds, remaining: int | None = None) -> bytes:
        """The property block a 5.0 receiver gets: the publisher's, the remaining expiry
        (``remaining``, or computed now) and one Subscription Identifier per matching
        subscription [MQTT-3.3.4-4]."""
        props = self.props
        if self.expires_at is not None:
            if remaining is None:
                remaining = self.remaining_expiry()
            props += b"\x02" + remaining.to_bytes(4, "big")
        for sub_id in sub_ids:
            props += b"\x0b" + varint(sub_id)
        return props

    def aliased(self, qos: int, retain: bool, dup: bool, packet_id: int | None, sub_ids: SubIds, alias: int,
                with_topic: bool) -> bytes:
        """A 5.0 PUBLISH with a Topic Alias: the first one of a connection carries the topic name
        and sets the alias, later ones an empty topic name (§3.3.2.3.4)."""
        props = self.v5_props(sub_ids) + b"\x23" + alias.to_bytes(2, "big")
        return send_publish(self.topic_b if with_topic else b"\x00\x00", self.payload, qos, retain, dup, packet_id,
                            props)

    def packet(self, version: int, qos: int, retain: bool, dup: bool = False, packet_id: int | None = None,
               sub_ids: SubIds = NO_IDS) -> bytes:
        """The PUBLISH for one receiver, encoded once per fan-out and shared.

        A message routed to several sessions (``shared``) keeps what it encoded: receivers of
        one version that get the same first byte (QoS, RETAIN, DUP), the same Subscription
        Identifiers and (5.0) the same whole seconds of remaining expiry get the same bytes but
        the packet id. So a QoS 0 PUBLISH is kept whole and returned as is; a QoS 1/2 one is
        kept as the part before the packet id (fixed header, topic) and the property block
        after it, and only the packet id and payload are joined per receiver (the payload is
        not copied into what is kept: a message waiting in a slow subscriber's queue holds it
        once)."""
        if not self.shared:
            # Routed to one session (or a retained message handed out as subscriptions come):
            # nothing to share, and keeping a form would only cost.
            props = None
            if version == V5:
                props = self.v5_props(sub_ids) if sub_ids or self.expires_at is not None else self.props
            return send_publish(self.topic_b, self.payload, qos, retain, dup, packet_id, props)
        remaining = 0
        key: tuple[int | bool | SubIds, ...]
        if version == V5 and (sub_ids or self.expires_at is not None):
            if self.expires_at is not None:
                remaining = self.remaining_expiry()
            key = (qos, retain, dup, sub_ids, remaining)
        else:
            # 3.1.1 (no properties, whatever the subscription), or 5.0 with the publisher's only.
            key = (qos, retain, dup, version) if qos else (retain, version)
        encoded = self._encoded
        cached: Any = encoded.get(key)   # bytes for QoS 0, (head, property block) for QoS 1/2
        if cached is None:
            first = 0x30 | (0x08 if dup and qos else 0) | (qos << 1) | (1 if retain else 0)
            cached = self._encode(version, first, sub_ids, remaining)
            if len(encoded) >= ENCODED_MAX:
                del encoded[next(iter(encoded))]
            encoded[key] = cached
        if not qos:
            return cached   # type: ignore[no-any-return]
        head, props = cached
        return b"".join((head, packet_id.to_bytes(2, "big"), props, self.payload))  # type: ignore[union-attr]

    def _encode(self, version: int, first: int, sub_ids: SubIds, remaining: int) -> bytes | tuple[bytes, bytes]:
        """What :meth:`packet` keeps: the whole QoS 0 packet, or for QoS 1/2 the bytes before the
        packet id and the property block (5.0; empty for 3.1.1) after it."""
        props = None
        if version == V5:
            # The publisher's properties as they came, unless there is an expiry or an identifier to add.
            props = self.v5_props(sub_ids, remaining) if sub_ids or remaining else self.props
        if not first & 0x06:
            return send_publish(self.topic_b, self.payload, 0, bool(first & 1), props=props)
        block = b"" if props is None else varint(len(props)) + props if props else b"\x00"
        body_len = len(self.topic_b) + 2 + len(block) + len(self.payload)
        return bytes((first,)) + varint(body_len) + self.topic_b, block


class Outgoing:
    """A message on its way to one client, at the QoS it is delivered with."""

    __slots__ = ("group", "msg", "packet_id", "qos", "retain", "seq", "state", "sub_ids")

    def __init__(self, msg: Message, qos: int, retain: bool, seq: int = 0, sub_ids: SubIds = NO_IDS,
                 group: SharedGroup | None = None):
        self.msg = msg
        self.group = group      # the shared subscription it came through (handed over if the member leaves)
        self.qos = qos
        self.retain = retain
        self.seq = seq          # row in broker_messages (persistent sessions, QoS > 0), else 0
        self.sub_ids = sub_ids
        self.packet_id: int | None = None
        self.state = 0

    def packet(self, version: int, dup: bool = False) -> bytes:
        return self.msg.packet(version, self.qos, self.retain, dup, self.packet_id, self.sub_ids)


class ClientState:
    """Everything the broker keeps for one client id, connected or not."""

    def __init__(self, client_id: str, clean: bool, *, store: StateStore | None, metrics: BrokerMetrics,
                 seq: itertools.count[int], max_queued: int, max_inflight: int = MAX_INFLIGHT,
                 capped: bool = True, drop_log: LogThrottle | None = None,
                 limit_log: LimitRecorder | None = None, connections: ConnectionCount | None = None,
                 presence: Presence | None = None):
        self.client_id = client_id
        self.clean = clean
        self._presence = presence
        self._present_as: tuple[str | None, str | None] = (None, None)  # as counted in ``presence``
        self.username: str | None = None
        self.role: str | None = None
        self.owner: str | None = None    # the principal the session belongs to (see GatewayBroker)
        self.acl: ClientAcl | None = None
        self.capped = capped             # False only for the gateway's own session
        self.subscriptions: dict[str, int] = {}
        self.pending: deque[Outgoing] = deque()
        self.inflight: dict[int, Outgoing] = {}
        self.qos2_in: set[int] = set()
        self.handler: Connection | None = None
        self.limits: ClientLimits = UNLIMITED   # [broker.limits] of its role (gateway.broker.limits)
        self.rate: RateBucket | None = None      # per connection, when the role has a publish rate
        self.pending_bytes = 0                   # payload bytes in ``pending``
        self.offline_since = time.monotonic()    # when the last connection ended (session expiry)
        self.account_hash: str | None = None     # the password hash it authenticated with (accounts.py)
        self.dropped = 0
        self.expiry_s: int | None = None   # 5.0 Session Expiry Interval once disconnected (None: never)
        self._expiry: asyncio.TimerHandle | None = None
        self._store = store
        self._metrics = metrics
        self._seq = seq
        self._max_queued = max_queued
        self._max_inflight = max_inflight
        self._drop_log = drop_log or LogThrottle()
        self._limit_log = limit_log
        self._connections = connections
        self._counted: tuple[str | None, bool] | None = None   # its entry in ``connections`` while connected
        self._next_pid = 0
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        # The sender cannot move messages now: its window is full of unacknowledged messages, or
        # the socket does not take more. Yielding to it would not help (see ``backlogged``).
        self._stuck = False
        # The sender waits for acknowledgements (its window is full): a new message cannot move,
        # so it is not woken for one. A subscriber that never acknowledges woke its sender for
        # every message routed to it, only to find the window still full.
        self._full = False

    # ----------------------------------------------------------------- helpers
    @property
    def persistent(self) -> bool:
        return not self.clean and self._store is not None

    @property
    def store(self) -> StateStore | None:
        return self._store if not self.clean else None

    def _alloc_packet_id(self) -> int:
        pid = self._next_pid
        for _ in range(65535):
            pid = pid % 65535 + 1
            if pid not in self.inflight:
                self._next_pid = pid
                return pid
        raise RuntimeError("no free packet identifier")  # cannot happen: inflight ≤ max_inflight

    # ----------------------------------------------------------------- queueing
    def enqueue(self, msg: Message, qos: int, retain: bool, sub_ids: SubIds = NO_IDS,
                group: SharedGroup | None = None) -> bool:
        """Queue ``msg`` for this client; True when a durable write was queued for it."""
        online = self.handler is not None
        if qos == 0 and not online:
            return False  # QoS 0 is not part of an offline session's state [MQTT-3.1.2-5]
        durable = False
        out = Outgoing(msg, qos, retain, 0, sub_ids, group)
        store = self._store
        if qos and not self.clean and store is not None:
            out.seq = next(self._seq)
            # On disk on the gateway's clock (gateway.clock): a restart keeps its meaning.
            expires_at = None if msg.expires_at is None else clock.now() + (msg.expires_at - time.monotonic())
            share = group.subscription if group is not None else None
            if msg.shared:
                store.queue_shared(self.client_id, out.seq, msg, qos, retain, expires_at, sub_ids, share)
            else:
                store.queue_message(self.client_id, out.seq, msg.topic, msg.payload, qos, retain, msg.props,
                                    expires_at, sub_ids, share)
            durable = True
        pending = self.pending
        pending.append(out)
        self.pending_bytes += len(msg.payload)
        if self.capped:
            max_bytes = self.limits.max_queued_bytes
            while len(pending) > self._max_queued or (max_bytes and self.pending_bytes > max_bytes and pending):
                self._drop_oldest(online, by_bytes=len(pending) <= self._max_queued)
        if online and not self._full:
            self._wake.set()
        return durable

    def _done(self, out: Outgoing) -> None:
        """A stored message of this session is finished (acknowledged, dropped, withheld)."""
        store = self._store
        assert store is not None
        store.message_done(self.client_id, out.seq)
        store.release_body(out.msg)

    def release_all(self) -> None:
        """The session is being forgotten: give up its share of every stored message body
        (its rows go with the session's delete)."""
        store = self._store
        if store is None or self.clean:
            return
        for out in (*self.pending, *self.inflight.values()):
            if out.seq:
                store.release_body(out.msg)

    def _drop_oldest(self, online: bool, by_bytes: bool) -> None:
        """The queue is over max_queued_messages (or max_queued_bytes): drop its oldest, count, log."""
        oldest = self.pending.popleft()
        self.pending_bytes -= len(oldest.msg.payload)
        self.dropped += 1
        self._metrics.dropped += 1
        store = self._store
        if oldest.seq and store is not None:
            self._done(oldest)
            if not self.clean:
                store.dropped(self.client_id, self.dropped)
        if by_bytes and self._limit_log is not None:
            self._limit_log.hit(Limit.QUEUED_BYTES, self.client_id, username=self.username, connected=online,
                                max_queued_bytes=self.limits.max_queued_bytes, dropped_topic=oldest.msg.topic,
                                dropped_total=self.dropped)
            return
        suppressed = self._drop_log(self.client_id)
        if suppressed is not None:
            log.warning("client queue full; oldest message dropped (broker.max_queued_messages)",
                        client_id=self.client_id, username=self.username, connected=online,
                        max_queued_messages=self._max_queued, dropped_topic=oldest.msg.topic,
                        dropped_total=self.dropped, suppressed=suppressed)

    @property
    def backlogged(self) -> bool:
        """Connected with a capped queue at least half full and a sender that can move messages
        into flight now: it should run before the next message is routed. A subscriber that
        neither reads nor acknowledges is not backlogged in this sense: publishers yielding to it
        after every message only slowed everyone (its queue drops its oldest instead)."""
        return (self.handler is not None and self.capped and not self._stuck
                and 2 * len(self.pending) >= self._max_queued)

    def restore(self, messages: list[tuple[Outgoing, int | None, int]]) -> None:
        """Messages loaded from SQLite: written ones go back in flight, the rest queue."""
        for out, packet_id, state in messages:
            if packet_id and state in (SENT, RELEASED) and packet_id not in self.inflight:
                out.packet_id, out.state = packet_id, state
                self.inflight[packet_id] = out
            else:
                self.pending.append(out)
                self.pending_bytes += len(out.msg.payload)

    # ----------------------------------------------------------------- session expiry
    def arm_expiry(self, seconds: int, expire: Callable[[ClientState], None]) -> None:
        self.cancel_expiry()
        self._expiry = asyncio.get_running_loop().call_later(seconds, expire, self)

    def cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    # ----------------------------------------------------------------- connection
    def attach(self, handler: Connection) -> None:
        self.handler = handler
        self._stuck = self._full = False
        if self._presence is not None:
            self._presence.attached(self.username, self.role)
            self._present_as = (self.username, self.role)
        limits = self.limits
        if self._connections is not None:
            self._counted = self._connections.add(self.role, limits)
        self.rate = RateBucket(limits.max_publish_rate, limits.max_publish_bytes_rate) if limits.rate_limited else None
        self._wake = asyncio.Event()
        self._sender = asyncio.get_running_loop().create_task(
            self._run_sender(handler), name=f"mqtt-send:{self.client_id}")

    def recount(self) -> None:
        """Its role or limits changed while connected: count it under the new ones."""
        if self._connections is not None and self._counted is not None:
            self._connections.remove(self._counted)
            self._counted = self._connections.add(self.role, self.limits)

    def detach(self) -> None:
        if self._presence is not None and self.handler is not None:
            self._presence.detached(*self._present_as)
        if self._connections is not None and self._counted is not None:
            self._connections.remove(self._counted)
            self._counted = None
        self.handler = None
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        self.offline_since = time.monotonic()
        if self.persistent:
            self._store.session_seen(self.client_id, clock.now())  # type: ignore[union-attr]
        if any(out.qos == 0 for out in self.pending):
            self.pending = deque(out for out in self.pending if out.qos)
            self.pending_bytes = sum(len(out.msg.payload) for out in self.pending)

    def _forget(self, out: Outgoing) -> None:
        if out.seq and self._store is not None:
            self._done(out)

    def _readable(self, out: Outgoing) -> bool:
        """May this client's role read ``out`` now, and has it not expired? If not, it is
        dropped and counted (an expired message is never sent [MQTT-3.3.2-5])."""
        if out.msg.expires_at is not None and out.msg.expired(time.monotonic()):
            self._metrics.expired += 1
            self._forget(out)
            return False
        acl = self.acl
        if acl is None or acl.allow_all or acl.may_receive(out.msg.topic):
            return True
        self._metrics.dropped_acl += 1
        self._forget(out)
        suppressed = self._drop_log((self.client_id, "acl"))
        if suppressed is not None:
            log.info("queued message withheld: the client's role may not read its topic (any more)",
                     client_id=self.client_id, username=self.username, role=self.role, topic=out.msg.topic,
                     suppressed=suppressed)
        return False

    async def _run_sender(self, handler: Connection) -> None:
        metrics = self._metrics
        version = handler.version
        # The client's Receive Maximum bounds what is in flight to it [MQTT-3.3.4-9].
        window = min(self._max_inflight, handler.send_quota)
        max_packet = handler.max_packet_out
        # Topic aliases towards a 5.0 client that allows them: one per topic, first come, for the
        # connection's life (the client's Topic Alias Maximum bounds how many).
        alias_max = handler.topic_alias_max_out
        aliases = handler.aliases_out

        def encode(out: Outgoing, dup: bool = False) -> tuple[bytes, str | None]:
            """The packet for ``out``, and the topic whose alias it set (None: none set)."""
            if not alias_max:
                return out.packet(version, dup), None
            topic = out.msg.topic
            alias = aliases.get(topic)
            if alias is not None:
                return out.msg.aliased(out.qos, out.retain, dup, out.packet_id, out.sub_ids, alias, False), None
            if len(aliases) < alias_max:
                alias = aliases[topic] = len(aliases) + 1
                return out.msg.aliased(out.qos, out.retain, dup, out.packet_id, out.sub_ids, alias, True), topic
            return out.packet(version, dup), None

        try:
            if self.inflight:
                # [MQTT-4.4.0-1]: unacknowledged PUBLISH again with DUP=1, PUBREL again
                # (a PUBREL carries no message: it needs no ACL check).
                parts = []
                for pid, out in list(self.inflight.items()):
                    if out.state == RELEASED:
                        parts.append(send_ack(PUBREL_B, pid))
                    elif self._readable(out):
                        parts.append(encode(out, dup=True)[0])
                        metrics.messages_out += 1
                    else:
                        del self.inflight[pid]
                await handler.send_bytes(b"".join(parts))
            wake = self._wake
            while True:
                pending = self.pending
                if not pending or (pending[0].qos and len(self.inflight) >= window):
                    self._stuck = self._full = bool(pending)
                    wake.clear()
                    await wake.wait()
                    self._stuck = self._full = False
                    continue
                parts = []
                barrier = False
                nbytes = 0
                store = self._store
                while pending and len(parts) < BATCH:
                    out = pending[0]
                    if not self._readable(out):
                        pending.popleft()
                        self.pending_bytes -= len(out.msg.payload)
                        continue
                    if out.qos:
                        if len(self.inflight) >= window:
                            break
                        pid = self._alloc_packet_id()
                        out.packet_id = pid
                        data, new_alias = encode(out)
                        if max_packet is not None and len(data) > max_packet:
                            if new_alias is not None:
                                del aliases[new_alias]   # not sent: the alias was not set
                            self._too_large(pending.popleft())
                            continue
                        out.state = SENT
                        self.inflight[pid] = out
                        if out.seq and store is not None:
                            store.message_state(self.client_id, out.seq, pid, SENT)
                            # A QoS 2 packet id must be on disk before the client sees it,
                            # or a restarted broker could send the message under a new id.
                            barrier = barrier or out.qos == 2
                    else:
                        data, new_alias = encode(out)
                        if max_packet is not None and len(data) > max_packet:
                            if new_alias is not None:
                                del aliases[new_alias]
                            self._too_large(pending.popleft())
                            continue
                    pending.popleft()
                    self.pending_bytes -= len(out.msg.payload)
                    parts.append(data)
                    nbytes += len(out.msg.payload)
                if barrier and store is not None:
                    await store.barrier()
                if not parts:
                    continue
                self._stuck = True
                await handler.send_bytes(b"".join(parts))
                self._stuck = False
                metrics.messages_out += len(parts)
                metrics.bytes_out += nbytes
        except asyncio.CancelledError:
            raise
        except StateNotStored:
            # A QoS 2 packet id could not be stored: sending it could deliver twice after
            # a restart. Close; the message is resent when the client is back.
            handler.close_unstored()
        except Exception as exc:  # a broken connection must not take the broker down
            log.warning("delivery to client failed; closing its connection", client_id=self.client_id,
                        error=repr(exc))
            handler.abort()

    def _too_large(self, out: Outgoing) -> None:
        """Larger than the client's Maximum Packet Size: not sent, as if delivered [MQTT-3.1.2-25]."""
        out.packet_id = None
        self.pending_bytes -= len(out.msg.payload)
        self._metrics.dropped_too_large += 1
        self._forget(out)
        suppressed = self._drop_log((self.client_id, "size"))
        if suppressed is not None:
            log.info("message not sent: larger than the client's Maximum Packet Size", client_id=self.client_id,
                     topic=out.msg.topic, suppressed=suppressed)

    # ----------------------------------------------------------------- acknowledgements
    def on_puback(self, packet_id: int) -> None:
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 1:
            return  # unknown id: nothing to do (a late PUBACK after a resend)
        del self.inflight[packet_id]
        if out.seq and self._store is not None:
            self._done(out)
        if self.pending:
            self._wake.set()

    async def on_pubrec(self, packet_id: int, handler: Connection) -> None:
        out = self.inflight.get(packet_id)
        if out is not None and out.qos == 2 and out.state != RELEASED:
            out.state = RELEASED
            if out.seq and self._store is not None:
                self._store.message_state(self.client_id, out.seq, packet_id, RELEASED)
                try:
                    await self._store.barrier()
                except StateNotStored:
                    handler.close_unstored()  # no PUBREL before RELEASED is on disk
                    return
        await handler.send_bytes(send_ack(PUBREL_B, packet_id))

    def take_shared(self, group: SharedGroup | None = None, reader: ClientAcl | None = None) -> list[Outgoing]:
        """The member leaves (its connection ended): remove and return the QoS 1/2 messages it got
        through a shared subscription and has not acknowledged, so the group's other members get
        them (at least once). A QoS 2 message whose PUBREC came is the receiver's: it stays.
        ``group``: only that group's; ``reader``: only messages that ACL may receive."""

        def wanted(out: Outgoing) -> bool:
            return (out.group is not None and (group is None or out.group is group)
                    and (reader is None or reader.allow_all or reader.may_receive(out.msg.topic)))

        taken = [out for out in self.pending if out.qos and wanted(out)]
        if taken:
            self.pending = deque(out for out in self.pending if not (out.qos and wanted(out)))
            self.pending_bytes = sum(len(out.msg.payload) for out in self.pending)
        for packet_id, out in list(self.inflight.items()):
            if out.state != RELEASED and wanted(out):
                del self.inflight[packet_id]
                taken.append(out)
        return taken

    def forget_taken(self, out: Outgoing) -> None:
        """A message from :meth:`take_shared` was queued elsewhere: its stored row goes."""
        self._forget(out)

    def on_pubrec_refused(self, packet_id: int) -> None:
        """A 5.0 PUBREC with a reason code of 0x80 or more: the receiver refused the message and
        the exchange ends there (no PUBREL) [MQTT-4.3.3-4]; it is not sent again."""
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 2 or out.state == RELEASED:
            return
        del self.inflight[packet_id]
        self._forget(out)
        if self.pending:
            self._wake.set()

    def on_pubcomp(self, packet_id: int) -> None:
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 2:
            return
        del self.inflight[packet_id]
        if out.seq and self._store is not None:
            self._done(out)
        if self.pending:
            self._wake.set()
