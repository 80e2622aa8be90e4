"""The cloud link: jobs down from the cloud controller's broker, statuses and acks up.

One service, two directions, neither of which may hold up local work:

* **Inbound.** The link subscribes ``P/jobs`` and ``P/devices/+/register`` at QoS 1 on the
  cloud broker with a persistent session (client id from config), so jobs published
  while the gateway is away wait for it there. Each message is handed to the pipeline's
  :class:`Intake`, the same entry point local technicians use; the client acks it only
  after the intake returned, i.e. after the job is committed to SQLite.
* **Outbound.** Whatever the pipeline queued in the outbox (:mod:`.outbox`) is published
  in ``seq`` order at QoS 1 (status snapshots retained) by a drain task. A row is
  deleted only after the cloud broker's PUBACK; when the connection drops the drain
  stops, and after reconnecting resends from the oldest row still there. So delivery is
  at least once and in order, across outages and ``kill -9``.

The link announces ``{"state": "online", ...}`` retained on the cloud's
``P/gateway/status`` on every connect, with the same payload marked ``offline`` as its
will, and publishes ``offline`` itself on a clean stop.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable
from typing import Any, Protocol

import aiomqtt
import structlog

from gateway import __version__
from gateway.config import Config
from gateway.mqtt import ConnectionSettings, GatewayClient, NotConnected
from gateway.storage import Database
from gateway.timeutil import iso, utcnow
from gateway.topics import Topics
from gateway.upstream import outbox
from gateway.upstream.connection import UpstreamClient

log = structlog.get_logger(__name__)

SOURCE = "upstream"  # the ``source`` the intake sees for everything from the cloud broker


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

    def __init__(self, cfg: Config, db: Database, intake: Intake, *,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0,
                 window: int = 64, publish_timeout: float = 30.0, poll_interval: float = 1.0,
                 stop_flush_s: float = 2.0):
        if cfg.upstream is None:
            raise ValueError("UpstreamLink needs an [upstream] section")
        if not 1 <= window <= 100:
            raise ValueError("window must be 1..100 (the client's in-flight limit)")
        up = cfg.upstream
        self.cfg = cfg
        self.db = db
        self.intake = intake
        self.topics = Topics(cfg.prefix)
        self.max_bytes = int(up.buffer_max_mb * 1024 * 1024)
        self.started_at = iso(utcnow())
        self._window = window
        self._publish_timeout = publish_timeout
        self._poll_interval = poll_interval
        self._stop_flush_s = stop_flush_s
        self._backoff_max = backoff_max
        self._wake = asyncio.Event()
        self._stats: outbox.OutboxStats | None = None
        self._counters = {"published": 0, "jobs_received": 0, "registrations_received": 0, "resend_rounds": 0}
        settings = ConnectionSettings(
            url=up.url,
            client_id=up.client_id or f"gw-{cfg.gateway.site_id}",
            username=up.username or None,
            password=up.password.get_secret_value() if up.password else None,
            ca_file=str(up.ca_file) if up.ca_file else None,
            cert_file=str(up.cert_file) if up.cert_file else None,
            key_file=str(up.key_file) if up.key_file else None,
            clean_session=False,
            will_topic=self.topics.gateway_status,
            will_payload=self._status_payload("offline"),
            will_retain=True,
        )
        self.client = UpstreamClient(settings, backoff_initial=backoff_initial, backoff_max=backoff_max)
        self.client.route(self.topics.jobs, self._on_job, qos=1)
        self.client.route(self.topics.device_register(), self._on_register, qos=1)
        self.client.on_connect(self._announce_online)

    # ------------------------------------------------------------------ service protocol
    def attach(self, client: GatewayClient) -> None:
        """The local broker's client is not needed: the link has its own connection."""

    async def run(self, stopping: asyncio.Event) -> None:
        await self.db.run(self._prepare)
        loop = asyncio.get_running_loop()

        def wake() -> None:
            # Called by outbox.enqueue on the database thread inside the pipeline's
            # transaction: it must never raise (that would roll the pipeline back).
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # loop already closed
                pass

        outbox.add_listener(wake)
        client_stop = asyncio.Event()
        client_task = asyncio.create_task(self._keep_client(client_stop), name="upstream-client")
        log.info("upstream link starting", url=self.client.settings.url,
                 client_id=self.client.settings.client_id, buffer_max_bytes=self.max_bytes,
                 buffered_rows=self._stats.rows if self._stats else 0)
        try:
            await self._keep_draining(stopping)
        finally:
            outbox.remove_listener(wake)
            await self._announce_offline()
            client_stop.set()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                client_task.cancel()  # torn down: do not wait for a handler in progress
            try:
                await asyncio.wait_for(asyncio.gather(client_task, return_exceptions=True), 5)
            except TimeoutError:
                pass  # wait_for cancelled it
            log.info("upstream link stopped", **self.metrics())

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Any]:
        """Counters for operators: link state, buffer size/fill, dropped, coalesced, sent."""
        stats = self._stats.as_dict() if self._stats else {}
        return {
            "connected": self.client.connected,
            "connect_failures": self.client.connect_failures,
            "last_error": self.client.last_error,
            **self._counters,
            **stats,
        }

    async def refresh_metrics(self) -> dict[str, Any]:
        self._stats = await self.db.run(outbox.stats)
        return self.metrics()

    # ------------------------------------------------------------------ helpers
    def _prepare(self, conn: sqlite3.Connection) -> outbox.OutboxStats:
        outbox.ensure_schema(conn)
        outbox.configure(conn, self.max_bytes)
        self._stats = outbox.stats(conn)
        return self._stats

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "version": __version__, "started_at": self.started_at}).encode()

    async def _announce_online(self, client: GatewayClient) -> None:
        try:
            await client.publish(self.topics.gateway_status, self._status_payload("online"), qos=1, retain=True)
        except NotConnected as exc:  # the reconnect will announce again
            log.info("upstream online announcement not confirmed", error=str(exc))

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
                await _first(stop.wait(), timeout=self._backoff_max)

    async def _keep_draining(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self._drain(stopping)
            except Exception:
                # e.g. a disk error: keep the rows, say so, try again; never crash the daemon.
                log.exception("upstream drain failed; retrying")
                await _first(stopping.wait(), timeout=1.0)
        await self._final_flush()

    async def _final_flush(self) -> None:
        """On a clean stop, send what is queued while the link is up, for a bounded time.

        Whatever is left (or queued later by the pipeline's own shutdown) stays in the
        outbox and goes out after the next start.
        """
        if not self.client.up.is_set() or self._stop_flush_s <= 0:
            return
        try:
            async with asyncio.timeout(self._stop_flush_s):
                await self._drain_connected(asyncio.Event(), until_empty=True)
        except TimeoutError:
            pass
        except Exception:
            log.exception("upstream final flush failed; rows stay buffered")
        if self._stats is not None and self._stats.rows:
            log.info("upstream link stopping with messages buffered; sent after the restart",
                     rows=self._stats.rows)

    # ------------------------------------------------------------------ outbound
    async def _drain(self, stopping: asyncio.Event) -> None:
        up = self.client.up
        while not stopping.is_set():
            if not up.is_set():
                # Keep metrics fresh while offline (the buffer grows meanwhile).
                self._stats = await self.db.run(outbox.stats)
                await _first(up.wait(), stopping.wait(), timeout=max(self._poll_interval, 1.0))
                continue
            await self._drain_connected(stopping)

    async def _drain_connected(self, stopping: asyncio.Event, *, until_empty: bool = False) -> None:
        """Publish the outbox in order until the link drops or we stop (or, with
        ``until_empty``, until nothing is left).

        Rows go out in batches of ``window`` publishes awaiting their PUBACKs together;
        paho writes them to the socket in call order and the broker keeps that order (and
        acknowledges in that order), so a batch is as ordered as one-by-one, at ``window``
        times the throughput, and what was acknowledged is always a prefix. Acked rows are
        deleted at the next fetch (same transaction), so a crash in between only means
        they are sent again: at least once. Each session starts from the oldest row left.
        """
        lost = self.client.lost
        cursor = 0
        acked: list[int] = []
        broken: list[str] = []
        tasks: list[asyncio.Task[None]] = []
        self._counters["resend_rounds"] += 1
        try:
            while not (stopping.is_set() or lost.is_set() or broken):
                done = list(acked)
                acked.clear()
                self._wake.clear()
                rows, self._stats = await self.db.run(lambda conn: self._exchange(conn, done, cursor))
                if not rows:
                    if until_empty:
                        return
                    await _first(self._wake.wait(), lost.wait(), stopping.wait(), timeout=self._poll_interval)
                    continue
                tasks = [asyncio.create_task(self._publish(row, acked, broken)) for row in rows]
                batch = asyncio.gather(*tasks)
                await _first(batch, lost.wait(), stopping.wait())
                if not batch.done():
                    break  # the unconfirmed rows stay in the outbox and are sent again
                tasks = []
                cursor = rows[-1].seq
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if acked:
                done = list(acked)
                self._stats = await self.db.run(lambda conn: self._forget(conn, done))
        if broken and not lost.is_set() and not stopping.is_set():
            # A PUBACK did not come in time on a link that looks up: reconnect, so the resend
            # from the outbox cannot overtake a message still pending on the old connection.
            log.warning("upstream publish not confirmed; reconnecting", error=broken[0])
            await self.client.disconnect()

    def _exchange(self, conn: sqlite3.Connection, done: list[int], cursor: int
                  ) -> tuple[list[outbox.OutboxRow], outbox.OutboxStats]:
        """One transaction: forget what the cloud acknowledged, read the next batch."""
        if done:
            outbox.delete_sent(conn, done)
        return outbox.fetch(conn, cursor, self._window), outbox.stats(conn)

    @staticmethod
    def _forget(conn: sqlite3.Connection, done: list[int]) -> outbox.OutboxStats:
        outbox.delete_sent(conn, done)
        return outbox.stats(conn)

    async def _publish(self, row: outbox.OutboxRow, acked: list[int], broken: list[str]) -> None:
        try:
            await self.client.publish(row.topic, row.payload, qos=1, retain=row.retain,
                                      timeout=self._publish_timeout)
        except NotConnected as exc:
            broken.append(str(exc))
            return
        acked.append(row.seq)
        self._counters["published"] += 1


async def _first(*aws: Awaitable[Any], timeout: float | None = None) -> None:
    """Wait until the first of ``aws`` completes (or ``timeout``); cancel the rest.

    Futures passed in (e.g. a gather of publishes) are not cancelled: the caller decides.
    """
    owned = [asyncio.ensure_future(a) for a in aws]
    mine = [f for f, a in zip(owned, aws) if f is not a]
    try:
        await asyncio.wait(owned, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in mine:
            f.cancel()
