"""Service ``http``: the HTTP API (contract §10) on aiohttp, in the daemon's own loop.

Started with the other services; it sets :attr:`HttpService.started` once its socket
listens, and the daemon sends ``READY=1`` only after that. On stop it closes the listener
at once, ends event streams, lets requests in progress finish for up to
:data:`SHUTDOWN_S` and then cuts them, well inside the daemon's 10 s budget.

Hostile clients: request line and header sizes are aiohttp's limits (8 KiB per line, 128
headers → 400); a connection must deliver its request headers within
:data:`HEADER_TIMEOUT_S` of connecting (or of its previous response) or it is closed, which
is what stops slowloris; a body must arrive within ``BODY_TIMEOUT_S`` (408) and under the
route's size limit (413). Every answer, including aiohttp's own 404/405, is a JSON error
and counted in ``homepot_http_requests_total``.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

import devices

from gateway.config import Config, split_host_port
from gateway.http.acks import AckSigner
from gateway.http.auth import BasicAuth
from gateway.http.people import PeopleRegistry
from gateway.http.pulse import Pulse
from gateway.http.reader import Reader
from gateway.http.routes import ApiParts, HealthView, JobIntake, api_app
from gateway.http.sessions import SessionStore
from gateway.http.static import StaticFiles
from gateway.http.streams import StreamSlots
from gateway.metrics import Metrics
from gateway.mqtt import GatewayClient
from gateway.service import ServiceStartError
from gateway.storage import Database

if TYPE_CHECKING:
    from gateway.http.ui import AlarmAcks, OperatorPage

log = structlog.get_logger(__name__)

HEADER_TIMEOUT_S = 10.0
SHUTDOWN_S = 2.0
WEB_DIR = Path(devices.__file__).resolve().parent / "web"  # the package's data (pyproject package-data)
WEB_FILES = StaticFiles(WEB_DIR, "/web/", frozenset({".js", ".html", ".css", ".json", ".webmanifest", ".png", ".svg"}))


class HttpStartError(ServiceStartError):
    """The API cannot serve (port in use, unreadable certificate or ack secret)."""


class HttpService:
    """Service ``http``. Its collaborators come from the wiring: the pipeline's entry
    points (``jobs``), the health snapshot, the ack signer (built before the pipeline,
    which puts its URLs in every payload; ``signer_error`` if the secret was unusable,
    reported when the API starts), and the pulse the pipeline fires on every commit."""

    name = "http"

    def __init__(self, cfg: Config, db: Database, jobs: JobIntake, health: HealthView, signer: AckSigner,
                 changes: Pulse, started_at: str, alarms: "AlarmAcks", people: PeopleRegistry,
                 signer_error: str | None = None):
        if cfg.http is None:
            raise ValueError("HttpService needs an [http] section")
        self.app_cfg = cfg
        self.cfg = cfg.http
        self.db = db
        self.started_at = started_at
        self.alarms = alarms
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self.changes = changes
        self.auth = BasicAuth(cfg)
        self.metrics = Metrics(cfg.db_path, rules=[r.name for r in cfg.rules])
        self.reader = Reader(cfg.db_path)
        # The operator page (gateway.http.ui): its own read connection, so a device search
        # over 100,000 rows never delays an ack's lookup on the API's.
        self.ui_reader = Reader(cfg.db_path)
        self.sessions = SessionStore(Path(cfg.broker.auth.password_file))
        self.streams = StreamSlots(self.cfg.max_streams_per_account)  # every event stream, per account
        self.page: OperatorPage | None = None
        self.start_error = signer_error
        self.signer = signer
        self.parts = ApiParts(cfg=cfg, jobs=jobs, health=health, reader=self.reader, auth=self.auth,
                              metrics=self.metrics, signer=signer, changes=changes, stopping=self.stopping,
                              streams=self.streams, people=people)
        self.web_config: dict[str, Any] = {}
        self.bound_port: int | None = None  # set once listening (the kernel's pick for `bind` port 0)
        self.base_url = self.cfg.base_url()  # with the bound port once listening, for `bind` port 0

    def attach(self, client: GatewayClient) -> None:
        """No MQTT routes: the API enters the pipeline through its Python entry points."""

    # ------------------------------------------------------------------ app
    def build_app(self) -> web.Application:
        from gateway.http.ui import OperatorPage

        app, api = api_app(self.parts)
        self.page = page = OperatorPage(self.parts, api, ui_reader=self.ui_reader, sessions=self.sessions,
                                        alarms=self.alarms, started_at=self.started_at)
        r = app.router
        r.add_get("/", page.index, allow_head=False)  # the page for browsers, the JSON pointer otherwise
        r.add_get("/web/config.json", self._web_config, allow_head=False)
        r.add_get("/web/", self._web_file, allow_head=False)
        r.add_get("/web/{name}", self._web_file, allow_head=False)
        page.add_routes(r)
        # A person's own page and routes (/me, /v1/me*): same sessions and login form.
        from gateway.http.me import MeRoutes
        from gateway.people.own import OwnChanges

        MeRoutes(self.parts, api, sessions=self.sessions, people=OwnChanges(self.db),
                 login_page=page.login_page).add_routes(r)
        return app

    async def _web_config(self, request: web.Request) -> web.Response:
        from gateway.http.errors import json_response

        if self.web_config.get("vapid_public_key") is None:
            await self._load_web_config()  # the Web Push bridge may have created the key since
        return json_response(self.web_config)

    async def _web_file(self, request: web.Request) -> web.StreamResponse:
        """The Web Push client (devices/web/): public, static, only the files that exist there."""
        name = request.match_info.get("name", "") or "index.html"
        return WEB_FILES.response(name, {"Service-Worker-Allowed": "/web/"} if name == "sw.js" else None)

    # ------------------------------------------------------------------ lifecycle
    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.cfg.certfile), str(self.cfg.keyfile))
        except (OSError, ssl.SSLError) as exc:
            raise HttpStartError(f"http.certfile/keyfile: cannot load ({exc})") from None
        return ctx

    async def _load_web_config(self) -> None:
        from gateway import vapid

        cfg = self.app_cfg
        public_key = None
        path = cfg.bridges.webpush.vapid_private_key_file
        if cfg.bridges.webpush.enabled:
            # Read only: the Web Push bridge creates the key at start (O_EXCL); creating it
            # here too would race it. Until it exists, config.json says null and is retried.
            try:
                if await asyncio.to_thread(path.exists):
                    public_key = vapid.public_key_b64(await asyncio.to_thread(vapid.load_or_create, path))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("web push client gets no VAPID key", error=str(exc))
        self.web_config = {"vapid_public_key": public_key, "api": self.base_url, "site_id": cfg.gateway.site_id}

    async def run(self, stopping: asyncio.Event) -> None:
        if self.start_error:
            log.error("http api cannot start", error=self.start_error)
            raise HttpStartError(self.start_error)
        await self._load_web_config()
        ssl_ctx = self._ssl_context()
        host, port = split_host_port(self.cfg.bind)
        runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                               keepalive_timeout=HEADER_TIMEOUT_S, shutdown_timeout=SHUTDOWN_S)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=512, shutdown_timeout=SHUTDOWN_S)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            log.error("http api cannot listen", bind=self.cfg.bind, error=exc.strerror or str(exc))
            raise HttpStartError(f"http.bind: cannot listen on {self.cfg.bind}: {exc.strerror or exc}") from None
        self.bound_port = runner.addresses[0][1]
        if port == 0 and not self.cfg.public_url:
            # The kernel chose the port: ack URLs and the page's API address must carry it.
            bind_host = self.cfg.bind.rpartition(":")[0]  # IPv6 keeps its brackets
            base = f"{'https' if self.cfg.tls else 'http'}://{bind_host}:{self.bound_port}"
            self.base_url = self.signer.base_url = base
            if self.web_config:
                self.web_config["api"] = base
        if not self.cfg.public_url and host in ("0.0.0.0", "::", ""):
            log.warning("http.public_url is not set and http.bind is a wildcard address: ack URLs in payloads "
                        "point at it and devices cannot reach them; set http.public_url", bind=self.cfg.bind)
        self.started.set()
        log.info("http api listening", bind=self.cfg.bind, tls=self.cfg.tls, public_url=self.cfg.base_url())
        try:
            await stopping.wait()
        finally:
            self.stopping.set()
            self.changes.fire()
            if self.page is not None:
                self.page.hub.stop()
            try:
                await asyncio.wait_for(runner.cleanup(), SHUTDOWN_S + 1.5)
            except TimeoutError:
                log.warning("http api did not stop in time")
            self.metrics.close()
            await asyncio.to_thread(self.reader.close)
            await asyncio.to_thread(self.ui_reader.close)
            self.auth.close()
            log.info("http api stopped")


__all__ = ["HttpService", "HttpStartError"]
