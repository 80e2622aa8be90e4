"""The gateway's own MQTT client: one aiomqtt connection, topic routing, reconnects.

This is the "one way through": the core publishes and subscribes through this client
in embedded and external mode alike. Incoming QoS 1/2 messages are acknowledged only
after their handler returned, so a job is in SQLite before the broker forgets it.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiomqtt
import structlog

from gateway.config import MqttUrl
from gateway.topics import matches

log = structlog.get_logger(__name__)

Handler = Callable[[aiomqtt.Message], Awaitable[None]]
OnConnect = Callable[["GatewayClient"], Awaitable[None]]


class NotConnected(Exception):
    """Publishing while the broker is unreachable; callers keep the work and retry."""


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
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, max_concurrent_handlers: int = 256):
        self.settings = settings
        self.name = name
        self._routes: list[Route] = []
        self._on_connect: list[OnConnect] = []
        self._state = _State()
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self.connect_failures = 0
        self.last_error: str | None = None
        self._slots = asyncio.Semaphore(max_concurrent_handlers)

    # ----------------------------------------------------------------- set-up
    def route(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self._routes.append(Route(topic_filter, handler, qos))

    def on_connect(self, callback: OnConnect) -> None:
        self._on_connect.append(callback)

    @property
    def connected(self) -> bool:
        return self._state.connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._state.connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ----------------------------------------------------------------- publish
    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      timeout: float = 10.0) -> None:
        client = self._state.client
        if client is None or not self.connected:
            raise NotConnected(f"{self.name}: not connected")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        except aiomqtt.MqttError as exc:
            raise NotConnected(f"{self.name}: publish failed: {exc}") from exc

    # ----------------------------------------------------------------- run
    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        url = MqttUrl(s.url)
        will = None
        if s.will_topic is not None:
            will = aiomqtt.Will(s.will_topic, s.will_payload, qos=1, retain=s.will_retain)
        client = aiomqtt.Client(
            url.host, url.port,
            username=s.username or None, password=s.password or None,
            identifier=s.client_id, clean_session=s.clean_session,
            transport=url.transport, tls_context=s.tls_context(), keepalive=s.keepalive,
            will=will, max_inflight_messages=s.max_inflight, timeout=10,
        )
        # Ack incoming QoS 1/2 only once a handler has stored the message (see module doc).
        client._client.manual_ack_set(True)  # noqa: SLF001 - aiomqtt 2.x has no public switch
        return client

    async def connect_once(self) -> aiomqtt.Client:
        """Connect and subscribe; raise aiomqtt.MqttError on failure."""
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
        """Stay connected until ``stop`` is set."""
        delay = self._backoff_initial
        while not stop.is_set():
            try:
                client = await self.connect_once()
            except aiomqtt.MqttError as exc:
                self.connect_failures += 1
                message = str(exc)
                if message != self.last_error:
                    log.warning("mqtt connect failed", link=self.name, url=self.settings.url, error=message)
                self.last_error = message
                wait = random.uniform(delay / 2, delay)
                delay = min(delay * 2, self._backoff_max)
                await _sleep_or_stop(stop, wait)
                continue
            delay = self._backoff_initial
            self.last_error = None
            self._state.client = client
            self._state.connected.set()
            log.info("mqtt connected", link=self.name, url=self.settings.url)
            try:
                for callback in self._on_connect:
                    await callback(self)
                await self._consume(client, stop)
            except (aiomqtt.MqttError, NotConnected) as exc:
                # NotConnected: the connection dropped while an on-connect callback published.
                log.warning("mqtt connection lost", link=self.name, error=str(exc))
            finally:
                self._state.connected.clear()
                self._state.client = None
                try:
                    await client.__aexit__(None, None, None)
                except Exception:  # already gone
                    pass

    async def _consume(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Handlers run concurrently (an ack waits for a batched commit; serial handling
        would cap throughput at one commit per message), but PUBACKs go out in arrival
        order as MQTT 3.1.1 requires [MQTT-4.6.0-2]."""
        messages = aiter(client.messages)
        order: asyncio.Queue[tuple[aiomqtt.Message, asyncio.Task[None]] | None] = asyncio.Queue()
        acker = asyncio.create_task(self._ack_in_order(client, order))
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({nxt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                message = nxt.result()
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(message))
                order.put_nowait((message, task))
        finally:
            stop_wait.cancel()
            order.put_nowait(None)
            # Let started handlers finish (their work is committed and acked), briefly.
            try:
                await asyncio.wait_for(acker, 5)
            except (TimeoutError, aiomqtt.MqttError):
                acker.cancel()

    async def _ack_in_order(self, client: aiomqtt.Client,
                            order: "asyncio.Queue[tuple[aiomqtt.Message, asyncio.Task[None]] | None]") -> None:
        while (item := await order.get()) is not None:
            message, task = item
            try:
                await asyncio.wait([task])  # never raises, whatever the handler did
            finally:
                self._slots.release()
            if message.qos > 0 and not task.cancelled():
                client._client.ack(message.mid, message.qos)  # noqa: SLF001

    async def _handle(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        try:
            for route in self._routes:
                if matches(topic, route.topic_filter):
                    await route.handler(message)
                    break
        except Exception:
            # A handler bug must not take the link down; the message is acked so it
            # cannot loop forever, and the failure is logged with its topic.
            log.exception("handler failed", link=self.name, topic=topic)

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
