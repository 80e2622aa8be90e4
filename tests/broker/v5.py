"""A deliberately dumb MQTT 5.0 client for broker tests, written from the standard (§2, §3)
independently of the broker's codec, so tests see reason codes, properties and flags.

Properties are given and returned as ``{identifier: value}``; User Property (0x26) and
Subscription Identifier (0x0B) as lists.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from tests.broker.helpers import CONNACK, PUBLISH, SUBACK, UNSUBACK, Packet, RawClient, _rl, _s

# identifier -> kind: 1 byte, 2 u16, 4 u32, "v" varint, "s" string, "b" binary, "p" string pair
KINDS: dict[int, Any] = {
    0x01: 1, 0x02: 4, 0x03: "s", 0x08: "s", 0x09: "b", 0x0B: "v", 0x11: 4, 0x12: "s", 0x13: 2, 0x15: "s",
    0x16: "b", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: 2, 0x22: 2, 0x23: 2,
    0x24: 1, 0x25: 1, 0x26: "p", 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}
REPEATABLE = (0x26, 0x0B)
DISCONNECT = 14


def varint(n: int) -> bytes:
    return _rl(n)


def encode_props(props: dict[int, Any] | None) -> bytes:
    out = b""
    for ident, value in (props or {}).items():
        values = value if ident in REPEATABLE else [value]
        for v in values:
            kind = KINDS[ident]
            out += varint(ident)
            if kind == 1:
                out += bytes([v])
            elif kind in (2, 4):
                out += v.to_bytes(kind, "big")
            elif kind == "v":
                out += varint(v)
            elif kind in ("s", "b"):
                out += _s(v)
            else:
                out += _s(v[0]) + _s(v[1])
    return varint(len(out)) + out


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def decode_props(data: bytes, pos: int) -> tuple[dict[int, Any], int]:
    length, pos = read_varint(data, pos)
    end = pos + length
    props: dict[int, Any] = {}
    while pos < end:
        ident, pos = read_varint(data, pos)
        kind = KINDS[ident]
        if kind == 1:
            v: Any = data[pos]
            pos += 1
        elif kind in (2, 4):
            v = int.from_bytes(data[pos:pos + kind], "big")
            pos += kind
        elif kind == "v":
            v, pos = read_varint(data, pos)
        elif kind in ("s", "b"):
            n = int.from_bytes(data[pos:pos + 2], "big")
            raw = data[pos + 2:pos + 2 + n]
            v = raw.decode() if kind == "s" else raw
            pos += 2 + n
        else:
            n1 = int.from_bytes(data[pos:pos + 2], "big")
            k = data[pos + 2:pos + 2 + n1].decode()
            pos += 2 + n1
            n2 = int.from_bytes(data[pos:pos + 2], "big")
            v = (k, data[pos + 2:pos + 2 + n2].decode())
            pos += 2 + n2
        if ident in REPEATABLE:
            props.setdefault(ident, []).append(v)
        else:
            props[ident] = v
    return props, end


@dataclass
class Publish5:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    props: dict[int, Any]


def parse_publish(pkt: Packet) -> Publish5:
    body = pkt.body
    n = int.from_bytes(body[:2], "big")
    topic = body[2:2 + n].decode()
    pos = 2 + n
    pid = None
    if pkt.qos:
        pid = int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
    props, pos = decode_props(body, pos)
    return Publish5(topic, body[pos:], pkt.qos, pkt.retain, pkt.dup, pid, props)


def ack_reason(pkt: Packet) -> int:
    """The reason code of a PUBACK/PUBREC/PUBREL/PUBCOMP (absent: 0x00, §3.4.2.1)."""
    return pkt.body[2] if len(pkt.body) > 2 else 0


def disconnect_reason(pkt: Packet) -> int:
    return pkt.body[0] if pkt.body else 0


class RawClient5(RawClient):
    """:class:`RawClient` speaking 5.0: CONNECT level 5, properties on every packet."""

    connack_props: dict[int, Any]

    async def connect5(self, client_id: str, *, clean_start: bool = True, keepalive: int = 60,
                       props: dict[int, Any] | None = None, username: str | None = None,
                       password: str | None = None,
                       will: tuple[str, bytes, int, bool, dict[int, Any]] | None = None) -> tuple[bool, int]:
        if self.writer is None:
            await self.open()
        flags = 0x02 if clean_start else 0
        payload = _s(client_id)
        if will:
            topic, message, qos, retain, will_props = will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += encode_props(will_props) + _s(topic) + _s(message)
        if username is not None:
            flags |= 0x80
            payload += _s(username)
        if password is not None:
            flags |= 0x40
            payload += _s(password)
        var = _s("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + encode_props(props)
        self.send(bytes([0x10]) + _rl(len(var) + len(payload)) + var + payload)
        pkt = await self.read(timeout=10)
        assert pkt is not None and pkt.type == CONNACK, pkt
        self.connack_props = decode_props(pkt.body, 2)[0] if len(pkt.body) > 2 else {}
        return bool(pkt.body[0] & 1), pkt.body[1]

    def publish5(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *,
                 props: dict[int, Any] | None = None, packet_id: int | None = None, dup: bool = False) -> int:
        pid = packet_id if packet_id is not None else (self.next_pid() if qos else 0)
        body = _s(topic) + (struct.pack("!H", pid) if qos else b"") + encode_props(props) + payload
        first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        self.send(bytes([first]) + _rl(len(body)) + body)
        return pid

    async def subscribe5(self, *filters: tuple[str, int], props: dict[int, Any] | None = None) -> list[int]:
        """``filters``: (filter, options byte: QoS | No Local 0x04 | RAP 0x08 | Retain Handling << 4)."""
        pid = self.next_pid()
        body = struct.pack("!H", pid) + encode_props(props) + b"".join(_s(f) + bytes([o]) for f, o in filters)
        self.send(bytes([0x82]) + _rl(len(body)) + body)
        pkt = await self.expect(SUBACK)
        assert pkt.packet_id == pid
        _, pos = decode_props(pkt.body, 2)
        return list(pkt.body[pos:])

    async def unsubscribe5(self, *filters: str) -> list[int]:
        pid = self.next_pid()
        body = struct.pack("!H", pid) + encode_props(None) + b"".join(_s(f) for f in filters)
        self.send(bytes([0xA2]) + _rl(len(body)) + body)
        pkt = await self.expect(UNSUBACK)
        assert pkt.packet_id == pid
        _, pos = decode_props(pkt.body, 2)
        return list(pkt.body[pos:])

    def disconnect5(self, reason: int = 0, props: dict[int, Any] | None = None) -> None:
        body = bytes([reason]) + encode_props(props)
        self.send(bytes([0xE0]) + _rl(len(body)) + body)
        assert self.writer is not None
        self.writer.close()

    async def next_publish(self, timeout: float = 5.0) -> Publish5:
        return parse_publish(await self.expect(PUBLISH, timeout))


# ---------------------------------------------------------------- paho-mqtt 2.2 speaking 5.0
import asyncio  # noqa: E402
import threading  # noqa: E402

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from tests.broker.helpers import until  # noqa: E402


@dataclass
class Received5:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: dict[str, Any]


def paho_props(kind: int, **values: Any) -> Properties:
    """paho Properties of packet ``kind`` (PacketTypes.PUBLISH, ...) from keyword names
    (MessageExpiryInterval=60, UserProperty=[("k", "v")], ...)."""
    props = Properties(kind)
    for name, value in values.items():
        setattr(props, name, value)
    return props


class Paho5:
    """paho-mqtt with ``protocol=MQTTv5``, its network loop in a thread."""

    def __init__(self, port: int, client_id: str = "", *, clean_start: bool = True,
                 session_expiry: int | None = None, username: str | None = None, password: str | None = None):
        self.port = port
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.messages: list[Received5] = []
        self.connack: tuple[int, bool, dict[str, Any]] | None = None
        self.suback: list[int] | None = None
        self.disconnect_reason: int | None = None
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, reasons, props: setattr(self, "suback", [r.value for r in reasons])
        self.client.on_disconnect = lambda c, u, flags, reason, props: setattr(self, "disconnect_reason", reason.value)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = (reason.value, bool(flags.session_present), props.json() if props else {})

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = msg.properties.json() if getattr(msg, "properties", None) is not None else {}
        with self._lock:
            self.messages.append(Received5(msg.topic, msg.payload, msg.qos, bool(msg.retain), props))

    async def connect(self) -> "Paho5":
        props = None
        if self.session_expiry is not None:
            props = paho_props(PacketTypes.CONNECT, SessionExpiryInterval=self.session_expiry)
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, 30, clean_start=self.clean_start,
                                properties=props)
        self.client.loop_start()
        await until(lambda: self.connack is not None or self.disconnect_reason is not None)
        return self

    async def subscribe(self, topic: str, qos: int, **options: Any) -> list[int]:
        self.suback = None
        self.client.subscribe(topic, options=paho.SubscribeOptions(qos=qos, **options))
        await until(lambda: self.suback is not None)
        assert self.suback is not None
        return self.suback

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                      **props: Any) -> Any:
        info = self.client.publish(topic, payload, qos, retain,
                                   properties=paho_props(PacketTypes.PUBLISH, **props) if props else None)
        await until(info.is_published)
        return info

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
