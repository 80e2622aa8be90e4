"""MQTT devices (PLCs, terminals): the §8 envelope on ``P/devices/<id>/notify``.

Published through the gateway's own client at the job's QoS (``options.mqtt.qos``,
else ``[bridges.mqtt] qos``). The broker taking the message (PUBACK/PUBCOMP for QoS
1/2) is "accepted"; a persistent device session then holds it until the device is back.
"""

from __future__ import annotations

import json

import structlog

from bridges.base import Bridge, BridgeConfigError, BridgeContext, Delivery, Outcome
from gateway.config import MqttBridge
from gateway.mqtt_errors import NotConnected
from gateway.secret_files import Problems

log = structlog.get_logger(__name__)

LEFT_ON_PURPOSE_RETRY_S = 1.0  # the client's paced reconnect after a held message starts at 0.5 s


class MqttDeviceBridge(Bridge):
    platform = "mqtt"
    default_max_in_flight = 500

    def __init__(self, section: MqttBridge, ctx: BridgeContext):
        self.default_qos = section.qos
        self.ctx = ctx

    async def start(self) -> None:
        if self.ctx.client is None:
            raise BridgeConfigError("bridges.mqtt: no MQTT client")

    async def send(self, delivery: Delivery) -> Outcome:
        assert self.ctx.client is not None
        qos = delivery.options.get("qos", self.default_qos) if isinstance(delivery.options, dict) else self.default_qos
        payload = json.dumps(delivery.envelope(), separators=(",", ":")).encode()
        try:
            # Over MQTT 5.0 the job's TTL left now is the Message Expiry Interval (the broker
            # drops it from a device's queue when the job would have expired; at least 1 s:
            # 0 would mean "deliver now or never" to us but is not a valid "expire now"), and
            # the delivery's message_id is a User Property a device can read without parsing.
            await self.ctx.client.publish(self.ctx.topics.device_notify(delivery.device_id), payload,
                                          qos=int(qos), retain=False, expiry_s=max(1, delivery.ttl_remaining),
                                          user_properties=[("message_id", delivery.message_id)])
        except NotConnected as exc:
            if self.ctx.client.left_on_purpose:
                # Our own client stepped off the broker to have a message it could not store
                # redelivered: not the device's broker failing. Wait without spending an
                # attempt (a delivery must not fail because the gateway disconnected itself).
                return Outcome.unhealthy("the gateway's client is away while incoming messages cannot be stored",
                                         retry_after=LEFT_ON_PURPOSE_RETRY_S)
            return Outcome.retry(f"broker unreachable: {exc}")
        return Outcome.accepted()


def load_secrets(section: MqttBridge, problems: Problems, key: str = "") -> None:
    """Devices are reached through the gateway's own broker connection: no secret here."""
    return None


def build(section: MqttBridge, ctx: BridgeContext, secrets: None = None, key: str = "") -> Bridge:
    return MqttDeviceBridge(section, ctx)
