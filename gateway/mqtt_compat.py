"""The private names of aiomqtt and paho-mqtt the gateway's MQTT client reaches into, checked
on the first client built, before it connects.

aiomqtt 2.x has no public way to turn on paho's manual acknowledgements (a message is
acknowledged only once stored), to read the CONNACK's properties or a PUBACK's reason code
(the cloud link), or to read the socket in chunks; so ``gateway/mqtt.py`` and
``gateway/upstream/connection.py`` use its paho client and a few of paho's internals. Both
libraries are pinned exactly (pyproject.toml); this check turns an upgrade that renamed one of
them into a clear error at start instead of a failure on the first message.
"""

from __future__ import annotations

import aiomqtt
import paho.mqtt.client as paho

# aiomqtt.Client: its paho client, the future its CONNACK resolves, and the one a lost
# connection resolves (the reference agent stops waiting for a PUBACK on it).
AIOMQTT_NAMES = ("_client", "_connected", "_disconnected")
# paho.Client: the socket the chunked reader checks against; the public calls it relies on.
PAHO_NAMES = ("_sock", "manual_ack_set", "ack", "on_publish", "on_connect", "on_disconnect", "publish")


class MqttLibraryMismatch(RuntimeError):
    """aiomqtt or paho-mqtt no longer has a name the gateway's client uses."""


_checked = False


def check(client: aiomqtt.Client) -> None:
    """Raise :class:`MqttLibraryMismatch` naming every missing name and the installed versions.

    Run on the first client built (aiomqtt builds a client only inside a running loop), before
    it connects; later ones pass at once."""
    global _checked
    if _checked:
        return
    missing = [f"aiomqtt.Client.{n}" for n in AIOMQTT_NAMES if not hasattr(client, n)]
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client):
        missing.append("aiomqtt.Client._client (a paho.Client)")
    else:
        missing += [f"paho.Client.{n}" for n in PAHO_NAMES if not hasattr(inner, n)]
    if missing:
        from importlib.metadata import version  # only to name them in the error

        raise MqttLibraryMismatch(
            f"aiomqtt {version('aiomqtt')} / paho-mqtt {version('paho-mqtt')} lack what the gateway's MQTT "
            f"client uses: {', '.join(missing)}; install the versions pinned in pyproject.toml")
    _checked = True


def reset() -> None:
    """Check again on the next client (tests)."""
    global _checked
    _checked = False
