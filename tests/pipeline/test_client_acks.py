"""The gateway's own MQTT client against a real Mosquitto: nothing is acknowledged before
its handler stored it, and PUBACKs stay in arrival order [MQTT-4.6.0-2]."""

from __future__ import annotations

import asyncio
import sqlite3

import paho.mqtt.client as paho

from gateway.mqtt import ConnectionSettings, GatewayClient
from gateway.storage import NotStored


def publish(port: int, topic: str, payloads: list[bytes]) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for p in payloads:
            info = c.publish(topic, p, qos=1)
            info.wait_for_publish(5)
            assert info.is_published()  # the broker has it: from here on it must not be lost
    finally:
        c.disconnect()
        c.loop_stop()


async def run_client(port: int, handler, until, probe=None, timeout: float = 15.0) -> GatewayClient:  # noqa: ANN001
    client = GatewayClient(ConnectionSettings(url=f"mqtt://127.0.0.1:{port}", client_id="gw-under-test"),
                           storage_probe=probe, hold_initial=0.05, hold_max=0.2)
    client.route("t/#", handler)
    stop = asyncio.Event()
    task = asyncio.create_task(client.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not (client.connected and until()):
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return client


async def test_a_message_that_could_not_be_stored_is_redelivered_and_nothing_after_it_was_acked(mosquitto):
    handled: list[bytes] = []
    failures = {"A": 1}

    async def handler(message) -> None:  # noqa: ANN001
        body = bytes(message.payload)
        if body == b"A":
            await asyncio.sleep(0.2)  # B, after it, finishes first
            if failures["A"]:
                failures["A"] -= 1
                raise sqlite3.OperationalError("database or disk is full")
        handled.append(body)

    # The session must exist before the publish, so the broker queues for it.
    await run_client(mosquitto.port, handler, lambda: True)
    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"A", b"B"])
    probes: list[int] = []

    async def probe() -> None:
        probes.append(1)

    client = await run_client(mosquitto.port, handler,
                              lambda: handled.count(b"A") == 1 and handled.count(b"B") == 2,
                              probe=probe)
    bodies = list(handled)
    # B was stored the first time but not acknowledged ahead of A: the broker sent it again.
    assert bodies[0] == b"B" and sorted(bodies[1:]) == [b"A", b"B"], bodies
    assert client.held == 1 and probes  # the reconnect waited for a write probe
    # Everything is acknowledged now: a fresh connection of the same session gets nothing.
    # Barrier: a marker published after it arrives, and it arrives alone.
    handled.clear()
    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"marker"])
    await run_client(mosquitto.port, handler, lambda: bool(handled))
    assert handled == [b"marker"]


async def test_a_handler_bug_is_redelivered_then_dropped_and_notstored_is_retried(mosquitto):
    seen: list[bytes] = []

    async def handler(message) -> None:  # noqa: ANN001
        body = bytes(message.payload)
        seen.append(body)
        if body == b"bug":
            raise KeyError("a bug")
        if body == b"later" and seen.count(b"later") < 3:
            raise NotStored("upstream buffer full")

    await run_client(mosquitto.port, handler, lambda: True)
    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"bug", b"later"])
    client = await run_client(mosquitto.port, handler, lambda: seen.count(b"later") >= 3, timeout=20)
    assert seen.count(b"bug") == 3 and client.poison_dropped == 1  # three deliveries, then dropped
    handled_after: list[bytes] = []

    async def recorder(message) -> None:  # noqa: ANN001
        handled_after.append(bytes(message.payload))

    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"marker"])
    await run_client(mosquitto.port, recorder, lambda: b"marker" in handled_after)
    assert handled_after == [b"marker"]  # "bug" and "later" were acknowledged in the end
