"""What a person may change of their own entry (the ``/v1/me`` routes of a ``user`` account).

Their preferences (:data:`PREFERENCES`) and which of their devices are in their reach list;
never their id, name, account, or another person. Each change reads the person and writes
them back in one transaction on the daemon's database thread (an operator's edit of the
same person in between is never overwritten with an older copy), validated by the Person
model itself, so a bad value is refused with the same field-naming message as ``PUT
/v1/people/<id>``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import structlog

from gateway.people import store
from gateway.people.model import MAX_DEVICES, Person, parse_person
from gateway.pipeline.models import InputError
from gateway.storage import Database

log = structlog.get_logger(__name__)

# A person's own settings (contract §12); the rest of a Person is the operator's.
PREFERENCES = ("timezone", "quiet_hours", "bypass_priority", "muted", "reach_after_s")
OPERATORS = ("person_id", "name", "account", "devices")


class PersonGone(LookupError):
    """The person was removed between the request's lookup and its write."""


def check_preferences(obj: dict[str, Any]) -> None:
    """Only preference fields, at least one: :class:`InputError` naming the first other field."""
    for key in obj:
        if key in OPERATORS:
            raise InputError.at("invalid_preferences", key, "not a preference: an operator sets it (people set/add)")
        if key not in PREFERENCES:
            raise InputError.at("invalid_preferences", key, f"unknown field (preferences are {', '.join(PREFERENCES)})")
    if not obj:
        raise InputError.at("invalid_preferences", "preferences", f"give at least one of {', '.join(PREFERENCES)}")


def with_preferences(person: Person, obj: dict[str, Any]) -> Person:
    """``person`` with the given preference fields replaced (``null``: back to the site's
    default where there is one), validated as a whole Person."""
    check_preferences(obj)
    body = person.as_json()
    body.update(obj)
    try:
        return parse_person(body, person.person_id)
    except InputError as err:
        raise InputError("invalid_preferences", err.message, err.fields) from None


def with_device(person: Person, device_id: str) -> Person:
    """The device appended to the person's reach list (kept in its place if there)."""
    if device_id in person.devices:
        return person
    if len(person.devices) >= MAX_DEVICES:
        raise InputError.at("invalid_device", "device_id", f"you have {MAX_DEVICES} devices, the most a person may "
                                                          "have; remove one first")
    return person.model_copy(update={"devices": [*person.devices, device_id]})


def without_device(person: Person, device_id: str) -> Person:
    return person.model_copy(update={"devices": [d for d in person.devices if d != device_id]})


def _change(person_id: str, change: Callable[[Person], Person]) -> Callable[[sqlite3.Connection], Person]:
    def run(conn: sqlite3.Connection) -> Person:
        person = store.get(conn, person_id)
        if person is None:
            raise PersonGone(person_id)
        changed = change(person)
        if changed != person:
            store.put(conn, changed)
        return changed

    return run


class OwnChanges:
    """A person's changes to themselves, committed on the daemon's database thread before
    the API answers (:class:`gateway.http.me.MeRoutes`)."""

    def __init__(self, db: Database):
        self.db = db

    async def set_preferences(self, person_id: str, obj: dict[str, Any]) -> dict[str, Any]:
        check_preferences(obj)  # before the database thread: bad input costs no transaction
        person = await self.db.run(_change(person_id, lambda p: with_preferences(p, obj)))
        return person.as_json()

    async def add_device(self, person_id: str, device_id: str) -> dict[str, Any]:
        return (await self.db.run(_change(person_id, lambda p: with_device(p, device_id)))).as_json()

    async def remove_device(self, person_id: str, device_id: str) -> dict[str, Any]:
        return (await self.db.run(_change(person_id, lambda p: without_device(p, device_id)))).as_json()


__all__ = ["OPERATORS", "PREFERENCES", "OwnChanges", "PersonGone", "check_preferences", "with_device",
           "with_preferences", "without_device"]
