"""One client connection of the embedded broker, from accept to close.

The reader reads what the socket has (up to 64 KiB at a time) and splits it into
packets in memory: one await per read, not per packet or per field, and a packet that
spans reads is completed with one exact read of what it still lacks. Each packet goes to
the module that owns its flow (``handle_*``); PUBLISH and the acknowledgements are
handled synchronously, in arrival order, and need a task only for an acknowledgement
that must wait for a commit.

Two time limits, one lazy timer per connection (a timer per packet cost a task each):
- keepalive: no packet begun for 1.5 × the client's Keep Alive → closed as a network
  failure, will published [MQTT-3.1.2-24];
- a packet begun and not complete within the same time (or ``packet_timeout_s`` when
  the client asked for no keepalive) → the same. MQTT lets a client stay idle between
  packets as long as its keepalive allows, not stop in the middle of one.

A protocol violation closes the connection [MQTT-4.8.0-1]; a 5.0 client is first told
why with a DISCONNECT carrying the reason code [MQTT-4.13.1-1].
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog

from gateway.broker.wire import handle_connect, handle_disconnect, handle_publish, handle_subscribe
from gateway.broker.wire.codec import (
    AUTH, CONNECT, DISCONNECT, PINGREQ, PINGRESP_PACKET, PUBACK, PUBCOMP, PUBLISH,
    PUBREL, SUBSCRIBE, UNSUBSCRIBE, V5, V311, Malformed, Reason, TooLarge, send_disconnect,
)

if TYPE_CHECKING:
    from gateway.broker.clients import ClientState
    from gateway.broker.embedded import GatewayBroker
    from gateway.broker.wire.listeners import Writer
    from gateway.config import ListenerSection

log = structlog.get_logger(__name__)

READ_SIZE = 65536
CLOSE_GRACE_S = 1.0          # a DISCONNECT we send gets this long to be written before the socket is cut
# The Receive Maximum the broker gives 5.0 clients (QoS 1/2 PUBLISHes not yet acknowledged;
# more closes the connection with 0x93 [MQTT-3.3.4-7]), and its Topic Alias Maximum.
SERVER_RECEIVE_MAXIMUM = 1024
SERVER_TOPIC_ALIAS_MAXIMUM = 64

# Packet types whose fixed-header flags are 0010; every other (but PUBLISH) has 0000 [MQTT-2.2.2-2].
_FLAGS_0010 = frozenset({PUBREL, SUBSCRIBE, UNSUBSCRIBE})
_YIELD = -1
# Packets handled from one connection before its reader lets the other connections run. A
# client that keeps its socket full (a flood of denied publishes) otherwise held the event loop
# for a whole read of ~1,600 small packets at every turn, and each of the round trips of every
# other client waited behind one such turn: a legitimate QoS 1 publisher fell to 0.08x of its
# rate (bench/hostile_bench.py).
FAIR_SHARE = 64


class Connection:
    """One accepted network connection; ``client`` is set once its CONNECT is accepted."""

    def __init__(self, gw: GatewayBroker, reader: asyncio.StreamReader, writer: Writer,
                 section: ListenerSection, remote: str):
        self.gw = gw
        self.reader = reader
        self.writer = writer
        self.section = section
        self.remote = remote
        self.version = V311
        self.client: ClientState | None = None
        self.connect: handle_connect.ConnectPacket | None = None
        self.no_will = False         # closed for the broker's own trouble: the client did nothing wrong
        self.closed = False
        self.clean_disconnect = False  # a DISCONNECT that suppresses the will was received
        self.problem_info = True       # 5.0 Request Problem Information: Reason Strings on acks [MQTT-3.1.2-29]
        # Limits of the peer (5.0): its Receive Maximum and Maximum Packet Size.
        self.send_quota = 65535
        self.max_packet_out: int | None = None
        self.topic_alias_max_out = 0           # the client's Topic Alias Maximum (0: no aliases to it)
        self.aliases_out: dict[str, int] = {}  # topic → alias set on this connection
        # Ours: checked on every packet the client sends.
        self.max_packet_in: int | None = None
        self.receive_maximum = SERVER_RECEIVE_MAXIMUM
        self.topic_alias_maximum = SERVER_TOPIC_ALIAS_MAXIMUM
        self.unacked_in = 0          # QoS 1/2 PUBLISHes received and not yet fully acknowledged
        self.aliases: dict[int, str] = {}
        self.keepalive: float | None = None     # 1.5 × the client's, seconds
        self.packet_timeout: float = gw.packet_timeout_s
        self.stalled = False
        self._mark = 0.0             # loop time the idle wait or the partial packet began
        self._partial = False
        self._timer: asyncio.TimerHandle | None = None
        self._acks: list[bytes] = []
        self._ack_barrier: asyncio.Future[None] | None = None
        self._barrier_acks: list[bytes] = []
        self._tasks: deque[asyncio.Task[Any]] = deque()
        self._pause = 0.0            # seconds the reader waits: the client is over its publish rate

    # ================================================================== life cycle
    async def serve(self) -> None:
        """CONNECT, then packets until the connection ends, then the broker's clean-up."""
        gw = self.gw
        gw.connecting.add(self)
        try:
            try:
                body = await asyncio.wait_for(self._read_connect(), gw.connect_timeout_s)
            except (TimeoutError, Malformed, asyncio.IncompleteReadError, ConnectionError) as exc:
                if self.writer.frame_too_large:
                    self._frame_too_large()
                    self.close_now()
                    return
                self._refuse_early(exc)
                return
            accepted = await handle_connect.handle(self, body)
        finally:
            gw.connecting.discard(self)
        if not accepted:
            self.close_now()
            return
        try:
            await self._reader_loop()
        finally:
            await gw.connection_closed(self, abnormal=not self.clean_disconnect)

    async def _read_connect(self) -> bytes:
        reader = self.reader
        first = await reader.readexactly(1)
        if first != b"\x10":
            raise Malformed(f"first packet is not CONNECT (byte {first!r})")  # [MQTT-3.1.0-1]
        length, shift = 0, 0
        for _ in range(4):
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        else:
            raise Malformed("remaining length over 4 bytes")
        if self.max_packet_in is not None and length > self.max_packet_in:
            raise TooLarge(length, self.max_packet_in)   # the sender is not known yet: before a body byte
        return await reader.readexactly(length)

    def _refuse_early(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.IncompleteReadError) and not exc.partial:
            self.close_now()  # closed before a byte: port probes
            return
        if isinstance(exc, TooLarge):
            # Counted and logged (once a minute) as a limit hit: a client that reconnects in a
            # loop must not write a line per connection.
            self.gw.packet_too_large(None, exc.length)
            self.close_now()
            return
        if not isinstance(exc, ConnectionError):
            self.gw.metrics.protocol_errors += 1
        log.info("connection refused before CONNECT completed", remote=self.remote,
                 error=str(exc) or type(exc).__name__)
        self.close_now()

    def limit_packets_in(self, max_packet: int) -> None:
        """The largest packet (remaining length) this client may send from now on; a websocket
        frame larger than one such packet is refused before it is buffered."""
        self.max_packet_in = max_packet
        self.writer.limit_frames(max_packet)

    def _frame_too_large(self) -> None:
        """The websocket listener refused a frame over the cap (it closed the connection, code
        1009): counted and logged as the packet it would have been."""
        if self.writer.frame_too_large:
            self.gw.packet_too_large(self.client, None, limit=self.max_packet_in)

    def set_keepalive(self, seconds: int) -> None:
        if seconds > 0:
            self.keepalive = seconds * 1.5
            self.packet_timeout = self.keepalive

    # ================================================================== reading
    async def _reader_loop(self) -> None:
        gw, client = self.gw, self.client
        assert client is not None
        loop = asyncio.get_running_loop()
        reader = self.reader
        tasks = self._tasks
        buf = b""
        try:
            while not self.closed:
                while tasks and tasks[0].done():
                    tasks.popleft()
                if not buf:
                    self._partial = False
                    self._mark = loop.time()
                    if self._timer is None and self.keepalive is not None:
                        self._timer = loop.call_at(self._mark + self.keepalive, self._check)
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                buf = buf + data if buf else data
                pos = 0
                while True:
                    pos, need = self._parse(buf, pos)
                    if pos < 0 or self.closed:
                        return   # DISCONNECT, or the connection was closed by what a packet did
                    if need == _YIELD:
                        if self._pause:
                            # Over its publish rate: this connection is not read until it is within it.
                            pause, self._pause = self._pause, 0.0
                            await gw.rate_pause(client, pause)
                            continue
                        # A subscriber's queue is half full: let its sender move messages into
                        # flight before the next one is routed (a burst read in one piece would
                        # otherwise overflow max_queued_messages before the sender ran once).
                        # Or this connection had its FAIR_SHARE of the loop: the others' turn.
                        gw.backlogged = False
                        await asyncio.sleep(0)
                        continue
                    if pos:
                        buf = buf[pos:]
                        pos = 0
                    if not buf:
                        break
                    if not self._partial:
                        self._partial = True
                        self._mark = loop.time()
                        if self._timer is None:
                            self._timer = loop.call_at(self._mark + self.packet_timeout, self._check)
                    if not need:
                        break   # the fixed header itself is incomplete: read more
                    # The rest of one packet in one exact read (a large PUBLISH is not re-joined
                    # per 64 KiB chunk), then parse again without waiting for more bytes.
                    buf += await reader.readexactly(need)
                if gw.backlogged:
                    gw.backlogged = False
                    await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the connection ended (or was aborted: keepalive, stall, shutdown)
        except Malformed as exc:
            self.protocol_error(exc)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # one client's bytes must never take the broker down
            log.warning("reader failed; closing connection", client_id=client.client_id, error=repr(exc))
            self.abort()
        finally:
            self._frame_too_large()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while tasks:
                tasks.popleft().cancel()

    def _parse(self, buf: bytes, pos: int) -> tuple[int, int]:
        """Dispatch the whole packets of ``buf`` from ``pos``: (where parsing stopped, bytes the
        next packet still lacks (0: its fixed header is incomplete too; _YIELD: a subscriber
        is backlogged, yield and go on)); (-1, 0) once a DISCONNECT was handled."""
        n = len(buf)
        max_in = self.max_packet_in
        gw = self.gw
        share = FAIR_SHARE
        while pos < n:
            # fixed header: type/flags byte, 1-4 bytes of remaining length (§2.1)
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= n:
                    return pos, 0
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise Malformed("remaining length over 4 bytes")
            if max_in is not None and length > max_in:
                raise TooLarge(length, max_in)   # closed before a byte of the body is read
            end = i + length
            if end > n:
                return pos, end - n
            first = buf[pos]
            if self._dispatch(first >> 4, first & 0x0F, buf[i:end]):
                return -1, 0
            pos = end
            if self.closed:
                return -1, 0
            rate = self.client.rate if first >> 4 == PUBLISH and self.client is not None else None
            if rate is not None:
                pause = rate.take(length)
                if pause > 0:
                    self._pause = pause
                    return pos, _YIELD
            share -= 1
            if (gw.backlogged or not share) and pos < n:
                return pos, _YIELD
        return pos, 0

    def _dispatch(self, kind: int, flags: int, body: bytes) -> bool:
        """One packet to the module owning its flow; True when it was a DISCONNECT."""
        client = self.client
        assert client is not None
        if kind == PUBLISH:
            task = handle_publish.on_publish(self, client, flags, body)
            if task is not None:
                self._tasks.append(task)
            return False
        if kind in _FLAGS_0010:
            if flags != 0b0010:
                raise Malformed(f"packet type {kind} with flags {flags:04b}")
        elif flags:
            raise Malformed(f"packet type {kind} with flags {flags:04b}")
        if PUBACK <= kind <= PUBCOMP:
            task = handle_publish.on_ack(self, client, kind, body)
        elif kind == SUBSCRIBE:
            task = handle_subscribe.on_subscribe(self, client, body)
        elif kind == UNSUBSCRIBE:
            task = handle_subscribe.on_unsubscribe(self, client, body)
        elif kind == PINGREQ:
            if body:
                raise Malformed("PINGREQ with a body")
            self.writer.write(PINGRESP_PACKET)
            return False
        elif kind == DISCONNECT:
            handle_disconnect.on_disconnect(self, client, body)
            return True
        elif kind == CONNECT:
            raise Malformed("a second CONNECT", Reason.PROTOCOL_ERROR)  # [MQTT-3.1.0-2]
        elif kind == AUTH and self.version == V5:
            # No Authentication Method was agreed on in CONNECT: AUTH is a protocol error [MQTT-4.12.0-1].
            raise Malformed("AUTH without enhanced authentication", Reason.PROTOCOL_ERROR)
        else:
            raise Malformed(f"packet type {kind} is not sent by clients", Reason.PROTOCOL_ERROR)
        if task is not None:
            self._tasks.append(task)
        return False

    # ================================================================== timers
    def _check(self) -> None:
        """The one timer: keepalive while idle, the packet time limit inside a packet."""
        self._timer = None
        if self.closed:
            return
        limit = self.packet_timeout if self._partial else self.keepalive
        if limit is None:
            return  # idle with keepalive 0: the next packet arms it again
        loop = asyncio.get_running_loop()
        if loop.time() - self._mark >= limit:
            self._timed_out()
            return
        self._timer = loop.call_at(self._mark + limit, self._check)

    def _timed_out(self) -> None:
        client_id = self.client.client_id if self.client else None
        if self._partial:
            self.stalled = True
            log.info("client stalled in the middle of a packet; disconnecting", client_id=client_id,
                     timeout_s=self.packet_timeout)
            self.gw.metrics.packet_timeouts += 1
        else:
            log.info("client silent for 1.5 x keepalive; disconnecting", client_id=client_id)
            self.gw.metrics.keepalive_timeouts += 1
        if self.version == V5:
            self.writer.write(send_disconnect(Reason.KEEP_ALIVE_TIMEOUT))
        self.abort()

    # ================================================================== writing
    async def send_bytes(self, data: bytes) -> None:
        """Write already-encoded packets and wait until the transport took them."""
        if not data or self.closed:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except Exception as exc:  # ConnectionResetError, BrokenPipeError, a closed websocket
            log.debug("write failed; connection closed", client_id=self.client.client_id if self.client else None,
                      error=repr(exc))
            self.abort()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)

    def write_acks(self, acks: list[bytes]) -> None:
        """Acknowledgements in one write; each PUBACK ends a QoS 1 exchange (Receive Maximum)."""
        if self.closed:
            return
        self.writer.write(b"".join(acks))

    def queue_ack(self, ack: bytes) -> None:
        """An acknowledgement that needs no commit: written with the others of this read."""
        self._acks.append(ack)
        if len(self._acks) == 1:
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            self.write_acks(acks)

    def ack_after_commit(self, shared: asyncio.Future[None], ack: bytes) -> None:
        """Acknowledge once ``shared`` (the commit carrying what the ack depends on) is done;
        every ack waiting for the same commit goes out in one write, in arrival order."""
        if shared is not self._ack_barrier:
            self._ack_barrier = shared
            self._barrier_acks = []
            shared.add_done_callback(functools.partial(self._acks_committed, self._barrier_acks))
        self._barrier_acks.append(ack)

    def _acks_committed(self, acks: list[bytes], barrier: asyncio.Future[None]) -> None:
        if barrier is self._ack_barrier:
            self._ack_barrier = None
        failed = barrier.cancelled() or barrier.exception() is not None
        if self.client is None:
            return  # the connection ended: the client resends what it has no acknowledgement for
        if failed:
            self.close_unstored()
            return
        self.write_acks(acks)

    # ================================================================== closing
    def abort(self) -> None:
        """Close the connection as a network failure (the will is published)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.writer.abort()
        except Exception:  # already gone
            pass
        self.reader.feed_eof()

    def close_now(self) -> None:
        """Close after what was written is flushed (a CONNACK refusal, a DISCONNECT), or
        abort after :data:`CLOSE_GRACE_S` if the peer does not read."""
        self.closed = True
        try:
            self.writer.close()
        except Exception:
            pass
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._abort_quietly)
        self.reader.feed_eof()

    def _abort_quietly(self) -> None:
        try:
            self.writer.abort()
        except Exception:
            pass

    def disconnect(self, reason: Reason) -> None:
        """The broker ends the connection: a 5.0 client is told why first [MQTT-3.14.0-1]."""
        if self.version == V5 and not self.closed:
            self.writer.write(send_disconnect(reason))
        self.close_now()

    def protocol_error(self, exc: Malformed) -> None:
        self.gw.violated(self)
        if isinstance(exc, TooLarge):
            # Logged once a minute per client as a limit hit (limits.LimitRecorder), not once per
            # connection: a client disconnected for it that reconnects in a loop wrote a line each time.
            self.gw.packet_too_large(self.client, exc.length)
        else:
            self.gw.metrics.protocol_errors += 1
            log.info("malformed packet; closing connection", client_id=self.client.client_id if self.client else None,
                     reason=str(exc), reason_code=f"0x{int(exc.reason):02x}")
        if self.version == V5 and not self.closed:
            self.writer.write(send_disconnect(exc.reason))
            self.close_now()
        else:
            self.abort()

    def close_unstored(self) -> None:
        """The broker could not store what this client's next acknowledgement depends on:
        close without that acknowledgement so the client resends after reconnecting. Its
        will is not published (it did not fail; the broker's disk did)."""
        self.no_will = True
        self.gw.metrics.not_acknowledged += 1
        if self.version == V5 and not self.closed:
            self.writer.write(send_disconnect(Reason.UNSPECIFIED_ERROR))
        self.abort()
