"""The cloud link: jobs down from the cloud controller's broker, statuses and acks up.

One service, two directions, neither of which may hold up local work:

* **Inbound.** The link subscribes ``P/jobs`` and ``P/devices/+/register`` at QoS 1 on the
  cloud broker with a persistent session (client id from config), so jobs published
  while the gateway is away wait for it there. Each message is handed to the pipeline's
  :class:`Intake`, the same entry point local technicians use; the client acks it only
  after the intake returned, i.e. after the job is committed to SQLite.
* **Outbound.** Whatever the pipeline queued in the outbox (:mod:`.outbox`) is published
  in ``seq`` order at QoS 1 (status snapshots retained) by a sliding-window drain
  (:mod:`.drain`): up to ``[upstream] max_inflight`` publishes await their PUBACK at once,
  and only the confirmed prefix is deleted, so after a lost PUBACK, a reconnect, a stop
  or ``kill -9`` the resend starts at the oldest unconfirmed row and order holds.
  Delivery is at least once and in order; every row carries an ``id`` to de-duplicate on.

The link announces ``{"state": "online", ...}`` retained on the cloud's
``P/gateway/status`` on every connect, with the same payload marked ``offline`` as its
will, and publishes ``offline`` itself on a clean stop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any, Protocol

import aiomqtt
import structlog

from gateway import __version__
from gateway.config import Config, LinkSecrets
from gateway.mqtt import ConnectionSettings, GatewayClient, NotConnected
from gateway.storage import Database
from gateway.timeutil import iso, utcnow
from gateway.topics import Topics
from gateway.upstream.outbox import Outbox, OutboxStats
from gateway.upstream.connection import UpstreamClient
from gateway.upstream.drain import Drain, first_of

log = structlog.get_logger(__name__)

SOURCE = "upstream"  # the ``source`` the intake sees for everything from the cloud broker
MAX_WINDOW = 10_000  # publishes in flight at most (paho's packet ids are 16 bits)


class Intake(Protocol):
    """The pipeline's entry points; both validate, commit, answer with a status and never
    raise on bad input (a bad job from the cloud must not take the link down)."""

    async def submit_job(self, payload: bytes, source: str) -> object: ...

    async def register_device(self, device_id: str, payload: bytes, source: str) -> object: ...


def _as_bytes(payload: Any) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    return str(payload).encode()


class UpstreamLink:
    """Service ``upstream``: keeps the cloud connection and drains the outbox."""

    name = "upstream"
    started: asyncio.Event | None = None  # serves once running (the cloud may be away for days)

    def __init__(self, cfg: Config, db: Database, intake: Intake, outbox: Outbox | None = None, *,
                 secrets: LinkSecrets,
                 backoff_initial: float | None = None, backoff_max: float | None = None,
                 healthy_after_s: float = 30.0,
                 window: int | None = None, publish_timeout: float = 30.0, poll_interval: float = 1.0,
                 stop_flush_s: float = 2.0, gap_grace: float = 2.0, set_aside_after: int = 5):
        if cfg.upstream is None:
            raise ValueError("UpstreamLink needs an [upstream] section")
        up = cfg.upstream
        # The config's reconnect_initial_s/reconnect_max_s unless a test gives its own.
        backoff_initial = up.reconnect_initial_s if backoff_initial is None else backoff_initial
        backoff_max = up.reconnect_max_s if backoff_max is None else backoff_max
        window = up.max_inflight if window is None else window
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        self.cfg = cfg
        self.db = db
        self.intake = intake
        self.topics = Topics(cfg.prefix)
        # The pipeline queues into the same instance (the daemon's wiring passes it to both).
        self.outbox = outbox if outbox is not None else Outbox.for_upstream(up)
        self.max_bytes = self.outbox.max_bytes
        self.overflow = self.outbox.overflow
        self.started_at = iso(utcnow())
        self._window = window
        self._backoff_max = backoff_max
        self._counters = {"jobs_received": 0, "registrations_received": 0}
        settings = ConnectionSettings(
            url=up.url,
            client_id=up.client_id or f"gw-{cfg.gateway.site_id}",
            username=up.username or None,
            password=secrets.password.get_secret_value() if secrets.password else None,
            ca_file=str(up.ca_file) if up.ca_file else None,
            cert_file=str(up.cert_file) if up.cert_file else None,
            key_file=str(up.key_file) if up.key_file else None,
            clean_session=False,
            will_topic=self.topics.gateway_status,
            will_payload=self._status_payload("offline"),
            will_retain=True,
            max_inflight=window,
            protocol=up.protocol,
        )
        self.client = UpstreamClient(settings, backoff_initial=backoff_initial, backoff_max=backoff_max,
                                     healthy_after_s=healthy_after_s, storage_probe=db.probe)
        self.client.route(self.topics.jobs, self._on_job, qos=1)
        self.client.route(self.topics.device_register(), self._on_register, qos=1)
        self.client.on_connect(self._announce_online)
        self.drain = Drain(db, self.client, self.outbox, window=window, publish_timeout=publish_timeout,
                           poll_interval=poll_interval, gap_grace=gap_grace, set_aside_after=set_aside_after,
                           stop_flush_s=stop_flush_s)

    # ------------------------------------------------------------------ service protocol
    def attach(self, client: GatewayClient) -> None:
        """The local broker's client is not needed: the link has its own connection."""

    async def run(self, stopping: asyncio.Event) -> None:
        await self.db.run(self._prepare)
        loop = asyncio.get_running_loop()

        def wake() -> None:
            # Called by Outbox.enqueue on the database thread inside the pipeline's
            # transaction: it must never raise (that would roll the pipeline back).
            try:
                loop.call_soon_threadsafe(self.drain.notify)
            except RuntimeError:  # loop already closed
                pass

        self.outbox.add_listener(wake)
        client_stop = asyncio.Event()
        client_task = asyncio.create_task(self._keep_client(client_stop), name="upstream-client")
        stats = self.drain.stats
        log.info("upstream link starting", url=self.client.settings.url,
                 client_id=self.client.settings.client_id, buffer_max_bytes=self.max_bytes,
                 overflow=self.overflow, max_inflight=self._window, buffered_rows=stats.rows if stats else 0)
        try:
            await self.drain.run(stopping)  # on stop: waits (bounded) for what is in flight
        finally:
            self.outbox.remove_listener(wake)
            await self._announce_offline()
            client_stop.set()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                client_task.cancel()  # torn down: do not wait for a handler in progress
            try:
                await asyncio.wait_for(asyncio.gather(client_task, return_exceptions=True), 5)
            except TimeoutError:
                pass  # wait_for cancelled it
            stats = self.drain.stats
            if stats is not None and stats.rows:
                log.info("upstream link stopping with messages buffered; sent after the restart", rows=stats.rows)
            log.info("upstream link stopped", **self.metrics())

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Any]:
        """Counters for operators (``/metrics``, ``status``): link state, reconnects, the window,
        what was confirmed, resent or set aside, and the buffer (size, fill, overflow
        policy, dropped, coalesced, refused)."""
        if self.drain.stats is not None:
            stats = self.drain.stats.as_dict()
        else:  # not read yet: same keys, values unknown
            stats = {**dict.fromkeys(OutboxStats(0, 0, 0, 0, 0, False).as_dict()),
                     "buffer_max_bytes": self.max_bytes, "buffer_overflow": self.overflow}
        return {
            "connected": self.client.connected,
            "connect_failures": self.client.connect_failures,
            "connects": self.client.connects,
            "connection_drops": self.client.drops,
            "backoff_s": round(self.client.backoff_s, 3),
            "last_error": self.client.last_error,
            "max_inflight": self._window,
            **self.drain.metrics(),
            **self._counters,
            **stats,
        }

    async def refresh_metrics(self) -> dict[str, Any]:
        self.drain.stats = await self.db.run(self.outbox.stats)
        return self.metrics()

    # ------------------------------------------------------------------ helpers
    def _prepare(self, conn: sqlite3.Connection) -> OutboxStats:
        self.drain.stats = self.outbox.prepare(conn)
        return self.drain.stats

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "version": __version__, "started_at": self.started_at}).encode()

    async def _announce_online(self, _client: GatewayClient) -> None:
        # Through publish_nowait: its future fails the moment the connection drops, so a
        # connection cut right after CONNACK does not hold the reconnect for a timeout.
        try:
            confirmed = self.client.publish_nowait(self.topics.gateway_status, self._status_payload("online"),
                                                   retain=True)
            await asyncio.wait_for(confirmed, 10)
        except (NotConnected, TimeoutError) as exc:  # the reconnect will announce again
            log.info("upstream online announcement not confirmed", error=str(exc) or type(exc).__name__)

    async def _announce_offline(self) -> None:
        if not self.client.connected:
            return
        try:
            await self.client.publish(self.topics.gateway_status, self._status_payload("offline"), qos=1,
                                      retain=True, timeout=2)
        except NotConnected:
            pass

    # ------------------------------------------------------------------ inbound
    async def _on_job(self, message: aiomqtt.Message) -> None:
        self._counters["jobs_received"] += 1
        await self.intake.submit_job(_as_bytes(message.payload), SOURCE)

    async def _on_register(self, message: aiomqtt.Message) -> None:
        self._counters["registrations_received"] += 1
        device_id = self.topics.device_id_of(message.topic.value) or ""
        await self.intake.register_device(device_id, _as_bytes(message.payload), SOURCE)

    # ------------------------------------------------------------------ supervision
    async def _keep_client(self, stop: asyncio.Event) -> None:
        """The connection loop must outlive bugs: a crash is logged and the loop restarted."""
        while not stop.is_set():
            try:
                await self.client.run(stop)
            except Exception:
                log.exception("upstream client loop failed; restarting")
                await first_of(stop.wait(), timeout=self._backoff_max)
