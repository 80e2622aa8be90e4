"""The gateway MQTT client's exception, importable without the client.

A bridge that only catches it (``bridges/mqtt.py``) is imported by every CLI command that
loads the configuration (each enabled bridge's ``load_secrets``); importing
:mod:`gateway.mqtt` for it would load aiomqtt and paho-mqtt there for nothing.
"""

from __future__ import annotations


class NotConnected(Exception):
    """Publishing while the broker is unreachable; callers keep the work and retry."""
