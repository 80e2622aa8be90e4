"""An MQTT broker URL taken apart (``mqtt://``, ``mqtts://``, ``ws://``, ``wss://``).

Its own module, not in :mod:`gateway.config`: the device agent (``devices/agent.py``) and
the MQTT clients need only this, and importing the config builds every pydantic model of
it (~0.15 s of CPU per agent started). The config validates URLs with it and re-exports it.
"""

from __future__ import annotations


class MqttUrl:
    """Parsed ``mqtt://host:port`` URL (only what aiomqtt needs)."""

    DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}

    def __init__(self, url: str):
        scheme, rest = url.split("://", 1)
        rest = rest.rstrip("/")
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = rest.partition(":")
        self.scheme = scheme
        self.host = host
        self.port = int(port) if port else self.DEFAULT_PORTS[scheme]
        self.tls = scheme in ("mqtts", "wss")
        self.transport = "websockets" if scheme in ("ws", "wss") else "tcp"
