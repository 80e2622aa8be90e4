"""The operator page (contract §10 ``GET /``): what a site technician sees and does.

Plain HTML, CSS and ES modules from ``gateway/http/ui/`` (no build step), served by the
daemon, fed by the JSON routes below and one event stream (:mod:`gateway.http.ui_events`).

Who: the broker's accounts with their MQTT meaning (:mod:`gateway.http.auth`). Seeing needs
the right to read job status (monitor, technician, controller, admin); sending a job needs
the right to publish ``P/jobs``; acknowledging an alarm the right to publish its
``P/alarms/<rule>/<key>/ack``. A ``device`` account is refused at login.

How: a login form opens a session (:mod:`gateway.http.sessions`: HttpOnly SameSite=Strict
cookie, CSRF token per session). Reads also take HTTP Basic, like the rest of the API, so
scripts and tests can use them; every write needs the session, its CSRF token in
``X-CSRF-Token``, and no foreign ``Origin`` / ``Sec-Fetch-Site: cross-site``.

``GET /`` answers a browser (``Accept: text/html``) with the page, or the login form when
there is no session; any other client keeps the JSON pointer to the API's routes.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import structlog
from aiohttp import web

from gateway import clock
from gateway.config import USER_ROLE
from gateway.ids import is_id
from gateway.http import ui_queries as q
from gateway.broker.presence import device_presence
from gateway.http.errors import ApiError, json_response
from gateway.http.reader import Reader
from gateway.http.sessions import (
    COOKIE,
    Session,
    SessionStore,
    check_same_origin,
    clear_cookie_header,
    cookie_header,
)
from gateway.http.static import StaticFiles, file_response
from gateway.http.ui_events import EventHub
from gateway.pipeline.models import (
    JOB_ID_RE,
    MAX_ACK_BYTES,
    MAX_JOB_BYTES,
    InputError,
    decode_json_object,
    parse_job,
)
from gateway.states import AlarmState, JobState
from gateway.storage import STORAGE_ERRORS
from gateway.timeutil import parse_iso

if TYPE_CHECKING:
    from gateway.http.auth import Principal
    from gateway.http.routes import Api, ApiParts

log = structlog.get_logger(__name__)

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_FILES = StaticFiles(UI_DIR, "/ui/static/", frozenset({".js", ".css", ".svg", ".png"}))
MAX_LOGIN_BYTES = 4096
ACK_WAIT_S = 3.0
MAX_STREAMS_PER_SESSION = 8  # within the account's cap (gateway/http/streams.py)
KEEPALIVE_S = 15.0
# No inline script or style, nothing from elsewhere, no framing (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on a form POST.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NO_STORE = {"Cache-Control": "no-store"}
# The page's filter lists them in this order (the API's error message too).
JOB_STATES = (JobState.ACCEPTED, JobState.REJECTED, JobState.DISPATCHING, JobState.COMPLETED, JobState.ACKNOWLEDGED)


class AlarmAcks(Protocol):
    """What the page needs of the alarm engine (:class:`gateway.alarms.service.AlarmService`)."""

    async def acknowledge(self, rule: str, key: str, by: str, note: str | None, source: str) -> str:
        """Apply an ack; resolves once committed: ``acknowledged``, ``already``, ``unknown``,
        ``not_firing``; raises :class:`gateway.storage.NotStored` when not committed."""
        ...


def error_fields(err: ApiError) -> list[dict[str, str]]:
    """The error's problems one per field, as validation reported them (the page shows each
    next to its control, in the API's own words)."""
    return [f.as_dict() for f in err.fields]


def wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


class OperatorPage:
    """Handlers of the page and its JSON routes, bound to the API's parts plus its own:
    a read connection of its own, the login sessions, the alarm engine (acks) and the
    daemon's start time."""

    def __init__(self, parts: "ApiParts", api: "Api", *, ui_reader: Reader, sessions: SessionStore,
                 alarms: AlarmAcks, started_at: str):
        self.svc = parts
        self.api = api
        self.cfg = parts.cfg
        self.alarm_acks = alarms  # not ``alarms``: that is the handler of /ui/api/alarms
        self.started_at = started_at
        self.sessions = sessions
        self.reader = ui_reader
        self.hub = EventHub(self.reader, parts.changes, parts.stopping, self.now_view)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_post("/ui/login", self.login)
        r.add_post("/ui/logout", self.logout)
        r.add_get("/ui/static/{name}", self.static, allow_head=False)
        r.add_get("/ui/api/session", self.session_info, allow_head=False)
        r.add_get("/ui/api/now", self.now, allow_head=False)
        r.add_get("/ui/api/events", self.events, allow_head=False)
        r.add_get("/ui/api/jobs", self.jobs, allow_head=False)
        r.add_post("/ui/api/jobs", self.send_job)
        r.add_get("/ui/api/jobs/{job_id}", self.job, allow_head=False)
        r.add_get("/ui/api/jobs/{job_id}/deliveries", self.deliveries, allow_head=False)
        r.add_get("/ui/api/devices", self.devices, allow_head=False)
        r.add_get("/ui/api/devices/{device_id}", self.device, allow_head=False)
        r.add_get("/ui/api/alarms", self.alarms, allow_head=False)
        r.add_post("/ui/api/alarms/ack", self.ack_alarm)
        r.add_get("/ui/api/people", self.people, allow_head=False)

    # ------------------------------------------------------------------ who
    def _secure(self, request: web.Request) -> bool:
        return request.secure or self.cfg.http is not None and self.cfg.http.tls

    async def _session(self, request: web.Request, touch: bool = True) -> Session | None:
        return await self.sessions.get(request.cookies.get(COOKIE), touch=touch)

    async def _viewer(self, request: web.Request) -> tuple["Principal", Session | None]:
        """Who reads: the session's account, else HTTP Basic; must be allowed to read jobs."""
        session = await self._session(request)
        if session is not None:
            principal = self.svc.auth.principal_for(session.name, session.role)
        elif request.headers.get("Authorization"):
            principal = await self.svc.auth.principal(request.headers.get("Authorization"), request.remote or "")
        else:
            raise ApiError(401, "unauthorized", "log in on the operator page (/) or use HTTP Basic")
        if not principal.may_read_jobs():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not use the operator page")
        return principal, session

    async def _actor(self, request: web.Request) -> tuple["Principal", Session]:
        """Who acts: a session (never Basic: a browser sends cached Basic credentials
        cross-site), its CSRF token, and a request that says it comes from this origin."""
        self._same_origin(request)
        session = await self._session(request)
        if session is None:
            raise ApiError(401, "unauthorized", "log in on the operator page (/) first; scripts use /v1")
        if not self.sessions.csrf_ok(session, request.headers.get("X-CSRF-Token")):
            raise ApiError(403, "csrf", "X-CSRF-Token: missing or not this session's token (reload the page)")
        return self.svc.auth.principal_for(session.name, session.role), session

    _same_origin = staticmethod(check_same_origin)

    # ------------------------------------------------------------------ pages
    async def index(self, request: web.Request) -> web.StreamResponse:
        if not wants_html(request):
            return await self.api.index(request)
        session = await self._session(request)
        if session is None:
            return self._login_page()
        if session.role == USER_ROLE:  # a person: their own page, not the site's
            return web.Response(status=303, headers={"Location": "/me", **NO_STORE})
        return file_response(UI_DIR / "index.html", PAGE_HEADERS)

    def login_page(self) -> web.Response:
        """The login form (``GET /me`` without a session shows it too)."""
        return self._login_page()

    def _login_page(self, error: str = "", username: str = "", status: int = 200) -> web.Response:
        text = (UI_DIR / "login.html").read_text(encoding="utf-8")
        message = f'<p class="error" id="login-error" role="alert">{html.escape(error)}</p>' if error else ""
        text = text.replace("<!--ERROR-->", message).replace("__USERNAME__", html.escape(username, quote=True))
        return web.Response(text=text, status=status, content_type="text/html", headers=PAGE_HEADERS)

    async def login(self, request: web.Request) -> web.Response:
        from gateway.http.routes import read_body

        try:
            self._same_origin(request)
        except ApiError as err:
            return self._login_page(err.message, status=403)
        body = await read_body(request, MAX_LOGIN_BYTES, "login form")
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        username = (form.get("username") or [""])[0].strip()
        password = (form.get("password") or [""])[0]
        if not username or not password:
            return self._login_page("user name and password are required", username, 400)
        try:
            principal = await self.svc.auth.check(username, password, request.remote or "")
        except ApiError as err:
            log.info("operator page login refused", user=username[:64], reason=err.code, peer=request.remote)
            return self._login_page(err.message, username, err.status)
        person = principal.role == USER_ROLE  # a person's account: their own page (/me)
        if not principal.may_read_jobs() and not person:
            log.info("operator page login refused", user=principal.name, role=principal.role, reason="role")
            return self._login_page(f"{principal.name} ({principal.role}) may not use the operator page",
                                    username, 403)
        created = await self.sessions.create(principal.name, principal.role)
        if created is None:
            return self._login_page("wrong user name or password", username, 401)
        token, _ = created
        log.info("operator page login", user=principal.name, role=principal.role, peer=request.remote)
        return web.Response(status=303, headers={"Location": "/me" if person else "/",
                                                 "Set-Cookie": cookie_header(token, self._secure(request)), **NO_STORE})

    async def logout(self, request: web.Request) -> web.Response:
        await self._actor(request)
        session = self.sessions.end(request.cookies.get(COOKIE))
        if session is not None:
            log.info("operator page logout", user=session.name)
        return web.Response(status=204, headers={"Set-Cookie": clear_cookie_header(self._secure(request)), **NO_STORE})

    async def static(self, request: web.Request) -> web.StreamResponse:
        return UI_FILES.response(request.match_info["name"])

    # ------------------------------------------------------------------ reads
    async def _read(self, fn: Any) -> Any:
        try:
            return await self.reader.run(fn)
        except q.QueryError as err:
            raise ApiError(400, "bad_request", str(err)) from None
        except STORAGE_ERRORS as exc:  # the database cannot answer now
            log.error("operator page read failed", error=f"{type(exc).__name__}: {exc}"[:300])
            raise ApiError(503, "not_ready", "the database cannot answer now; try again", {"Retry-After": "2"}) from None

    async def session_info(self, request: web.Request) -> web.Response:
        principal, session = await self._viewer(request)
        return json_response({
            "user": principal.name, "role": principal.role, "site_id": self.cfg.gateway.site_id,
            "csrf": session.csrf if session is not None else None,
            "may": {"send_jobs": principal.may_submit_jobs(), "ack_alarms": _may_ack_alarms(principal)},
            "rules": {r.name: {"escalate": [s.after_s for s in r.escalate]} for r in self.cfg.rules},
        }, headers=NO_STORE)

    async def now_view(self) -> dict[str, Any]:
        """Gateway state (mode, uptime, version), bridges, broker, queue, cloud link, alarms:
        the health snapshot the reporter keeps plus a handful of aggregate rows."""
        health = self.svc.health
        snap = health.latest or health.snapshot()
        db = await self.reader.run(q.now_from_db)
        started = parse_iso(self.started_at).timestamp()
        client = snap.get("broker_client") or {}
        upstream = snap.get("upstream")
        if upstream is not None or db["upstream_backlog"] is not None:
            upstream = {**(upstream or {}), **(db["upstream_backlog"] or {})}
            upstream = {k: upstream.get(k) for k in ("connected", "last_error", "drain_rate", "buffer_rows",
                                                     "buffer_bytes", "buffer_max_bytes", "buffer_oldest_age_s",
                                                     "buffer_dropped", "buffer_overflow")}
        broker = snap.get("broker") or None
        if broker is not None:
            broker = {k: broker.get(k) for k in ("clients_connected", "sessions", "subscriptions", "retained",
                                                 "queued", "dropped")}
        return {
            "gateway": {"site_id": self.cfg.gateway.site_id, "version": snap.get("version"),
                        "state": snap.get("state"), "status": snap.get("status"), "checks": snap.get("checks"),
                        "mode": self.cfg.broker.mode, "started_at": self.started_at,
                        "uptime_s": round(max(0.0, clock.now() - started)),
                        "broker_client_connected": client.get("connected")},
            "bridges": snap.get("bridges") or {},
            "broker": broker,
            "upstream": upstream,
            **{k: v for k, v in db.items() if k != "upstream_backlog"},
        }

    async def now(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        return json_response(await self.now_view(), headers=NO_STORE)

    async def jobs(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        query = request.query
        limit = _int(query.get("limit"), 20, "limit")
        state = query.get("state", "")
        if state and state not in JOB_STATES:
            raise ApiError(400, "bad_request", f"state: one of {', '.join(JOB_STATES)}")
        prefix = _prefix(query.get("q", ""), "q")
        before = query.get("before") or None
        return json_response(await self._read(lambda c: q.jobs_page(c, limit, before, state or None, prefix)),
                             headers=NO_STORE)

    async def job(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        job_id = _job_id(request)
        detail = await self._read(lambda c: q.job_detail(c, job_id))
        if detail is None:
            raise ApiError(404, "not_found", f"no job {job_id!r}")
        return json_response(detail, headers=NO_STORE)

    async def deliveries(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        job_id = _job_id(request)
        which = request.query.get("state", "")
        if which == "problems":
            states: tuple[str, ...] = q.PROBLEM_STATES
        elif which in q.DELIVERY_STATES:
            states = (which,)
        elif which == "":
            states = ()
        else:
            raise ApiError(400, "bad_request", f"state: one of problems, {', '.join(q.DELIVERY_STATES)}")
        after = _prefix(request.query.get("after", ""), "after")
        limit = _int(request.query.get("limit"), 50, "limit")
        # The job's ack latency comes with its rows, from the same snapshot: the page never
        # says "no acks yet" above a row that shows an ack.
        return json_response(await self._read(lambda c: {**q.deliveries_page(c, job_id, states, after, limit),
                                                         "latency": q.job_latency(c, job_id)}),
                             headers=NO_STORE)

    async def devices(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        query = request.query
        prefix = _prefix(query.get("q", "").strip(), "q")
        segment = query.get("segment", "").strip()
        tag = query.get("tag", "").strip()
        for name, value in (("segment", segment), ("tag", tag)):
            if len(value) > 128:
                raise ApiError(400, "bad_request", f"{name}: at most 128 characters")
        after = _prefix(query.get("after", ""), "after")
        limit = _int(query.get("limit"), 50, "limit")
        page = await self._read(lambda c: q.devices_page(c, prefix, segment, tag, after, limit))
        presence = self._presence()
        for device in page["devices"]:
            device["presence"] = device_presence(presence, device["device_id"])
        return json_response(page, headers=NO_STORE)

    def _presence(self) -> dict[str, Any] | None:
        """The embedded broker's device presence, read now (see gateway.broker.presence)."""
        return (self.svc.health.snapshot() or {}).get("presence")

    async def device(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        device_id = request.match_info["device_id"]
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", device_id):
            raise ApiError(404, "not_found", f"device_id: {device_id[:130]!r} is not a device id")
        detail = await self._read(lambda c: q.device_detail(c, device_id))
        if detail is None:
            raise ApiError(404, "not_found", f"no device {device_id!r}")
        detail["presence"] = device_presence(self._presence(), device_id)
        return json_response(detail, headers=NO_STORE)

    async def alarms(self, request: web.Request) -> web.Response:
        await self._viewer(request)
        state = request.query.get("state", AlarmState.FIRING)
        if state not in q.ALARM_STATES:
            raise ApiError(400, "bad_request", f"state: one of {', '.join(q.ALARM_STATES)}")
        after = None
        if request.query.get("after_rule") is not None:
            after = (request.query.get("after_rule", ""), request.query.get("after_key", ""))
        limit = _int(request.query.get("limit"), 50, "limit")
        return json_response(await self._read(lambda c: q.alarms_page(c, state, after, limit)), headers=NO_STORE)

    async def people(self, request: web.Request) -> web.Response:
        """The People tab: persons by id (prefix ``q``), ``limit`` at a time after ``after``."""
        from gateway.http.ui_people import people_page

        await self._viewer(request)
        prefix = _prefix(request.query.get("q", "").strip(), "q")
        after = _prefix(request.query.get("after", ""), "after")
        limit = _int(request.query.get("limit"), 50, "limit")
        defaults = self.cfg.people
        return json_response(await self._read(lambda c: people_page(
            c, defaults.quiet_hours_default, defaults.reach_after_s, prefix, after, limit)), headers=NO_STORE)

    # ------------------------------------------------------------------ the event stream
    async def events(self, request: web.Request) -> web.StreamResponse:
        principal, session = await self._viewer(request)
        if session is not None and session.streams >= MAX_STREAMS_PER_SESSION:
            raise ApiError(503, "not_ready", f"this session has {session.streams} open event streams, the most one "
                           "session may hold; close a page", {"Retry-After": "5"})
        with self.svc.streams.hold(principal.name):
            return await self._stream(request, session)

    async def _stream(self, request: web.Request, session: Session | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        if session is not None:
            session.streams += 1
        sub = self.hub.subscribe()
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 3000\n\n")
            for event, data in await self.hub.hello():
                await resp.write(_event(event, data))
            token = request.cookies.get(COOKIE)
            while not self.svc.stopping.is_set():
                try:
                    event, data = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    event, data = "", None
                if session is not None and await self.sessions.get(token) is None:
                    await resp.write(_event("logout", {"why": "the session ended"}))
                    break
                if event == "bye":
                    break
                if sub.behind:
                    sub.behind = False
                    await resp.write(_event("resync", {"why": "this page fell behind"}))
                elif event:
                    await resp.write(_event(event, data))
                else:
                    await resp.write(b": keepalive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            self.hub.unsubscribe(sub)
            if session is not None:
                session.streams -= 1
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------------ writes
    async def send_job(self, request: web.Request) -> web.Response:
        """The page's job form: the API's validation and pipeline entry (same codes and
        messages, split per field), plus one check the API does not make: every device a job
        names must be registered (a typo would otherwise only show as a failed delivery)."""
        from gateway.http.routes import read_body

        principal, session = await self._actor(request)
        if not principal.may_submit_jobs():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not submit jobs")
        payload = await read_body(request, MAX_JOB_BYTES, "job")
        try:
            try:
                obj = decode_json_object(payload, MAX_JOB_BYTES, "job")
                parse_job(obj)
            except InputError:
                status = await self.api.submit_job(principal, payload)  # raises the API's own error
            else:
                devices = (obj.get("target") or {}).get("devices") or []
                known = await self._read(lambda c: q.known_devices(c, devices))
                unknown = sorted(set(devices) - known)
                if unknown:
                    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                    raise ApiError.at(400, "unknown_device", "target.devices", "no registered device "
                                      + ", ".join(repr(d) for d in unknown[:5]) + more)
                status = await self.api.submit_job(principal, payload)
        except ApiError as err:
            return json_response({"error": {"code": err.code, "message": err.message},
                                  "fields": error_fields(err)}, status=err.status, headers=err.headers)
        log.info("job sent from the operator page", job_id=status["job_id"], user=session.name)
        return json_response(status, status=202, headers={"Location": f"/v1/jobs/{status['job_id']}"})

    async def ack_alarm(self, request: web.Request) -> web.Response:
        """What ``homepot-gateway alarms ack RULE KEY`` does, as the logged-in user, applied by
        the alarm engine in this process (escalation stops) before the answer, which carries
        the alarm as it is then."""
        from gateway.alarms.rules import key_level
        from gateway.http.routes import read_body

        principal, session = await self._actor(request)
        body = await read_body(request, MAX_ACK_BYTES, "alarm ack")  # an ack, device's or alarm's
        try:
            obj = decode_json_object(body, MAX_ACK_BYTES, "alarm ack")
        except InputError as err:
            raise ApiError.from_input(err) from None
        rule, key, note = obj.get("rule"), obj.get("key"), obj.get("note")
        unknown = sorted(set(obj) - {"rule", "key", "note"})
        if unknown:
            raise ApiError(400, "invalid_alarm_ack", f"{unknown[0]}: unknown field")
        if not isinstance(rule, str) or not isinstance(key, str) or not rule or not key:
            raise ApiError(400, "invalid_alarm_ack", "rule, key: required strings")
        if note is not None and (not isinstance(note, str) or len(note) > 1024):
            raise ApiError(400, "invalid_alarm_ack", "note: a string of at most 1024 characters")
        if not principal.acl.may_publish(f"{principal.topics.prefix}/alarms/{rule}/{key_level(key)}/ack"):
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not acknowledge alarms")
        if rule not in {r.name for r in self.cfg.rules}:
            raise ApiError(404, "unknown_alarm", f"rule: no rule {rule!r} in the config")
        try:
            outcome = await asyncio.wait_for(
                self.alarm_acks.acknowledge(rule, key, f"http:{session.name}", note, source="operator page"),
                ACK_WAIT_S)
        except STORAGE_ERRORS as exc:
            log.error("alarm ack not stored", rule=rule, key=key, error=f"{type(exc).__name__}: {exc}"[:300])
            raise ApiError(503, "not_stored", "the ack could not be stored now; try again", {"Retry-After": "5"}) from None
        except TimeoutError:
            raise ApiError(503, "not_ready", "the alarm engine did not answer in time; try again",
                           {"Retry-After": "2"}) from None
        current = await self._read(lambda c: q.alarm(c, rule, key))
        if outcome == "unknown" or current is None:
            raise ApiError(404, "unknown_alarm", f"key: no alarm {key!r} of rule {rule!r}")
        if outcome == "not_firing":
            raise ApiError(409, "alarm_not_firing", f"key: alarm {key!r} of rule {rule!r} is {current['state']}, not firing")
        log.info("alarm acknowledged on the operator page", rule=rule, key=key, by=session.name, outcome=outcome)
        return json_response({"result": outcome, "alarm": current})


def _may_ack_alarms(principal: "Principal") -> bool:
    # A literal '+' level is matched only by a wildcard in the role's publish filters.
    return principal.acl.may_publish(f"{principal.topics.prefix}/alarms/+/+/ack")


def _int(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= q.MAX_PAGE:  # "²".isdigit() is true
        raise ApiError(400, "bad_request", f"{name}: must be an integer 1..{q.MAX_PAGE}")
    return int(raw)


def _prefix(raw: str, name: str) -> str:
    try:
        return q.check_id_prefix(raw, name)
    except q.QueryError as err:
        raise ApiError(400, "bad_request", str(err)) from None


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not is_id(JOB_ID_RE, job_id):
        raise ApiError(404, "not_found", f"job_id: {job_id[:70]!r} is not a job id")
    return job_id


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()


__all__ = ["AlarmAcks", "OperatorPage", "error_fields", "wants_html"]
