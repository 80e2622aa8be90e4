"""Prometheus metrics (``GET /metrics``), with prometheus_client.

Three kinds of source, none of which costs the pipeline anything between scrapes:

- the runtime snapshot of :mod:`gateway.health` (bridges, broker, cloud link, loop lag),
  taken on the event loop at scrape time and handed to :class:`RuntimeCollector`;
- SQLite, read by :class:`DatabaseCollector` on its own read-only connection in the
  scrape's worker thread (WAL: it never waits for the pipeline's writer, nor the writer
  for it), from the aggregates :mod:`gateway.stats` keeps with every write: a few rows whatever
  the fleet size;
- counters kept in process (HTTP requests) and prometheus_client's process/platform/GC
  collectors.

**Registration point.** A prometheus_client collector (an object with ``collect()``
yielding metric families) is added with :meth:`Metrics.register`, by the wiring
(:mod:`gateway.wiring`) that builds both the service it reads and the HTTP service.
``collect()`` runs in a worker thread: read values that are safe to read there (numbers, a
snapshot, your own SQLite connection). ``homepot_alarms_firing`` and
``homepot_alarms{state}`` come from :func:`gateway.alarms.summary.summary`, like ``status``
and the operator page.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from gateway import clock
from gateway import stats
from gateway.alarms.summary import summary as alarm_summary

log = structlog.get_logger(__name__)

NS = "homepot"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _platform(name: str) -> str:
    return name or "unassigned"


# Broker counters of EmbeddedBroker.metrics(): key → (metric name, help). Gauges below;
# any other numeric key is exported as homepot_broker_<key> so a new counter is not lost.
BROKER_COUNTERS = {
    "messages_in": ("broker_messages_received", "PUBLISH packets received from clients"),
    "messages_out": ("broker_messages_sent", "PUBLISH packets written to clients (resends included)"),
    "bytes_in": ("broker_bytes_received", "payload bytes received"),
    "bytes_out": ("broker_bytes_sent", "payload bytes written"),
    "dropped": ("broker_messages_dropped", "queued messages dropped (max_queued_messages)"),
    "denied_publish": ("broker_denied_publish", "PUBLISHes dropped by the ACL"),
    "denied_subscribe": ("broker_denied_subscribe", "SUBSCRIBE filters refused (0x80)"),
    "denied_receive": ("broker_denied_receive", "deliveries withheld by the receiver's ACL"),
    "connections_total": ("broker_connections", "connections accepted"),
    "auth_failures": ("broker_auth_failures", "CONNECTs refused for bad credentials"),
    "keepalive_timeouts": ("broker_keepalive_timeouts", "connections closed after 1.5 x keepalive"),
    "wills_published": ("broker_wills_published", "wills published"),
    "protocol_errors": ("broker_protocol_errors", "connections closed for malformed input"),
    "persist_errors": ("broker_persist_errors", "SQLite writes of the broker that failed"),
    "limited_packet_size": ("broker_limited_packet_size", "connections closed: packet over max_packet_size"),
    "limited_connections": ("broker_limited_connections", "connections refused: max_connections"),
    "limited_sessions": ("broker_limited_sessions", "CONNECTs refused: max_sessions_per_account"),
    "limited_queued_bytes": ("broker_limited_queued_bytes", "queued messages dropped: max_queued_bytes"),
    "limited_retained": ("broker_limited_retained", "retained messages not kept: retained quota per principal"),
    "limited_rate": ("broker_limited_rate", "PUBLISHes after which a client over its rate was paused"),
    "sessions_evicted": ("broker_sessions_evicted", "offline sessions replaced (max_sessions_per_account)"),
    "sessions_expired": ("broker_sessions_expired", "offline sessions expired (session_expiry_s)"),
    "accounts_disconnected": ("broker_accounts_disconnected", "clients closed: account removed or password changed"),
    "accounts_updated": ("broker_accounts_updated", "connected clients given a changed role's ACL"),
}
BROKER_GAUGES = {
    "clients_connected": ("broker_clients_connected", "clients connected now"),
    "sessions": ("broker_sessions", "sessions (connected and persistent offline)"),
    "subscriptions": ("broker_subscriptions", "subscriptions"),
    "retained": ("broker_retained_messages", "retained messages"),
    "queued": ("broker_queued_messages", "QoS 1/2 messages queued for clients"),
    "inflight": ("broker_inflight_messages", "QoS 1/2 messages in flight to clients"),
    "queued_bytes": ("broker_queued_bytes", "payload bytes of the queued messages"),
}
SKIP_BROKER = {"denied"}  # the sum of the three denied_* counters


class RuntimeCollector:
    """Metrics from the latest runtime snapshot (set per scrape by :meth:`Metrics.render`)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        healthy = GaugeMetricFamily(f"{NS}_healthy", "1 when every health check passes (GET /healthz)")
        healthy.add_metric([], 1.0 if snap.get("status") == "ok" else 0.0)
        yield healthy
        check = GaugeMetricFamily(f"{NS}_health_check", "1 when the check passes", labels=["check"])
        for name, c in (snap.get("checks") or {}).items():
            check.add_metric([name], 1.0 if c.get("ok") else 0.0)
        yield check
        lag = GaugeMetricFamily(f"{NS}_loop_lag_seconds", "how late the event loop woke a timer")
        lag.add_metric([], float(snap.get("loop_lag_s") or 0.0))
        yield lag
        client = GaugeMetricFamily(f"{NS}_broker_client_connected", "1 when the gateway's own MQTT client is connected")
        client.add_metric([], 1.0 if (snap.get("broker_client") or {}).get("connected") else 0.0)
        yield client
        aside = CounterMetricFamily(f"{NS}_messages_set_aside",
                                    "MQTT messages acknowledged but not processed: their handling failed "
                                    "for a reason that is not storage (status lists the last ones)", labels=["link"])
        for link, n in sorted(((snap.get("set_aside") or {}).get("counts") or {}).items()):
            aside.add_metric([link], float(n))
        yield aside
        yield from self._bridges(snap.get("bridges") or {})
        yield from self._broker(snap.get("broker"))
        yield from self._upstream(snap.get("upstream"))

    @staticmethod
    def _bridges(bridges: dict[str, Any]) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(f"{NS}_bridge_healthy", "1 unless the bridge is paused as unhealthy", labels=["platform"])
        in_flight = GaugeMetricFamily(f"{NS}_bridge_in_flight", "sends in progress", labels=["platform"])
        sent = CounterMetricFamily(f"{NS}_bridge_sent", "deliveries the platform accepted (since start)", labels=["platform"])
        for name, b in sorted(bridges.items()):
            healthy.add_metric([name], 1.0 if b.get("healthy", True) else 0.0)
            in_flight.add_metric([name], float(b.get("in_flight") or 0))
            sent.add_metric([name], float(b.get("sent") or 0))
        yield from (healthy, in_flight, sent)

    @staticmethod
    def _broker(broker: dict[str, Any] | None) -> Iterator[Metric]:
        if not broker:
            return
        for key, value in sorted(broker.items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or key in SKIP_BROKER:
                continue
            if key in BROKER_COUNTERS:
                name, doc = BROKER_COUNTERS[key]
                family: Metric = CounterMetricFamily(f"{NS}_{name}", doc)
            else:
                name, doc = BROKER_GAUGES.get(key, (f"broker_{key}", f"embedded broker: {key}"))
                family = GaugeMetricFamily(f"{NS}_{name}", doc)
            family.add_metric([], float(value))
            yield family

    @staticmethod
    def _upstream(up: dict[str, Any] | None) -> Iterator[Metric]:
        if not up:
            return
        connected = GaugeMetricFamily(f"{NS}_upstream_connected", "1 when the cloud link is connected")
        connected.add_metric([], 1.0 if up.get("connected") else 0.0)
        yield connected
        for key, name, doc in (("published", "upstream_published", "messages the cloud broker acknowledged"),
                               ("connect_failures", "upstream_connect_failures", "failed connection attempts"),
                               ("jobs_received", "upstream_jobs_received", "jobs received from the cloud")):
            value = up.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                c = CounterMetricFamily(f"{NS}_{name}", doc)
                c.add_metric([], float(value))
                yield c
        rate = up.get("drain_rate")
        if isinstance(rate, (int, float)):
            g = GaugeMetricFamily(f"{NS}_upstream_drain_rate", "messages/s acknowledged by the cloud (last interval)")
            g.add_metric([], float(rate))
            yield g


class DatabaseCollector:
    """Pipeline and cloud-link figures from SQLite (read-only connection, worker thread)."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.last_duration_s = 0.0

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            from gateway.storage import connect

            self._conn = connect(self.db_path, readonly=True)
        return self._conn

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            t0 = time.perf_counter()
            try:
                families = list(self._read())
            except sqlite3.Error as exc:
                log.warning("metrics: database read failed", error=str(exc))
                self.close_unlocked()
                families = []
            self.last_duration_s = time.perf_counter() - t0
        yield from families
        took = GaugeMetricFamily(f"{NS}_metrics_database_read_seconds", "time this scrape spent reading SQLite")
        took.add_metric([], self.last_duration_s)
        yield took

    def close_unlocked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _read(self) -> Iterator[Metric]:
        conn = self._connection()
        conn.execute("BEGIN")  # one consistent read snapshot for the whole scrape
        try:
            now = clock.now()
            counts = stats.delivery_counts(conn)
            latency = stats.ack_latency(conn)
            oldest = stats.oldest_queued(conn, now)
            counters = stats.counters(conn)
            jobs = stats.jobs_by_state(conn)
            devices = stats.device_count(conn)
            backlog = stats.upstream_backlog(conn)
            alarms = alarm_summary(conn)
        finally:
            conn.execute("COMMIT")
        deliveries = GaugeMetricFamily(f"{NS}_deliveries", "deliveries now in each state, by platform of the last "
                                       "attempt ('unassigned' = not attempted yet)", labels=["platform", "state"])
        queue = GaugeMetricFamily(f"{NS}_queue_depth", "queued deliveries", labels=["platform"])
        for (platform, state), n in sorted(counts.items()):
            deliveries.add_metric([_platform(platform), state], float(n))
            if state == "queued":
                queue.add_metric([_platform(platform)], float(n))
        yield from (deliveries, queue)
        age = GaugeMetricFamily(f"{NS}_queue_oldest_age_seconds", "age of the oldest queued delivery (since its job "
                                "was accepted)", labels=["platform"])
        for platform, seconds in sorted(oldest.items()):
            age.add_metric([_platform(platform)], seconds)
        yield age
        hist = HistogramMetricFamily(f"{NS}_ack_latency_seconds", "first ack time minus send time", labels=["platform"])
        for platform, h in sorted(latency.items()):
            buckets = [("+Inf" if le == float("inf") else repr(le / 1000.0), float(n)) for le, n in h["buckets"]]
            hist.add_metric([_platform(platform)], buckets, h["sum_ms"] / 1000.0)
        yield hist
        events = CounterMetricFamily(f"{NS}_pipeline_events", "pipeline counters (jobs_accepted, acks_stored, "
                                     "acks_refused, ...)", labels=["event"])
        for name, value in sorted(counters.items()):
            events.add_metric([name], float(value))
        yield events
        jobs_family = GaugeMetricFamily(f"{NS}_jobs", "jobs by state", labels=["state"])
        for state, n in sorted(jobs.items()):
            jobs_family.add_metric([state], float(n))
        yield jobs_family
        dev = GaugeMetricFamily(f"{NS}_devices", "registered devices")
        dev.add_metric([], float(devices))
        yield dev
        if alarms is not None:
            firing = GaugeMetricFamily(f"{NS}_alarms_firing", "alarms firing now (sensor rules)")
            firing.add_metric([], float(alarms.count("firing")))
            yield firing
            by_state = GaugeMetricFamily(f"{NS}_alarms", "alarm records by state", labels=["state"])
            for state, n in sorted(alarms.by_state.items()):
                by_state.add_metric([state], float(n))
            yield by_state
        if backlog is not None:
            for key, name, doc in (("buffer_rows", "upstream_backlog_messages", "messages waiting for the cloud"),
                                   ("buffer_bytes", "upstream_backlog_bytes", "bytes waiting for the cloud"),
                                   ("buffer_oldest_age_s", "upstream_backlog_oldest_age_seconds",
                                    "age of the oldest message waiting for the cloud")):
                value = backlog.get(key)
                g = GaugeMetricFamily(f"{NS}_{name}", doc)
                g.add_metric([], float(value) if isinstance(value, (int, float)) else 0.0)
                yield g
            for key, name, doc in (("buffer_dropped", "upstream_backlog_dropped", "messages dropped at the cap"),
                                   ("buffer_coalesced", "upstream_backlog_coalesced", "status snapshots superseded")):
                value = backlog.get(key)
                if isinstance(value, (int, float)):
                    c = CounterMetricFamily(f"{NS}_{name}", doc)
                    c.add_metric([], float(value))
                    yield c


class Metrics:
    """The daemon's registry: what ``GET /metrics`` renders."""

    def __init__(self, db_path: Path):
        self.registry = CollectorRegistry(auto_describe=False)
        self.runtime = RuntimeCollector()
        self.database = DatabaseCollector(db_path)
        self.registry.register(self.runtime)
        self.registry.register(self.database)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http_requests = Counter(f"{NS}_http_requests", "HTTP API requests by route, method and status code",
                                     ["route", "method", "code"], registry=self.registry)
        self.http_acks = Counter(f"{NS}_http_acks", "acks POSTed to signed ack URLs, by result",
                                 ["result"], registry=self.registry)
        self._lock = asyncio.Lock()

    def register(self, collector: Any) -> None:
        self.registry.register(collector)

    async def render(self, snapshot: dict[str, Any]) -> bytes:
        async with self._lock:  # one scrape at a time: the runtime snapshot is per scrape
            self.runtime.snapshot = snapshot
            return await asyncio.to_thread(generate_latest, self.registry)

    def close(self) -> None:
        self.database.close()


__all__ = ["CONTENT_TYPE", "DatabaseCollector", "Metrics", "RuntimeCollector"]
