"""``homepot-gateway run``: the daemon's lifecycle in one asyncio loop.

Order matters: the embedded broker listens first, then the gateway's own client
connects to it (the same client code that external mode uses), then the services
run; systemd hears READY=1 only when all of that holds. Shutdown goes the other
way, so no in-flight work is cut off by a broker that is already gone.

SIGHUP (``systemctl reload``) re-reads what can change in place — the password file,
``[logging] level``, and whatever the service graph or :meth:`Daemon.on_reload` registered
— and names in one log line what else changed in the file and needs a restart.

The daemon owns the lifecycle only (lock, signals, reload, start order, stop budget);
which services run and what each is built with is :mod:`gateway.wiring`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal

import structlog

from gateway import __version__, clock, filemodes, gc_tuning
from gateway.broker.embedded import BrokerStartError, EmbeddedBroker, InternalCredentials
from gateway.config import Config, ConfigError, LoadedConfig, load_config, split_host_port
from gateway.lock import AlreadyRunning, DaemonLock
from gateway.migrations import SchemaTooNew
from gateway.mqtt import ConnectionSettings, GatewayClient
from gateway.mqtt_errors import NotConnected
from gateway.mqtt_url import MqttUrl
from gateway.sdnotify import Notifier
from gateway.service import Service, ServiceStartError
from gateway.storage import Database
from gateway.timeutil import iso, utcnow
from gateway.topics import Topics
from gateway.wiring import Build, ReloadCallback, Runtime, build

log = structlog.get_logger(__name__)

# Shutdown must fit the contract's 10 s whatever hangs (a bridge in send, a broker that
# never PUBACKs, a database locked by another process). Worst case, step by step:
STOP_BUDGET_S = 5.0  # services (the pipeline's own steps fit in 4.5 s)
OFFLINE_S = 0.8  # the retained "offline" publish
CLIENT_S = 0.8  # the gateway client's disconnect
BROKER_S = 1.5  # the embedded broker's stop
DB_CLOSE_S = 0.4  # the database thread (abandoned after this; SQLite's journal keeps it safe)
LOCK_WAIT_AT_STOP_S = 2.0  # after this, a locked database fails at once instead of waiting


class Daemon:
    """One gateway process: ``build`` makes its services once the broker and the client exist."""

    def __init__(self, loaded: LoadedConfig, build: Build = build, environ: dict[str, str] | None = None):
        cfg = loaded.config
        self.cfg = cfg  # as started; a reload hands callbacks a new one and never swaps this
        self.secrets = loaded.secrets
        self.log_level = cfg.logging.level  # the level in force: SIGHUP may change it
        self.topics = Topics(cfg.prefix)
        self.notifier = Notifier(environ)
        self.started_at = iso(utcnow())
        self.internal = InternalCredentials.generate()
        self.broker: EmbeddedBroker | None = None
        self.client: GatewayClient | None = None
        self.services: list[Service] = []
        self._build = build
        self.stop_event = asyncio.Event()
        self.db = Database(cfg.db_path)
        self.lock = DaemonLock(cfg.data_dir)
        self._reload_callbacks: list[tuple[str, ReloadCallback]] = []
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self._ready = False

    def on_reload(self, callback: ReloadCallback, name: str | None = None) -> None:
        """Call ``callback(cfg)`` on every SIGHUP (``systemctl reload``), in registration order.

        ``cfg`` is the configuration as re-read from the file (the running one if the file
        is now invalid). A callback drops what it caches from files or accounts (the HTTP
        API's verified credentials, say); it may be a coroutine function; one that raises is
        logged and does not stop the others. ``self.cfg`` keeps the values the daemon
        started with; the new ``logging.level`` is applied (:attr:`log_level`).
        """
        label = name if name is not None else str(getattr(callback, "__qualname__", repr(callback)))
        self._reload_callbacks.append((label, callback))

    # ------------------------------------------------------------------ helpers
    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "version": __version__, "started_at": self.started_at}).encode()

    def _client_url(self) -> str:
        """``broker.url``; in embedded mode a URL with port 0 means the port the kernel gave
        the first listener of the URL's transport that binds port 0."""
        b = self.cfg.broker
        url = MqttUrl(b.url)
        if b.mode != "embedded" or url.port != 0 or self.broker is None:
            return b.url
        wanted = {"mqtt": "tcp", "mqtts": "tls", "ws": "ws", "wss": "wss"}.get(url.scheme)
        bound = self.broker.bound_ports()
        for section in b.listeners:
            if section.type == wanted and split_host_port(section.bind)[1] == 0 and section.name in bound:
                host = f"[{url.host}]" if ":" in url.host else url.host
                return f"{url.scheme}://{host}:{bound[section.name]}"
        return b.url

    def client_settings(self) -> ConnectionSettings:
        b = self.cfg.broker
        username: str | None
        password: str | None
        if b.mode == "embedded" and not b.username:
            username, password = self.internal.username, self.internal.password
        else:
            username = b.username or None
            secret = self.secrets.broker.password
            password = secret.get_secret_value() if secret else None
        return ConnectionSettings(
            url=self._client_url(),
            client_id=f"homepot-gateway-{self.cfg.gateway.site_id}",
            username=username, password=password,
            ca_file=str(b.ca_file) if b.ca_file else None,
            cert_file=str(b.cert_file) if b.cert_file else None,
            key_file=str(b.key_file) if b.key_file else None,
            clean_session=False,
            will_topic=self.topics.gateway_status,
            will_payload=self._status_payload("offline"),
            protocol=b.protocol,
        )

    async def _announce_online(self, client: GatewayClient) -> None:
        await client.publish(self.topics.gateway_status, self._status_payload("online"), qos=1, retain=True)

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            self._private_data_dir()
            self.lock.acquire()
        except AlreadyRunning as exc:
            log.error("another gateway runs on this data_dir", error=str(exc))
            self._remove_signal_handlers(loop)
            return 2
        except OSError as exc:
            log.error("cannot use data_dir", data_dir=str(self.cfg.data_dir), error=str(exc))
            self._remove_signal_handlers(loop)
            return 2
        try:
            try:
                await self.db.open()  # the schema registry migrates, before any service starts
            except SchemaTooNew as exc:
                log.error("database schema is newer than this gateway", path=str(self.cfg.db_path), error=str(exc))
                await self.db.close(timeout=DB_CLOSE_S)
                return 2
            await clock.start(self.db)
            try:
                return await self._run()
            finally:
                if self._reload_task is not None:
                    await asyncio.gather(self._reload_task, return_exceptions=True)
                await self.db.close(timeout=DB_CLOSE_S)
        finally:
            self.lock.release()
            self._remove_signal_handlers(loop)
            self.notifier.close()

    def _private_data_dir(self) -> None:
        """Owner-only state whatever the umask (gateway/filemodes.py); say once what was loose."""
        done = filemodes.make_private(self.cfg.data_dir)
        if done.changed:
            log.info("data_dir tightened to owner-only", data_dir=str(self.cfg.data_dir),
                     entries=len(done.changed), changed=done.summary())
        if done.failed:
            log.warning("data_dir entries could not be made owner-only", data_dir=str(self.cfg.data_dir),
                        entries=[f"{p}: {e}" for p, e in done.failed[:10]])
        if done.skipped:
            log.warning("data_dir left as it is", reason=done.skipped)

    @staticmethod
    def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop_event.is_set():
            return
        log.info("stop requested", signal=sig.name)
        self.stop_event.set()

    # ------------------------------------------------------------------ reload (SIGHUP)
    def _on_hup(self) -> None:
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True  # one more pass after this one: the file may have changed since
            return
        self._reload_task = asyncio.create_task(self._reload_loop(), name="reload")

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload()
            except Exception as exc:  # a reload must never take the daemon down
                log.error("reload failed", error=repr(exc))
            if not self._reload_again or self.stop_event.is_set():
                return

    async def reload(self) -> dict[str, list[str]]:
        """What SIGHUP does; returns the ``reloaded`` and ``restart_needed`` key lists it logged."""
        tell_systemd = self._ready and not self.stop_event.is_set()
        if tell_systemd:
            self.notifier.send("RELOADING=1", "STATUS=reloading")
        reloaded: list[str] = []
        restart: list[str] = []
        effective = self.cfg
        source = self.cfg.source
        try:
            loaded = await asyncio.to_thread(load_config, source) if source is not None else None
            new = loaded.config if loaded is not None else None
        except ConfigError as exc:
            new = None
            log.error("reload: the config file is invalid; keeping the running configuration",
                      config=str(source), problems=exc.lines())
        if new is not None:
            effective = new
            if new.logging.level != self.log_level:
                from gateway.logs import set_level

                log.info("reload: log level changed", old=self.log_level, new=new.logging.level)
                set_level(new.logging.level)
                self.log_level = new.logging.level
                reloaded.append("logging.level")
            restart = [key for key in _changed_keys(self.cfg.model_dump(mode="json"), new.model_dump(mode="json"))
                       if key != "logging.level"]
        if self.broker is not None:
            try:
                accounts = await asyncio.to_thread(self.broker.reload_passwords)
                await self.broker.check_accounts()  # removed accounts, changed passwords and roles: now
                reloaded.append("broker.auth.password_file")
                log.info("reload: password file read", path=str(self.cfg.broker.auth.password_file),
                         accounts=accounts)
            except Exception as exc:  # noqa: BLE001 - a broken file is reported, the daemon keeps running
                log.error("reload: cannot read the password file", path=str(self.cfg.broker.auth.password_file),
                          error=str(exc))
        for name, callback in self._reload_callbacks:
            try:
                result = callback(effective)
                if inspect.isawaitable(result):
                    await result
                reloaded.append(name)
            except Exception as exc:  # noqa: BLE001 - one bad callback must not stop the others
                log.error("reload: callback failed", callback=name, error=repr(exc))
        if restart:
            log.warning("reload: these settings changed in the file and take effect only after a restart",
                        keys=restart)
        log.info("reloaded", reloaded=reloaded, restart_needed=restart)
        if tell_systemd and not self.stop_event.is_set():
            self.notifier.send("READY=1", f"STATUS=running; reloaded {', '.join(reloaded) or 'nothing'}")
        return {"reloaded": reloaded, "restart_needed": restart}

    async def _run(self) -> int:
        cfg = self.cfg
        if cfg.broker.mode == "embedded":
            # The broker reserves our client id for our account (contract §5).
            self.broker = EmbeddedBroker(cfg, self.internal, self.db,
                                         reserved_client_id=self.client_settings().client_id)
            try:
                await self.broker.start()
            except BrokerStartError as exc:
                log.error("broker failed to start", error=str(exc))
                self.broker = None
                return 2

        client = GatewayClient(self.client_settings(), name="broker", storage_probe=self.db.probe,
                               backoff_initial=cfg.broker.reconnect_initial_s, backoff_max=cfg.broker.reconnect_max_s)
        self.client = client
        graph = self._build(cfg, self.db, Runtime(started_at=self.started_at, secrets=self.secrets, client=client,
                                                   broker=self.broker))
        self.services = graph.services
        for name, callback in graph.reload_callbacks:
            self.on_reload(callback, name=name)
        for svc in self.services:
            svc.attach(client)
        client.on_connect(self._announce_online)

        client_stop = asyncio.Event()
        client_task = asyncio.create_task(client.run(client_stop), name="mqtt-client")
        if cfg.broker.mode == "embedded":
            connected = await client.wait_connected(timeout=10)
        else:
            # An external broker may come up after the gateway (its own unit, another host): the
            # first attempt's outcome is logged and the client retries in the background with
            # backoff (broker.reconnect_initial_s/_max_s); READY=1 does not wait for the retries.
            connected = await client.wait_first_attempt(timeout=10)
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
        clock_keeper = asyncio.create_task(clock.keep_saved(self.db), name="clock")
        status = f"running; broker {cfg.broker.mode} {cfg.broker.url}"
        if await _services_started(self.services, service_tasks):  # e.g. the HTTP API listens
            for step in graph.before_ready:  # runtime.json with the bound ports, before READY=1
                await step()
            self.notifier.ready(status)
            self._ready = True
            gc_tuning.freeze()  # startup's objects leave the collector's sight (gateway/gc_tuning.py)
            log.info("gateway ready", site_id=cfg.gateway.site_id, mode=cfg.broker.mode, url=cfg.broker.url,
                     services=[s.name for s in self.services], version=__version__)

        stop_wait = asyncio.create_task(self.stop_event.wait())
        await asyncio.wait([stop_wait, *service_tasks], return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        for task in service_tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                log.error("service crashed", service=task.get_name(), error=repr(error))
                exit_code = max(exit_code, error.exit_code if isinstance(error, ServiceStartError) else 1)

        # ---------------------------------------------------------- shutdown
        self.notifier.stopping("stopping: finishing in-flight work")
        log.info("stopping")
        services_stopping.set()
        self.db.stop_waiting_for_locks(LOCK_WAIT_AT_STOP_S)
        _, pending = await asyncio.wait(service_tasks, timeout=STOP_BUDGET_S) if service_tasks else (set(), set())
        for task in pending:
            log.warning("service did not stop in time; cancelling", service=task.get_name())
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=0.3)
        try:
            await client.publish(self.topics.gateway_status, self._status_payload("offline"), qos=1,
                                 retain=True, timeout=OFFLINE_S)
        except NotConnected:
            pass
        client_stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(client_task, return_exceptions=True), CLIENT_S)
        except TimeoutError:
            log.warning("mqtt client did not disconnect in time")
        watchdog.cancel()
        clock_keeper.cancel()
        stop_wait.cancel()
        await self._stop_broker()
        log.info("stopped", exit_code=exit_code)
        return exit_code

    async def _stop_broker(self) -> None:
        if self.broker is not None:
            try:
                await asyncio.wait_for(self.broker.stop(), BROKER_S)
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
    """Wait for each service's ``started`` event (set once it serves; None: serving once
    running); False if one ended first (it failed to start: no READY=1, the daemon stops)."""
    for svc, task in zip(services, tasks):
        started = svc.started
        if started is not None and not started.is_set():
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
    return not any(t.done() for t in tasks)


def _changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; lists (listeners, rules) are compared whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def run_daemon(loaded: LoadedConfig) -> int:
    gc_tuning.tune()
    return asyncio.run(Daemon(loaded).run())


__all__ = ["Daemon", "run_daemon"]
