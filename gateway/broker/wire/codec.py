"""MQTT 3.1.1 and 5.0 wire primitives and the encoders of every packet the broker sends.

Decoding reads from one packet body already in memory (:class:`Body`); anything that does
not fit raises :class:`Malformed`, which the connection answers the way its protocol level
wants (5.0: DISCONNECT with the reason code, 3.1.1: close) [MQTT-4.8.0-1], [MQTT-4.13.1-1].
Encoders write bytes directly: the hot path (PUBLISH, acknowledgements) builds no object
graph, and a QoS 0 PUBLISH can be encoded once for every subscriber of one version.
"""

from __future__ import annotations

import enum

# Protocol levels (the CONNECT's "Protocol Level" byte, §3.1.2.2).
V311 = 4
V5 = 5

# Control packet types (§2.1.2).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

# First bytes of the acknowledgements (PUBREL's flags are 0010 [MQTT-3.6.1-1]).
PUBACK_B, PUBREC_B, PUBREL_B, PUBCOMP_B = 0x40, 0x50, 0x62, 0x70

MAX_VARINT = 268_435_455


class Reason(enum.IntEnum):
    """MQTT 5.0 reason codes (§2.4) the broker sends; 3.1.1 CONNACK return codes are mapped."""

    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    SERVER_SHUTTING_DOWN = 0x8B
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


# 3.1.1 CONNACK return codes (§3.2.2.3) for the 5.0 reasons a refused CONNECT can have.
V311_CONNACK = {
    Reason.UNSUPPORTED_PROTOCOL_VERSION: 0x01,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: 0x02,
    Reason.SERVER_UNAVAILABLE: 0x03,
    Reason.SERVER_BUSY: 0x03,
    Reason.BAD_USER_NAME_OR_PASSWORD: 0x04,
    Reason.NOT_AUTHORIZED: 0x05,
}


class Malformed(Exception):
    """The bytes are not a valid packet. ``reason`` is 0x81 (malformed) or 0x82 (protocol
    error), or another 5.0 reason the standard names for the case (0x94 topic alias, ...)."""

    def __init__(self, message: str, reason: Reason = Reason.MALFORMED_PACKET):
        super().__init__(message)
        self.reason = reason


class TooLarge(Malformed):
    """A fixed header announced more than the receiver's maximum packet size; nothing of the
    body was read."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"packet of {length} bytes (at most {limit})", Reason.PACKET_TOO_LARGE)
        self.length = length


def varint(n: int) -> bytes:
    """A Variable Byte Integer (§1.5.5)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def utf8(value: str) -> bytes:
    """A UTF-8 Encoded String (§1.5.4)."""
    raw = value.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def binary(value: bytes) -> bytes:
    """Binary Data (§1.5.6)."""
    return len(value).to_bytes(2, "big") + value


def check_utf8_text(text: str, what: str) -> str:
    """[MQTT-1.5.4-2]: no U+0000; [MQTT-1.5.4-1]: no surrogates (decoding already refused them)."""
    if "\0" in text:
        raise Malformed(f"{what} contains U+0000")
    return text


class Body:
    """A cursor over one packet body; every read checks the bounds (truncation is Malformed)."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise Malformed(f"packet ends inside {what}")
        self.pos = pos + n
        return self.data[pos:pos + n]

    def u8(self, what: str) -> int:
        if self.pos >= self.end:
            raise Malformed(f"packet ends before {what}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def varint(self, what: str) -> int:
        value, shift = 0, 0
        for _ in range(4):
            byte = self.u8(what)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise Malformed(f"{what}: variable byte integer longer than 4 bytes")

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def text(self, what: str) -> str:
        raw = self.binary(what)
        try:
            return check_utf8_text(raw.decode("utf-8"), what)
        except UnicodeDecodeError:
            raise Malformed(f"{what} is not valid UTF-8") from None

    def rest(self) -> bytes:
        pos, self.pos = self.pos, self.end
        return self.data[pos:self.end]


# ====================================================================== encoders
def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def send_ack(first: int, packet_id: int, reason: int = 0, props: bytes = b"") -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP. A success with no properties is the 3.1.1 form,
    which 5.0 allows too (§3.4.2.1: reason code and properties may be omitted)."""
    if not reason and not props:
        return bytes((first, 2)) + packet_id.to_bytes(2, "big")
    if not props:
        return bytes((first, 3)) + packet_id.to_bytes(2, "big") + bytes((reason,))
    return packet(first, packet_id.to_bytes(2, "big") + bytes((reason,)) + varint(len(props)) + props)


def send_connack(version: int, session_present: bool, reason: int, props: bytes = b"") -> bytes:
    """CONNACK; a refused connection never reports a session [MQTT-3.2.2-4], [MQTT-3.2.2-6]."""
    present = 1 if (session_present and reason == 0) else 0
    if version == V5:
        return packet(0x20, bytes((present, reason)) + varint(len(props)) + props)
    code = reason if reason < 0x80 else V311_CONNACK.get(Reason(reason), 0x03)
    return bytes((0x20, 2, present, code))


def send_suback(version: int, packet_id: int, codes: list[int]) -> bytes:
    body = packet_id.to_bytes(2, "big") + (b"\x00" if version == V5 else b"") + bytes(codes)
    return packet(0x90, body)


def send_unsuback(version: int, packet_id: int, codes: list[int]) -> bytes:
    if version == V5:
        return packet(0xB0, packet_id.to_bytes(2, "big") + b"\x00" + bytes(codes))
    return bytes((0xB0, 2)) + packet_id.to_bytes(2, "big")


PINGRESP_PACKET = b"\xd0\x00"


def send_disconnect(reason: int, props: bytes = b"") -> bytes:
    """A server DISCONNECT (5.0 only, §3.14)."""
    if not props:
        return bytes((0xE0, 1, reason)) if reason else b"\xe0\x00"
    return packet(0xE0, bytes((reason,)) + varint(len(props)) + props)


def send_publish(topic_b: bytes, payload: bytes, qos: int, retain: bool, dup: bool = False,
                 packet_id: int | None = None, props: bytes | None = None) -> bytes:
    """A PUBLISH; ``topic_b`` is length-prefixed (:func:`utf8`). ``props`` is None for 3.1.1
    and the encoded property block (without its length) for 5.0."""
    first = 0x30 | (0x08 if dup and qos else 0) | (qos << 1) | (1 if retain else 0)
    if props is not None:
        plen = varint(len(props)) if props else b"\x00"
        if qos:
            body_len = len(topic_b) + 2 + len(plen) + len(props) + len(payload)
            return b"".join((bytes((first,)), varint(body_len), topic_b, packet_id.to_bytes(2, "big"),  # type: ignore[union-attr]
                             plen, props, payload))
        body_len = len(topic_b) + len(plen) + len(props) + len(payload)
        return b"".join((bytes((first,)), varint(body_len), topic_b, plen, props, payload))
    if qos:
        body_len = len(topic_b) + 2 + len(payload)
        return b"".join((bytes((first,)), varint(body_len), topic_b,
                         packet_id.to_bytes(2, "big"), payload))  # type: ignore[union-attr]
    return b"".join((bytes((first,)), varint(len(topic_b) + len(payload)), topic_b, payload))
