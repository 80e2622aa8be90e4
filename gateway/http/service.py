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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

import devices

from gateway.config import split_host_port
from gateway.http.acks import AckSigner, secret_path
from gateway.http.auth import BasicAuth
from gateway.http.errors import HTTP_CODES, ApiError, error_response
from gateway.http.reader import Reader
from gateway.http.routes import Api
from gateway.http.sessions import SessionStore
from gateway.http.streams import StreamSlots
from gateway.metrics import Metrics
from gateway.mqtt import GatewayClient
from gateway.pipeline.models import MAX_JOB_BYTES

if TYPE_CHECKING:
    from gateway.daemon import Daemon
    from gateway.health import HealthReporter

log = structlog.get_logger(__name__)

HEADER_TIMEOUT_S = 10.0
SHUTDOWN_S = 2.0
WEB_DIR = Path(devices.__file__).resolve().parent / "web"  # the package's data (pyproject package-data)
WEB_TYPES = {".js": "text/javascript", ".html": "text/html", ".css": "text/css", ".json": "application/json",
             ".webmanifest": "application/manifest+json", ".png": "image/png", ".svg": "image/svg+xml"}


class HttpStartError(Exception):
    """The API cannot serve (port in use, unreadable certificate or ack secret)."""

    exit_code = 2  # like a broker that cannot bind: a configuration problem


class Pulse:
    """Wakes every waiter at once when something committed (job status may have changed)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float, stopping: asyncio.Event) -> None:
        event = self._event
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


class HttpService:
    name = "http"

    def __init__(self, daemon: "Daemon", reporter: "HealthReporter"):
        assert daemon.cfg.http is not None
        self.daemon = daemon
        self.cfg = daemon.cfg.http
        self.reporter = reporter
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self.changes = Pulse()
        self.auth = BasicAuth(daemon.cfg)
        self.metrics = Metrics(daemon.cfg.db_path)
        self.reader = Reader(daemon.cfg.db_path)
        # The operator page (gateway.http.ui): its own read connection, so a device search
        # over 100,000 rows never delays an ack's lookup on the API's.
        self.ui_reader = Reader(daemon.cfg.db_path)
        self.sessions = SessionStore(Path(daemon.cfg.broker.auth.password_file))
        self.streams = StreamSlots(self.cfg.max_streams_per_account)  # every event stream, per account
        self.page: Any = None
        self.start_error: str | None = None
        self.signer: AckSigner
        try:
            self.signer = AckSigner.from_config(daemon.cfg)
        except (OSError, ValueError) as exc:
            self.start_error = f"http.ack_secret_file: cannot use {secret_path(daemon.cfg)}: {exc}"
            self.signer = AckSigner(b"unused" * 4, self.cfg.base_url())
        self.web_config: dict[str, Any] = {}
        self.bound_port: int | None = None  # set once listening (the kernel's pick for `bind` port 0)

    def ack_url(self, message_id: str) -> str:
        """The signed ack URL of a delivery (what the pipeline puts in every payload)."""
        return self.signer.url(message_id)

    def attach(self, client: GatewayClient) -> None:
        """No MQTT routes: the API enters the pipeline through its Python entry points."""

    # ------------------------------------------------------------------ app
    def build_app(self) -> web.Application:
        from gateway.http.ui import OperatorPage

        api = Api(self)
        self.page = page = OperatorPage(self, api)
        app = web.Application(client_max_size=MAX_JOB_BYTES + 1024, middlewares=[self._middleware])
        r = app.router
        r.add_get("/healthz", api.healthz, allow_head=False)
        r.add_get("/metrics", api.metrics, allow_head=False)
        r.add_get("/", page.index, allow_head=False)  # the page for browsers, the JSON pointer otherwise
        r.add_post("/v1/jobs", api.post_job)
        r.add_get("/v1/jobs", api.list_jobs, allow_head=False)
        r.add_get("/v1/jobs/{job_id}", api.get_job, allow_head=False)
        r.add_get("/v1/jobs/{job_id}/events", api.job_events, allow_head=False)
        r.add_get("/v1/devices", api.list_devices, allow_head=False)
        r.add_put("/v1/devices/{device_id}", api.put_device)
        r.add_get("/v1/devices/{device_id}", api.get_device, allow_head=False)
        r.add_delete("/v1/devices/{device_id}", api.delete_device)
        r.add_post("/v1/acks/{message_id}", api.post_ack)
        r.add_route("OPTIONS", "/v1/acks/{message_id}", api.ack_preflight)
        r.add_get("/web/config.json", self._web_config, allow_head=False)
        r.add_get("/web/", self._web_file, allow_head=False)
        r.add_get("/web/{name}", self._web_file, allow_head=False)
        page.add_routes(r)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        t0 = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except ApiError as err:
            response = error_response(err.status, err.code, err.message, err.headers)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, body limit
            code = HTTP_CODES.get(exc.status, "error")
            message = {404: f"no such route: {request.method} {request.path}"[:300],
                       405: f"{request.method} is not allowed here"}.get(exc.status, exc.reason)
            headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
            response = error_response(exc.status, code, message, headers)
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.http_requests.labels(route, request.method, "499").inc()
            raise
        except Exception:
            log.exception("http handler failed", route=route, method=request.method)
            response = error_response(500, "internal", "internal error (logged)")
        self.metrics.http_requests.labels(route, request.method, str(response.status)).inc()
        if response.status >= 500:
            log.warning("http request failed", route=route, method=request.method, status=response.status,
                        duration_ms=round((time.perf_counter() - t0) * 1000, 1))
        return response

    async def _web_config(self, request: web.Request) -> web.Response:
        from gateway.http.errors import json_response

        if self.web_config.get("vapid_public_key") is None:
            await self._load_web_config()  # the Web Push bridge may have created the key since
        return json_response(self.web_config)

    async def _web_file(self, request: web.Request) -> web.StreamResponse:
        """The Web Push client (devices/web/): public, static, only the files that exist there."""
        name = request.match_info.get("name", "") or "index.html"
        path = (WEB_DIR / name).resolve()
        if path.parent != WEB_DIR.resolve() or path.suffix not in WEB_TYPES or not path.is_file():
            raise ApiError(404, "not_found", f"no such file: /web/{name}"[:200])
        headers = {"Content-Type": WEB_TYPES[path.suffix], "Cache-Control": "no-cache"}
        if name == "sw.js":
            headers["Service-Worker-Allowed"] = "/web/"
        return web.FileResponse(path, headers=headers)

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

        cfg = self.daemon.cfg
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
        self.web_config = {"vapid_public_key": public_key, "api": self.cfg.base_url(), "site_id": cfg.gateway.site_id}

    async def _migrate_ui(self) -> None:
        """The operator page's indexes and tag table (gateway.http.ui_queries); without them
        the page still works, only slower, so a failure here does not stop the API."""
        from gateway.http import ui_queries
        from gateway.pipeline import schema

        def migrate(conn: Any) -> None:
            schema.migrate(conn)  # idempotent; whoever is first creates the pipeline's tables
            ui_queries.migrate(conn)

        try:
            await self.daemon.db.run(migrate)
        except Exception as exc:
            log.warning("operator page indexes not created; its searches will be slower", error=str(exc)[:300])

    async def run(self, stopping: asyncio.Event) -> None:
        if self.start_error:
            log.error("http api cannot start", error=self.start_error)
            raise HttpStartError(self.start_error)
        pipeline = self.daemon.pipeline
        recorder = getattr(pipeline, "recorder", None)
        if recorder is not None and isinstance(getattr(recorder, "on_commit", None), list):
            recorder.on_commit.append(self.changes.fire)
        self.metrics.register_services(self.daemon.services)
        await self._load_web_config()
        await self._migrate_ui()
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
            self.signer.base_url = base
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
