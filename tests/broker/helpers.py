"""Helpers for broker tests: an in-process broker, a raw MQTT client, paho in a thread.

The raw client speaks MQTT 3.1.1 byte by byte so tests can see and control what
libraries hide: DUP and RETAIN flags, packet ids, withheld acknowledgements,
connections that just go silent. paho-mqtt and mosquitto_pub/sub are the
independent clients.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gateway.broker.embedded import EmbeddedBroker, InternalCredentials
from gateway.config import Config, parse_config
from tests.helpers import deep_merge, free_port, until  # noqa: F401 - until: re-exported


def broker_config(tmp: Path, port: int, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "gateway": {"site_id": "site-t", "topic_prefix": "homepot", "data_dir": str(tmp / "var")},
        "broker": {
            "url": f"mqtt://127.0.0.1:{port}",
            "listeners": [{"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}",
                           "allow_anonymous": True, "anonymous_role": "admin"}],
            "auth": {"password_file": str(tmp / "var" / "passwd")},
        },
    }
    return parse_config(deep_merge(data, extra), environ={}).config


def write_accounts(path: Path, accounts: dict[str, str], password: str | None = "pw") -> None:
    """Broker accounts NAME -> ROLE in the password file, all with ``password`` (or ``pw-NAME``
    when password is None), hashed cheaply by :func:`tests.helpers.accounts.write_accounts`."""
    from tests.helpers.accounts import write_accounts as write

    write(path, {name: (role, password or f"pw-{name}") for name, role in accounts.items()})


async def start_broker(tmp: Path, port: int | None = None, options: dict[str, Any] | None = None,
                       **extra: Any) -> EmbeddedBroker:
    """``extra``: config sections merged in; ``options``: EmbeddedBroker keyword arguments."""
    broker = EmbeddedBroker(broker_config(tmp, port or 0, **extra), InternalCredentials.generate(), **(options or {}))
    await broker.start()
    # Port 0 unless given: the kernel picks, nothing can take it between choosing and binding.
    broker.port = port or next(iter(broker.bound_ports().values()))  # type: ignore[attr-defined]
    return broker


# ---------------------------------------------------------------- raw client
def _rl(n: int) -> bytes:
    out = bytearray()
    while True:
        d, n = n % 128, n // 128
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.flags & 8)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 1)

    # PUBLISH fields
    @property
    def topic(self) -> str:
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2:2 + n].decode()

    @property
    def packet_id(self) -> int:
        if self.type == 3:
            (n,) = struct.unpack("!H", self.body[:2])
            return struct.unpack("!H", self.body[2 + n:4 + n])[0]
        return struct.unpack("!H", self.body[:2])[0]

    @property
    def payload(self) -> bytes:
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2 + n + (2 if self.qos else 0):]


CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP = 2, 3, 4, 5, 6, 7, 9, 11, 13


@dataclass
class RawClient:
    """A deliberately dumb MQTT 3.1.1 client: nothing is acknowledged unless asked."""

    port: int
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    _pid: int = 0
    inbox: list[Packet] = field(default_factory=list)

    async def open(self) -> "RawClient":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def connect(self, client_id: str, *, clean: bool = True, keepalive: int = 60,
                      username: str | None = None, password: str | None = None,
                      will: tuple[str, bytes, int, bool] | None = None) -> tuple[bool, int]:
        if self.writer is None:
            await self.open()
        flags = (0x02 if clean else 0)
        payload = _s(client_id)
        if will:
            topic, message, qos, retain = will
            flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
            payload += _s(topic) + _s(message)
        if username is not None:
            flags |= 0x80
            payload += _s(username)
        if password is not None:
            flags |= 0x40
            payload += _s(password)
        var = _s("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
        self.send(bytes([0x10]) + _rl(len(var) + len(payload)) + var + payload)
        pkt = await self.read(timeout=10)
        assert pkt is not None and pkt.type == CONNACK, pkt
        return bool(pkt.body[0] & 1), pkt.body[1]

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    def next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *,
                dup: bool = False, packet_id: int | None = None) -> int:
        pid = packet_id if packet_id is not None else (self.next_pid() if qos else 0)
        body = _s(topic) + (struct.pack("!H", pid) if qos else b"") + payload
        first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        self.send(bytes([first]) + _rl(len(body)) + body)
        return pid

    def ack(self, kind: int, packet_id: int) -> None:
        self.send(bytes([(kind << 4) | (2 if kind == PUBREL else 0), 2]) + struct.pack("!H", packet_id))

    async def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        pid = self.next_pid()
        body = struct.pack("!H", pid) + b"".join(_s(f) + bytes([q]) for f, q in filters)
        self.send(bytes([0x82]) + _rl(len(body)) + body)
        pkt = await self.expect(SUBACK)
        assert pkt.packet_id == pid  # [MQTT-3.8.4-2]
        return list(pkt.body[2:])

    async def unsubscribe(self, *filters: str) -> None:
        pid = self.next_pid()
        body = struct.pack("!H", pid) + b"".join(_s(f) for f in filters)
        self.send(bytes([0xA2]) + _rl(len(body)) + body)
        pkt = await self.expect(UNSUBACK)
        assert pkt.packet_id == pid

    def disconnect(self) -> None:
        self.send(b"\xe0\x00")
        assert self.writer is not None
        self.writer.close()

    def drop(self) -> None:
        """The network fails: no DISCONNECT, the socket just goes away."""
        assert self.writer is not None
        self.writer.transport.abort()

    async def read(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None on EOF / timeout."""
        assert self.reader is not None
        try:
            head = await asyncio.wait_for(self.reader.readexactly(1), timeout)
            mult, length = 1, 0
            while True:
                (b,) = await asyncio.wait_for(self.reader.readexactly(1), timeout)
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return None
        return Packet(head[0] >> 4, head[0] & 0x0F, body)

    async def expect(self, kind: int, timeout: float = 5.0) -> Packet:
        """Next packet of ``kind``; PUBLISHes seen meanwhile go to ``inbox``."""
        for i, pkt in enumerate(self.inbox):
            if pkt.type == kind:
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            pkt = await self.read(max(0.01, deadline - time.monotonic()))
            if pkt is None:
                raise AssertionError(f"no packet of type {kind} (got EOF/timeout); inbox={self.inbox}")
            if pkt.type == kind:
                return pkt
            self.inbox.append(pkt)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the broker has closed the connection."""
        deadline = time.monotonic() + timeout
        assert self.reader is not None
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                return False
            except ConnectionError:
                return True
            if not data:
                return True
        return False


# ---------------------------------------------------------------- paho in a thread
@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class Paho:
    """paho-mqtt with its network loop in a thread; collects messages for async tests."""

    def __init__(self, port: int, client_id: str = "", clean: bool = True, username: str | None = None,
                 password: str | None = None, transport: str = "tcp", tls: dict[str, Any] | None = None):
        self.port = port
        self.messages: list[Received] = []
        self.connack: int | None = None
        self.session_present: bool | None = None
        self.suback: list[int] | None = None
        self.disconnected = False
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                                  transport=transport)  # type: ignore[arg-type]
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(**tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnected = True

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = reason.value if hasattr(reason, "value") else int(reason)
        self.session_present = bool(getattr(flags, "session_present", False))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.suback = [r.value for r in reasons]

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, msg.payload, msg.qos, bool(msg.retain), bool(msg.dup)))

    async def connect(self, expect_ok: bool = True) -> "Paho":
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, 30)
        self.client.loop_start()
        await until(lambda: self.connack is not None or self.disconnected)
        if expect_ok:
            assert self.connack == 0, self.connack
        return self

    async def subscribe(self, topic: str, qos: int) -> list[int]:
        self.suback = None
        self.client.subscribe(topic, qos)
        await until(lambda: self.suback is not None)
        assert self.suback is not None
        return self.suback

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        await until(info.is_published)

    async def stop(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


async def mosquitto_pub(port: int, topic: str, message: bytes | None, qos: int = 0, retain: bool = False,
                        *extra: str) -> None:
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", str(qos)]
    if retain:
        args.append("-r")
    if message is None or message == b"":
        args.append("-n")
        stdin = None
    else:
        args.append("-s")
        stdin = message
    proc = await asyncio.create_subprocess_exec(*args, *extra, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 10)
    assert proc.returncode == 0, err.decode()


async def mosquitto_sub(port: int, topic: str, count: int, timeout: float = 3.0, *extra: str) -> list[str]:
    """``mosquitto_sub -v -C count -W timeout``: lines "topic payload" (may be fewer on timeout)."""
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-v", "-C", str(count),
        "-W", str(int(timeout)), *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout + 5)
    return out.decode().splitlines()
