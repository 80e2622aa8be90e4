"""The routes of contract §10 (``GET /``'s operator page for browsers is :mod:`gateway.http.ui`).

Every handler validates with the same functions as the MQTT side
(:mod:`gateway.pipeline.models`) and commits through the same pipeline entry points
(:class:`gateway.pipeline.intake.Intake`), so HTTP and MQTT input cannot drift apart:
the same job is accepted or rejected with the same code and message, a known job_id is
not dispatched twice, an ack is stored exactly as an MQTT ack. Nothing is answered 2xx
before it is committed; a database that cannot commit is 503 ``not_stored``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from bridges.registry import app_names
from gateway.config import Config
from gateway.ids import NOT_DOTS, is_id
from gateway.http.acks import AckSigner
from gateway.http.auth import BasicAuth, Principal
from gateway.broker.presence import device_presence
from gateway.http.errors import HTTP_CODES, ApiError, error_response, json_response
from gateway.http.people import PeopleRegistry, PeopleRoutes
from gateway.http.pulse import Pulse
from gateway.http.reader import Reader
from gateway.http.streams import StreamSlots
from gateway.metrics import Metrics
from gateway.pipeline import acks, deliveries, registry
from gateway.pipeline import jobs as pipeline_jobs
from gateway.pipeline.models import (
    DEVICE_ID_RE,
    JOB_ID_RE,
    MAX_ACK_BYTES,
    MAX_DEVICE_BYTES,
    MAX_JOB_BYTES,
    AckVia,
    InputError,
    decode_json_object,
    parse_ack,
    parse_device,
    parse_job,
    readable_job_id,
)
from gateway.states import FINAL_JOB_STATES
from gateway.storage import STORAGE_ERRORS
from gateway.timeutil import iso, utcnow

log = structlog.get_logger(__name__)

T = TypeVar("T")

BODY_TIMEOUT_S = 10.0  # a body that trickles in slower than this is answered 408
READY_TIMEOUT_S = 5.0
SSE_POLL_S = 1.0
SSE_MIN_INTERVAL_S = 0.2
SSE_KEEPALIVE_S = 15.0
MAX_LIST = 10_000
DEFAULT_LIST = 1000
ACK_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "86400",
            "Access-Control-Expose-Headers": "Retry-After"}  # a service worker on another origin honours it


async def read_body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, at most ``limit`` bytes (413) and within :data:`BODY_TIMEOUT_S` (408)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"{what}: {request.content_length} bytes is over the {limit} byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"{what}: over the {limit} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "timeout", f"{what}: the body did not arrive within {BODY_TIMEOUT_S:g} s",
                       {"Connection": "close"}) from None
    return b"".join(chunks)


class JobIntake(Protocol):
    """Where the API's input goes: the pipeline's own entry points (the MQTT path's)."""

    @property
    def ready(self) -> asyncio.Event: ...

    async def submit_job(self, payload: bytes, source: str) -> str | None: ...

    async def register_device(self, device_id: str, payload: bytes, source: str) -> bool: ...

    async def ack(self, device_id: str, payload: bytes, source: str, via: AckVia) -> acks.AckResult | None: ...


class HealthView(Protocol):
    """The runtime snapshot (:class:`gateway.health.HealthReporter`)."""

    @property
    def latest(self) -> dict[str, Any]: ...

    def snapshot(self) -> dict[str, Any]: ...


@dataclass
class ApiParts:
    """What the routes use, each typed: built by :class:`gateway.http.service.HttpService`
    from the daemon's wiring, or by a test with fakes of the ports (:class:`JobIntake`,
    :class:`HealthView`) and real readers on a test database."""

    cfg: Config
    jobs: JobIntake
    health: HealthView
    reader: Reader
    auth: BasicAuth
    metrics: Metrics
    signer: AckSigner
    changes: Pulse             # fired after every pipeline commit (event streams re-read)
    stopping: asyncio.Event    # set when the API stops (event streams end)
    streams: StreamSlots       # every event stream, counted per account
    people: PeopleRegistry     # the person registry's writes (/v1/people)


def api_app(parts: ApiParts) -> tuple[web.Application, "Api"]:
    """An application with the contract's routes (all but ``GET /``, which the operator
    page answers for browsers too) and the middleware that makes every answer a JSON error
    and counts it; the HTTP service adds the page and the Web Push client's files."""
    api = Api(parts)
    app = web.Application(client_max_size=MAX_JOB_BYTES + 1024, middlewares=[json_errors(parts.metrics)])
    api.add_routes(app.router)
    return app, api


def json_errors(metrics: Metrics) -> Middleware:
    """Every answer, including aiohttp's own 404/405 and a handler's bug, is a JSON error,
    counted in ``homepot_http_requests_total``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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
        except asyncio.CancelledError:
            metrics.http_requests.labels(route, request.method, "499").inc()
            raise
        except ConnectionResetError:
            # The client went away (a page closed, a stream dropped): nothing for an operator to
            # do, so not an error. Answering instead of raising keeps aiohttp from logging the
            # traceback at ERROR; its write of this answer to the closed transport is dropped.
            log.debug("http client went away", route=route, method=request.method)
            metrics.http_requests.labels(route, request.method, "499").inc()
            metrics.observe_http(route, request.method, time.perf_counter() - t0)
            return web.Response(status=499)
        except Exception:
            log.exception("http handler failed", route=route, method=request.method)
            response = error_response(500, "internal", "internal error (logged)")
        metrics.http_requests.labels(route, request.method, str(response.status)).inc()
        metrics.observe_http(route, request.method, time.perf_counter() - t0)
        if response.status >= 500:
            log.warning("http request failed", route=route, method=request.method, status=response.status,
                        duration_ms=round((time.perf_counter() - t0) * 1000, 1))
        return response

    return middleware


class Api:
    """Handlers bound to their collaborators (:class:`ApiParts`)."""

    def __init__(self, parts: ApiParts):
        self.svc = parts

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/healthz", self.healthz, allow_head=False)
        r.add_get("/metrics", self.metrics, allow_head=False)
        r.add_post("/v1/jobs", self.post_job)
        r.add_get("/v1/jobs", self.list_jobs, allow_head=False)
        r.add_get("/v1/jobs/{job_id}", self.get_job, allow_head=False)
        r.add_get("/v1/jobs/{job_id}/events", self.job_events, allow_head=False)
        r.add_get("/v1/devices", self.list_devices, allow_head=False)
        r.add_put("/v1/devices/{device_id}", self.put_device)
        r.add_get("/v1/devices/{device_id}", self.get_device, allow_head=False)
        r.add_delete("/v1/devices/{device_id}", self.delete_device)
        r.add_post("/v1/acks/{message_id}", self.post_ack)
        r.add_route("OPTIONS", "/v1/acks/{message_id}", self.ack_preflight)
        PeopleRoutes(self, self.svc.people).add_routes(r)

    # ------------------------------------------------------------------ helpers
    async def _ready(self) -> JobIntake:
        jobs = self.svc.jobs
        try:
            await asyncio.wait_for(jobs.ready.wait(), READY_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(503, "not_ready", "the pipeline is still starting", {"Retry-After": "1"}) from None
        return jobs

    async def intake(self) -> JobIntake:
        """The pipeline's entry points once it runs (503 ``not_ready`` meanwhile): for the
        routes of other modules (gateway.http.me) that enter it the same way."""
        return await self._ready()

    async def _db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read (on the API's read-only connection, never queued behind the writer's fsyncs)."""
        try:
            return await self.svc.reader.run(fn)
        except STORAGE_ERRORS as exc:
            raise _not_stored(exc) from None

    async def _principal(self, request: web.Request) -> Principal:
        return await self.svc.auth.principal(request.headers.get("Authorization"), request.remote or "")

    # ------------------------------------------------------------------ public
    async def healthz(self, request: web.Request) -> web.Response:
        snap = self.svc.health.snapshot()
        body = {"status": snap["status"], "checks": snap["checks"]}
        return json_response(body, status=200 if snap["status"] == "ok" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        from gateway.metrics import CONTENT_TYPE

        data = await self.svc.metrics.render(self.svc.health.snapshot())
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})

    async def index(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        if not principal.may_read_jobs():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not read the gateway's state")
        return json_response({"service": "homepot-gateway", "site_id": self.svc.cfg.gateway.site_id,
                              "api": "/v1", "jobs": "/v1/jobs", "devices": "/v1/devices", "health": "/healthz",
                              "metrics": "/metrics", "web_push_client": "/web/"})

    # ------------------------------------------------------------------ jobs
    async def post_job(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        if not principal.may_submit_jobs():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not submit jobs")
        payload = await read_body(request, MAX_JOB_BYTES, "job")
        status = await self.submit_job(principal, payload)
        return json_response(status, status=202, headers={"Location": f"/v1/jobs/{status['job_id']}"})

    async def submit_job(self, principal: Any, payload: bytes) -> dict[str, Any]:
        """Validate and commit a job (the API's and the operator page's one way in); the
        JobStatus, or the ApiError the API answers."""
        if not principal.may_submit_jobs():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not submit jobs")
        try:
            obj = decode_json_object(payload, MAX_JOB_BYTES, "job")
        except InputError as err:
            raise ApiError.from_input(err) from None
        job_id = readable_job_id(obj)
        problem: InputError | None = None
        try:
            parse_job(obj)
        except InputError as err:
            problem = err
            if job_id is None:
                raise ApiError.from_input(err) from None
        pipeline = await self._ready()
        try:
            # The MQTT path's own entry: idempotency by job_id, rejection published on
            # P/jobs/<job_id>/status, and the job committed before this returns.
            accepted = await pipeline.submit_job(payload, "http")
        except STORAGE_ERRORS as exc:
            raise _not_stored(exc) from None
        if accepted is None:
            if problem is not None:
                raise ApiError.from_input(problem)
            raise ApiError(503, "not_stored", "the job was not stored; try again", {"Retry-After": "5"})
        status = await self._db(lambda conn: pipeline_jobs.job_status(conn, accepted))
        if status is None:
            raise ApiError(503, "not_stored", "the job could not be read back; try again")
        return status

    async def list_jobs(self, request: web.Request) -> web.Response:
        await self._reader(request)
        limit = _int_param(request, "limit", DEFAULT_LIST, 1, MAX_LIST)
        return json_response(await self._db(lambda conn: pipeline_jobs.list_jobs(conn, limit)))

    async def get_job(self, request: web.Request) -> web.Response:
        await self._reader(request)
        return json_response(await self._job(request.match_info["job_id"]))

    async def _reader(self, request: web.Request) -> Any:
        principal = await self._principal(request)
        if not principal.may_read_jobs():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not read jobs")
        return principal

    async def _job(self, job_id: str) -> dict[str, Any]:
        if not is_id(JOB_ID_RE, job_id):
            raise ApiError(404, "not_found", f"job_id: {job_id!r} is not a job id")
        status = await self._db(lambda conn: pipeline_jobs.job_status(conn, job_id))
        if status is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return status

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: a ``status`` event with the JobStatus on every change, until final."""
        principal = await self._reader(request)
        job_id = request.match_info["job_id"]
        status = await self._job(job_id)
        with self.svc.streams.hold(principal.name):
            return await self._job_stream(request, job_id, status)

    async def _job_stream(self, request: web.Request, job_id: str, status: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        last: dict[str, Any] | None = None
        last_write = time.monotonic()
        stopping = self.svc.stopping
        while True:
            if status != last:
                await resp.write(_event("status", status))
                last, last_write = status, time.monotonic()
            if status["state"] in FINAL_JOB_STATES or stopping.is_set():
                break
            await asyncio.sleep(SSE_MIN_INTERVAL_S)
            await self.svc.changes.wait(SSE_POLL_S, stopping)
            if time.monotonic() - last_write > SSE_KEEPALIVE_S:
                await resp.write(b": keepalive\n\n")
                last_write = time.monotonic()
            try:
                fresh = await self.svc.reader.run(lambda conn: pipeline_jobs.job_status(conn, job_id))
            except STORAGE_ERRORS:
                continue  # a transient database error: keep the stream, try again
            if fresh is None:
                break  # pruned meanwhile
            status = fresh
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------------ devices
    async def _device_principal(self, request: web.Request, device_id: str) -> Any:
        principal = await self._principal(request)
        if not is_id(DEVICE_ID_RE, device_id):
            raise ApiError(400, "invalid_device",
                           f"device_id: {device_id!r} in the URL must match [A-Za-z0-9._:-]{{1,128}} {NOT_DOTS}")
        if not principal.may_manage_device(device_id):
            raise ApiError(403, "forbidden", f"{principal.name!r} ({principal.role}) may not manage device {device_id!r}")
        return principal

    async def put_device(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        principal = await self._device_principal(request, device_id)
        payload = await read_body(request, MAX_DEVICE_BYTES, "device")
        try:
            parse_device(payload, device_id, app_names(self.svc.cfg))
        except InputError as err:
            raise ApiError.from_input(err) from None
        pipeline = await self._ready()
        existed = await self._db(lambda conn: registry.get_device(conn, device_id) is not None)
        try:
            stored = await pipeline.register_device(device_id, payload, f"http:{principal.name}")
        except STORAGE_ERRORS as exc:
            raise _not_stored(exc) from None
        if not stored:
            raise ApiError(503, "not_stored", "the device was not stored; try again")
        device = await self._db(lambda conn: registry.get_device(conn, device_id))
        return json_response(device, status=200 if existed else 201)

    async def get_device(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        await self._device_principal(request, device_id)
        device = await self._db(lambda conn: registry.get_device(conn, device_id))
        if device is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        device["presence"] = device_presence(self._presence(), device_id)
        return json_response(device)

    def _presence(self) -> dict[str, Any] | None:
        """The embedded broker's device presence, read now."""
        return (self.svc.health.snapshot() or {}).get("presence")

    async def delete_device(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        await self._device_principal(request, device_id)
        pipeline = await self._ready()
        try:
            removed = await pipeline.register_device(device_id, b"", "http")
        except STORAGE_ERRORS as exc:
            raise _not_stored(exc) from None
        if not removed:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        return web.Response(status=204)

    async def list_devices(self, request: web.Request) -> web.Response:
        principal = await self._principal(request)
        if not principal.may_list_devices():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not list devices")
        limit = _int_param(request, "limit", DEFAULT_LIST, 1, MAX_LIST)
        after = request.query.get("after", "")

        devices = await self._db(lambda conn: registry.devices_after(conn, after, limit))
        presence = self._presence()
        for device in devices:
            device["presence"] = device_presence(presence, device["device_id"])
        headers = {}
        if len(devices) == limit:
            headers["Link"] = f'</v1/devices?after={devices[-1]["device_id"]}&limit={limit}>; rel="next"'
        return json_response(devices, headers=headers)

    # ------------------------------------------------------------------ acks
    async def ack_preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=ACK_CORS)

    async def post_ack(self, request: web.Request) -> web.Response:
        """Anyone holding the signed URL: the body is an Ack without message_id (§9, §10)."""
        message_id = request.match_info["message_id"]
        sig = request.query.get("sig", "")
        if not self.svc.signer.verify(message_id, sig):
            self.svc.metrics.http_acks.labels("bad_signature").inc()
            log.info("ack refused: bad signature", message_id=message_id[:64], peer=request.remote)
            raise ApiError(403, "bad_signature", "sig: not the signature of this message_id", ACK_CORS)
        payload = await read_body(request, MAX_ACK_BYTES, "ack")
        try:
            obj = decode_json_object(payload, MAX_ACK_BYTES, "ack")
            given = obj.get("message_id")
            if given is not None and (not isinstance(given, str) or given.lower() != message_id.lower()):
                raise InputError.at("invalid_ack", "message_id", "differs from the one in the URL (leave it out)")
            obj["message_id"] = message_id
            obj.setdefault("at", iso(utcnow()))  # absent = when the gateway got it (§9)
            body = json.dumps(obj).encode()
            ack = parse_ack(body)
        except InputError as err:
            self.svc.metrics.http_acks.labels("invalid").inc()
            raise ApiError.from_input(err, ACK_CORS) from None
        device_id = await self._db(lambda conn: _device_of(conn, ack.message_id))
        if device_id is None:
            self.svc.metrics.http_acks.labels("unknown").inc()
            raise ApiError(404, "not_found", f"no delivery {message_id!r} (pruned, or never sent)", ACK_CORS)
        pipeline = await self._ready()
        try:
            result = await pipeline.ack(device_id, body, f"http:/v1/acks/{ack.message_id}", AckVia.ACK_URL)
        except STORAGE_ERRORS as exc:
            raise _not_stored(exc, ACK_CORS) from None
        if result is None or not result.accepted:
            self.svc.metrics.http_acks.labels("refused").inc()
            raise ApiError(404, "not_found", f"ack refused: {getattr(result, 'reason', 'unknown')}", ACK_CORS)
        self.svc.metrics.http_acks.labels("stored").inc()
        return json_response({"message_id": ack.message_id, "status": ack.status, "first": result.first,
                              "latency_ms": result.latency_ms}, status=202, headers=ACK_CORS)


def _device_of(conn: sqlite3.Connection, message_id: str) -> str | None:
    return deliveries.device_of(conn, message_id)


def _not_stored(exc: BaseException, headers: dict[str, str] | None = None) -> ApiError:
    log.error("http request not stored", error=f"{type(exc).__name__}: {exc}"[:300])
    return ApiError(503, "not_stored", "the gateway could not store this now (disk or database); try again",
                    {"Retry-After": "5", **(headers or {})})


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:  # "²".isdigit() is true
        raise ApiError(400, "bad_request", f"{name}: must be an integer {low}..{high}")
    return int(raw)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


__all__ = ["Api", "error_response", "read_body"]
