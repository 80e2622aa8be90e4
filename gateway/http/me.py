"""A person's own page and routes (contract §10, §12): ``GET /me`` and ``/v1/me*``.

Who: an account of role ``user`` whose name is the ``account`` of a person. That account
has no MQTT rights by default and, over HTTP, reaches only these routes: every other route
asks for a right it does not have (read jobs, publish ``P/jobs``, a device's register
topic) and answers 403. It logs in with HTTP Basic (scripts) or the operator page's login
form (:mod:`gateway.http.sessions`: the same cookie, CSRF token and origin checks), which
sends it here instead of to ``/``.

What: only that person. Every read and write goes through :class:`MeRoutes._person`, which
yields the person its account names, and every id in a URL is looked up among that
person's own rows (:mod:`gateway.http.me_queries`): another person's message_id or
device_id is 404, a device that exists but is someone else's is 403 for a write, and
neither answer carries any of its data.

"Open" is an ack with status ``opened`` for that delivery through the pipeline's own ack
entry (:meth:`JobIntake.ack`), stored once like any ack, with ``via`` ``me`` (an alarm's
``acknowledged_by`` then reads ``me:<device_id>``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web

from devices.models import DEVICE_ID_RE
from gateway.config import USER_ROLE
from gateway.http.errors import ApiError, json_response
from gateway.http import me_queries as mq
from gateway.http.sessions import COOKIE, Session, SessionStore, check_same_origin
from gateway.ids import NOT_DOTS, is_id
from gateway.people import store as people_store
from gateway.people.model import MAX_DEVICES
from gateway.people.own import PersonGone
from gateway.pipeline.models import MAX_DEVICE_BYTES, AckVia, InputError, decode_json_object, parse_device
from gateway.storage import STORAGE_ERRORS
from gateway.timeutil import iso, utcnow

if TYPE_CHECKING:
    from gateway.http.auth import Principal
    from gateway.http.routes import Api, ApiParts

log = structlog.get_logger(__name__)

MAX_PREFERENCES_BYTES = 16 * 1024
NO_STORE = {"Cache-Control": "no-store"}


class OwnPeople(Protocol):
    """The person's writes to themselves (:class:`gateway.people.own.OwnChanges`), each
    committed before it returns; bad input raises :class:`InputError` naming the field."""

    async def set_preferences(self, person_id: str, preferences: dict[str, Any]) -> dict[str, Any]: ...

    async def add_device(self, person_id: str, device_id: str) -> dict[str, Any]: ...

    async def remove_device(self, person_id: str, device_id: str) -> dict[str, Any]: ...


def is_user(principal: "Principal") -> bool:
    return principal.role == USER_ROLE


class MeRoutes:
    """The handlers of ``/me`` and ``/v1/me*``, bound to the API's parts, its handlers (for
    the shared helpers), the login sessions and the person registry."""

    def __init__(self, parts: "ApiParts", api: "Api", *, sessions: SessionStore, people: OwnPeople,
                 login_page: Callable[[], web.Response]):
        self.svc = parts
        self.api = api
        self.sessions = sessions
        self.people = people
        self.login_page = login_page  # the operator page's login form (one form, both pages)

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/me", self.page, allow_head=False)
        r.add_get("/v1/me", self.me, allow_head=False)
        r.add_put("/v1/me/preferences", self.put_preferences)
        r.add_get("/v1/me/inbox", self.inbox, allow_head=False)
        r.add_post("/v1/me/inbox/{message_id}/open", self.open)
        r.add_get("/v1/me/devices", self.devices, allow_head=False)
        r.add_put("/v1/me/devices/{device_id}", self.put_device)
        r.add_delete("/v1/me/devices/{device_id}", self.delete_device)

    # ------------------------------------------------------------------ who
    async def _principal(self, request: web.Request, write: bool) -> tuple["Principal", Session | None]:
        """HTTP Basic when the request carries it (scripts); else the page's session, and
        for a write also its CSRF token and a same-origin request (as the operator page)."""
        if request.headers.get("Authorization"):
            return await self.svc.auth.principal(request.headers.get("Authorization"), request.remote or ""), None
        session = await self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            raise ApiError(401, "unauthorized", "log in on /me, or use HTTP Basic with a `user` account")
        if write:
            check_same_origin(request)
            if not self.sessions.csrf_ok(session, request.headers.get("X-CSRF-Token")):
                raise ApiError(403, "csrf", "X-CSRF-Token: missing or not this session's token (reload the page)")
        return self.svc.auth.principal_for(session.name, session.role), session

    async def _person(self, request: web.Request, write: bool = False) -> tuple["Principal", Session | None,
                                                                               dict[str, Any]]:
        """The caller's principal, session (None with Basic) and person; 401/403/404."""
        principal, session = await self._principal(request, write)
        if not is_user(principal):
            raise ApiError(403, "forbidden", f"role {principal.role!r} has no person page: /v1/me is for `user` "
                                             "accounts (the operator page is /)")
        found = await self._read(lambda c: people_store.by_account(c, principal.name))
        if found is None:
            raise ApiError(404, "not_found", f"no person has the account {principal.name!r} "
                                             "(an operator sets it: people add ID --account NAME)")
        return principal, session, found.as_json()

    async def _read(self, fn: Any) -> Any:
        try:
            return await self.svc.reader.run(fn)
        except STORAGE_ERRORS as exc:
            raise _not_ready(exc) from None

    # ------------------------------------------------------------------ the page
    async def page(self, request: web.Request) -> web.StreamResponse:
        """The page for a logged-in `user`; the login form without a session (the form
        sends a `user` back here); other roles are pointed at the operator page."""
        from gateway.http.ui import PAGE_HEADERS, UI_DIR
        from gateway.http.static import file_response

        session = await self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            return self.login_page()
        if session.role != USER_ROLE:
            return web.Response(status=303, headers={"Location": "/", **NO_STORE})
        return file_response(UI_DIR / "me.html", PAGE_HEADERS)

    # ------------------------------------------------------------------ reads
    async def me(self, request: web.Request) -> web.Response:
        """The Person; to the page's session also its CSRF token (``X-CSRF-Token``: readable
        by this origin's scripts only, the API grants no CORS)."""
        _, session, person = await self._person(request)
        headers = {**NO_STORE, "X-CSRF-Token": session.csrf} if session is not None else NO_STORE
        return json_response(person, headers=headers)

    async def inbox(self, request: web.Request) -> web.Response:
        _, _, person = await self._person(request)
        limit = _limit(request.query.get("limit"))
        before = request.query.get("before") or None
        if before is not None and len(before) > 64:
            raise ApiError(400, "bad_request", "before: not a message_id of your inbox")
        mine = _mine(person)
        try:
            items = await self._read(lambda c: mq.inbox(c, mine, limit, before))
        except mq.NotInInbox:
            raise ApiError(400, "bad_request", "before: not a message_id of your inbox") from None
        headers = dict(NO_STORE)
        if len(items) == limit:
            headers["Link"] = f'</v1/me/inbox?before={items[-1]["message_id"]}&limit={limit}>; rel="next"'
        return json_response(items, headers=headers)

    async def devices(self, request: web.Request) -> web.Response:
        _, _, person = await self._person(request)
        device_ids = list(person.get("devices") or [])
        return json_response(await self._read(lambda c: mq.devices(c, device_ids)), headers=NO_STORE)

    # ------------------------------------------------------------------ writes
    async def open(self, request: web.Request) -> web.Response:
        principal, _, person = await self._person(request, write=True)
        message_id = request.match_info["message_id"]
        mine = _mine(person)
        item = None
        if len(message_id) <= 64:
            item = await self._read(lambda c: mq.inbox_item(c, mine, message_id))
        if item is None:
            raise ApiError(404, "not_found", f"message_id: {message_id[:64]!r} is not in your inbox")
        body = json.dumps({"message_id": item["message_id"], "status": "opened", "at": iso(utcnow())}).encode()
        pipeline = await self.api.intake()
        with _written():
            result = await pipeline.ack(item["device_id"], body, f"http:/v1/me/inbox/{item['message_id']}/open",
                                        AckVia.ME)
        if result is None or result.not_stored:
            raise ApiError(503, "not_stored", "the ack could not be stored now; try again", {"Retry-After": "5"})
        if not result.accepted:
            raise ApiError(404, "not_found", f"message_id: ack refused ({result.reason})")
        log.info("opened on the person's page", person_id=person["person_id"], message_id=item["message_id"],
                 user=principal.name)
        return json_response({"message_id": item["message_id"], "status": "opened", "first": result.first,
                              "repeat": result.repeat, "latency_ms": result.latency_ms}, status=202)

    async def put_preferences(self, request: web.Request) -> web.Response:
        from gateway.http.routes import read_body

        principal, _, person = await self._person(request, write=True)
        payload = await read_body(request, MAX_PREFERENCES_BYTES, "preferences")
        try:
            obj = decode_json_object(payload, MAX_PREFERENCES_BYTES, "preferences")
            with _written():
                stored = await self.people.set_preferences(person["person_id"], obj)
        except InputError as err:
            return field_errors(err)
        log.info("preferences changed on the person's page", person_id=person["person_id"], user=principal.name,
                 fields=sorted(obj))
        return json_response(stored, headers=NO_STORE)

    async def put_device(self, request: web.Request) -> web.Response:
        """Register one of the person's own devices (this browser's Web Push subscription):
        a Device (§7) whose ``owner`` is the person (set when absent; another is refused),
        appended to the person's reach list; 201 new / 200 replaced, with the Device.

        Whose a device is: one that does not exist yet becomes theirs; one that exists is
        theirs as :func:`_owns` says. Any other is 403, and nothing of it is read back. The device is stored first and then listed:
        a crash between the two leaves a device owned by the person and not yet listed,
        which the same PUT again completes."""
        from gateway.http.routes import read_body

        principal, _, person = await self._person(request, write=True)
        person_id = person["person_id"]
        device_id = _device_id(request)
        payload = await read_body(request, MAX_DEVICE_BYTES, "device")
        try:
            obj = decode_json_object(payload, MAX_DEVICE_BYTES, "device")
            owner = obj.setdefault("owner", person_id)
            if owner != person_id:
                raise InputError.at("invalid_device", "owner", f"must be you ({person_id!r}) or left out")
            obj.setdefault("device_id", device_id)
            body = json.dumps(obj).encode()
            parse_device(body, device_id)
            listed = device_id in person["devices"]
            if not listed and len(person["devices"]) >= MAX_DEVICES:
                raise InputError.at("invalid_device", "device_id", f"you have {MAX_DEVICES} devices, the most a "
                                                                  "person may have; remove one first")
        except InputError as err:
            return field_errors(err)
        existing, others = await self._read(lambda c: _device_and_others(c, device_id, person_id))
        if not existing.get("missing") and not _owns(person_id, listed, existing, others):
            raise ApiError(403, "forbidden", f"device_id: {device_id!r} is not one of your devices")
        pipeline = await self.api.intake()
        try:
            with _written():
                stored = await pipeline.register_device(device_id, body, f"http:me:{principal.name}")
                if stored and not listed:
                    await self.people.add_device(person_id, device_id)
        except InputError as err:
            return field_errors(err)
        if not stored:
            raise ApiError(503, "not_stored", "the device was not stored; try again", {"Retry-After": "5"})
        device = (await self._read(lambda c: mq.devices(c, [device_id])))[0]
        log.info("device registered on the person's page", person_id=person_id, device_id=device_id)
        return json_response(device, status=201 if existing.get("missing") else 200)

    async def delete_device(self, request: web.Request) -> web.Response:
        """Take a device out of the person's reach list; one that is theirs (:func:`_owns`)
        leaves the registry too (its queued deliveries end as "device removed"), a shared
        or someone else's stays. Not in their list: 404."""
        principal, _, person = await self._person(request, write=True)
        person_id = person["person_id"]
        device_id = _device_id(request)
        if device_id not in person["devices"]:
            raise ApiError(404, "not_found", f"device_id: {device_id!r} is not one of your devices")
        existing, others = await self._read(lambda c: _device_and_others(c, device_id, person_id))
        pipeline = await self.api.intake()
        with _written():
            if not existing.get("missing") and _owns(person_id, True, existing, others):
                await pipeline.register_device(device_id, b"", f"http:me:{principal.name}")
            await self.people.remove_device(person_id, device_id)
        log.info("device removed on the person's page", person_id=person_id, device_id=device_id)
        return web.Response(status=204)


def _device_and_others(conn: Any, device_id: str, person_id: str) -> tuple[dict[str, Any], list[str]]:
    """The device as the page shows it, and the other persons whose reach list has it."""
    others = [p for p, _ in people_store.persons_of_device(conn, device_id) if p != person_id]
    return mq.devices(conn, [device_id])[0], others


def _owns(person_id: str, listed: bool, device: dict[str, Any], others: list[str]) -> bool:
    """Whether an existing device is the person's to change or remove: its owner is them,
    or it has no owner and is in their list and nobody else's (a shared kiosk is not)."""
    owner = device.get("owner")
    return owner == person_id or (owner is None and listed and not others)


def _mine(person: dict[str, Any]) -> mq.Mine:
    return mq.Mine(person["person_id"], tuple(person.get("devices") or ()))


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return mq.DEFAULT_INBOX_PAGE
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= mq.MAX_INBOX_PAGE:
        raise ApiError(400, "bad_request", f"limit: must be an integer 1..{mq.MAX_INBOX_PAGE}")
    return int(raw)


def _device_id(request: web.Request) -> str:
    device_id = request.match_info["device_id"]
    if not is_id(DEVICE_ID_RE, device_id):
        raise ApiError(400, "invalid_device",
                       f"device_id: {device_id[:130]!r} in the URL must match [A-Za-z0-9._:-]{{1,128}} {NOT_DOTS}")
    return device_id


def field_errors(err: InputError) -> web.Response:
    """A 400 that names each field on its own (``fields``, as the operator page's form
    answers), so the page shows each problem next to its control."""
    return json_response({"error": err.as_dict(), "fields": [f.as_dict() for f in err.fields]},
                         status=413 if err.code == "too_large" else 400)


def _not_ready(exc: BaseException) -> ApiError:
    log.error("person page read failed", error=f"{type(exc).__name__}: {exc}"[:300])
    return ApiError(503, "not_ready", "the database cannot answer now; try again", {"Retry-After": "2"})


@contextlib.contextmanager
def _written() -> Iterator[None]:
    """What a write of the person's can meet, as the page answers it: their person removed
    meanwhile (by an operator) is 404; storage that cannot take it now is 503 with a retry
    hint, logged as an ERROR because a full disk or a broken database needs an operator.
    Bad input (:class:`InputError`) passes through for the caller's field errors."""
    try:
        yield
    except PersonGone:
        raise ApiError(404, "not_found", "your person was removed meanwhile") from None
    except STORAGE_ERRORS as exc:
        log.error("person page write not stored", error=f"{type(exc).__name__}: {exc}"[:300])
        raise ApiError(503, "not_stored", "the gateway could not store this now (disk or database); try again",
                       {"Retry-After": "5"}) from None


__all__ = ["MeRoutes", "OwnPeople", "USER_ROLE", "is_user"]
