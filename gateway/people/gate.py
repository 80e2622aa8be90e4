"""The people gate: what a person's preferences do to a delivery that is due (contract §12).

The dispatcher asks it once per due delivery of a person, before the delivery's bridge is
chosen: bridges only classify, the pipeline decides. The answer is one of

- nothing: send it as usual;
- *suppress*: the person muted the job's segment or its alarm rule; the delivery ends
  ``suppressed`` (final, counted, shown) and is never sent;
- *hold*: the person is in quiet hours and the job's priority is below their
  ``bypass_priority``; the delivery stays ``queued`` with reason ``quiet hours until
  <local time> (<zone>)`` and is due again when the quiet stretch ends, or when its TTL
  ends if that comes first (then the dispatcher expires it as any other).

Whose a delivery is: the person the job reached through it (``deliveries.person_id``, a
job that targets people), else the person or persons whose reach order lists the device
(``person_devices``). A device listed by several persons is held only while all of them
are quiet (until the earliest end) and suppressed only when all of them muted the job.

A job that reaches a person holds each of their devices' deliveries; when the quiet stretch
ends the first device is due, and each later one ``reach_after_s`` after the one before it,
as if the job had come at the window's end.

Times are the gateway's clock (:mod:`gateway.clock`): quiet hours are read at
``clock.now()``, and a hold's end is stored as a due time on that clock, so a step of the
system clock while the daemon runs neither releases nor freezes a held delivery.

The gate keeps every person in memory (a site has tens to hundreds), read again when the
``persons`` or ``person_devices`` tables change (written by the daemon's HTTP API or by
the CLI, another process): the dispatcher checks a cheap fingerprint of them at most once a
second (:meth:`PeopleGate.fingerprint_sql`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import structlog

from gateway.people import quiet
from gateway.people.quiet import Window

log = structlog.get_logger(__name__)

PRIORITIES = ("low", "normal", "high", "critical")  # a notification's priority, lowest first
REFRESH_S = 1.0  # how often the dispatcher looks whether persons changed


def rank(priority: str | None) -> int:
    """A priority's place (unknown or missing: normal, the job default)."""
    try:
        return PRIORITIES.index(priority or "normal")
    except ValueError:
        return 1


@dataclass(frozen=True, slots=True)
class Policy:
    """What the gate needs of one person, read once per change of the registry."""

    person_id: str
    tz: ZoneInfo
    windows: tuple[Window, ...]
    bypass: int  # rank of bypass_priority: a job at or above it goes through quiet hours
    muted_segments: frozenset[str]
    muted_rules: frozenset[str]
    devices: tuple[str, ...] = ()  # reach order
    reach_after_s: float = 0.0

    @classmethod
    def of(cls, person: Any, default_windows: Sequence[Window], reach_after_s: float = 0.0) -> "Policy":
        """From a Person (gateway.people.model): its own quiet hours and reach time, else the config's."""
        own = getattr(person, "quiet_hours", None)
        muted = getattr(person, "muted", None)
        reach = getattr(person, "reach_after_s", None)
        return cls(person.person_id, quiet.zone(person.timezone),
                   quiet.windows(own) if own is not None else tuple(default_windows),
                   rank(getattr(person, "bypass_priority", "critical")),
                   frozenset(getattr(muted, "segments", ()) or ()), frozenset(getattr(muted, "rules", ()) or ()),
                   tuple(getattr(person, "devices", ()) or ()), float(reach if reach is not None else reach_after_s))

    def turn(self, device_id: str) -> float:
        """How long after the first device this device's turn comes in the reach order (s)."""
        try:
            return self.devices.index(device_id) * self.reach_after_s
        except ValueError:
            return 0.0


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What the gate needs of a job: its priority, and what a person may have muted."""

    priority: str
    segment: str | None = None  # target.segment
    rule: str | None = None  # the alarm rule whose job it is


class Verdict(NamedTuple):
    hold: bool  # True: hold until ``until``; False: suppress
    until: float  # gateway clock (hold only)
    reason: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    persons: Mapping[str, Policy]
    by_device: Mapping[str, tuple[str, ...]]  # device_id → person_ids whose reach order lists it
    fingerprint: tuple[Any, ...]

    @property
    def empty(self) -> bool:
        return not self.persons


EMPTY = Snapshot({}, {}, ())


class PeopleGate:
    """Decides for due deliveries of persons (see the module docstring)."""

    def __init__(self, default_windows: Iterable[Any] = (), reach_after_s: float = 0.0):
        self.default_windows = quiet.windows(default_windows)
        self.reach_after_s = reach_after_s  # [people] reach_after_s
        self.snapshot = EMPTY
        self.checked_at = float("-inf")  # gateway clock of the last fingerprint check

    # ------------------------------------------------------------ the registry in memory
    @staticmethod
    def fingerprint(conn: sqlite3.Connection) -> tuple[Any, ...]:
        """Changes whenever a person is added, changed or removed (the registry's own)."""
        from gateway.people import store as people_store

        return people_store.fingerprint(conn)

    def load(self, conn: sqlite3.Connection, fingerprint: tuple[Any, ...]) -> Snapshot:
        """Every person's policy (database thread). A person whose stored body no longer
        reads (a zone removed from the system's tzdata) is left out, logged: their
        deliveries go as if they had no preferences rather than not at all."""
        from gateway.people import store as people_store

        persons: dict[str, Policy] = {}
        if fingerprint:
            for row in people_store.raw_rows(conn):
                try:
                    person = people_store.person_of_row(row)
                    persons[row[0]] = Policy.of(person, self.default_windows, self.reach_after_s)
                except ValueError as exc:
                    log.warning("person left out of quiet hours and mutes: cannot read it", person_id=row[0],
                                error=str(exc))
        by_device: dict[str, list[str]] = {}
        if fingerprint:
            for device_id, person_id in people_store.device_index(conn):
                if person_id in persons:
                    by_device.setdefault(device_id, []).append(person_id)
        return Snapshot(persons, {d: tuple(p) for d, p in by_device.items()}, fingerprint)

    def refresh(self, conn: sqlite3.Connection) -> Snapshot | None:
        """A new snapshot when the registry changed since the last one, else None (database thread)."""
        fp = self.fingerprint(conn)
        if fp == self.snapshot.fingerprint:
            return None
        return self.load(conn, fp)

    def concerns(self, person_id: str | None, device_id: str) -> bool:
        """Whether a delivery may be someone's (the dispatcher's cheap test before :meth:`decide`)."""
        snap = self.snapshot
        return not snap.empty and (person_id is not None or device_id in snap.by_device)

    # ------------------------------------------------------------ the decision
    def policies(self, person_id: str | None, device_id: str) -> list[Policy]:
        snap = self.snapshot
        if person_id is not None:
            found = snap.persons.get(person_id)
            return [found] if found is not None else []
        return [snap.persons[p] for p in snap.by_device.get(device_id, ()) if p in snap.persons]

    def decide(self, person_id: str | None, device_id: str, job: JobFacts, now: float) -> Verdict | None:
        """Suppress, hold, or None (send). ``now`` is the gateway clock."""
        policies = self.policies(person_id, device_id)
        if not policies:
            return None
        mutes = [_muted(p, job) for p in policies]
        if all(mutes):
            return Verdict(False, now, "; ".join(dict.fromkeys(m for m in mutes if m)))
        priority = rank(job.priority)
        at = datetime.fromtimestamp(now, UTC)
        ends: list[tuple[datetime, Policy]] = []
        for p in policies:
            if priority >= p.bypass:
                return None
            end = quiet.quiet_until(p.windows, p.tz, at)
            if end is None:
                return None  # one of them is awake
            ends.append((end, p))
        end, who = min(ends, key=lambda e: e[0])
        # A job that reaches this person: their later devices keep their turns after the
        # window (the second one reach_after_s after it ends), not all at its end.
        turn = who.turn(device_id) if person_id is not None else 0.0
        reason = (quiet.ALWAYS_REASON if end - at >= quiet.LONGEST_STRETCH else quiet.hold_reason(end, who.tz))
        return Verdict(True, end.timestamp() + turn, reason)


def _muted(p: Policy, job: JobFacts) -> str | None:
    if job.rule is not None and job.rule in p.muted_rules:
        return f"muted by {p.person_id}: alarm rule {job.rule}"
    if job.segment is not None and job.segment in p.muted_segments:
        return f"muted by {p.person_id}: segment {job.segment}"
    return None


def job_facts(notification: Mapping[str, Any], target: Any, rule: str | None) -> JobFacts:
    """A job's facts from its stored notification and target (JSON text or decoded)."""
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except ValueError:
            target = {}
    segment = target.get("segment") if isinstance(target, dict) else None
    return JobFacts(str(notification.get("priority") or "normal"), segment if isinstance(segment, str) else None,
                    rule)


def alarm_rules(conn: sqlite3.Connection, job_ids: Iterable[str]) -> dict[str, str]:
    """job_id → the alarm rule that submitted it, for those of ``job_ids`` that are alarm
    jobs (asked of the alarms package, which owns ``alarm_jobs``)."""
    ids = list(job_ids)
    if not ids:
        return {}
    from gateway.alarms import store as alarms_store  # the alarms package imports the pipeline's

    return alarms_store.rules_of_jobs(conn, ids)


__all__ = ["JobFacts", "PRIORITIES", "PeopleGate", "Policy", "REFRESH_S", "Snapshot", "Verdict", "alarm_rules",
           "job_facts", "rank"]
