"""amqtt's per-connection protocol handler with the gateway's publish/ack flows.

amqtt keeps reading and decoding packets (its reader loop); what the packets *do*
is redirected here:

- PUBLISH is routed at once by the broker (ACL, retain, fan-out) and acknowledged
  after whatever it needed on disk is committed; QoS 2 uses "method B" of §4.3.3:
  the packet id is remembered until PUBREL, so a resent PUBLISH is not routed twice;
- PUBACK / PUBREC / PUBCOMP settle the client's in-flight messages (amqtt's 5 s
  timeout that silently forgot unacknowledged messages is gone);
- a read timeout (no packet for 1.5 × keepalive) closes the connection as if the
  network had failed, so the will is published [MQTT-3.1.2-24]. amqtt ignored it;
- a packet that stalls half-way (a fixed header, part of a body, then nothing) is
  timed out too: amqtt bounds only the wait for a fixed header, so such a client held
  its connection, session and client id for ever. :class:`StallGuard` bounds every
  read inside a packet by the same 1.5 × keepalive, or by ``packet_timeout_s`` when the
  client asked for no keepalive (0): MQTT lets such a client stay idle between packets
  as long as it likes, but not stop in the middle of one.

The reader loop itself is the gateway's (:meth:`GatewayProtocolHandler._reader_loop`):
amqtt's spent about half of the broker's CPU on a QoS 1 stream (profiled): an ``asyncio.wait_for`` (a task and a timer) per packet for
the keepalive, a decode of every field through awaited one-field reads, and a task per
packet. Ours reads each packet in three reads (type, length, body), decodes PUBLISH and
the acknowledgements from the body in memory, routes a PUBLISH at once (in arrival order,
as before) and needs a task only for an acknowledgement that must wait for a commit. The
keepalive is one lazy timer per connection. Every other packet type is decoded by amqtt
from the same bytes and handled by amqtt as before.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from amqtt.adapters import BufferReader, ReaderAdapter, StreamWriterAdapter
from amqtt.errors import MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsuback import UnsubackPacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket

from gateway.broker.codec import encode_ack

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState
    from gateway.broker.embedded import GatewayBroker

log = structlog.get_logger(__name__)

# MQTT 3.1.1 control packet types (§2.2.1).
_CONNECT, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 1, 3, 4, 5, 6, 7

# The packets amqtt decodes and handles (method name, packet class), as its reader did.
_AMQTT_HANDLED: dict[int, tuple[str, type[Any]]] = {
    2: ("handle_connack", ConnackPacket),
    8: ("handle_subscribe", SubscribePacket),
    9: ("handle_suback", SubackPacket),
    10: ("handle_unsubscribe", UnsubscribePacket),
    11: ("handle_unsuback", UnsubackPacket),
    12: ("handle_pingreq", PingReqPacket),
    13: ("handle_pingresp", PingRespPacket),
    14: ("handle_disconnect", DisconnectPacket),
}


class _Malformed(Exception):
    """The bytes on the connection are not MQTT 3.1.1: the connection is closed [MQTT-4.8.0-1]."""


def abort_transport(writer: Any) -> None:
    """Drop a connection now, without flushing (a dead peer would never drain it)."""
    if writer is None:
        return
    stream = getattr(writer, "_writer", None)  # amqtt StreamWriterAdapter
    if stream is not None:
        writer.is_closed = True
        stream.transport.abort()
        return
    protocol = getattr(writer, "_protocol", None)  # amqtt WebSocketsWriter
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.abort()


class StallGuard(ReaderAdapter):
    """The connection's reader, with a time limit on every packet once it has begun.

    It follows the MQTT framing (§2.2: one type byte, 1–4 "remaining length" bytes,
    then that many bytes) from the sizes amqtt reads, so it knows whether the client is
    between packets (idle: amqtt's keepalive applies, or nothing with keepalive 0) or in
    the middle of one. A packet not complete ``timeout`` seconds after its first byte
    calls ``on_stall`` (the handler closes the connection like a keepalive timeout).

    One lazy timer per connection, not one per packet: it wakes at most once per
    ``timeout`` and re-arms for the packet in progress, so the hot path only sets a
    timestamp (``asyncio.wait_for`` per read cost a task per packet).
    """

    def __init__(self, inner: ReaderAdapter, timeout: float, on_stall: Any = None):
        self._inner = inner
        self.timeout = timeout
        self.on_stall = on_stall
        self._state = 0          # 0 between packets, 1 reading the remaining length, 2 in the body
        self._length = 0
        self._multiplier = 1
        self._since: float | None = None   # loop time the packet in progress began
        self._timer: asyncio.TimerHandle | None = None
        self.stalled = False

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        self._track(data)
        return data

    def _begin(self) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        if self._timer is None and self.on_stall is not None:
            self._timer = loop.call_at(self._since + self.timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None:
            return  # between packets: the next packet arms it again
        loop = asyncio.get_running_loop()
        if loop.time() - since >= self.timeout:
            self.stalled = True
            if self.on_stall is not None:
                self.on_stall()
            return
        self._timer = loop.call_at(since + self.timeout, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _track(self, data: bytes) -> None:
        for index, byte in enumerate(data):
            if self._state == 0:
                self._state, self._length, self._multiplier = 1, 0, 1
                self._begin()
            elif self._state == 1:
                self._length += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                if not byte & 0x80:
                    if self._length == 0:
                        self._state, self._since = 0, None
                    else:
                        self._state = 2
                        self._body(len(data) - index - 1)
                        return
            else:
                self._body(len(data) - index)
                return

    def _body(self, n: int) -> None:
        self._length -= n
        if self._length <= 0:
            self._state, self._since = 0, None

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class GatewayProtocolHandler(BrokerProtocolHandler):
    """One client connection; ``gw`` and ``client`` are set once the CONNECT is accepted."""

    gw: GatewayBroker | None = None
    client: ClientState | None = None
    no_will = False          # closed by the broker for its own trouble: the client did nothing wrong
    _acks: list[bytes]       # acknowledgements waiting for _flush_acks (set by _reader_loop)
    _ack_barrier: asyncio.Future[None] | None = None   # the commit _barrier_acks wait for
    _barrier_acks: list[bytes]

    async def send_bytes(self, data: bytes) -> None:
        """Write already-encoded packets; the lock keeps amqtt's websocket writer consistent."""
        writer = self.writer
        if writer is None or not data:
            return
        try:
            async with self._write_lock:
                writer.write(data)
                await writer.drain()
        except Exception as exc:  # ConnectionResetError, BrokenPipeError, websockets' ConnectionClosed
            log.debug("write failed; connection closed", client_id=self.session.client_id if self.session else None,
                      error=repr(exc))
            self.abort()

    def abort(self) -> None:
        """Close the connection as a network failure (the will is published)."""
        if isinstance(self.reader, StallGuard):
            self.reader.cancel()
        abort_transport(self.writer)
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close_unstored(self) -> None:
        """The broker could not store what this client's next acknowledgement depends on:
        close without that acknowledgement so the client resends after reconnecting. Its
        will is not published (it did not fail; the broker's disk did)."""
        self.no_will = True
        if self.gw is not None:
            self.gw.metrics.not_acknowledged += 1
        self.abort()

    # ----------------------------------------------------------------- reading
    async def _reader_loop(self) -> None:
        """Read, decode and dispatch packets until the connection ends (module docstring)."""
        gw, client, session = self.gw, self.client, self.session
        if gw is None or client is None or session is None or self._reader_ready is None:
            await super()._reader_loop()  # not a gateway session: amqtt's own loop
            return
        loop = asyncio.get_running_loop()
        keepalive = session.keep_alive if session.keep_alive and session.keep_alive > 0 else None
        running: deque[asyncio.Task[None]] = deque()
        self._idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._acks = []
        reader = self.reader
        try:
            while reader is not None:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                if keepalive is not None:
                    self._idle_since = loop.time()
                    if self._idle_timer is None:
                        self._idle_timer = loop.call_at(self._idle_since + keepalive, self._idle_check, keepalive)
                first = await reader.read(1)
                self._idle_since = None
                if not first:
                    break
                length, multiplier = 0, 1
                for _ in range(4):
                    byte = (await reader.read(1))[0]
                    length += (byte & 0x7F) * multiplier
                    if not byte & 0x80:
                        break
                    multiplier *= 128
                else:
                    raise _Malformed("remaining length over 4 bytes")
                if length > client.limits.max_packet_size:
                    gw.packet_too_large(client, length)  # closed before a byte of the body is read
                    self.abort()
                    break
                body = await reader.read(length) if length else b""
                if len(body) != length:
                    break  # the connection ended inside the packet
                kind, flags = first[0] >> 4, first[0] & 0x0F
                task = self._dispatch(gw, client, kind, flags, body)
                if task is None and kind not in (_PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP):
                    task = await self._dispatch_amqtt(kind, flags, body)
                if task is not None:
                    running.append(task)
                if kind == _PUBLISH and client.rate is not None:
                    pause = client.rate.take(length)
                    if pause > 0:  # over its rate: this connection is not read until it is within it
                        await gw.rate_pause(client, pause)
                if gw.backlogged:
                    # A subscriber's queue is half full: let its sender move messages into
                    # flight before the next one is routed (a burst read in one piece would
                    # otherwise overflow max_queued_messages before the sender ran once).
                    # Otherwise keep reading: the senders then write many packets at once.
                    gw.backlogged = False
                    await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError, NoDataError, IndexError):
            pass  # the connection ended (or was aborted: keepalive, stall, shutdown)
        except _Malformed as exc:
            gw.metrics.protocol_errors += 1
            log.info("malformed packet; closing connection", client_id=client.client_id, reason=str(exc))
            self.abort()
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one client's bytes must never take the broker down
            log.warning("reader failed; closing connection", client_id=client.client_id, error=repr(exc))
            self.abort()
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _acks_committed(self, acks: list[bytes], barrier: asyncio.Future[None]) -> None:
        """The commit the PUBLISHes behind ``acks`` waited for is done: acknowledge them all
        in one write, in the order they were received; if it failed, acknowledge none and
        close the connection so that the client resends them (:meth:`close_unstored`).
        Commits finish in order, so the groups' writes keep the PUBLISHes' order."""
        if barrier is self._ack_barrier:
            self._ack_barrier = None
        failed = barrier.cancelled() or barrier.exception() is not None
        if self.client is None:
            return  # the connection ended: the client resends what it has no PUBACK for
        if failed:
            self.close_unstored()
            return
        writer = self.writer
        if writer is not None and not writer.is_closed:
            # A stream writer: whole packets appended to the transport's buffer, like the
            # unawaited acks of _flush_acks (they are a few bytes each, bounded by what the
            # client sent).
            writer.write(b"".join(acks))

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        writer = self.writer
        if acks and writer is not None:
            writer.write(b"".join(acks))

    def _idle_check(self, keepalive: float) -> None:
        """The keepalive: no packet begun for ``keepalive`` s (1.5 × the client's) → timeout."""
        self._idle_timer = None
        since = self._idle_since
        if since is None:
            return  # a packet is being read (StallGuard bounds it); the next wait re-arms this
        loop = asyncio.get_running_loop()
        if loop.time() - since >= keepalive:
            self.handle_read_timeout()
            return
        self._idle_timer = loop.call_at(since + keepalive, self._idle_check, keepalive)

    def _dispatch(self, gw: GatewayBroker, client: ClientState, kind: int, flags: int,
                  body: bytes) -> asyncio.Task[None] | None:
        """PUBLISH and the acknowledgements, decoded here; None for other packet types."""
        if kind == _PUBLISH:
            if len(body) < 2:
                raise _Malformed("PUBLISH without a topic")
            qos = (flags >> 1) & 3
            end = 2 + int.from_bytes(body[:2], "big")
            packet_id = None
            if qos:
                if len(body) < end + 2:
                    raise _Malformed("PUBLISH shorter than its topic and packet id")
                packet_id = int.from_bytes(body[end:end + 2], "big")
                payload = body[end + 2:]
            else:
                if len(body) < end:
                    raise _Malformed("PUBLISH shorter than its topic")
                payload = body[end:]
            try:
                topic = body[2:end].decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed("topic name is not UTF-8") from None  # [MQTT-1.5.3-1]
            ack = gw.accept_publish(self, client, topic, packet_id, qos, bytes(payload), bool(flags & 1))
            if ack is None:
                return None
            ack_kind, ack_id, durable = ack
            if durable and isinstance(self.writer, StreamWriterAdapter):
                shared = gw.shared_commit_barrier()
                if shared is not None:
                    # Wait for the commit without a task: the acks of everything routed
                    # before this commit starts go out in one write once it is on disk
                    # (a task, a future and a send() per PUBLISH were most of the broker's
                    # cost of a persistent-session message).
                    if shared is not self._ack_barrier:
                        self._ack_barrier = shared
                        self._barrier_acks = []
                        shared.add_done_callback(functools.partial(self._acks_committed, self._barrier_acks))
                    self._barrier_acks.append(encode_ack(ack_kind, ack_id))
                    return None
            barrier = gw.commit_barrier(durable)
            if barrier is None and not self._write_lock.locked() and isinstance(self.writer, StreamWriterAdapter):
                # Nothing to wait for and nobody writing: answer without a task, in order.
                # The acks of everything this read brought go out in one write once the reader
                # waits for more (one send per ack was the broker's largest cost after the
                # decoding). A websocket writer or a held lock takes the awaited path below.
                self._acks.append(encode_ack(ack_kind, ack_id))
                if len(self._acks) == 1:
                    asyncio.get_running_loop().call_soon(self._flush_acks)
                return None
            return asyncio.get_running_loop().create_task(gw.acknowledge_publish(self, ack_kind, ack_id, barrier))
        if kind in (_PUBACK, _PUBREC, _PUBREL, _PUBCOMP):
            if len(body) != 2:
                raise _Malformed(f"packet type {kind} with remaining length {len(body)}, not 2")
            packet_id = int.from_bytes(body, "big")
            if kind == _PUBACK:
                client.on_puback(packet_id)
                return None
            if kind == _PUBCOMP:
                client.on_pubcomp(packet_id)
                return None
            if kind == _PUBREC:
                return asyncio.get_running_loop().create_task(client.on_pubrec(packet_id, self))
            return asyncio.get_running_loop().create_task(gw.on_pubrel(self, client, packet_id))
        return None

    async def _dispatch_amqtt(self, kind: int, flags: int, body: bytes) -> asyncio.Task[None] | None:
        """Any other packet: amqtt decodes it from the same bytes and handles it as it did."""
        if kind == _CONNECT:
            raise _Malformed("a second CONNECT")  # [MQTT-3.1.0-2]
        handled = _AMQTT_HANDLED.get(kind)
        if handled is None:
            raise _Malformed(f"reserved packet type {kind}")
        name, expected = handled
        header = MQTTFixedHeader(kind, flags, len(body))
        try:
            packet = await packet_class(header).from_stream(BufferReader(body), fixed_header=header)
        except (MQTTError, NoDataError) as exc:
            raise _Malformed(f"packet type {kind} does not decode ({type(exc).__name__})") from None
        if not isinstance(packet, expected):
            raise _Malformed(f"packet type {kind} does not decode")
        return asyncio.get_running_loop().create_task(getattr(self, name)(packet))

    # ----------------------------------------------------------------- keepalive
    def handle_read_timeout(self) -> None:
        client_id = self.session.client_id if self.session else None
        guard = self.reader if isinstance(self.reader, StallGuard) else None
        if guard is not None and guard.stalled:
            log.info("client stalled in the middle of a packet; disconnecting", client_id=client_id,
                     timeout_s=guard.timeout)
            if self.gw is not None:
                self.gw.metrics.packet_timeouts += 1
        else:
            log.info("client silent for 1.5 x keepalive; disconnecting", client_id=client_id)
            if self.gw is not None:
                self.gw.metrics.keepalive_timeouts += 1
        self.abort()

    # ----------------------------------------------------------------- publish flows
    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        gw, client = self.gw, self.client
        if gw is None or client is None:
            return
        await gw.on_publish(self, client, publish_packet)

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        gw, client = self.gw, self.client
        if gw is None or client is None:
            return
        await gw.on_pubrel(self, client, pubrel.packet_id)

    async def handle_puback(self, puback: PubackPacket) -> None:
        client = self.client
        if client is not None and puback.variable_header is not None:
            client.on_puback(puback.variable_header.packet_id)

    async def handle_pubrec(self, pubrec: PubrecPacket) -> None:
        client = self.client
        if client is not None:
            await client.on_pubrec(pubrec.packet_id, self)

    async def handle_pubcomp(self, pubcomp: PubcompPacket) -> None:
        client = self.client
        if client is not None:
            client.on_pubcomp(pubcomp.packet_id)
