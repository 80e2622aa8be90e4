"""What the daemon runs besides the broker and its own client.

A service registers its MQTT routes before the client connects (``attach``), then runs
until ``stopping`` is set, finishing or persisting its in-flight work before returning.
``started`` is how the daemon knows a service serves (the HTTP API listens, the health
reporter has a first snapshot): ``READY=1`` waits for every service's event; a service
whose ``started`` is None serves as soon as it runs. The pipeline, the upstream link, the
alarms, the health reporter and the HTTP API are services; :mod:`gateway.wiring` builds
them, each with the collaborators it uses.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.mqtt import GatewayClient


class Service(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def started(self) -> asyncio.Event | None: ...

    def attach(self, client: GatewayClient) -> None: ...

    async def run(self, stopping: asyncio.Event) -> None: ...


class ServiceStartError(Exception):
    """A service cannot serve with its configuration; the daemon exits with ``exit_code``."""

    exit_code = 2  # like a broker that cannot bind: a configuration problem
