"""Reaching people (contract §12): what a job that targets people does with their devices.

**Every step is a delivery row, made when the job is expanded.** A person with devices
``[d0, d1, d2]`` and ``reach_after_s = r`` gets, in the expansion's transaction, one
delivery per registered device: ``d0`` due at once, ``d1`` due ``r`` seconds later, ``d2``
at ``2r`` (never past the job's TTL). A waiting row is an ordinary queued delivery whose due
time lies ahead (its reason says ``waiting for the person's earlier device``): the
dispatcher sends it when it falls due exactly as it sends a retry after its backoff. So the
reach schedule is on the gateway's clock (:mod:`gateway.clock`: a wall-clock step neither
fires a step early nor holds it, a restart re-anchors the stored due times and resumes), and
a kill -9 at any point leaves either no rows or all of them (one transaction), each device
given one delivery per job (``UNIQUE(job_id, device_id)``): no step runs twice, none is
skipped.

**The first ack reaches the person** (any status), in the ack's own transaction
(:meth:`gateway.pipeline.deliveries.DeliveryWriter.acknowledge` calls :func:`reached`):
``job_people`` marks who was reached and by which device, the job's ``people_reached``
grows, the person's rows that are still waiting (never attempted, not due yet, so never
fetched by the dispatcher) are withdrawn — deleted, and taken out of the job's counts: they
were never sent, and the job's ``targets`` are the deliveries it really made — and the
resends of their devices that were sent but have not acked stop.

A device that cannot be found when the job is expanded gets a ``failed`` row ("unknown
device"), like a device target's; it takes no turn in the schedule. A device the person
shares with another person of the same job gets one delivery, which counts for the person
whose id sorts first.

**Removing a person** (:func:`remove_person`) ends what open jobs still had queued for them:
each such delivery ``failed`` with ``person removed``, in the same transaction as the
registry's delete (the other devices' notifications were for that person). Removing a device
is the registry's: a queued delivery to it fails ``device removed from the registry`` when it
falls due, and the person's next device keeps its turn.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gateway.people import store as people
from gateway.pipeline import registry
from gateway.pipeline.routing import ChannelCache, route_of
from gateway.states import DeliveryState, ReachState

if TYPE_CHECKING:
    from gateway.pipeline.deliveries import DeliveryWriter

WAITING = "waiting for the person's earlier device"
UNKNOWN_DEVICE = "unknown device"
PERSON_REMOVED = "person removed"


def count_targets(conn: sqlite3.Connection, person_ids: list[str]) -> int:
    """How many deliveries a people job will make: each listed device of each known person
    once (a device two of them share, once)."""
    devices: set[str] = set()
    for person in people.get_many(conn, person_ids).values():
        devices.update(person.devices)
    return len(devices)


def expand_page(writer: "DeliveryWriter", job_id: str, person_ids: list[str], due: float, expires_at: float,
                default_reach_after_s: float, platforms: set[str] | None,
                channels: ChannelCache | None) -> tuple[int, int]:
    """One page of a people target: every step of each person (see the module's
    docstring), their ``job_people`` rows. (rows made, of which failed)."""
    conn = writer.conn
    found = people.get_many(conn, person_ids)
    wanted = [d for p in found.values() for d in p.devices]
    known = registry.channels_of(conn, list(dict.fromkeys(wanted)))
    rows: list[tuple[str, str | None, str, float, str, str | None]] = []
    states: list[tuple[str, str, str | None]] = []
    failed = 0
    for person_id in person_ids:
        person = found.get(person_id)
        if person is None:
            states.append((person_id, ReachState.UNKNOWN, "no such person"))
            continue
        if not person.devices:
            states.append((person_id, ReachState.NO_DEVICES, "the person has no devices"))
            continue
        r = person.reach_after_s if person.reach_after_s is not None else default_reach_after_s
        turn = 0
        for device_id in person.devices:
            if device_id not in known:
                rows.append((device_id, None, person_id, due, DeliveryState.FAILED, UNKNOWN_DEVICE))
                continue
            rows.append((device_id, route_of(*known[device_id], platforms, channels), person_id,
                         min(due + turn * r, expires_at), DeliveryState.QUEUED, None))
            turn += 1
        states.append((person_id, ReachState.REACHING, None if turn else "none of the person's devices is registered"))
    made, failed = writer.insert_steps(job_id, rows)
    conn.executemany("INSERT OR IGNORE INTO job_people(job_id, person_id, state, note) VALUES (?, ?, ?, ?)",
                     [(job_id, p, st, note) for p, st, note in states])
    return made, failed


def reached(writer: "DeliveryWriter", acked: Iterable[tuple[str, str, str, float]], now: float) -> None:
    """First acks of people's deliveries, (job_id, person_id, device_id, acked_at) each: the
    person is reached once (the first of them); their waiting rows are withdrawn and their
    other devices' resends stop (see the module's docstring)."""
    conn = writer.conn
    for job_id, person_id, device_id, acked_at in acked:
        cur = conn.execute("UPDATE job_people SET state = ?, reached_at = ?, reached_by = ?, note = NULL "
                           "WHERE job_id = ? AND person_id = ? AND state != ?",
                           (ReachState.REACHED, acked_at, device_id, job_id, person_id, ReachState.REACHED))
        if not cur.rowcount:
            continue
        writer.count_reached(job_id)
        waiting = [r[0] for r in conn.execute(
            "SELECT message_id FROM deliveries WHERE person_id = ? AND job_id = ? AND state = 'queued' "
            "AND attempts = 0 AND next_at > ?", (person_id, job_id, now))]
        writer.withdraw(waiting)
        writer.stop_resends(job_id, person_id)


def remove_person(conn: sqlite3.Connection, person_id: str, now: float) -> bool:
    """Remove a person from the registry and end what open jobs still had queued for them
    (``failed``, ``person removed``; see the module's docstring); False if there was none."""
    from gateway.pipeline.deliveries import DeliveryWriter, Result

    if not people.remove(conn, person_id):
        return False
    queued = conn.execute("SELECT message_id, job_id, device_id, attempts FROM deliveries "
                          "WHERE person_id = ? AND state = 'queued'", (person_id,)).fetchall()
    with DeliveryWriter(conn, now) as writer:
        writer.record([Result(r[0], r[1], r[2], DeliveryState.FAILED, attempts=r[3], error=PERSON_REMOVED)
                       for r in queued])
    conn.execute("UPDATE job_people SET state = ?, note = ? WHERE person_id = ? AND state = ?",
                 (ReachState.REMOVED, PERSON_REMOVED, person_id, ReachState.REACHING))
    return True


def people_of_job(conn: sqlite3.Connection, job_id: str) -> list[dict[str, Any]]:
    """Each person of a people job: state, who reached them and when, or why not."""
    from gateway.timeutil import iso_ts

    return [{"person_id": r[0], "state": r[1], "reached_at": iso_ts(r[2]) if r[2] is not None else None,
             "reached_by": r[3], "note": r[4]}
            for r in conn.execute("SELECT person_id, state, reached_at, reached_by, note FROM job_people "
                                  "WHERE job_id = ? ORDER BY person_id", (job_id,))]


def delete_of_jobs(conn: sqlite3.Connection, job_ids: list[str]) -> None:
    """Retention: the person rows of pruned jobs."""
    conn.execute("DELETE FROM job_people WHERE job_id IN (SELECT value FROM json_each(?))", (json.dumps(job_ids),))


__all__ = ["PERSON_REMOVED", "UNKNOWN_DEVICE", "WAITING", "count_targets", "delete_of_jobs", "expand_page",
           "people_of_job", "reached", "remove_person"]
