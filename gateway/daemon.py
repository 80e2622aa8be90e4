"""``homepot-gateway run``: the daemon's lifecycle in one asyncio loop.

Order matters: the embedded broker listens first, then the gateway's own client
connects to it (the same client code that external mode uses), then the services
run; systemd hears READY=1 only when all of that holds. Shutdown goes the other
way, so no in-flight work is cut off by a broker that is already gone.
"""

from __future__ import annotations

import asyncio
import json

import signal
from collections.abc import Callable
from typing import Any

import structlog

from gateway import __version__
from gateway.broker import BrokerStartError, EmbeddedBroker, InternalCredentials
from gateway.config import Config
from gateway.mqtt import ConnectionSettings, GatewayClient, NotConnected
from gateway.sdnotify import Notifier
from gateway.service import Service
from gateway.storage import Database
from gateway.timeutil import iso, utcnow
from gateway.topics import Topics

log = structlog.get_logger(__name__)

STOP_BUDGET_S = 6.0  # of the contract's 10 s; then ≤1.5 s for the client and ≤2 s for the broker


ServiceFactory = Callable[["Daemon"], list[Service]]


class Daemon:
    def __init__(self, cfg: Config, service_factory: ServiceFactory | None = None,
                 environ: dict[str, str] | None = None):
        self.cfg = cfg
        self.topics = Topics(cfg.prefix)
        self.notifier = Notifier(environ)
        self.started_at = iso(utcnow())
        self.internal = InternalCredentials.generate()
        self.broker: EmbeddedBroker | None = None
        self.client: GatewayClient | None = None
        self.services: list[Service] = []
        self.pipeline: Any = None
        self._service_factory = service_factory or default_services
        self.stop_event = asyncio.Event()
        self.db = Database(cfg.db_path)

    # ------------------------------------------------------------------ helpers
    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "version": __version__, "started_at": self.started_at}).encode()

    def client_settings(self) -> ConnectionSettings:
        b = self.cfg.broker
        if b.mode == "embedded" and not b.username:
            username, password = self.internal.username, self.internal.password
        else:
            username = b.username or None
            password = b.password.get_secret_value() if b.password else None
        return ConnectionSettings(
            url=b.url,
            client_id=f"homepot-gateway-{self.cfg.gateway.site_id}",
            username=username, password=password,
            ca_file=str(b.ca_file) if b.ca_file else None,
            cert_file=str(b.cert_file) if b.cert_file else None,
            key_file=str(b.key_file) if b.key_file else None,
            clean_session=False,
            will_topic=self.topics.gateway_status,
            will_payload=self._status_payload("offline"),
        )

    async def _announce_online(self, client: GatewayClient) -> None:
        await client.publish(self.topics.gateway_status, self._status_payload("online"), qos=1, retain=True)

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        await self.db.open()
        try:
            return await self._run()
        finally:
            await self.db.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            self.notifier.close()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop_event.is_set():
            return
        log.info("stop requested", signal=sig.name)
        self.stop_event.set()

    async def _run(self) -> int:
        cfg = self.cfg
        if cfg.broker.mode == "embedded":
            self.broker = EmbeddedBroker(cfg, self.internal, self.db)
            try:
                await self.broker.start()
            except BrokerStartError as exc:
                log.error("broker failed to start", error=str(exc))
                self.broker = None
                return 2

        client = GatewayClient(self.client_settings(), name="broker")
        self.client = client
        self.services = self._service_factory(self)
        for svc in self.services:
            svc.attach(client)
        client.on_connect(self._announce_online)

        client_stop = asyncio.Event()
        client_task = asyncio.create_task(client.run(client_stop), name="mqtt-client")
        connected = await client.wait_connected(timeout=10)
        if not connected and cfg.broker.mode == "embedded":
            log.error("cannot connect to the embedded broker", url=cfg.broker.url, error=client.last_error)
            client_stop.set()
            await client_task
            await self._stop_broker()
            return 1
        if not connected:
            log.warning("external broker unreachable; retrying in the background", url=cfg.broker.url)

        services_stopping = asyncio.Event()
        service_tasks = [asyncio.create_task(svc.run(services_stopping), name=svc.name) for svc in self.services]
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        status = f"running; broker {cfg.broker.mode} {cfg.broker.url}"
        if await _services_started(self.services, service_tasks):  # e.g. the HTTP API listens
            self.notifier.ready(status)
            log.info("gateway ready", site_id=cfg.gateway.site_id, mode=cfg.broker.mode, url=cfg.broker.url,
                     services=[s.name for s in self.services], version=__version__)

        stop_wait = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait([stop_wait, *service_tasks], return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        for task in service_tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("service crashed", service=task.get_name(), error=repr(task.exception()))
                exit_code = max(exit_code, getattr(task.exception(), "exit_code", 1))

        # ---------------------------------------------------------- shutdown
        self.notifier.stopping("stopping: finishing in-flight work")
        log.info("stopping")
        services_stopping.set()
        _, pending = await asyncio.wait(service_tasks, timeout=STOP_BUDGET_S) if service_tasks else (set(), set())
        for task in pending:
            log.warning("service did not stop in time; cancelling", service=task.get_name())
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            await client.publish(self.topics.gateway_status, self._status_payload("offline"), qos=1,
                                 retain=True, timeout=2)
        except NotConnected:
            pass
        client_stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(client_task, return_exceptions=True), 1.5)
        except TimeoutError:
            log.warning("mqtt client did not disconnect in time")
        watchdog.cancel()
        stop_wait.cancel()
        await self._stop_broker()
        log.info("stopped", exit_code=exit_code)
        return exit_code

    async def _stop_broker(self) -> None:
        if self.broker is not None:
            try:
                await asyncio.wait_for(self.broker.stop(), 2)
            except (TimeoutError, Exception) as exc:  # never block exit on broker teardown
                log.warning("broker shutdown incomplete", error=repr(exc))

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


async def _services_started(services: list[Service], tasks: list[asyncio.Task[None]]) -> bool:
    """Wait for each service that has a ``started`` event (set once it serves); False if one
    ended first (it failed to start: no READY=1, the daemon stops)."""
    for svc, task in zip(services, tasks):
        started = getattr(svc, "started", None)
        if isinstance(started, asyncio.Event) and not started.is_set():
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
    return not any(t.done() for t in tasks)


def default_services(daemon: Daemon) -> list[Service]:
    """The services a daemon runs: the pipeline (and upstream link), then the health
    reporter and, with [http], the HTTP API."""
    services = _core_services(daemon)
    return [*services, *_observer_services(daemon)]


def _core_services(daemon: Daemon) -> list[Service]:
    """The pipeline and upstream link."""
    from gateway.pipeline import Pipeline

    if daemon.cfg.upstream is None:
        pipeline = Pipeline(daemon.cfg, daemon.db)
        daemon.pipeline = pipeline
        return [pipeline]
    from gateway.upstream import UpstreamLink, outbox

    # Status changes and acks are queued for the cloud in the pipeline's own transactions.
    pipeline = Pipeline(daemon.cfg, daemon.db, forward=outbox)
    daemon.pipeline = pipeline
    return [pipeline, UpstreamLink(daemon.cfg, daemon.db, pipeline)]


def _observer_services(daemon: Daemon) -> list[Service]:
    """runtime.json for `status`, /healthz and /metrics; the HTTP API when [http] is set."""
    from gateway.health import HealthReporter

    reporter = HealthReporter(daemon)
    if daemon.cfg.http is None:
        return [reporter]
    from gateway.http import HttpService

    http = HttpService(daemon, reporter)
    if daemon.pipeline is not None:
        daemon.pipeline.ack_url = http.ack_url  # every payload carries its signed ack URL (§8)
    on_reload = getattr(daemon, "on_reload", None)  # SIGHUP: forget cached HTTP logins
    if callable(on_reload):
        on_reload(http.auth.invalidate)
    return [reporter, http]


def run_daemon(cfg: Config) -> int:
    return asyncio.run(Daemon(cfg).run())


__all__ = ["Daemon", "run_daemon"]
