"""A TCP proxy between the gateway and the cloud broker that reads MQTT 3.1.1 frames and
injects WAN faults: delay (each direction), a lost PUBACK, a connection cut after N
publishes, and a broker that drops the client on a denied publish (AWS IoT, HiveMQ).

It runs its own event loop in a thread (``start``/``stop``), so it serves in-process
tests, tests of the real daemon and the bench alike. It only sees plaintext MQTT, so the
cloud behind it is Mosquitto's plain listener (:meth:`Cloud.plain_url`).

What it counts (``stats``) is what an operator's packet capture would show: connections,
PUBLISH frames from the gateway, PUBACKs back, and the most publishes the gateway had
unacknowledged at once (the window it really used).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["forward", "drop_puback", "kick", "cut"]

PUBLISH, PUBACK = 3, 4


@dataclass
class Publish:
    """One PUBLISH from the gateway, as the proxy saw it."""

    connection: int  # 1 for the first connection through the proxy
    index: int  # 1 for the first PUBLISH on this connection
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None


# A policy decides per PUBLISH from the gateway:
#  forward      pass it on;
#  drop_puback  pass it on, but never pass its PUBACK back (a PUBACK lost in the WAN);
#  kick         like a broker denying it: do not pass it on, let the PUBACKs of the
#               publishes before it come back, then close the connection;
#  cut          a network failure: close both sides at once (in-flight PUBACKs are lost).
Policy = Callable[[Publish], Action]


def forward_all(_: Publish) -> Action:
    return "forward"


@dataclass
class ProxyStats:
    connections: int = 0
    publishes: int = 0  # PUBLISH frames from the gateway (forwarded or not)
    pubacks: int = 0  # PUBACKs passed back to the gateway
    dropped_pubacks: int = 0
    kicks: int = 0
    cuts: int = 0
    max_unacked: int = 0  # the most QoS 1 publishes forwarded and not yet answered, at once
    connected_at: list[float] = field(default_factory=list)


class _Frames:
    """Incremental MQTT frame splitter (fixed header + remaining length)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out: list[bytes] = []
        while True:
            if len(self.buf) < 2:
                return out
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                byte = self.buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
                if i > 4:
                    raise ValueError("malformed remaining length")
            if len(self.buf) < i + length:
                return out
            out.append(bytes(self.buf[:i + length]))
            del self.buf[:i + length]


def _parse_publish(frame: bytes, connection: int, index: int) -> Publish:
    qos = (frame[0] >> 1) & 3
    i = 1
    while frame[i] & 0x80:
        i += 1
    i += 1
    tlen = int.from_bytes(frame[i:i + 2], "big")
    topic = frame[i + 2:i + 2 + tlen].decode()
    j = i + 2 + tlen
    pid = None
    if qos:
        pid = int.from_bytes(frame[j:j + 2], "big")
        j += 2
    return Publish(connection, index, topic, frame[j:], qos, pid)


def _puback_id(frame: bytes) -> int:
    return int.from_bytes(frame[2:4], "big")


class MqttFaultProxy:
    """``MqttFaultProxy(target_port, policy=..., delay_s=...)``; ``.port`` once started."""

    def __init__(self, target_port: int, *, policy: Policy = forward_all, delay_s: float = 0.0,
                 parse: bool = True, host: str = "127.0.0.1"):
        self.target = (host, target_port)
        self.policy = policy
        self.delay_s = delay_s
        self.parse = parse
        self.stats = ProxyStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._conns: set[_Conn] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "MqttFaultProxy":
        self._thread = threading.Thread(target=self._run, name="mqtt-fault-proxy", daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "proxy did not start"
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self._serve())
        loop.run_forever()
        loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()

    def stop(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.close()
            me = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not me]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "MqttFaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cut_all(self) -> None:
        """Close every connection now (a network failure on demand)."""
        assert self._loop is not None

        def cut() -> None:
            for conn in list(self._conns):
                self.stats.cuts += 1
                conn.close()

        self._loop.call_soon_threadsafe(cut)

    # ------------------------------------------------------------------ connections
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.stats.connections += 1
        self.stats.connected_at.append(time.monotonic())
        conn = _Conn(self, self.stats.connections, reader, writer, up_reader, up_writer)
        self._conns.add(conn)
        try:
            await conn.run()
        except asyncio.CancelledError:
            conn.close()  # the proxy stops (asyncio's stream callback must not see a cancelled task)
        finally:
            self._conns.discard(conn)


class _Conn:
    def __init__(self, proxy: MqttFaultProxy, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter):
        self.proxy = proxy
        self.number = number
        self.reader, self.writer = reader, writer
        self.up_reader, self.up_writer = up_reader, up_writer
        self.publishes = 0
        self.unacked: set[int] = set()
        self.drop_ids: set[int] = set()
        self.closed = asyncio.Event()
        self.kicking = False

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for w in (self.writer, self.up_writer):
            transport = w.transport
            transport.abort()

    async def run(self) -> None:
        to_server: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        to_client: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._pump(self.reader, to_server, self._from_client, from_client=True)),
            asyncio.create_task(self._pump(self.up_reader, to_client, self._from_server, from_client=False)),
        ]
        writers = [asyncio.create_task(self._write(to_server, self.up_writer)),
                   asyncio.create_task(self._write(to_client, self.writer))]
        tasks += writers
        # Done when both directions have delivered what they carried (as TCP would: bytes a
        # dead client sent before it died still reach the broker), or at a cut/kick/stop.
        closed = asyncio.create_task(self.closed.wait())
        await asyncio.wait([asyncio.gather(*writers), closed], return_when=asyncio.FIRST_COMPLETED)
        self.close()
        tasks.append(closed)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None],
                    inspect: Callable[[bytes], bytes | None], *, from_client: bool) -> None:
        frames = _Frames()
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if not self.proxy.parse:
                    queue.put_nowait((loop.time() + self.proxy.delay_s, data))
                    continue
                out = bytearray()
                stop_reading = False
                for frame in frames.feed(data):
                    passed = inspect(frame)
                    if passed is None:
                        if self.closed.is_set() or (from_client and self.kicking):
                            stop_reading = True
                            break
                        continue
                    out += passed
                if out:
                    queue.put_nowait((loop.time() + self.proxy.delay_s, bytes(out)))
                if stop_reading:
                    break
        except (ConnectionError, OSError):
            pass
        if from_client and self.kicking:
            await self._finish_kick()
        else:
            queue.put_nowait(None)  # this side ended: the writer delivers what is queued, then closes

    async def _finish_kick(self) -> None:
        # Like a broker: what came before the denied publish is processed and answered.
        deadline = time.monotonic() + 2 + 2 * self.proxy.delay_s
        while self.unacked and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.proxy.delay_s + 0.02)
        self.close()

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes] | None], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
            await writer.drain()
            writer.close()  # the other side ended and all it sent is delivered: end this one too
        except (ConnectionError, OSError):
            pass  # the receiver is gone; what it did not get is lost, as on a real network

    # ------------------------------------------------------------------ inspection
    def _from_client(self, frame: bytes) -> bytes | None:
        if self.kicking or self.closed.is_set():
            return None
        if frame[0] >> 4 != PUBLISH:
            return frame
        self.publishes += 1
        self.proxy.stats.publishes += 1
        publish = _parse_publish(frame, self.number, self.publishes)
        action = self.proxy.policy(publish)
        if action == "cut":
            self.proxy.stats.cuts += 1
            self.close()
            return None
        if action == "kick":
            self.proxy.stats.kicks += 1
            self.kicking = True
            return None
        if publish.packet_id is not None:
            self.unacked.add(publish.packet_id)
            self.proxy.stats.max_unacked = max(self.proxy.stats.max_unacked, len(self.unacked))
            if action == "drop_puback":
                self.drop_ids.add(publish.packet_id)
        return frame

    def _from_server(self, frame: bytes) -> bytes | None:
        if frame[0] >> 4 != PUBACK:
            return frame
        pid = _puback_id(frame)
        self.unacked.discard(pid)
        if pid in self.drop_ids:
            self.drop_ids.discard(pid)
            self.proxy.stats.dropped_pubacks += 1
            return None
        self.proxy.stats.pubacks += 1
        return frame
