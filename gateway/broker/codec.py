"""Encoders for the packets the broker writes on its hot path.

amqtt builds a packet object graph per outgoing PUBLISH and per acknowledgement;
these few functions write the MQTT 3.1.1 wire format (§2, §3.3, §3.4–3.7) directly,
and let a QoS 0 PUBLISH be encoded once and written to every subscriber.
"""

from __future__ import annotations

PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62  # PUBREL's fixed header flags are 0010 [MQTT-3.6.1-1]
PUBCOMP = 0x70


def remaining_length(n: int) -> bytes:
    """The variable-length "Remaining Length" of §2.2.3."""
    out = bytearray()
    while True:
        digit = n % 128
        n //= 128
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode_topic(topic: str) -> bytes:
    raw = topic.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def encode_publish(topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool = False,
                   packet_id: int | None = None) -> bytes:
    """A PUBLISH; ``topic`` is already length-prefixed (see :func:`encode_topic`)."""
    first = PUBLISH | (0x08 if dup and qos else 0) | (qos << 1) | (1 if retain else 0)
    if qos:
        assert packet_id is not None
        body_len = len(topic) + 2 + len(payload)
        return b"".join((bytes((first,)), remaining_length(body_len), topic,
                         packet_id.to_bytes(2, "big"), payload))
    return b"".join((bytes((first,)), remaining_length(len(topic) + len(payload)), topic, payload))


def encode_ack(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP: fixed header, length 2, packet id."""
    return bytes((kind, 2)) + packet_id.to_bytes(2, "big")


def encode_connack(session_present: bool, return_code: int) -> bytes:
    # A refused connection never reports a session [MQTT-3.2.2-4].
    return bytes((0x20, 2, 1 if (session_present and return_code == 0) else 0, return_code))
