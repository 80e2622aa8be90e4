"""The gateway's own MQTT client: one aiomqtt connection, topic routing, reconnects.

This is the "one way through": the core publishes and subscribes through this client
in embedded and external mode alike. Incoming QoS 1/2 messages are acknowledged only
after their handler returned, so a job is in SQLite before the broker forgets it.

It speaks MQTT 5.0 or 3.1.1 (``ConnectionSettings.protocol``): "auto" tries 5.0 first and
falls back to 3.1.1 when the broker refuses 5.0 (and stays there until restarted). A 5.0
persistent session asks for a Session Expiry Interval that never ends, as CleanSession=0 does
in 3.1.1: otherwise the broker would drop our session, and its queue, at every disconnect.

A handler that could not store its message (disk full, database read-only or locked:
any :func:`gateway.storage.is_storage_error`) gets no PUBACK: the client stops taking
messages, acknowledges none after it (PUBACKs go out in arrival order), and closes the
connection, so the broker keeps the message in our persistent session and redelivers
it (DUP=1) when we are back. Reconnects after such a failure are paced (exponential,
and a write probe must succeed first), the failure is logged once per episode, and
nothing else stops. Bad input is the handler's business: it answers and returns.

Any other failure of a handler never holds the link: the message is acknowledged and set
aside (:mod:`gateway.setaside`: counted, logged once, the last few kept for ``status``),
and the messages after it flow.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import mqtt_compat
from gateway.mqtt_errors import NotConnected as NotConnected  # part of the client's interface (re-exported)
from gateway.mqtt_url import MqttUrl
from gateway.setaside import SetAside
from gateway.storage import FailureEpisode, is_storage_error
from gateway.topics import FilterTree

log = structlog.get_logger(__name__)

Handler = Callable[[aiomqtt.Message], Awaitable[None]]
OnConnect = Callable[["GatewayClient"], Awaitable[None]]
Probe = Callable[[], Awaitable[None]]

PROTOCOLS = ("auto", "5", "3.1.1")
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
# CONNACK codes of a broker that does not speak 5.0: 3.1.1's 0x01 or 5.0's 0x84.
_UNSUPPORTED_PROTOCOL = (1, 0x84)


@dataclass
class Route:
    topic_filter: str
    handler: Handler
    qos: int = 1


@dataclass
class ConnectionSettings:
    url: str
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    clean_session: bool = False
    keepalive: int = 30
    will_topic: str | None = None
    will_payload: bytes | None = None
    will_retain: bool = True
    max_inflight: int = 100
    protocol: str = "3.1.1"   # "5", "3.1.1" or "auto" (5.0 when the broker offers it)

    def tls_context(self) -> ssl.SSLContext | None:
        if not MqttUrl(self.url).tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file or None)
        return ctx


@dataclass
class _State:
    client: aiomqtt.Client | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)


class GatewayClient:
    """Keeps one connection up (jittered exponential reconnect) and routes messages."""

    def __init__(self, settings: ConnectionSettings, *, name: str = "broker",
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, max_concurrent_handlers: int = 1024,
                 storage_probe: Probe | None = None, hold_initial: float = 0.5, hold_max: float = 10.0):
        self.settings = settings
        self.name = name
        self._routes: list[Route] = []
        self._index = _RouteIndex()
        self._on_connect: list[OnConnect] = []
        self._state = _State()
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.connect_failures = 0
        self.last_error: str | None = None
        self._slots = asyncio.Semaphore(max_concurrent_handlers)
        self._probe = storage_probe
        self._storage = FailureEpisode(log, f"{name}: storing incoming messages", hold_initial, hold_max)
        self._held_last = False
        # From a held message until the next connection: we left the broker ourselves.
        self.left_on_purpose = False
        self.held = 0  # messages left unacknowledged because they could not be stored
        self.backoff_s = 0.0  # the wait before the next connect attempt (0 while connected)
        self._attempted = asyncio.Event()  # the first connect attempt has succeeded or failed
        self.set_aside = SetAside(log, name)  # handled with a failure that is not storage
        if settings.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {settings.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        # The version the next connect uses; "auto" starts with 5.0.
        self.protocol_version = aiomqtt.ProtocolVersion.V311 if settings.protocol == "3.1.1" else \
            aiomqtt.ProtocolVersion.V5

    # ----------------------------------------------------------------- set-up
    def route(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self._index.add(topic_filter, len(self._routes))
        self._routes.append(Route(topic_filter, handler, qos))

    def on_connect(self, callback: OnConnect) -> None:
        self._on_connect.append(callback)

    @property
    def connected(self) -> bool:
        return self._state.connected.is_set()

    @property
    def storage_failing(self) -> bool:
        return self._storage.failing

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._state.connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def wait_first_attempt(self, timeout: float | None = None) -> bool:
        """Wait until the first connect attempt has an outcome (not for the retries after a
        failure); return whether the client is connected."""
        try:
            await asyncio.wait_for(self._attempted.wait(), timeout)
        except TimeoutError:
            pass
        return self.connected

    # ----------------------------------------------------------------- publish
    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      timeout: float = 10.0, *, expiry_s: int | None = None,
                      user_properties: list[tuple[str, str]] | None = None) -> None:
        """Publish; ``expiry_s`` (Message Expiry Interval) and ``user_properties`` go with it
        when the connection speaks 5.0 and are left out over 3.1.1, which has no place for them."""
        client = self._state.client
        if client is None or not self.connected:
            raise NotConnected(f"{self.name}: not connected")
        props = None
        if self.protocol_version == aiomqtt.ProtocolVersion.V5 and (expiry_s is not None or user_properties):
            props = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
            if user_properties:
                props.UserProperty = user_properties
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, properties=props, timeout=timeout)
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"{self.name}: publish failed: {exc}") from exc

    # ----------------------------------------------------------------- run
    def _make_client(self) -> aiomqtt.Client:
        """A client for the next connect, at :attr:`protocol_version` (subclasses extend it)."""
        s = self.settings
        version = self.protocol_version
        url = MqttUrl(s.url)
        will = None
        if s.will_topic is not None:
            will = aiomqtt.Will(s.will_topic, s.will_payload, qos=1, retain=s.will_retain)
        if version == aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.CONNECT)
            if not s.clean_session:
                props.SessionExpiryInterval = SESSION_NEVER_EXPIRES
            session: dict[str, Any] = {"clean_start": s.clean_session, "properties": props}
        else:
            session = {"clean_session": s.clean_session}
        client = aiomqtt.Client(
            url.host, url.port,
            username=s.username or None, password=s.password or None,
            identifier=s.client_id, protocol=version, **session,
            transport=url.transport, tls_context=s.tls_context(), keepalive=s.keepalive,
            will=will, max_inflight_messages=s.max_inflight, timeout=10,
        )
        mqtt_compat.check(client)   # the private names used below, once per process
        # Ack incoming QoS 1/2 only once a handler has stored the message (see module doc).
        client._client.manual_ack_set(True)  # noqa: SLF001 - aiomqtt 2.x has no public switch
        _register_writes_only_for_open_sockets(client)
        _read_in_chunks(client)
        return client

    async def connect_once(self) -> aiomqtt.Client:
        """Connect and subscribe; raise aiomqtt.MqttError on failure."""
        client = self._make_client()
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            if not (self.settings.protocol == "auto" and self.protocol_version == aiomqtt.ProtocolVersion.V5
                    and getattr(exc, "rc", None) in _UNSUPPORTED_PROTOCOL):
                raise
            log.info("broker does not speak MQTT 5.0; using 3.1.1", link=self.name, url=self.settings.url)
            self.protocol_version = aiomqtt.ProtocolVersion.V311
            client = self._make_client()
            await client.__aenter__()
        try:
            for route in self._routes:
                await client.subscribe(route.topic_filter, qos=route.qos)
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        return client

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set: connect, run the on-connect callbacks,
        consume; after a failed connect wait a jittered, doubling backoff; after a session
        that ended because a message could not be stored, wait for the database instead.

        What a subclass may change is in three hooks: how a failed connect is logged
        (:meth:`_connect_failed`), what a new connection resets (:meth:`_connected`), and
        what follows a session that ended by itself (:meth:`_session_ended`)."""
        delay = self._backoff_initial
        while not stop.is_set():
            if self._held_last:
                await self._pause_after_hold(stop)
                if stop.is_set():
                    break
            try:
                client = await self.connect_once()
            except aiomqtt.MqttError as exc:
                self.connect_failures += 1
                message = str(exc)
                self._connect_failed(message)
                self.last_error = message
                self._attempted.set()
                delay = await self._wait(stop, delay)
                continue
            self.last_error = None
            self.left_on_purpose = False
            delay = self._connected(delay)
            self._state.client = client
            self._state.connected.set()
            self._attempted.set()
            # While stored messages keep failing we reconnect every few seconds; say it once.
            (log.debug if self._storage.failing else log.info)("mqtt connected", link=self.name,
                                                               url=self.settings.url)
            error: str | None = None
            held = False
            try:
                for callback in self._on_connect:
                    await callback(self)
                held = await self._consume(client, stop)
                self.left_on_purpose = held
            except (aiomqtt.MqttError, NotConnected) as exc:
                # NotConnected: the connection dropped while an on-connect callback published.
                error = str(exc)
            finally:
                self._state.connected.clear()
                self._state.client = None
                try:
                    await client.__aexit__(None, None, None)
                except Exception:  # already gone
                    pass
            self._held_last = held
            if not held and not stop.is_set():  # we closed a held session ourselves: not a loss
                delay = await self._session_ended(stop, error, delay)

    def _connect_failed(self, message: str) -> None:
        """Log a failed connect: once per distinct error (``last_error`` is the previous one)."""
        if message != self.last_error:
            log.warning("mqtt connect failed", link=self.name, url=self.settings.url, error=message)

    def _connected(self, delay: float) -> float:
        """A connection came up: the next failure starts the backoff afresh."""
        self.backoff_s = 0.0
        return self._backoff_initial

    async def _session_ended(self, stop: asyncio.Event, error: str | None, delay: float) -> float:
        """The connection ended without a stop and without a held message: reconnect at once."""
        if error is not None:
            log.warning("mqtt connection lost", link=self.name, error=error)
        return delay

    async def _wait(self, stop: asyncio.Event, delay: float) -> float:
        """Sleep a jittered ``delay`` (or until stop); return the next, doubled, delay."""
        wait = random.uniform(delay / 2, delay)
        self.backoff_s = wait
        await _sleep_or_stop(stop, wait)
        return min(delay * 2, self._backoff_max)

    async def _pause_after_hold(self, stop: asyncio.Event) -> None:
        """Wait before taking the held message back: a growing delay, then (if given) until a
        write to the database succeeds, so a full disk is not hammered with redeliveries."""
        await _sleep_or_stop(stop, self._storage.delay())
        while self._probe is not None and not stop.is_set():
            try:
                await self._probe()
                break
            except Exception as exc:
                if not is_storage_error(exc):
                    log.exception("storage probe failed", link=self.name)
                    break
                self._storage.failed(exc, link=self.name)
                await _sleep_or_stop(stop, self._storage.delay())
        self._held_last = False

    async def _consume(self, client: aiomqtt.Client, stop: asyncio.Event) -> bool:
        """Handlers run concurrently (an ack waits for a batched commit; serial handling
        would cap throughput at one commit per message), but PUBACKs go out in arrival
        order as MQTT 3.1.1 requires [MQTT-4.6.0-2].

        Returns True when it stopped because a message could not be stored: that message
        and every later one on this connection stay unacknowledged (redelivered after the
        reconnect), which is the only order-preserving way to refuse one."""
        messages = aiter(client.messages)
        queued = client._queue  # noqa: SLF001 - aiomqtt's incoming queue (aiomqtt is pinned exactly)
        disconnected = client._disconnected  # noqa: SLF001 - a new future per connect
        order: asyncio.Queue[tuple[aiomqtt.Message, asyncio.Task[bool]] | None] = asyncio.Queue()
        held = asyncio.Event()
        acker = asyncio.create_task(self._ack_in_order(client, order, held))
        stop_wait = asyncio.ensure_future(stop.wait())
        held_wait = asyncio.ensure_future(held.wait())
        try:
            while True:
                if stop.is_set() or held.is_set():
                    break  # a message taken now would be neither handled nor acked
                if queued.qsize() and not disconnected.done():
                    # Already received: take it without the iterator's task and the waits
                    # (two tasks and two asyncio.wait per message, several per cent of the
                    # loop's time in a registration burst).
                    message = queued.get_nowait()
                else:
                    nxt = asyncio.ensure_future(anext(messages))
                    done, _ = await asyncio.wait({nxt, stop_wait, held_wait}, return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        nxt.cancel()
                        break
                    message = nxt.result()
                if held.is_set():
                    break  # not handled, not acked: the broker redelivers it
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(message, held))
                order.put_nowait((message, task))
        finally:
            stop_wait.cancel()
            held_wait.cancel()
            order.put_nowait(None)
            # Let started handlers finish (their work is committed and acked), briefly.
            try:
                await asyncio.wait_for(acker, 5)
            except (TimeoutError, aiomqtt.MqttError):
                acker.cancel()
        return held.is_set()

    async def _ack_in_order(self, client: aiomqtt.Client,
                            order: "asyncio.Queue[tuple[aiomqtt.Message, asyncio.Task[bool]] | None]",
                            held: asyncio.Event) -> None:
        holding = False
        while (item := await order.get()) is not None:
            message, task = item
            try:
                if not task.done():
                    await asyncio.wait([task])  # never raises, whatever the handler did
            finally:
                self._slots.release()
            stored = not task.cancelled() and task.result()
            if not stored and not holding:
                holding = True
                held.set()
            if holding:
                continue  # neither this one nor any later one: PUBACKs must stay in order
            if message.qos > 0:
                client._client.ack(message.mid, message.qos)  # noqa: SLF001

    async def _handle(self, message: aiomqtt.Message, held: asyncio.Event) -> bool:
        """Run the message's handler; True if it may be acknowledged.

        Messages already received are taken without waiting between them, so several
        handlers may be created before the first runs: once one has refused its message
        (``held``), a later one neither runs its handler nor is acknowledged (the broker
        redelivers it after the reconnect, after the refused one, in order)."""
        if held.is_set():
            return False
        topic = message.topic.value
        first = self._index.first(topic)
        if first is None:
            return True
        route = self._routes[first]
        try:
            await route.handler(message)
        except Exception as exc:
            if is_storage_error(exc):
                self.held += 1
                self._storage.note(exc, link=self.name, topic=topic)
                held.set()
                return False
            # Anything else would fail again on every redelivery while holding every message
            # behind it: acknowledged and set aside (module doc), the link keeps flowing.
            payload = message.payload
            raw = bytes(payload) if isinstance(payload, (bytes, bytearray)) else str(payload or "").encode()
            self.set_aside.add(topic, raw, exc, route.topic_filter)
            return True
        self._storage.ok(link=self.name)
        return True

    async def disconnect(self) -> None:
        client = self._state.client
        if client is not None:
            self._state.connected.clear()
            try:
                await client.__aexit__(None, None, None)
            except Exception:
                pass


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def _register_writes_only_for_open_sockets(client: aiomqtt.Client) -> None:
    """aiomqtt 2.5.1 asks the loop to watch paho's socket for writing from paho's connect
    thread (``call_soon_threadsafe(add_writer, fd, ...)``). When the broker closes the
    connection in the TLS handshake or login (a rejected client certificate), paho has closed
    that socket before the loop runs the call: asyncio then logs an "Exception in callback"
    traceback, or watches whatever socket reused the number. Same callback, but it watches
    only the socket paho still holds open."""
    inner = client._client  # noqa: SLF001 - the paho client; aiomqtt is pinned exactly
    loop = client._loop  # noqa: SLF001

    def register_write(pc: Any, _userdata: Any, sock: Any) -> None:
        def writable() -> None:
            try:
                pc.loop_write()
            except Exception as exc:  # a broken connection: end it, as aiomqtt does
                disconnected = client._disconnected  # noqa: SLF001 - a new future per connect
                if not disconnected.done():
                    disconnected.set_exception(exc)

        def watch() -> None:
            if pc.socket() is sock and sock.fileno() != -1:
                loop.add_writer(sock.fileno(), writable)

        loop.call_soon_threadsafe(watch)

    inner.on_socket_register_write = register_write


RECV_BYTES = 65536  # one recv() for paho's many small reads (see _read_in_chunks)


def _read_in_chunks(client: aiomqtt.Client) -> None:
    """paho reads a packet with at least three ``recv()`` system calls (the type byte, each
    remaining-length byte, the body), and aiomqtt's reader callback has it decode one packet
    per pass of the event loop (``loop_read``'s packet budget is 1 for a client that
    publishes nothing), so a stream of QoS 1 messages from the broker cost three system calls
    and a loop pass each (the largest share of the gateway client's CPU in a
    registration burst). Here paho's reads are served from one ``recv()`` of up to
    ``RECV_BYTES``, and the socket's reader callback lets paho decode every packet already
    read before it returns to the loop. paho still decodes and dispatches every packet
    exactly as before; only where its bytes come from changes."""
    inner = client._client  # noqa: SLF001 - the paho client; paho and aiomqtt are pinned exactly
    loop = client._loop  # noqa: SLF001
    recv = inner._sock_recv  # noqa: SLF001 - paho's own (maps TLS want-read/write, a closed socket)
    # The bytes read and not yet handed to paho, and the socket they came from.
    buffered: list[Any] = [None, b"", 0]

    def sock_recv(bufsize: int) -> bytes:
        sock, data, pos = buffered
        if sock is not inner._sock or pos >= len(data):  # noqa: SLF001
            data = recv(RECV_BYTES)   # BlockingIOError when nothing is there; b"" at EOF
            buffered[:] = [inner._sock, data, 0]  # noqa: SLF001
            pos = 0
            if not data:
                return data
        end = pos + bufsize
        buffered[2] = end
        return data[pos:end] if pos or end < len(data) else data

    inner._sock_recv = sock_recv  # noqa: SLF001

    def has_buffered() -> bool:
        sock, data, pos = buffered
        return sock is not None and sock is inner._sock and pos < len(data)  # noqa: SLF001

    def read_all() -> None:
        try:
            while True:
                inner.loop_read()
                sock = inner._sock  # noqa: SLF001
                if sock is None:
                    break  # the connection ended (paho closed it and told aiomqtt)
                if has_buffered():
                    continue
                pending = getattr(sock, "pending", None)  # TLS: decrypted bytes not read yet
                if pending is not None and pending() > 0:
                    continue
                break
        except Exception as exc:  # a broken connection: end it, as aiomqtt's callback does
            disconnected = client._disconnected  # noqa: SLF001 - a new future per connect
            if not disconnected.done():
                disconnected.set_exception(exc)

    aiomqtt_open = inner.on_socket_open

    def on_socket_open(pc: Any, userdata: Any, sock: Any) -> None:
        aiomqtt_open(pc, userdata, sock)  # schedules aiomqtt's add_reader on the loop

        def take_over() -> None:  # runs after aiomqtt's add_reader: same fd, our callback
            if pc.socket() is sock and sock.fileno() != -1:
                loop.add_reader(sock.fileno(), read_all)

        loop.call_soon_threadsafe(take_over)

    inner.on_socket_open = on_socket_open


class _RouteIndex:
    """The first route (in the order they were added) whose filter matches a topic, from
    one walk of :class:`gateway.topics.FilterTree` instead of a match per route (the alarm
    engine adds a route per distinct rule filter)."""

    def __init__(self) -> None:
        self._tree: FilterTree[int] = FilterTree()

    def add(self, topic_filter: str, index: int) -> None:
        if self._tree.get(topic_filter) is None:   # a filter added again keeps its first route
            self._tree.set(topic_filter, index)

    def first(self, topic: str) -> int | None:
        return min(self._tree.matching(topic), default=None)
