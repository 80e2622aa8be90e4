"""The daemon's writes to the person registry (the HTTP API's ``PUT``/``DELETE
/v1/people/<id>``), on the database thread, committed before the API answers. The CLI
writes the same functions in its own transaction (it works while the daemon runs)."""

from __future__ import annotations

import structlog

from gateway import clock
from gateway.people import store
from gateway.people.model import Person
from gateway.storage import Database

log = structlog.get_logger(__name__)


class PeopleWriter:
    """Put and remove persons (the HTTP API's :class:`gateway.http.people.PeopleRegistry`)."""

    def __init__(self, db: Database):
        self.db = db

    async def put(self, person: Person, source: str) -> bool:
        """Store a person; True if new. :class:`gateway.people.store.AccountTaken` if its
        account is another person's."""
        created = await self.db.run(lambda conn: store.put(conn, person))
        log.info("person added" if created else "person changed", person_id=person.person_id, source=source,
                 devices=len(person.devices))
        return created

    async def remove(self, person_id: str, source: str) -> bool:
        """Remove a person; what they leave in open jobs ends with a reason
        (:func:`gateway.pipeline.reach.remove_person`). False: no such person."""
        from gateway.pipeline import reach

        removed = await self.db.run(lambda conn: reach.remove_person(conn, person_id, clock.now()))
        log.info("person removed" if removed else "person to remove was unknown", person_id=person_id, source=source)
        return removed


__all__ = ["PeopleWriter"]
