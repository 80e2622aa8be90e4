"""MQTT 5.0 properties (§2.2.2): decoding with every check the standard makes, and encoding.

A property block is a Variable Byte Integer length and then identifier/value pairs. The
decoder refuses, as a Malformed Packet or Protocol Error (the connection is then closed
with DISCONNECT): an identifier unknown or not allowed in the packet type, a property
given twice that may appear once [MQTT-2.2.2-2]... (User Property and, in PUBLISH,
Subscription Identifier may repeat), a value outside its range (Payload Format Indicator
other than 0/1, Receive Maximum 0, Maximum Packet Size 0, Topic Alias 0, Subscription
Identifier 0), and strings that are not well-formed UTF-8 [MQTT-1.5.4-1].
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from gateway.broker.wire.codec import (
    AUTH, CONNACK, CONNECT, DISCONNECT, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK,
    UNSUBSCRIBE, Body, Malformed, Reason, binary, utf8, varint,
)


class Prop(enum.IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class Kind(enum.Enum):
    BYTE = 1
    U16 = 2
    U32 = 4
    VARINT = 5
    TEXT = 6
    BINARY = 7
    PAIR = 8


KINDS: dict[int, Kind] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: Kind.BYTE, Prop.MESSAGE_EXPIRY_INTERVAL: Kind.U32, Prop.CONTENT_TYPE: Kind.TEXT,
    Prop.RESPONSE_TOPIC: Kind.TEXT, Prop.CORRELATION_DATA: Kind.BINARY, Prop.SUBSCRIPTION_IDENTIFIER: Kind.VARINT,
    Prop.SESSION_EXPIRY_INTERVAL: Kind.U32, Prop.ASSIGNED_CLIENT_IDENTIFIER: Kind.TEXT,
    Prop.SERVER_KEEP_ALIVE: Kind.U16, Prop.AUTHENTICATION_METHOD: Kind.TEXT, Prop.AUTHENTICATION_DATA: Kind.BINARY,
    Prop.REQUEST_PROBLEM_INFORMATION: Kind.BYTE, Prop.WILL_DELAY_INTERVAL: Kind.U32,
    Prop.REQUEST_RESPONSE_INFORMATION: Kind.BYTE, Prop.RESPONSE_INFORMATION: Kind.TEXT,
    Prop.SERVER_REFERENCE: Kind.TEXT, Prop.REASON_STRING: Kind.TEXT, Prop.RECEIVE_MAXIMUM: Kind.U16,
    Prop.TOPIC_ALIAS_MAXIMUM: Kind.U16, Prop.TOPIC_ALIAS: Kind.U16, Prop.MAXIMUM_QOS: Kind.BYTE,
    Prop.RETAIN_AVAILABLE: Kind.BYTE, Prop.USER_PROPERTY: Kind.PAIR, Prop.MAXIMUM_PACKET_SIZE: Kind.U32,
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: Kind.BYTE, Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: Kind.BYTE,
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: Kind.BYTE,
}

WILL = 0  # the will properties of a CONNECT (§3.1.3.2) use this pseudo packet type

_ACK = frozenset({Prop.REASON_STRING, Prop.USER_PROPERTY})
ALLOWED: dict[int, frozenset[int]] = {
    CONNECT: frozenset({Prop.SESSION_EXPIRY_INTERVAL, Prop.AUTHENTICATION_METHOD, Prop.AUTHENTICATION_DATA,
                        Prop.REQUEST_PROBLEM_INFORMATION, Prop.REQUEST_RESPONSE_INFORMATION, Prop.RECEIVE_MAXIMUM,
                        Prop.TOPIC_ALIAS_MAXIMUM, Prop.USER_PROPERTY, Prop.MAXIMUM_PACKET_SIZE}),
    WILL: frozenset({Prop.PAYLOAD_FORMAT_INDICATOR, Prop.MESSAGE_EXPIRY_INTERVAL, Prop.CONTENT_TYPE,
                     Prop.RESPONSE_TOPIC, Prop.CORRELATION_DATA, Prop.WILL_DELAY_INTERVAL, Prop.USER_PROPERTY}),
    PUBLISH: frozenset({Prop.PAYLOAD_FORMAT_INDICATOR, Prop.MESSAGE_EXPIRY_INTERVAL, Prop.CONTENT_TYPE,
                        Prop.RESPONSE_TOPIC, Prop.CORRELATION_DATA, Prop.SUBSCRIPTION_IDENTIFIER, Prop.TOPIC_ALIAS,
                        Prop.USER_PROPERTY}),
    PUBACK: _ACK, PUBREC: _ACK, PUBREL: _ACK, PUBCOMP: _ACK, SUBACK: _ACK, UNSUBACK: _ACK,
    SUBSCRIBE: frozenset({Prop.SUBSCRIPTION_IDENTIFIER, Prop.USER_PROPERTY}),
    UNSUBSCRIBE: frozenset({Prop.USER_PROPERTY}),
    DISCONNECT: frozenset({Prop.SESSION_EXPIRY_INTERVAL, Prop.REASON_STRING, Prop.USER_PROPERTY,
                           Prop.SERVER_REFERENCE}),
    AUTH: frozenset({Prop.AUTHENTICATION_METHOD, Prop.AUTHENTICATION_DATA, Prop.REASON_STRING,
                     Prop.USER_PROPERTY}),
    CONNACK: frozenset(KINDS),
}

NAMES: dict[int, str] = {int(p): p.name.lower() for p in Prop}

# Per packet type: identifier → the value of its Kind, for the identifiers allowed there (one
# dict lookup per property says both; plain ints compare faster than enum members).
_TABLES: dict[int, dict[int, int]] = {
    packet_type: {int(ident): KINDS[ident].value for ident in allowed} for packet_type, allowed in ALLOWED.items()}
_BYTE, _U16, _U32, _VARINT, _TEXT, _BINARY, _PAIR = (k.value for k in (Kind.BYTE, Kind.U16, Kind.U32, Kind.VARINT,
                                                                      Kind.TEXT, Kind.BINARY, Kind.PAIR))

_BOOLEAN = frozenset(int(p) for p in (Prop.PAYLOAD_FORMAT_INDICATOR, Prop.REQUEST_PROBLEM_INFORMATION,
                                      Prop.REQUEST_RESPONSE_INFORMATION))
_NOT_ZERO = frozenset(int(p) for p in (Prop.RECEIVE_MAXIMUM, Prop.MAXIMUM_PACKET_SIZE, Prop.TOPIC_ALIAS,
                                       Prop.SUBSCRIPTION_IDENTIFIER))

Properties = dict[int, Any]   # identifier → value; USER_PROPERTY → list of (name, value)


def decode(body: Body, packet_type: int) -> Properties:
    """The property block at the cursor; the cursor ends after it."""
    props, _, body.pos = _decode(body.data, body.pos, body.end, packet_type, False)
    return props


_WRITERS: dict[Kind, Callable[[Any], bytes]] = {
    Kind.BYTE: lambda v: bytes((v,)),
    Kind.U16: lambda v: v.to_bytes(2, "big"),
    Kind.U32: lambda v: v.to_bytes(4, "big"),
    Kind.VARINT: varint,
    Kind.TEXT: utf8,
    Kind.BINARY: binary,
    Kind.PAIR: lambda v: utf8(v[0]) + utf8(v[1]),
}


def encode(props: Properties) -> bytes:
    """The identifier/value pairs of ``props`` (without the block's length)."""
    parts: list[bytes] = []
    for ident, value in props.items():
        kind = KINDS[ident]
        prefix = varint(ident)
        if ident == Prop.USER_PROPERTY or (ident == Prop.SUBSCRIPTION_IDENTIFIER and isinstance(value, list)):
            for item in value:
                parts.append(prefix + _WRITERS[kind](item))
        else:
            parts.append(prefix + _WRITERS[kind](value))
    return b"".join(parts)


def block(props: Properties) -> bytes:
    """A whole property block: length and pairs."""
    raw = encode(props)
    return varint(len(raw)) + raw


# The properties a PUBLISH carries from its publisher to every subscriber unchanged
# [MQTT-3.3.2-4], [MQTT-3.3.2-15], [MQTT-3.3.2-16], [MQTT-3.3.2-17], [MQTT-3.3.2-20].
PASSED_THROUGH = (Prop.PAYLOAD_FORMAT_INDICATOR, Prop.CONTENT_TYPE, Prop.RESPONSE_TOPIC,
                  Prop.CORRELATION_DATA, Prop.USER_PROPERTY)


def passed_through(props: Properties) -> bytes:
    """The encoded pass-through properties of an incoming PUBLISH (b"" when none)."""
    if not props:
        return b""
    return encode({p: props[p] for p in PASSED_THROUGH if p in props})


_PASSED_IDS = frozenset(int(p) for p in PASSED_THROUGH)


def decode_publish(data: bytes, pos: int) -> tuple[Properties, bytes, int]:
    """The property block of a PUBLISH at ``pos``: (properties, the pass-through pairs as they
    came (raw bytes: forwarded without re-encoding), the offset after the block)."""
    return _decode(data, pos, len(data), PUBLISH, True)



def _varint(data: bytes, pos: int, limit: int, what: str) -> tuple[int, int]:
    """A variable byte integer at ``pos`` (at most 4 bytes, before ``limit``): its value and
    the position after it."""
    value, shift = 0, 0
    while True:
        if pos >= limit:
            raise Malformed(f"packet ends inside {what}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise Malformed(f"{what}: variable byte integer longer than 4 bytes")

def _decode(data: bytes, pos: int, limit: int, packet_type: int,
            forward: bool) -> tuple[Properties, bytes, int]:
    """The one property decoder: (properties, the raw pass-through pairs when ``forward``, the
    offset after the block). Flat over the bytes, by the kind of each identifier, because it is
    on the PUBLISH hot path: a decoder going through :class:`Body` per field and re-encoding the
    pass-through properties cost ~10x what the ``mqtt5`` wheel does (bench/mqtt5_codec.py)."""
    length, pos = _varint(data, pos, limit, "the property length")
    end = pos + length
    if end > limit:
        raise Malformed("property length beyond the packet")
    table = _TABLES[packet_type]
    props: Properties = {}
    forwarded: list[bytes] = []
    try:
        while pos < end:
            start = pos
            ident = data[pos]
            pos += 1
            # An identifier is a Variable Byte Integer, and every one is below 0x80: a first byte
            # with the continuation bit is a non-minimal encoding [MQTT-1.5.5-1] or no identifier
            # at all, refused like an unknown one.
            kind = table.get(ident)
            if kind is None:
                raise Malformed(f"property 0x{ident:02x} is not allowed in this packet")
            if kind == _BYTE:
                value: Any = data[pos]
                pos += 1
            elif kind == _U32:
                value = int.from_bytes(data[pos:pos + 4], "big")
                pos += 4
            elif kind == _U16:
                value = data[pos] << 8 | data[pos + 1]
                pos += 2
            elif kind == _TEXT:
                size = data[pos] << 8 | data[pos + 1]
                pos += 2 + size
                if pos > end:
                    raise Malformed(f"packet ends inside {NAMES[ident]}")
                value = data[pos - size:pos].decode("utf-8")
                if "\0" in value:
                    raise Malformed(f"{NAMES[ident]} contains U+0000")   # [MQTT-1.5.4-2]
            elif kind == _BINARY:
                size = data[pos] << 8 | data[pos + 1]
                pos += 2 + size
                value = data[pos - size:pos]
            elif kind == _PAIR:
                size = data[pos] << 8 | data[pos + 1]
                key = data[pos + 2:pos + 2 + size]
                pos += 2 + size
                size = data[pos] << 8 | data[pos + 1]
                pos += 2 + size
                if pos > end:
                    raise Malformed(f"packet ends inside {NAMES[ident]}")
                pair = (key.decode("utf-8"), data[pos - size:pos].decode("utf-8"))
                if "\0" in pair[0] or "\0" in pair[1]:
                    raise Malformed(f"{NAMES[ident]} contains U+0000")
                props.setdefault(ident, []).append(pair)   # may repeat [MQTT-3.3.2-17]
                if forward:
                    forwarded.append(data[start:pos])
                continue
            else:   # Kind.VARINT
                value, pos = _varint(data, pos, end, NAMES[ident])
            if pos > end:
                raise Malformed(f"packet ends inside {NAMES[ident]}")
            if ident in props:
                raise Malformed(f"property {NAMES[ident]} given twice", Reason.PROTOCOL_ERROR)  # [MQTT-2.2.2-2]
            if value == 0 and ident in _NOT_ZERO:
                raise Malformed(f"property {NAMES[ident]} must not be 0", Reason.PROTOCOL_ERROR)
            if kind == _BYTE and value > 1 and ident in _BOOLEAN:
                raise Malformed(f"property {NAMES[ident]} must be 0 or 1", Reason.PROTOCOL_ERROR)
            props[ident] = value
            if forward and ident in _PASSED_IDS:
                forwarded.append(data[start:pos])
    except UnicodeDecodeError:
        raise Malformed("a property string is not valid UTF-8") from None   # [MQTT-1.5.4-1]
    except IndexError:
        raise Malformed("packet ends inside a property") from None
    return props, b"".join(forwarded), end
