"""What the daemon runs besides the broker and its own client.

A service registers its MQTT routes before the client connects (``attach``), then runs
until ``stopping`` is set, finishing or persisting its in-flight work before returning.
The pipeline, the upstream link and the HTTP API are services.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from gateway.mqtt import GatewayClient


class Service(Protocol):
    name: str

    def attach(self, client: GatewayClient) -> None: ...

    async def run(self, stopping: asyncio.Event) -> None: ...


@runtime_checkable
class Listening(Protocol):
    """A service with a socket of its own (the HTTP API): ``bound_port`` is the port it
    listens on once started (what the kernel picked for a configured port 0), else None."""

    name: str
    bound_port: int | None
