"""The private names of aiomqtt/paho the gateway's client uses are checked at start."""

from __future__ import annotations

import aiomqtt
import pytest

from gateway import mqtt_compat
from gateway.mqtt import ConnectionSettings, GatewayClient


async def test_the_pinned_libraries_have_every_name():
    mqtt_compat.reset()
    GatewayClient(ConnectionSettings(url="mqtt://127.0.0.1:1", client_id="x"))._make_client()


async def test_a_library_without_one_of_them_is_refused_by_name(monkeypatch: pytest.MonkeyPatch):
    """As an upgrade that renamed aiomqtt's paho client would: a clear error before the first
    connect that names what is missing."""
    original = aiomqtt.Client.__init__

    def renamed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        original(self, *args, **kwargs)
        self._paho = self._client
        del self._client

    monkeypatch.setattr(aiomqtt.Client, "__init__", renamed)
    mqtt_compat.reset()
    try:
        with pytest.raises(mqtt_compat.MqttLibraryMismatch, match=r"aiomqtt.Client._client"):
            GatewayClient(ConnectionSettings(url="mqtt://127.0.0.1:1", client_id="x"))._make_client()
    finally:
        mqtt_compat.reset()


async def test_the_future_a_lost_connection_resolves_is_checked_too(monkeypatch: pytest.MonkeyPatch):
    """The reference agent stops waiting for a PUBACK when the connection drops, on aiomqtt's
    ``_disconnected``; a release without it is refused by name, not found out as a hang."""
    original = aiomqtt.Client.__init__

    def without(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        original(self, *args, **kwargs)
        del self._disconnected

    monkeypatch.setattr(aiomqtt.Client, "__init__", without)
    mqtt_compat.reset()
    try:
        with pytest.raises(mqtt_compat.MqttLibraryMismatch, match=r"aiomqtt.Client._disconnected"):
            mqtt_compat.check(aiomqtt.Client("127.0.0.1", 1))
    finally:
        mqtt_compat.reset()
