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
import platform
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import (CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector, ProcessCollector,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from devices.models import split_bridge_key
from gateway import __version__, clock
from gateway import stats
from gateway.alarms.summary import summary as alarm_summary
from gateway.pipeline import deliveries as deliveries_of
from gateway.pipeline import jobs as jobs_of
from gateway.pipeline import registry
from gateway.pipeline.dispatcher import OUTCOME_NAMES
from gateway.states import DeliveryState, JobState
from gateway.upstream import outbox

log = structlog.get_logger(__name__)
# No ``*_created`` series: they double every counter and no alert reads them.
disable_created_metrics()

NS = "homepot"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Series that exist with 0 before anything happened, so an alert on them has something to read.
DELIVERY_STATES = tuple(s.value for s in DeliveryState)
JOB_STATES = tuple(s.value for s in JobState)
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _platform(name: str) -> list[str]:
    """The ``platform`` and ``app`` labels of a bridge name (``fcm``, ``fcm:shop-app``; ``''`` =
    not attempted yet): the app is ``""`` for the section's own credentials."""
    platform, app = split_bridge_key(name)
    return [platform or "unassigned", app or ""]


# Broker counters of EmbeddedBroker.metrics(): key → (metric name, help). Gauges below;
# any other numeric key is exported as homepot_broker_<key> so a new counter is not lost.
BROKER_COUNTERS = {
    "messages_in": ("broker_messages_received", "PUBLISH packets received from clients"),
    "messages_out": ("broker_messages_sent", "PUBLISH packets written to clients (resends included)"),
    "bytes_in": ("broker_received_bytes", "payload bytes received"),
    "bytes_out": ("broker_sent_bytes", "payload bytes written"),
    "dropped": ("broker_messages_dropped", "queued messages dropped (max_queued_messages)"),
    "denied_publish": ("broker_denied_publish", "PUBLISHes dropped by the ACL"),
    "denied_subscribe": ("broker_denied_subscribe", "SUBSCRIBE filters refused (0x80)"),
    "denied_receive": ("broker_denied_receive", "deliveries withheld by the receiver's ACL"),
    "connections_total": ("broker_connections", "connections accepted"),
    "auth_failures": ("broker_auth_failures", "CONNECTs refused for bad credentials"),
    "logins_throttled": ("broker_logins_throttled", "CONNECTs refused unchecked: their address failed too often"),
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
    "dropped_acl": ("broker_dropped_acl_messages", "queued messages withheld when sent: the receiver may not read"),
    "dropped_too_large": ("broker_dropped_too_large_messages", "messages over the receiver's Maximum Packet Size"),
    "expired": ("broker_expired_messages", "MQTT 5.0 messages dropped when their expiry passed"),
    "not_acknowledged": ("broker_not_acknowledged_packets", "packets left unacknowledged: state was not stored"),
    "packet_timeouts": ("broker_packet_timeouts", "connections closed while stalled in the middle of a packet"),
    "receive_maximum_exceeded": ("broker_receive_maximum_exceeded", "MQTT 5.0 clients disconnected (0x93)"),
    "retained_refused": ("broker_retained_refused_messages", "retained messages not kept: the store is at a limit"),
    "sessions_refused": ("broker_sessions_refused", "CONNECTs refused: client id owned by another principal"),
    "shared_handed_over": ("broker_shared_handed_over_messages",
                           "unacknowledged messages of a leaving shared-subscription member given to another"),
}
BROKER_GAUGES = {
    "clients_connected": ("broker_clients_connected", "clients connected now"),
    "sessions": ("broker_sessions", "sessions (connected and persistent offline)"),
    "subscriptions": ("broker_subscriptions", "subscriptions"),
    "retained": ("broker_retained_messages", "retained messages"),
    "queued": ("broker_queued_messages", "QoS 1/2 messages queued for clients"),
    "inflight": ("broker_inflight_messages", "QoS 1/2 messages in flight to clients"),
    "queued_bytes": ("broker_queued_bytes", "payload bytes of the queued messages"),
    "uptime_s": ("broker_uptime_seconds", "seconds since the broker started"),
}
SKIP_BROKER = {"denied"}  # the sum of the three denied_* counters


class RuntimeCollector:
    """Metrics from the latest runtime snapshot (set per scrape by :meth:`Metrics.render`)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        info = GaugeMetricFamily(f"{NS}_build_info", "always 1; the running gateway's version and Python",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
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
        counts = {"broker": 0, **((snap.get("set_aside") or {}).get("counts") or {})}
        for link, n in sorted(counts.items()):
            aside.add_metric([link], float(n))
        yield aside
        yield from self._bridges(snap.get("bridges") or {})
        yield from self._broker(snap.get("broker"))
        yield from self._upstream(snap.get("upstream"))

    @staticmethod
    def _bridges(bridges: dict[str, Any]) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(f"{NS}_bridge_healthy", "1 unless the bridge is paused as unhealthy", labels=["platform", "app"])
        in_flight = GaugeMetricFamily(f"{NS}_bridge_in_flight", "sends in progress", labels=["platform", "app"])
        sent = CounterMetricFamily(f"{NS}_bridge_sent", "deliveries the platform accepted (since start)", labels=["platform", "app"])
        outcomes = CounterMetricFamily(f"{NS}_bridge_outcomes", "platform answers since start, by outcome: accepted, "
                                       "retried (transient failure), throttled (429 or quota), invalid_address, "
                                       "failed, unhealthy (the bridge paused)", labels=["platform", "app", "outcome"])
        for name, b in sorted(bridges.items()):
            healthy.add_metric(_platform(name), 1.0 if b.get("healthy", True) else 0.0)
            in_flight.add_metric(_platform(name), float(b.get("in_flight") or 0))
            sent.add_metric(_platform(name), float(b.get("sent") or 0))
            counted = b.get("outcomes") or {}
            for outcome in OUTCOME_NAMES:
                outcomes.add_metric([*_platform(name), outcome], float(counted.get(outcome, 0)))
        yield from (healthy, in_flight, sent, outcomes)

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
                unit = f"{key[:-2]}_seconds" if key.endswith("_s") else key  # units spelled out
                name, doc = BROKER_GAUGES.get(key, (f"broker_{unit}", f"embedded broker: {key}"))
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
            g = GaugeMetricFamily(f"{NS}_upstream_drain_messages_per_second",
                                  "messages/s acknowledged by the cloud (last interval)")
            g.add_metric([], float(rate))
            yield g


class DatabaseCollector:
    """Pipeline and cloud-link figures from SQLite (read-only connection, worker thread)."""

    def __init__(self, db_path: Path, rules: list[str] | None = None):
        self.db_path = db_path
        # Names that get a series (0) before anything happened: the enabled bridges (set per
        # scrape from the runtime snapshot) and the configured alarm rules.
        self.platforms: list[str] = []
        self.rules = list(rules or [])
        self.presence: dict[str, Any] = {}  # the broker's device presence, set per scrape
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
            oldest = deliveries_of.oldest_queued(conn, now)
            counters = jobs_of.counters(conn)
            jobs = jobs_of.count_by_state(conn)
            devices = registry.count(conn)
            held = jobs_of.people_held(conn)
            backlog = outbox.backlog(conn)
            alarms = alarm_summary(conn)
            online = _connected_by_segment(conn, self.presence)
        finally:
            conn.execute("COMMIT")
        deliveries = GaugeMetricFamily(f"{NS}_deliveries", "deliveries now in each state, by platform of the last "
                                       "attempt ('unassigned' = not attempted yet)", labels=["platform", "app", "state"])
        queue = GaugeMetricFamily(f"{NS}_queue_depth", "queued deliveries", labels=["platform", "app"])
        platforms = sorted({*self.platforms, *(p for p, _ in counts)})
        filled = {(p, st): 0 for p in platforms for st in DELIVERY_STATES} | counts
        for (platform_, state), n in sorted(filled.items()):
            deliveries.add_metric([*_platform(platform_), state], float(n))
            if state == DeliveryState.QUEUED:
                queue.add_metric(_platform(platform_), float(n))
        yield from (deliveries, queue)
        age = GaugeMetricFamily(f"{NS}_queue_oldest_age_seconds", "age of the oldest queued delivery (since its job "
                                "was accepted; 0 when none is queued)", labels=["platform", "app"])
        for platform_, seconds in sorted(({p: 0.0 for p in platforms} | oldest).items()):
            age.add_metric(_platform(platform_), seconds)
        yield age
        hist = HistogramMetricFamily(f"{NS}_ack_latency_seconds", "first ack time minus send time", labels=["platform", "app"])
        empty = {"buckets": [(le, 0) for le in (*stats.LATENCY_BUCKETS_MS, float("inf"))], "sum_ms": 0.0}
        for platform_, h in sorted(({p: empty for p in self.platforms} | latency).items()):
            buckets = [("+Inf" if le == float("inf") else repr(le / 1000.0), float(n)) for le, n in h["buckets"]]
            hist.add_metric(_platform(platform_), buckets, h["sum_ms"] / 1000.0)
        yield hist
        events = CounterMetricFamily(f"{NS}_pipeline_events", "pipeline counters (jobs_accepted, acks_stored, "
                                     "acks_refused, ...)", labels=["event"])
        for name, value in sorted(counters.items()):
            events.add_metric([name], float(value))
        yield events
        jobs_family = GaugeMetricFamily(f"{NS}_jobs", "jobs by state", labels=["state"])
        for state, n in sorted(({s: 0 for s in JOB_STATES} | jobs).items()):
            jobs_family.add_metric([state], float(n))
        yield jobs_family
        dev = GaugeMetricFamily(f"{NS}_devices", "registered devices")
        dev.add_metric([], float(devices))
        yield dev
        people = GaugeMetricFamily(f"{NS}_people_held", "persons whose notifications are held by their quiet "
                                   "hours now, over the open jobs (JobStatus people.held summed)")
        people.add_metric([], float(held))
        yield people
        connected = GaugeMetricFamily(f"{NS}_devices_connected", "registered devices connected to the embedded "
                                      "broker with their device account, by segment (0 for a segment whose "
                                      "devices were seen since start and all left)", labels=["segment"])
        for segment, n in sorted(online.items()):
            connected.add_metric([segment], float(n))
        yield connected
        per_rule: dict[str, int] = {name: 0 for name in self.rules}
        for alarm in (alarms.firing if alarms is not None else []):
            per_rule[str(alarm.get("rule"))] = per_rule.get(str(alarm.get("rule")), 0) + 1
        firing_family = GaugeMetricFamily(f"{NS}_alarms_firing", "alarms firing now, by rule (0 for a configured "
                                          "rule with none firing)", labels=["rule"])
        for rule, n in sorted(per_rule.items()):
            firing_family.add_metric([rule], float(n))
        yield firing_family
        if alarms is not None:
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
                                   ("buffer_coalesced", "upstream_backlog_coalesced",
                                    "status snapshots superseded")):
                value = backlog.get(key)
                if isinstance(value, (int, float)):
                    c = CounterMetricFamily(f"{NS}_{name}", doc)
                    c.add_metric([], float(value))
                    yield c


def _connected_by_segment(conn: sqlite3.Connection, presence: dict[str, Any]) -> dict[str, int]:
    """segment → devices connected now, over the registered devices the broker has seen."""
    if not presence:
        return {}
    out: dict[str, int] = {}
    for device_id, segment in registry.segments_of(conn, presence).items():
        out[segment] = out.get(segment, 0) + (1 if presence[device_id].get("connected") else 0)
    return out


class Metrics:
    """The daemon's registry: what ``GET /metrics`` renders."""

    def __init__(self, db_path: Path, rules: list[str] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.runtime = RuntimeCollector()
        self.database = DatabaseCollector(db_path, rules)
        self.registry.register(self.runtime)
        self.registry.register(self.database)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http_requests = Counter(f"{NS}_http_requests", "HTTP API requests by route, method and status code",
                                     ["route", "method", "code"], registry=self.registry)
        self.http_acks = Counter(f"{NS}_http_acks", "acks POSTed to signed ack URLs, by result",
                                 ["result"], registry=self.registry)
        # Event streams are left out: their duration is how long a page stayed open.
        self.http_duration = Histogram(f"{NS}_http_request_duration_seconds",
                                       "HTTP API request handling time by route and method (event streams excluded)",
                                       ["route", "method"], buckets=HTTP_BUCKETS_S, registry=self.registry)
        self._lock = asyncio.Lock()

    def register(self, collector: Any) -> None:
        self.registry.register(collector)

    def observe_http(self, route: str, method: str, seconds: float) -> None:
        if not route.endswith("/events"):
            self.http_duration.labels(route, method).observe(seconds)

    async def render(self, snapshot: dict[str, Any]) -> bytes:
        async with self._lock:  # one scrape at a time: the runtime snapshot is per scrape
            self.runtime.snapshot = snapshot
            self.database.platforms = sorted(snapshot.get("bridges") or {})
            self.database.presence = snapshot.get("presence") or {}
            return await asyncio.to_thread(generate_latest, self.registry)

    def close(self) -> None:
        self.database.close()


__all__ = ["CONTENT_TYPE", "DatabaseCollector", "Metrics", "RuntimeCollector"]
