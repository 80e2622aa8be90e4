"""The gateway's own MQTT client against a real Mosquitto: nothing is acknowledged before
its handler stored it, and PUBACKs stay in arrival order [MQTT-4.6.0-2]."""

from __future__ import annotations

import asyncio
import sqlite3
import time

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


async def test_a_handler_failure_that_is_not_storage_sets_the_message_aside_and_notstored_is_retried(mosquitto):
    """A handler that raises anything but a storage failure never holds the link: its
    message is acknowledged once, set aside (counted, kept for status), and the message
    after it is handled right away, on the same connection. NotStored is still held and
    redelivered."""
    seen: list[tuple[float, bytes]] = []

    async def handler(message) -> None:  # noqa: ANN001
        body = bytes(message.payload)
        seen.append((time.monotonic(), body))
        if body == b"bug":
            raise KeyError("a bug")
        if body == b"later" and [b for _, b in seen].count(b"later") < 3:
            raise NotStored("upstream buffer full")

    await run_client(mosquitto.port, handler, lambda: True)
    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"bug", b"next"])
    client = await run_client(mosquitto.port, handler, lambda: any(b == b"next" for _, b in seen))
    bodies = [b for _, b in seen]
    # Delivered once each: a held message would have been redelivered, and "next" with it.
    # (How fast the next one flows is measured against the daemon: tests/test_hostile_inputs.py.)
    assert bodies == [b"bug", b"next"], bodies
    assert client.set_aside.count == 1 and client.held == 0 and client.connect_failures == 0
    [kept] = client.set_aside.recent()
    assert kept["topic"] == "t/x" and kept["reason"] == "KeyError: 'a bug'" and kept["size"] == 3 and kept["at"]

    seen.clear()
    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"later"])
    client = await run_client(mosquitto.port, handler, lambda: [b for _, b in seen].count(b"later") >= 3, timeout=20)
    assert client.held == 2 and client.set_aside.count == 0  # storage: held and redelivered, as before
    handled_after: list[bytes] = []

    async def recorder(message) -> None:  # noqa: ANN001
        handled_after.append(bytes(message.payload))

    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"marker"])
    await run_client(mosquitto.port, recorder, lambda: b"marker" in handled_after)
    assert handled_after == [b"marker"]  # "bug", "next" and "later" were acknowledged


async def test_set_aside_messages_are_counted_in_metrics_and_listed_by_status(mosquitto, capsys):
    """What an operator sees of a set-aside message: the count per link in /metrics, and
    in `status` the count and the last ones (topic, time, size, reason)."""
    from gateway import health, status
    from gateway.metrics import RuntimeCollector

    async def handler(message) -> None:  # noqa: ANN001
        int(bytes(message.payload))  # a 4,400-digit number: ValueError, not a storage failure

    await run_client(mosquitto.port, handler, lambda: True)
    await asyncio.to_thread(publish, mosquitto.port, "t/x", [b"1" * 4400])
    seen: list[int] = []

    async def counting(message) -> None:  # noqa: ANN001
        seen.append(1)
        await handler(message)

    client = await run_client(mosquitto.port, counting, lambda: bool(seen))
    view = health.set_aside_view(health.HealthProbes(client=client, started_at="2026-01-01T00:00:00.000Z"))
    assert view["counts"] == {"broker": 1}
    [kept] = view["recent"]
    assert kept["link"] == "broker" and kept["topic"] == "t/x" and kept["size"] == 4400
    assert kept["reason"].startswith("ValueError: Exceeds the limit")

    collector = RuntimeCollector()
    collector.snapshot = {"set_aside": view}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples}
    assert samples[("homepot_messages_set_aside_total", (("link", "broker"),))] == 1.0

    status.render({"site_id": "s", "status": "ok", "set_aside": view, "deliveries": {}})
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "messages set aside" in out and "1 from the broker link" in out and "'t/x' (4400 bytes)" in out


async def test_a_closed_database_is_a_storage_failure_not_a_set_aside(tmp_path):
    """A message handled while the daemon shuts its database down must be held (redelivered
    after the restart), never acknowledged and set aside as if it were a bug."""
    from gateway.storage import Database, is_storage_error

    db = await Database(tmp_path / "gateway.db").open()
    await db.run(lambda conn: conn.execute("SELECT 1").fetchone())
    await db.close()
    try:
        await db.run(lambda conn: conn.execute("SELECT 1").fetchone())
    except Exception as exc:  # noqa: BLE001 - what the MQTT client would see
        assert is_storage_error(exc) and isinstance(exc, RuntimeError), repr(exc)
    else:
        raise AssertionError("a closed database answered")
