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
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import structlog
from amqtt.adapters import ReaderAdapter
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState
    from gateway.broker.embedded import GatewayBroker

log = structlog.get_logger(__name__)


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
