"""Independent receivers for pipeline tests: MQTT devices as real paho clients.

Each device is its own MQTT connection with client id = device id and a persistent
session (CleanSession=0), subscribed to its notify topic at QoS 1, exactly as a PLC
would be. It records every envelope it gets and acks it (or holds its acks until told).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho

P = "homepot/site-t"


class MqttDevice:
    def __init__(self, port: int, device_id: str, *, auto_ack: bool = True, prefix: str = P,
                 connect: bool = True):
        self.port = port
        self.device_id = device_id
        self.prefix = prefix
        self.auto_ack = auto_ack
        self.received: list[dict[str, Any]] = []
        self.held: list[bytes] = []
        self.acks_published = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        if connect:
            self.connect()

    @property
    def topic(self) -> str:
        return f"{self.prefix}/devices/{self.device_id}/notify"

    def connect(self, timeout: float = 10.0) -> "MqttDevice":
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"{self.device_id} did not subscribe")
        return self

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        envelope = json.loads(msg.payload)
        ack = json.dumps({"message_id": envelope["message_id"], "status": "received",
                          "at": datetime.now(UTC).isoformat()}).encode()
        with self._lock:
            self.received.append(envelope)
            if not self.auto_ack:
                self.held.append(ack)
                return
        self._ack(ack)

    def _ack(self, payload: bytes) -> None:
        self.client.publish(f"{self.prefix}/devices/{self.device_id}/ack", payload, qos=1)
        self.acks_published += 1

    def release(self) -> None:
        """Publish the held acks and ack everything from now on."""
        with self._lock:
            held, self.held, self.auto_ack = self.held, [], True
        for payload in held:
            self._ack(payload)

    def jobs(self) -> set[str]:
        with self._lock:
            return {e["job_id"] for e in self.received}

    def wait_for_job(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for e in self.received:
                    if e["job_id"] == job_id:
                        return e
            time.sleep(0.02)
        raise TimeoutError(f"{self.device_id} never got job {job_id}; got {sorted(self.jobs())}")

    def close(self) -> None:
        close_all([self])


def close_all(devices: "list[MqttDevice] | tuple[MqttDevice, ...]") -> None:
    """Disconnect every device, then wait for their network threads. Each thread notices
    the disconnect within a second (paho's reconnect wait once the broker is gone), so
    they wind down together instead of a second each, one after the other."""
    for d in devices:
        d.client.disconnect()
    for d in devices:
        d.client.loop_stop()
