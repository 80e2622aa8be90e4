"""The broker's listeners: TCP and TLS (asyncio streams), WebSocket and secure WebSocket
(the ``websockets`` package's server, through its public interface).

Each accepted connection is handed to the broker as a (reader, writer) pair of one
shape whatever the transport: an :class:`asyncio.StreamReader` and an object with
``write`` (never blocks), ``drain``, ``abort``, ``is_closing`` and ``close``. For a
websocket, binary frames are fed into the reader as a byte stream (MQTT packets may span
frames, §6) and writes are sent as binary frames in order.

A websocket frame is read whole by ``websockets`` before any byte of it reaches the MQTT
reader, so the packet-size check on the fixed header came too late: a 255 MiB frame was
buffered (twice) first. Frames are therefore capped at the largest packet the client may send
(its role's ``max_packet_size`` plus the 5-byte fixed header; before CONNECT,
``MAX_CONNECT_PACKET``): a larger frame is refused from its frame header, the connection is
closed with websocket code 1009 (message too big) and the limit counted like a too-large
packet. The per-connection cap is the one name of ``websockets`` used outside its public
interface (``ServerConnection.protocol.max_fragment_size``; pinned, checked at start).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.server import ServerProtocol

from gateway.broker.limits import MAX_CONNECT_PACKET
from gateway.config import ListenerSection

log = structlog.get_logger(__name__)

WS_READ_LIMIT = 2 ** 16
FIXED_HEADER_MAX = 5            # a type byte and at most 4 bytes of remaining length


class WebsocketsMismatch(RuntimeError):
    """The installed websockets lacks the per-connection frame cap the ws listeners need."""


def check_websockets() -> None:
    """The frame cap is set per connection on ``ServerConnection.protocol.max_fragment_size``:
    fail at start, naming the version, if an upgrade renamed it (pyproject.toml pins it)."""
    from importlib.metadata import version
    if not hasattr(ServerProtocol(), "max_fragment_size"):
        raise WebsocketsMismatch(f"websockets {version('websockets')} has no Protocol.max_fragment_size, which the "
                                 "broker's ws/wss listeners use to cap frames; install the version pinned in "
                                 "pyproject.toml")


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def limit_frames(self, max_packet: int) -> None: ...
    @property
    def frame_too_large(self) -> bool: ...


Accept = Callable[[asyncio.StreamReader, "Writer", ListenerSection, str], Awaitable[None]]


LINGER_BYTES = 256 * 1024      # what a closing TCP connection reads and drops before it is cut


class _Linger(asyncio.Protocol):
    """A half-closed TCP connection: the peer's late bytes are dropped, its FIN closes the
    socket, more than :data:`LINGER_BYTES` aborts it. Flow control and the final
    ``connection_lost`` still reach the stream's own protocol (a ``drain`` waiting there ends)."""

    def __init__(self, transport: asyncio.Transport, inner: asyncio.BaseProtocol):
        self._transport = transport
        self._inner = inner
        self._left = LINGER_BYTES

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:
            self._transport.abort()

    def eof_received(self) -> bool:
        return False   # the transport closes

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


class StreamWriter:
    """An :class:`asyncio.StreamWriter` with ``abort`` (drop the connection without flushing:
    a dead peer would never drain it)."""

    __slots__ = ("_w", "drain", "write")

    def __init__(self, writer: asyncio.StreamWriter):
        self._w = writer
        self.write = writer.write
        self.drain = writer.drain

    def abort(self) -> None:
        self._w.transport.abort()

    def is_closing(self) -> bool:
        return self._w.is_closing()

    def close(self) -> None:
        """Flush, then send FIN and keep reading (discarding) until the peer closes too, for at
        most :data:`LINGER_BYTES`; the caller aborts after its grace period anyway. A plain
        close with the peer's bytes still arriving makes the kernel answer them with a reset,
        and a reset makes the peer's kernel drop what it had not read yet: the DISCONNECT
        with its reason code (or a refusing CONNACK) never reached a client that had more
        packets on the way (RFC 2525 §2.17). TLS cannot half-close: closed as before."""
        transport = self._w.transport
        if transport.is_closing() or not transport.can_write_eof():
            self._w.close()
            return
        transport.set_protocol(_Linger(transport, transport.get_protocol()))
        transport.write_eof()
        transport.resume_reading()

    def peercert(self) -> Any:
        return self._w.get_extra_info("peercert")

    def limit_frames(self, max_packet: int) -> None:
        """TCP has no frames: the reader's fixed-header check is the only bound needed."""

    @property
    def frame_too_large(self) -> bool:
        return False


class WsWriter:
    """Writes to a websocket: ``write`` queues bytes, one task sends them as binary frames."""

    def __init__(self, ws: ServerConnection):
        self._ws = ws
        self._buffer: list[bytes] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        self.refused_frame = False   # set by the pump: websockets closed it with 1009 (frame over the cap)

    def limit_frames(self, max_packet: int) -> None:
        """Frames larger than one packet of ``max_packet`` bytes (remaining length) are refused
        from their frame header (see the module's docstring)."""
        self._ws.protocol.max_fragment_size = max_packet + FIXED_HEADER_MAX

    @property
    def frame_too_large(self) -> bool:
        """The connection ended because the client sent a frame over the cap (close code 1009)."""
        return self.refused_frame

    def write(self, data: bytes) -> None:
        if self._closed or not data:
            return
        self._buffer.append(data)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._buffer:
                data = b"".join(self._buffer)
                self._buffer.clear()
                await self._ws.send(data)
        except (ConnectionClosed, ConnectionError):
            self._closed = True
            self._buffer.clear()

    async def drain(self) -> None:
        sender = self._sender
        if sender is not None and not sender.done():
            await asyncio.shield(sender)
        if self._closed:
            raise ConnectionResetError("websocket closed")

    def abort(self) -> None:
        self._closed = True
        self._buffer.clear()
        transport = self._ws.transport
        if transport is not None:
            transport.abort()

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        transport = self._ws.transport
        if transport is not None:
            transport.close()


class WsReader(asyncio.StreamReader):
    """The byte stream of a websocket's binary frames, with the back-pressure a TCP reader has.

    A StreamReader fed by hand never pauses anything: while the connection was not read (a
    client over its publish rate), the pump kept taking frames from websockets and feeding
    them in, and the buffer grew with whatever the client sent. The pump now waits (:meth:`room`)
    while more than ``limit`` bytes are unread; websockets then stops reading the socket once
    its own queue is full, and TCP pushes back on the client, as for a TCP listener."""

    def __init__(self, limit: int = WS_READ_LIMIT):
        super().__init__(limit=limit)
        self.ws_unread = 0
        self._ws_cap = limit
        self._ws_room = asyncio.Event()
        self._ws_room.set()

    def feed_data(self, data: bytes) -> None:
        super().feed_data(data)
        self.ws_unread += len(data)
        if self.ws_unread > self._ws_cap:
            self._ws_room.clear()

    def feed_eof(self) -> None:
        super().feed_eof()
        self._ws_room.set()

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self._consumed(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await super().readexactly(n)
        self._consumed(n)
        return data

    def _consumed(self, n: int) -> None:
        self.ws_unread -= n
        if self.ws_unread <= self._ws_cap:
            self._ws_room.set()

    async def room(self) -> None:
        """Return once at most ``limit`` bytes are unread (or the stream ended)."""
        await self._ws_room.wait()


def tls_context(section: ListenerSection) -> ssl.SSLContext:
    """TLS 1.2+; client certificates required where the listener says so, verified against
    its ``cafile``; without a ``cafile`` none are asked for."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(section.certfile), str(section.keyfile))
    if section.cafile:
        ctx.load_verify_locations(cafile=str(section.cafile))
        ctx.verify_mode = ssl.CERT_REQUIRED if section.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Listener:
    """One configured listener, serving until :meth:`close`."""

    def __init__(self, section: ListenerSection, accept: Accept):
        self.section = section
        self._accept = accept
        self._server: asyncio.base_events.Server | WsServer | None = None
        self._ws_pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        section = self.section
        host, port = _split_bind(section.bind)
        ctx = tls_context(section) if section.secure else None
        if section.type in ("ws", "wss"):
            check_websockets()
            # Until CONNECT is accepted a frame may hold at most a CONNECT (WsWriter.limit_frames).
            self._server = await serve(self._serve_ws, host, port, ssl=ctx, subprotocols=["mqtt"],  # type: ignore[list-item]
                                       compression=None, max_size=(None, MAX_CONNECT_PACKET + FIXED_HEADER_MAX),
                                       ping_interval=None, select_subprotocol=_select_mqtt)
        else:
            self._server = await asyncio.start_server(self._serve_stream, host, port, ssl=ctx)

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                import socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        await self._accept(reader, StreamWriter(writer), self.section, remote)

    async def _serve_ws(self, ws: ServerConnection) -> None:
        reader = WsReader()
        peer = ws.remote_address
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        writer = WsWriter(ws)
        pump = asyncio.get_running_loop().create_task(_pump(ws, reader, writer))
        self._ws_pumps.add(pump)
        try:
            await self._accept(reader, writer, self.section, remote)
        finally:
            pump.cancel()
            self._ws_pumps.discard(pump)
            transport = ws.transport
            if transport is not None and not transport.is_closing():
                transport.abort()

    @property
    def port(self) -> int | None:
        """The port listened on (the kernel's pick for a ``bind`` with port 0); None before start."""
        sockets = list(self._server.sockets) if self._server is not None else []
        return sockets[0].getsockname()[1] if sockets else None

    def close(self) -> None:
        """Stop accepting; the broker then closes the connections (:meth:`wait_closed` after)."""
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        for pump in list(self._ws_pumps):
            pump.cancel()
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except (TimeoutError, Exception):
            pass


def _select_mqtt(connection: ServerConnection, subprotocols: list[str]) -> Any:
    """MQTT over websockets uses the "mqtt" subprotocol [MQTT-6.0.0-3]; a client that offers
    none is served too (as Mosquitto does)."""
    return "mqtt" if "mqtt" in subprotocols else None


async def _pump(ws: ServerConnection, reader: WsReader, writer: WsWriter) -> None:
    """Binary frames → the reader's byte stream [MQTT-6.0.0-1]; a text frame closes [MQTT-6.0.0-1].
    The next frame is taken only once the reader has room (see :class:`WsReader`)."""
    try:
        async for frame in ws:
            if isinstance(frame, str):
                break
            reader.feed_data(frame)
            await reader.room()
    except ConnectionClosed as exc:
        # websockets refused a frame over the cap from its header and closed with 1009.
        writer.refused_frame = exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG
    except ConnectionError:
        pass
    except asyncio.CancelledError:
        raise
    finally:
        reader.feed_eof()
