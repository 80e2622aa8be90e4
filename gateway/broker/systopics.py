"""``$SYS/broker/...``: the broker's vital signs as MQTT topics (contract §5).

Mosquitto's names where they apply, so ``mosquitto_sub -t '$SYS/#' -v`` and MQTT
Explorer show what operators are used to. Published from inside the broker (not
through the gateway's client), retained, QoS 0, every ``interval_s`` (10 s), and only
when the value changed (``uptime`` always does). The messages live in memory: they
are never written to SQLite and are not counted as retained messages. Who may read
them is the ACL's business: the default roles ``admin`` and ``monitor`` may.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from gateway import __version__

if TYPE_CHECKING:
    from gateway.broker.embedded import GatewayBroker

log = structlog.get_logger(__name__)

SYS_INTERVAL_S = 10.0
PREFIX = "$SYS/broker/"


def sys_values(broker: GatewayBroker) -> dict[str, str]:
    """Topic (below ``$SYS/broker/``) → payload text."""
    snap = broker.snapshot()
    return {
        "version": f"homepot-gateway {__version__} (MQTT 3.1.1, 5.0)",
        "uptime": f"{snap['uptime_s']} seconds",
        "clients/connected": str(snap["clients_connected"]),
        # Mosquitto: connected clients plus disconnected persistent sessions.
        "clients/total": str(snap["sessions"]),
        "messages/received": str(snap["messages_in"]),
        "messages/sent": str(snap["messages_out"]),
        "messages/dropped": str(snap["dropped"]),
        "subscriptions/count": str(snap["subscriptions"]),
        "retained messages/count": str(snap["retained"]),
    }


class SysPublisher:
    """Publishes :func:`sys_values` at once and then every ``interval_s``."""

    def __init__(self, broker: GatewayBroker, interval_s: float = SYS_INTERVAL_S,
                 values: Callable[[GatewayBroker], dict[str, str]] = sys_values):
        self._broker = broker
        self.interval_s = interval_s
        self._values = values
        self._last: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def publish_once(self) -> None:
        for name, text in self._values(self._broker).items():
            if self._last.get(name) != text:
                self._last[name] = text
                self._broker.publish_sys(PREFIX + name, text.encode())

    async def _run(self) -> None:
        while True:
            try:
                self.publish_once()
            except Exception as exc:  # a bug here must not stop the broker; say it once a round
                log.error("$SYS publish failed", error=repr(exc))
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="broker-sys")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
