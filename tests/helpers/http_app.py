"""The daemon's HTTP service served in the test's own process, for tests of HTTP behaviour.

:func:`serve_api` builds what :func:`gateway.wiring.build` gives the HTTP service, without
a daemon process: the real :class:`gateway.http.service.HttpService` (the API's routes,
the operator page, ``/me``, the login sessions, the stream caps, the listener with its
header timeout and TLS), the real person registry writes, and the pipeline's real entry
points — :class:`gateway.pipeline.intake.Intake` with its :class:`Recorder` on a migrated
database — so a job, a device or an ack sent over HTTP is committed exactly as in the
daemon. Nothing dispatches: no expander, dispatcher or bridge runs, so a job stays
``accepted``. What would cross to another process is a strict fake:

* the gateway's MQTT client (:class:`RecordingClient`) records what the intake publishes;
* the health snapshot is the real :class:`gateway.health.HealthReporter`'s, over probes
  that report a given broker and given bridges (:class:`GivenBroker`, :class:`GivenBridges`);
* the alarm engine (:class:`StrictAlarms`) answers only the acks a test scripts.

A fake asked for something it was not given records it in :attr:`ServedApi.unexpected`;
the server's close fails the test if any did, since a handler may turn the exception into
a 500 that the test alone might not notice.

The service runs on an event loop in a thread and listens on 127.0.0.1 port 0, so a test
drives it with the same synchronous clients (httpx, raw sockets, a browser) it would use
against a daemon: :class:`ServedApi` has :class:`tests.http.conftest.ApiGateway`'s
``base``, ``http_port``, ``client(user)``, ``data_dir`` and ``close()``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.helpers.accounts import write_accounts
from tests.helpers.config import base_config

T = TypeVar("T")

STARTED_AT = "2026-01-01T00:00:00.000Z"
START_TIMEOUT_S = 20.0


class RecordingClient:
    """The gateway's MQTT client as the intake and the health reporter use it: connected,
    every publish recorded as (topic, payload)."""

    def __init__(self) -> None:
        from gateway.setaside import SetAside

        import structlog

        self.connected = True
        self.last_error: str | None = None
        self.set_aside = SetAside(structlog.get_logger(__name__), "broker")
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      timeout: float = 10.0, **_: Any) -> None:
        self.published.append((topic, payload if isinstance(payload, bytes) else payload.encode()))


@dataclass
class GivenBroker:
    """The embedded broker's counters, as given by the test."""

    counters: dict[str, Any] = field(default_factory=lambda: {
        "clients_connected": 1, "sessions": 1, "subscriptions": 3, "retained": 0, "queued": 0, "dropped": 0})

    def metrics(self) -> dict[str, Any]:
        return dict(self.counters)


@dataclass
class GivenBridges:
    """The pipeline's bridge health, as given by the test (default: simulation and mqtt,
    healthy: the bridges of :func:`tests.helpers.base_config`)."""

    health: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        name: {"healthy": True, "reason": None, "paused_for_s": 0.0, "in_flight": 0, "sent": 0}
        for name in ("simulation", "mqtt")})

    def bridge_health(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.health.items()}


class StrictAlarms:
    """The alarm engine's ack entry (:class:`gateway.http.ui.AlarmAcks`): each call answers
    the next scripted outcome; an unscripted call is recorded as unexpected."""

    def __init__(self, unexpected: list[str]) -> None:
        self.outcomes: list[str] = []
        self.calls: list[tuple[str, str, str, str | None, str]] = []
        self._unexpected = unexpected

    async def acknowledge(self, rule: str, key: str, by: str, note: str | None, source: str) -> str:
        self.calls.append((rule, key, by, note, source))
        if not self.outcomes:
            self._unexpected.append(f"alarm ack {rule}/{key} by {by}")
            raise AssertionError(f"unexpected alarm ack {rule}/{key} by {by}")
        return self.outcomes.pop(0)


class PipelineEntry:
    """The :class:`gateway.http.routes.JobIntake` port as the daemon's pipeline serves it
    (gateway.pipeline.service.Pipeline's intake API): the real intake, ready at once."""

    def __init__(self, intake: Any) -> None:
        self.intake = intake
        self.ready = asyncio.Event()
        self.ready.set()

    async def submit_job(self, payload: bytes, source: str) -> str | None:
        return await self.intake.submit_job(payload, source)

    async def register_device(self, device_id: str, payload: bytes, source: str) -> bool:
        return bool(await self.intake.register_device(device_id, payload, source))

    async def ack(self, device_id: str, payload: bytes, source: str, via: Any) -> Any:
        return await self.intake.ack(device_id, payload, source, via)


@dataclass
class ServedApi:
    """A served :class:`HttpService` and what it was built with."""

    tmp: Path
    config_data: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    users: dict[str, tuple[str, str]]
    scheme: str = "http"
    verify: Any = True
    unexpected: list[str] = field(default_factory=list)
    clients: dict[str, httpx.Client] = field(default_factory=dict)
    svc: Any = None
    db: Any = None
    mqtt: RecordingClient | None = None
    health: Any = None
    broker: GivenBroker | None = None
    bridges: GivenBridges | None = None
    alarms: StrictAlarms | None = None

    @property
    def http_port(self) -> int:
        assert self.svc is not None and self.svc.bound_port, "the service is not listening"
        return int(self.svc.bound_port)

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    @property
    def data_dir(self) -> Path:
        return self.tmp / "var"

    def client(self, user: str | None = None) -> httpx.Client:
        key = user or ""
        if key not in self.clients:
            auth = (user, self.users[user][1]) if user else None
            self.clients[key] = httpx.Client(base_url=self.base, auth=auth, timeout=30, verify=self.verify)
        return self.clients[key]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the service's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def refresh_health(self) -> dict[str, Any]:
        """The reporter measures again (after a test changed the given broker or bridges)."""
        return self.call(self.health.refresh())

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()


@contextmanager
def serve_api(tmp: Path, extra: dict[str, Any] | None = None, users: dict[str, tuple[str, str]] | None = None,
              scheme: str = "http") -> Iterator[ServedApi]:
    """The HTTP service of a daemon configured like :func:`tests.http.conftest.make_api_gateway`
    (``base_config`` plus ``extra``, ``[http]`` on 127.0.0.1 port 0, ``users`` hashed
    cheaply), served in this process until the block ends."""
    from gateway.config import parse_config

    extra = dict(extra or {})
    http = {"bind": "127.0.0.1:0", **extra.pop("http", {})}
    data = base_config(tmp, 0, http=http, **extra)
    users = dict(users or {})
    if users:
        write_accounts(tmp / "var" / "passwd", users)
    cfg = parse_config(data, environ={}).config
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="served-api", daemon=True)
    thread.start()
    served = ServedApi(tmp, data, loop, users, scheme=scheme)
    stopping: asyncio.Event | None = None
    tasks: list[asyncio.Task[Any]] = []

    async def start() -> None:
        nonlocal stopping
        from gateway.health import HealthProbes, HealthReporter
        from gateway.http.acks import load_signer
        from gateway.http.pulse import Pulse
        from gateway.http.service import HttpService
        from gateway.people.service import PeopleWriter
        from gateway.pipeline.intake import Intake
        from gateway.pipeline.recorder import Recorder
        from gateway.storage import Database
        from gateway.topics import Topics

        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        served.db = db = await Database(cfg.db_path).open()
        changes = Pulse()
        recorder = Recorder(db)
        recorder.on_commit.append(changes.fire)  # what Pipeline.on_commit wires for the API
        tasks.append(asyncio.get_running_loop().create_task(recorder.run()))
        served.mqtt = RecordingClient()
        intake = Intake(db, served.mqtt, Topics(cfg.prefix), recorder, on_job=lambda: None, on_status=changes.fire)
        served.broker, served.bridges = GivenBroker(), GivenBridges()
        served.health = HealthReporter(cfg, db, HealthProbes(client=served.mqtt, started_at=STARTED_AT,  # type: ignore[arg-type]
                                                             broker=served.broker, bridges=served.bridges))
        await served.health.refresh()
        served.alarms = StrictAlarms(served.unexpected)
        signer, signer_error = load_signer(cfg)
        served.svc = HttpService(cfg, db, jobs=PipelineEntry(intake), health=served.health, signer=signer,
                                 changes=changes, started_at=STARTED_AT, alarms=served.alarms,
                                 people=PeopleWriter(db), signer_error=signer_error)
        stopping = asyncio.Event()
        run = asyncio.get_running_loop().create_task(served.svc.run(stopping))
        tasks.insert(0, run)
        started = asyncio.get_running_loop().create_task(served.svc.started.wait())
        await asyncio.wait([run, started], timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if run.done():
            run.result()  # the service's own start error
        assert served.svc.started.is_set(), "the HTTP service did not start listening"

    async def stop() -> BaseException | None:
        """Stop as the daemon stops the service; what its run() raised, if anything."""
        failed: BaseException | None = None
        if stopping is not None:
            stopping.set()
        if tasks:
            run, *others = tasks
            [failed] = await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 10)
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        if served.db is not None:
            await served.db.close()
        return failed

    body_done = False
    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S + 5)
        yield served
        assert served.unexpected == [], f"the fakes were asked what no test scripted: {served.unexpected}"
        body_done = True
    finally:
        served.close()
        try:
            failed = asyncio.run_coroutine_threadsafe(stop(), loop).result(20)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
        if body_done and failed is not None:
            raise AssertionError(f"the HTTP service did not stop cleanly: {failed!r}") from failed


__all__ = ["GivenBridges", "GivenBroker", "PipelineEntry", "RecordingClient", "ServedApi", "StrictAlarms",
           "serve_api"]
