"""amqtt's per-connection protocol handler with the gateway's publish/ack flows.

amqtt keeps reading and decoding packets (its reader loop); what the packets *do*
is redirected here:

- PUBLISH is routed at once by the broker (ACL, retain, fan-out) and acknowledged
  after whatever it needed on disk is committed; QoS 2 uses "method B" of §4.3.3:
  the packet id is remembered until PUBREL, so a resent PUBLISH is not routed twice;
- PUBACK / PUBREC / PUBCOMP settle the client's in-flight messages (amqtt's 5 s
  timeout that silently forgot unacknowledged messages is gone);
- a read timeout (no packet for 1.5 × keepalive) closes the connection as if the
  network had failed, so the will is published [MQTT-3.1.2-24]. amqtt ignored it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
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


class GatewayProtocolHandler(BrokerProtocolHandler):
    """One client connection; ``gw`` and ``client`` are set once the CONNECT is accepted."""

    gw: GatewayBroker | None = None
    client: ClientState | None = None

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
        abort_transport(self.writer)
        waiter = self._disconnect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----------------------------------------------------------------- keepalive
    def handle_read_timeout(self) -> None:
        client_id = self.session.client_id if self.session else None
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
