"""The broker under faults, through the real daemon: a full disk (a small tmpfs as the data
dir) and a burst of 5,000 device acks for the gateway's own session (issue 9 items 3, 5)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.support import GatewayProcess, base_config, fill_disk, free_port, mounted_tmpfs, write_config

P = "homepot/site-t"


# ---------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs; unmounted in teardown (whatever the test did)."""
    with mounted_tmpfs(tmp_path / "disk", "6m", "0700") as mnt:
        yield mnt


class Publisher:
    """paho with a persistent session that resends unacknowledged messages after a reconnect;
    records which publishes it saw acknowledged (PUBACK)."""

    def __init__(self, port: int, client_id: str):
        self.acked: set[int] = set()
        self.disconnects = 0
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.max_inflight_messages_set(100)
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason, props) -> None:  # noqa: ANN001
        with self._lock:
            self.acked.add(mid)

    def _on_disconnect(self, *args) -> None:  # noqa: ANN002
        self.disconnects += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def collect(port: int, client_id: str, topic_filter: str, clean: bool, count: int,
            timeout: float = 20) -> dict[str, bytes]:
    """Connect, subscribe (unless resuming), and gather ``count`` messages topic -> payload."""
    got: dict[str, bytes] = {}
    present: list[bool] = []
    lock = threading.Lock()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)

    def on_message(cl, ud, m) -> None:  # noqa: ANN001
        with lock:
            got[m.topic] = m.payload

    def on_connect(cl, ud, flags, rc, props) -> None:  # noqa: ANN001
        present.append(flags.session_present)
        if clean:
            cl.subscribe(topic_filter, 1)

    c.on_message = on_message
    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        wait(lambda: len(got) >= count, timeout, f"{client_id}: {len(got)} of {count} messages")
    finally:
        c.disconnect()
        c.loop_stop()
    assert present == [not clean]
    return got


def test_full_disk_nothing_is_acknowledged_that_is_not_stored(tmp_path: Path, small_disk: Path):
    """Contract §8: with the disk full the broker PUBACKs nothing it could not store (retained
    messages, a persistent session's queue); it closes the publisher's connection, logs once,
    keeps serving, and writes again when there is room. What the publisher saw PUBACKed
    reaches an independent subscriber, also after a kill -9."""
    port = free_port()
    data = base_config(tmp_path, port, gateway={"site_id": "site-t", "topic_prefix": "homepot",
                                                "data_dir": str(small_disk)})
    gw = GatewayProcess(write_config(tmp_path, data), tmp_path)
    gw.start()
    try:
        # A PLC's persistent session, offline: it will get everything queued.
        keeper = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="plc-keeper", clean_session=False)
        subscribed = threading.Event()
        keeper.on_subscribe = lambda *a: subscribed.set()
        keeper.connect("127.0.0.1", port)
        keeper.loop_start()
        keeper.subscribe(f"{P}/plc/#", 1)
        assert subscribed.wait(10)
        keeper.disconnect()
        keeper.loop_stop()

        fill_disk(small_disk / "ballast")
        pub = Publisher(port, "plc-writer")
        n = 8
        payloads = {f"{P}/plc/cfg/{i}": os.urandom(96 * 1024) for i in range(n)}
        mids = {topic: pub.client.publish(topic, payload, qos=1, retain=True).mid
                for topic, payload in payloads.items()}
        # The broker refused to acknowledge and closed the connection (paho reconnects, resends).
        wait(lambda: "broker state write failed" in gw.log() and pub.disconnects >= 2, 30,
             "the broker should close the publisher's connection while the disk is full")
        assert pub.acked < set(mids.values()), "everything acknowledged although the disk is full"
        assert gw.proc.poll() is None

        (small_disk / "ballast").unlink()                 # room again
        wait(lambda: pub.acked >= set(mids.values()), 40, "resent messages acknowledged once there is room")
        pub.close()
        log = gw.log()
        assert log.count("broker state write failed") == 1, "logged once per episode"
        assert "broker state writes resumed" in log

        gw.proc.send_signal(signal.SIGKILL)               # what was acknowledged is on disk
        gw.wait()
        gw.start()
        queued = collect(port, "plc-keeper", f"{P}/plc/#", clean=False, count=n)
        assert queued == payloads
        retained = collect(port, "late-reader", f"{P}/plc/cfg/#", clean=True, count=n)
        assert retained == payloads
        assert gw.stop() == 0
    finally:
        gw.kill()
        if gw.notify:
            gw.notify.close()


# ---------------------------------------------------------------- 5,000 acks at once
def counter(data_dir: Path, name: str) -> int:
    db = sqlite3.connect(data_dir / "gateway.db")
    try:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


@pytest.fixture
def ram_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs data dir: fsync is free there, so the test measures the broker's behaviour,
    not the disk of a shared CI machine."""
    with mounted_tmpfs(tmp_path / "ram", "64m", "0700") as mnt:
        yield mnt


def test_5000_acks_at_once_all_reach_the_gateway(tmp_path: Path, ram_disk: Path):
    """Issue 9.5 / contract §5: the gateway's own session is never capped. 5,000 devices ack at
    once through 50 paho connections while max_queued_messages = 100: every ack a device saw
    PUBACKed reaches the gateway, which records each one (these acks name message_ids it never
    sent, so each is refused and counted in ``acks_refused`` - one committed row per ack that
    arrived, without first dispatching 5,000 real deliveries)."""
    n, conns = 5000, 50
    port = free_port()
    data = base_config(tmp_path, port, broker={"max_queued_messages": 100},
                       gateway={"site_id": "site-t", "topic_prefix": "homepot", "data_dir": str(ram_disk)})
    gw = GatewayProcess(write_config(tmp_path, data), tmp_path)
    gw.start()
    try:
        clients, infos = [], []
        for c in range(conns):
            cl = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"acker-{c}")
            cl.max_inflight_messages_set(200)   # the whole burst reaches the broker at once
            cl.connect("127.0.0.1", port)
            clients.append(cl)
        for cl in clients:
            cl.loop_start()
        at = datetime.now(UTC).isoformat()
        for i in range(n):
            ack = json.dumps({"message_id": str(uuid.uuid4()), "status": "received", "at": at})
            infos.append(clients[i % conns].publish(f"{P}/devices/dev-{i:04}/ack", ack, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        assert sum(1 for info in infos if info.is_published()) == n   # every one PUBACKed
        for cl in clients:
            cl.disconnect()
            cl.loop_stop()
        wait(lambda: counter(ram_disk, "acks_refused") >= n, 90,
             f"acks that reached the gateway: {counter(ram_disk, 'acks_refused')} of {n}")
        assert counter(ram_disk, "acks_refused") == n
        assert "client queue full" not in gw.log()
        assert gw.stop() == 0
    finally:
        gw.kill()
        if gw.notify:
            gw.notify.close()
