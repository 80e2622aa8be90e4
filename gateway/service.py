"""What the daemon runs besides the broker and its own client.

A service registers its MQTT routes before the client connects (``attach``), then runs
until ``stopping`` is set, finishing or persisting its in-flight work before returning.
The pipeline, the upstream link and the HTTP API are services.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.mqtt import GatewayClient


class Service(Protocol):
    name: str

    def attach(self, client: GatewayClient) -> None: ...

    async def run(self, stopping: asyncio.Event) -> None: ...
