"""Per-client session state and outgoing delivery of the embedded broker.

amqtt delivers each message in its own task that waits at most 5 s for the PUBACK
and then forgets the message, so nothing is left to resend when a persistent
session reconnects, and messages queued while offline are replayed with RETAIN=1.
Here a :class:`ClientState` outlives connections (CleanSession=0) and owns:

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
import time
from collections import deque
from typing import TYPE_CHECKING

import structlog

from gateway import clock
from gateway.broker.acl import ClientAcl
from gateway.broker.codec import PUBREL, encode_ack, encode_publish, encode_topic
from gateway.broker.limits import UNLIMITED, ClientLimits, ConnectionCount, Limit, LimitRecorder, RateBucket
from gateway.broker.metrics import BrokerMetrics
from gateway.broker.state import RELEASED, SENT, StateNotStored, StateStore
from gateway.broker.throttle import LogThrottle

if TYPE_CHECKING:
    from gateway.broker.handler import GatewayProtocolHandler

log = structlog.get_logger(__name__)

MAX_INFLIGHT = 100      # QoS 1/2 messages written and unacknowledged, per client
# The same for the gateway's own session (its reserved client id). Its client acks a message
# only after the message's batched commit, so the window caps that batch: at 100 a burst of
# registrations or telemetry waited a commit round trip per 100 messages. Device clients keep 100: a small device need not take 1000 at once, and
# the messages are in memory (and, for persistent sessions, on disk) either way.
GATEWAY_MAX_INFLIGHT = 1000
BATCH = 256             # packets per write


class Message:
    """One application message as routed; shared by every client it goes to."""

    __slots__ = ("_qos0", "body_id", "payload", "refs", "shared", "topic", "topic_b")

    def __init__(self, topic: str, payload: bytes):
        self.topic = topic
        self.topic_b = encode_topic(topic)
        self.payload = payload
        self._qos0: dict[bool, bytes] = {}
        self.body_id = 0    # its row in broker_bodies while persistent sessions queue it (StateStore.queue_shared)
        self.refs = 0       # how many persistent sessions' rows name that body
        # Routed to more than one session: persistent ones share one stored body. A message for
        # one session keeps its payload in its own row (one write, as before).
        self.shared = False

    def qos0_packet(self, retain: bool) -> bytes:
        """A QoS 0 PUBLISH is the same bytes for every subscriber: encode it once."""
        packet = self._qos0.get(retain)
        if packet is None:
            packet = self._qos0[retain] = encode_publish(self.topic_b, self.payload, 0, retain)
        return packet


class Outgoing:
    """A message on its way to one client, at the QoS it is delivered with."""

    __slots__ = ("msg", "packet_id", "qos", "retain", "seq", "state")

    def __init__(self, msg: Message, qos: int, retain: bool, seq: int = 0):
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.seq = seq          # row in broker_messages (persistent sessions, QoS > 0), else 0
        self.packet_id: int | None = None
        self.state = 0

    def packet(self, dup: bool = False) -> bytes:
        if self.qos == 0:
            return self.msg.qos0_packet(self.retain)
        return encode_publish(self.msg.topic_b, self.msg.payload, self.qos, self.retain, dup, self.packet_id)


class ClientState:
    """Everything the broker keeps for one client id, connected or not."""

    def __init__(self, client_id: str, clean: bool, *, store: StateStore | None, metrics: BrokerMetrics,
                 seq: itertools.count[int], max_queued: int, max_inflight: int = MAX_INFLIGHT,
                 capped: bool = True, drop_log: LogThrottle | None = None,
                 limit_log: LimitRecorder | None = None, connections: ConnectionCount | None = None):
        self.client_id = client_id
        self.clean = clean
        self.username: str | None = None
        self.role: str | None = None
        self.owner: str | None = None    # the principal the session belongs to (see GatewayBroker)
        self.acl: ClientAcl | None = None
        self.capped = capped             # False only for the gateway's own session
        self.subscriptions: dict[str, int] = {}
        self.pending: deque[Outgoing] = deque()
        self.inflight: dict[int, Outgoing] = {}
        self.qos2_in: set[int] = set()
        self.handler: GatewayProtocolHandler | None = None
        self.limits: ClientLimits = UNLIMITED   # [broker.limits] of its role (gateway.broker.limits)
        self.rate: RateBucket | None = None      # per connection, when the role has a publish rate
        self.pending_bytes = 0                   # payload bytes in ``pending``
        self.offline_since = time.monotonic()    # when the last connection ended (session expiry)
        self.account_hash: str | None = None     # the password hash it authenticated with (accounts.py)
        self.dropped = 0
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
    def enqueue(self, msg: Message, qos: int, retain: bool) -> bool:
        """Queue ``msg`` for this client; True when a durable write was queued for it."""
        online = self.handler is not None
        if qos == 0 and not online:
            return False  # QoS 0 is not part of an offline session's state [MQTT-3.1.2-5]
        durable = False
        out = Outgoing(msg, qos, retain)
        store = self._store
        if qos and not self.clean and store is not None:
            out.seq = next(self._seq)
            if msg.shared:
                store.queue_shared(self.client_id, out.seq, msg, qos, retain)
            else:
                store.queue_message(self.client_id, out.seq, msg.topic, msg.payload, qos, retain)
            durable = True
        pending = self.pending
        pending.append(out)
        self.pending_bytes += len(msg.payload)
        if self.capped:
            max_bytes = self.limits.max_queued_bytes
            while len(pending) > self._max_queued or (max_bytes and self.pending_bytes > max_bytes and pending):
                self._drop_oldest(online, by_bytes=len(pending) <= self._max_queued)
        if online:
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
        """Connected with a capped queue at least half full: its sender should run soon."""
        return self.handler is not None and self.capped and 2 * len(self.pending) >= self._max_queued

    def restore(self, messages: list[tuple[Outgoing, int | None, int]]) -> None:
        """Messages loaded from SQLite: written ones go back in flight, the rest queue."""
        for out, packet_id, state in messages:
            if packet_id and state in (SENT, RELEASED) and packet_id not in self.inflight:
                out.packet_id, out.state = packet_id, state
                self.inflight[packet_id] = out
            else:
                self.pending.append(out)
                self.pending_bytes += len(out.msg.payload)

    # ----------------------------------------------------------------- connection
    def attach(self, handler: GatewayProtocolHandler) -> None:
        self.handler = handler
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

    def _readable(self, out: Outgoing) -> bool:
        """May this client's role read ``out`` now? If not, it is dropped and counted."""
        acl = self.acl
        if acl is None or acl.allow_all or acl.may_receive(out.msg.topic):
            return True
        self._metrics.dropped_acl += 1
        if out.seq and self._store is not None:
            self._done(out)
        suppressed = self._drop_log((self.client_id, "acl"))
        if suppressed is not None:
            log.info("queued message withheld: the client's role may not read its topic (any more)",
                     client_id=self.client_id, username=self.username, role=self.role, topic=out.msg.topic,
                     suppressed=suppressed)
        return False

    async def _run_sender(self, handler: GatewayProtocolHandler) -> None:
        metrics = self._metrics
        try:
            if self.inflight:
                # [MQTT-4.4.0-1]: unacknowledged PUBLISH again with DUP=1, PUBREL again
                # (a PUBREL carries no message: it needs no ACL check).
                parts = []
                for pid, out in list(self.inflight.items()):
                    if out.state == RELEASED:
                        parts.append(encode_ack(PUBREL, pid))
                    elif self._readable(out):
                        parts.append(out.packet(dup=True))
                        metrics.messages_out += 1
                    else:
                        del self.inflight[pid]
                await handler.send_bytes(b"".join(parts))
            wake = self._wake
            while True:
                pending = self.pending
                if not pending or (pending[0].qos and len(self.inflight) >= self._max_inflight):
                    wake.clear()
                    await wake.wait()
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
                        if len(self.inflight) >= self._max_inflight:
                            break
                        pid = self._alloc_packet_id()
                        out.packet_id, out.state = pid, SENT
                        self.inflight[pid] = out
                        if out.seq and store is not None:
                            store.message_state(self.client_id, out.seq, pid, SENT)
                            # A QoS 2 packet id must be on disk before the client sees it,
                            # or a restarted broker could send the message under a new id.
                            barrier = barrier or out.qos == 2
                    pending.popleft()
                    self.pending_bytes -= len(out.msg.payload)
                    parts.append(out.packet())
                    nbytes += len(out.msg.payload)
                if barrier and store is not None:
                    await store.barrier()
                if not parts:
                    continue
                await handler.send_bytes(b"".join(parts))
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

    async def on_pubrec(self, packet_id: int, handler: GatewayProtocolHandler) -> None:
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
        await handler.send_bytes(encode_ack(PUBREL, packet_id))

    def on_pubcomp(self, packet_id: int) -> None:
        out = self.inflight.get(packet_id)
        if out is None or out.qos != 2:
            return
        del self.inflight[packet_id]
        if out.seq and self._store is not None:
            self._done(out)
        if self.pending:
            self._wake.set()
