"""``/v1/people`` (contract §10, §12): the person registry over HTTP, for the roles that
may manage any device (technician, controller, admin). Reads go through the API's
read-only connection; writes through :class:`PeopleRegistry` (the daemon's database
thread), committed before the answer."""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from gateway.http.errors import ApiError, json_response
from gateway.ids import NOT_DOTS, is_id
from gateway.people import store
from gateway.people.model import PERSON_ID_RE, Person, parse_person
from gateway.pipeline.models import InputError, decode_json_object
from gateway.storage import STORAGE_ERRORS

MAX_PERSON_BYTES = 64 * 1024
MAX_LIST = 10_000


class PeopleRegistry(Protocol):
    """Where the API's person writes go (:class:`gateway.people.service.PeopleWriter`)."""

    async def put(self, person: Person, source: str) -> bool: ...

    async def remove(self, person_id: str, source: str) -> bool: ...


class PeopleRoutes:
    """The handlers; ``api`` is the :class:`gateway.http.routes.Api` they share helpers with."""

    def __init__(self, api: Any, registry: PeopleRegistry):
        self.api = api
        self.registry = registry

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/v1/people", self.list_people, allow_head=False)
        r.add_put("/v1/people/{person_id}", self.put_person)
        r.add_get("/v1/people/{person_id}", self.get_person, allow_head=False)
        r.add_delete("/v1/people/{person_id}", self.delete_person)

    async def _manager(self, request: web.Request) -> Any:
        principal = await self.api._principal(request)
        if not principal.may_manage_people():
            raise ApiError(403, "forbidden", f"role {principal.role!r} may not manage people")
        return principal

    def _person_id(self, request: web.Request) -> str:
        person_id = request.match_info["person_id"]
        if not is_id(PERSON_ID_RE, person_id):
            raise ApiError(400, "invalid_person",
                           f"person_id: {person_id[:80]!r} in the URL must match [A-Za-z0-9._:-]{{1,64}} {NOT_DOTS}")
        return person_id

    async def list_people(self, request: web.Request) -> web.Response:
        await self._manager(request)
        from gateway.http.routes import _int_param

        limit = _int_param(request, "limit", 1000, 1, MAX_LIST)
        after = request.query.get("after", "")
        people = await self.api._db(lambda conn: store.list_all(conn, after, limit))
        headers = {}
        if len(people) == limit:
            headers["Link"] = f'</v1/people?after={people[-1].person_id}&limit={limit}>; rel="next"'
        return json_response([p.as_json() for p in people], headers=headers)

    async def get_person(self, request: web.Request) -> web.Response:
        await self._manager(request)
        person_id = self._person_id(request)
        person = await self.api._db(lambda conn: store.get(conn, person_id))
        if person is None:
            raise ApiError(404, "not_found", f"no person {person_id!r}")
        return json_response(person.as_json())

    async def put_person(self, request: web.Request) -> web.Response:
        principal = await self._manager(request)
        person_id = self._person_id(request)
        from gateway.http.routes import read_body

        payload = await read_body(request, MAX_PERSON_BYTES, "person")
        try:
            person = parse_person(decode_json_object(payload, MAX_PERSON_BYTES, "person"), person_id)
        except InputError as err:
            raise ApiError.from_input(err) from None
        try:
            created = await self.registry.put(person, f"http:{principal.name}")
        except store.AccountTaken as exc:
            raise ApiError.from_input(InputError.at("invalid_person", "account", str(exc).partition(": ")[2])) from None
        except STORAGE_ERRORS as exc:
            from gateway.http.routes import _not_stored

            raise _not_stored(exc) from None
        return json_response(person.as_json(), status=201 if created else 200,
                             headers={"Location": f"/v1/people/{person_id}"} if created else None)

    async def delete_person(self, request: web.Request) -> web.Response:
        principal = await self._manager(request)
        person_id = self._person_id(request)
        try:
            removed = await self.registry.remove(person_id, f"http:{principal.name}")
        except STORAGE_ERRORS as exc:
            from gateway.http.routes import _not_stored

            raise _not_stored(exc) from None
        if not removed:
            raise ApiError(404, "not_found", f"no person {person_id!r}")
        return web.Response(status=204)


__all__ = ["PeopleRegistry", "PeopleRoutes"]
