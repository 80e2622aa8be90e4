"""The mqtt bridge's QoS: the job's ``options.mqtt.qos``, else ``[bridges.mqtt] qos``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bridges.base import BridgeContext, Delivery, Notification, OutcomeKind
from bridges.mqtt import build
from devices.models import MqttChannel
from gateway.config import MqttBridge
from gateway.mqtt import NotConnected
from gateway.pipeline.models import parse_job
from gateway.topics import Topics


class RecordingClient:
    left_on_purpose = False  # a broker that is simply unreachable

    def __init__(self, fail: bool = False):
        self.published: list[tuple[str, dict, int, bool]] = []
        self.fail = fail

    async def publish(self, topic, payload, qos=1, retain=False):  # noqa: ANN001
        if self.fail:
            raise NotConnected("down")
        self.published.append((topic, json.loads(payload), qos, retain))


def delivery(options: dict) -> Delivery:
    now = datetime.now(UTC)
    return Delivery("0b7f0c6e-6f0e-4c1e-9b0a-6a1f1c2d3e4f", "j1", "plc-1", MqttChannel(platform="mqtt"),
                    Notification(title="t"), options, now, now + timedelta(hours=1))


def stored_mqtt_options(job: dict) -> dict:
    """What the pipeline stores for the bridge (store.insert_job dumps exclude_none)."""
    return json.loads(parse_job(job).job.options.model_dump_json(exclude_none=True))["mqtt"]


async def test_bridge_default_qos_applies_when_the_job_names_none():
    client = RecordingClient()
    bridge = build(MqttBridge(qos=2), BridgeContext(client, Topics("p/s"), Path(".")))  # type: ignore[arg-type]
    job = {"target": {"all": True}, "notification": {"title": "t"}}
    assert (await bridge.send(delivery(stored_mqtt_options(job)))).kind is OutcomeKind.ACCEPTED
    with_qos = {**job, "options": {"mqtt": {"qos": 0}}}
    await bridge.send(delivery(stored_mqtt_options(with_qos)))
    assert [(t, q, r) for t, _, q, r in client.published] == [("p/s/devices/plc-1/notify", 2, False),
                                                             ("p/s/devices/plc-1/notify", 0, False)]
    envelope = client.published[0][1]
    assert envelope["message_id"] == "0b7f0c6e-6f0e-4c1e-9b0a-6a1f1c2d3e4f" and envelope["job_id"] == "j1"


async def test_broker_unreachable_is_a_retry():
    bridge = build(MqttBridge(), BridgeContext(RecordingClient(fail=True), Topics("p/s"), Path(".")))  # type: ignore[arg-type]
    assert (await bridge.send(delivery({}))).kind is OutcomeKind.RETRY


async def test_a_broker_the_gateway_left_on_purpose_pauses_the_bridge_and_spends_no_attempt(mosquitto):
    """A message the gateway cannot store makes its client leave the broker on purpose (to
    have it redelivered). Deliveries sent meanwhile must not count that as the device's
    broker being unreachable: the bridge is paused (UNHEALTHY: no attempt spent, the
    delivery waits) instead of retried towards max_attempts and failed."""
    import asyncio
    import sqlite3

    from gateway.mqtt import ConnectionSettings, GatewayClient
    from tests.support import MqttProbe

    async def disk_full() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    async def not_stored(message) -> None:  # noqa: ANN001
        await disk_full()

    client = GatewayClient(ConnectionSettings(url=f"mqtt://127.0.0.1:{mosquitto.port}", client_id="gw-hold"),
                           storage_probe=disk_full, hold_initial=0.05, hold_max=0.1)
    client.route("p/s/jobs", not_stored)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        assert await client.wait_connected(10)
        bridge = build(MqttBridge(), BridgeContext(client, Topics("p/s"), Path(".")))
        assert (await bridge.send(delivery({}))).kind is OutcomeKind.ACCEPTED
        probe = await asyncio.to_thread(MqttProbe, mosquitto.port)
        await asyncio.to_thread(probe.publish, "p/s/jobs", b"{}")
        await asyncio.to_thread(probe.close)
        async with asyncio.timeout(10):
            while client.connected or not client.left_on_purpose:
                await asyncio.sleep(0.02)
        outcome = await bridge.send(delivery({}))
        assert outcome.kind is OutcomeKind.UNHEALTHY, outcome
        assert "stored" in outcome.reason
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
