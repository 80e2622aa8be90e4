"""Expansion and dispatch: jobs become delivery rows; due rows go to their bridges.

Every policy of delivery lives here, once: channel choice and fallback, TTL, retries
with backoff and Retry-After, max attempts, resends of unacked deliveries, bridge health
pauses and bounded concurrency per bridge. Bridges only translate (see :mod:`bridges.base`).

Each delivery row carries its route (the bridge of its next attempt), and due work is
fetched per bridge, only for bridges with free slots: a saturated or paused bridge
never holds other bridges' deliveries behind it. Pauses live in memory; what is stored
(``next_at``, ``resend_at``) is always a finite time before the job's TTL. While nothing
is due the dispatcher sleeps until the next due time, a pause's end or a wake-up.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway import clock
from bridges.base import Bridge, Delivery, Notification, Outcome, OutcomeKind
from devices.models import split_bridge_key
from gateway.config import DispatchSection
from gateway.pipeline import jobs, routing
from gateway.pipeline import deliveries as pipeline_deliveries
from gateway.pipeline.backoff import retry_delay
from gateway.pipeline.recorder import Recorder
from gateway.people.gate import REFRESH_S as PEOPLE_REFRESH_S
from gateway.people.gate import JobFacts, PeopleGate, alarm_rules, job_facts
from gateway.states import DeliveryState
from gateway.storage import Database, FailureEpisode, is_storage_error

log = structlog.get_logger(__name__)

IDLE_MAX_S = 1.0  # the longest sleep with nothing due (a safety net; wake-ups do the work)
UNROUTED_EVERY_S = 1.0  # look for deliveries without a usable route this often (they are rare)


@dataclass(frozen=True, slots=True)
class JobInfo:
    notification: Notification
    options: dict[str, Any]
    created_at: float
    expires_at: float
    ttl: int
    expires_dt: datetime  # expires_at as the Delivery carries it (made once per job, not per send)
    facts: JobFacts  # what a person's quiet hours and mutes look at (gateway.people.gate)

    @classmethod
    def from_row(cls, row: Any, rule: str | None = None) -> "JobInfo":
        n = json.loads(row["notification"])
        return cls(
            Notification(title=n.get("title"), body=n.get("body"), data=n.get("data") or {},
                         priority=n.get("priority", "normal"), ttl=n.get("ttl", 3600),
                         collapse_key=n.get("collapse_key")),
            json.loads(row["options"]), row["created_at"], row["expires_at"], row["ttl"],
            datetime.fromtimestamp(row["expires_at"], UTC), job_facts(n, row["target"], rule))


THROTTLE_WORDS = ("quota", "too many", "toomany", "throttl", "rate limit", "ratelimit")
OUTCOME_NAMES = ("accepted", "retried", "throttled", "invalid_address", "failed", "unhealthy")


def outcome_name(outcome: Outcome) -> str:
    """The outcome as counted per platform: a retry the platform asked for by throttling (HTTP
    429, or a quota/rate reason) is told apart from one after a transient failure, because an
    operator answers the two differently (slow down vs. look at the platform)."""
    kind = outcome.kind
    if kind is OutcomeKind.RETRY:
        reason = outcome.reason.lower().replace("_", " ")
        throttled = outcome.status == 429 or any(w in reason for w in THROTTLE_WORDS)
        return "throttled" if throttled else "retried"
    return kind.value


@dataclass
class BridgeSlot:
    """Concurrency and health of one bridge."""

    bridge: Bridge
    limit: int
    in_flight: int = 0
    paused_until: float = 0.0
    pause_reason: str = ""
    pauses: int = 0
    sent: int = 0
    # Platform answers since start, by outcome (OUTCOME_NAMES): what /metrics exports per platform.
    outcomes: dict[str, int] = field(default_factory=dict)
    unhealthy_since: float | None = None  # gateway clock; the fallback grace counts from here

    @property
    def unhealthy(self) -> bool:
        return self.pauses > 0

    @property
    def free(self) -> int:
        # An unhealthy bridge is probed with one delivery at a time until it answers.
        return (1 if self.unhealthy else self.limit) - self.in_flight


class Dispatcher:
    def __init__(self, cfg: DispatchSection, db: Database, bridges: dict[str, Bridge], recorder: Recorder,
                 rng: random.Random | None = None, resend: set[str] | frozenset[str] = frozenset(),
                 people: PeopleGate | None = None):
        self.cfg = cfg
        # Quiet hours and mutes of persons (contract §12), asked once per due delivery of a
        # person; the registry is looked at again at most once a second.
        self.people = people
        self.db = db
        self.slots = {name: BridgeSlot(b, cfg.max_in_flight or b.default_max_in_flight) for name, b in bridges.items()}
        self.recorder = recorder
        self.channels = routing.ChannelCache()  # devices' channel lists decoded once per distinct text
        self.rng = rng or random.Random()
        self.resend = set(resend)  # bridges with resend_unacked
        self.wake = asyncio.Event()
        self._in_flight: dict[str, str | None] = {}  # message_id → bridge (None: only being recorded)
        self._tasks: set[asyncio.Task[None]] = set()
        # Results decided in this turn of the event loop, handed to the recorder together
        # (one recorder item and one future for all of them: see _record_soon).
        self._results: list[pipeline_deliveries.Result] = []
        self._flush_scheduled = False
        self._jobs: OrderedDict[str, JobInfo] = OrderedDict()
        self._accepting = True
        self.passes = 0
        self._unrouted_at = 0.0
        self.db_failures = FailureEpisode(log, "dispatcher: reading due work")
        self.record_failures = FailureEpisode(log, "dispatcher: recording results; no new sends until it works")
        # message_id → signed ack URL, put in every payload when [http] is on (contract §8).
        self.ack_url: Callable[[str], str] | None = None
        # Fallback: bridges unhealthy for longer than ``fallback_after_s`` are "down": a
        # delivery routed there moves to the device's next channel on a bridge that is not.
        # The platforms a channel may be chosen from are kept as one object per state (the
        # channel choice is cached by that object's identity): every bridge while all are
        # healthy; ``_usable_now`` (for ttl 0 jobs) leaves out every unhealthy bridge.
        self._down: frozenset[str] = frozenset()
        self._unhealthy: frozenset[str] = frozenset()
        self._usable: Any = self.slots
        self._usable_now: Any = self.slots
        self._moves_at = 0.0

    def new_rows(self) -> None:
        """Expansion made rows: some may have no route yet (no usable channel); look now."""
        self._unrouted_at = 0.0
        self.wake.set()

    def pause(self, platform: str, reason: str, until: float = float("inf")) -> None:
        """Hold a bridge in memory (e.g. it could not start); its deliveries keep their times."""
        slot = self.slots[platform]
        slot.paused_until, slot.pause_reason, slot.pauses = until, reason, max(1, slot.pauses)
        if slot.unhealthy_since is None:
            slot.unhealthy_since = clock.now()
        self._refresh_routes(clock.now())

    # ----------------------------------------------------------------- fallback
    def _refresh_routes(self, now: float) -> float:
        """Recompute which bridges are down (unhealthy past the grace) and the platforms a
        channel may be chosen from; returns when the next bridge's grace runs out."""
        grace = self.cfg.fallback_after_s
        down: set[str] = set()
        unhealthy: set[str] = set()
        next_change = float("inf")
        for name, slot in self.slots.items():
            if slot.unhealthy_since is None:
                continue
            unhealthy.add(name)
            if now - slot.unhealthy_since >= grace:
                down.add(name)
            else:
                next_change = min(next_change, slot.unhealthy_since + grace)
        if down != self._down:
            self._down = frozenset(down)
            self._usable = frozenset(set(self.slots) - down) if down else self.slots
            if down:
                log.warning("deliveries move to their next channel", down=sorted(down),
                            grace_s=grace)
        if unhealthy != self._unhealthy:
            self._unhealthy = frozenset(unhealthy)
            self._usable_now = frozenset(set(self.slots) - unhealthy) if unhealthy else self.slots
        return next_change

    def _choose(self, channels: Any, invalid: Any, ttl0: bool = False,
                also_invalid: str | None = None) -> routing.Route | tuple[str, str]:
        """The delivery's channel: the first usable one on a bridge that is not down (any
        unhealthy bridge for ttl 0, "now or never"); when every usable channel is on such a
        bridge, that bridge's (the delivery waits for it, as without fallback)."""
        usable = self._usable_now if ttl0 else self._usable
        picked = routing.choose_channel(channels, invalid, usable, also_invalid)
        if usable is not self.slots and isinstance(picked, tuple):
            return routing.choose_channel(channels, invalid, self.slots, also_invalid)
        return picked

    def _why_moved(self, frm: str | None, to: str, now: float) -> str | None:
        slot = self.slots.get(frm or "")
        if slot is None or slot.unhealthy_since is None or frm == to:
            return None
        return (f"moved from {frm} to {to}: {frm} unhealthy for {now - slot.unhealthy_since:.0f} s "
                f"({slot.pause_reason})")

    # ----------------------------------------------------------------- loop
    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()  # before the pass: a wake-up during it is not lost
            try:
                started, wake_at = await self._dispatch_once()
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                await _wait(stopping, None, self.db_failures.failed(exc))
                continue
            self.db_failures.ok()
            if started:
                continue
            await _wait(stopping, self.wake, max(0.01, wake_at - clock.now()))
        self._accepting = False

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight sends and the recording of their results (shutdown); those
        still running are cancelled and stay queued."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._flush_results()  # a send that just finished hands its result over now
            remaining = deadline - loop.time()
            if not self._tasks or remaining <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=0.5)

    async def _dispatch_once(self) -> tuple[int, float]:
        """One pass; returns (work started, when to look again at the latest)."""
        self.passes += 1
        now = clock.now()
        wake_at = min(now + IDLE_MAX_S, self._refresh_routes(now))
        if self.record_failures.failing:
            return 0, wake_at  # results wait to be recorded: send nothing more until they are
        wants: dict[str, int] = {}
        paused: list[str] = []
        for name, slot in self.slots.items():
            if slot.paused_until > now:
                paused.append(name)
                wake_at = min(wake_at, slot.paused_until)
            elif slot.free > 0:
                wants[name] = slot.free  # rows being sent or recorded are left out by the query
        sweep = bool(paused)  # deliveries no bridge fetches now may still have to expire
        routable = list(self.slots)
        look_unrouted = now >= self._unrouted_at
        resend = self.resend if self.cfg.ack_timeout_s > 0 else set()
        # Deliveries waiting on a down bridge whose device has a channel elsewhere: moved.
        sweeping = bool(self._unhealthy) and now >= self._moves_at
        moving = sorted(self._down) if sweeping else []
        explaining = sorted(self._unhealthy) if sweeping else []
        if sweeping:
            self._moves_at = now + UNROUTED_EVERY_S
        usable = sorted(p for p in self.slots if p not in self._down)

        skip = frozenset(self._in_flight)  # a copy: the scan runs on the database thread
        gate = self.people
        look_people = gate is not None and now - gate.checked_at >= PEOPLE_REFRESH_S
        if look_people:
            assert gate is not None
            gate.checked_at = now

        def scan(conn: Any) -> tuple[dict[str, tuple[list[pipeline_deliveries.DueDelivery], float | None]],
                                     list[pipeline_deliveries.DueDelivery], list[pipeline_deliveries.DueDelivery], float | None]:
            fetched = {}
            for name, limit in wants.items():
                rows = pipeline_deliveries.due_for_route(conn, name, now, limit, resends=name in resend, skip=skip,
                                           channels=self.channels)
                # With sends in flight, their completion wakes us anyway; else look ahead.
                idle = len(rows) < limit and self.slots[name].in_flight == 0
                fetched[name] = (rows, pipeline_deliveries.next_due_for_route(conn, name, now, resends=name in resend)
                                 if idle else None)
            unrouted = pipeline_deliveries.unrouted_due(conn, now, routable, 200, self.channels) if look_unrouted else []
            expiring = pipeline_deliveries.expiring(conn, now, paused, channels=self.channels) if sweep else []
            next_expiry = jobs.next_expiry(conn, now) if paused else None
            movable = [r for name in moving for r in pipeline_deliveries.movable_for_route(conn, name, now, usable, 200, skip)]
            silent = [r for name in explaining for r in pipeline_deliveries.unexplained_for_route(conn, name, now, 500, skip)]
            people = gate.refresh(conn) if look_people and gate is not None else None
            if people is not None:  # preferences changed (or the first look): held ones are decided again
                with pipeline_deliveries.DeliveryWriter(conn, now) as writer:
                    writer.wake_held(now)
            return fetched, unrouted, expiring, next_expiry, movable + silent, people

        fetched, unrouted, expiring, next_expiry, movable, people = await self.db.run(scan)
        if people is not None and gate is not None:
            gate.snapshot = people  # swapped here, on the loop's thread, between decisions
        if look_unrouted:
            self._unrouted_at = now if unrouted else now + UNROUTED_EVERY_S
        if next_expiry is not None:
            wake_at = min(wake_at, next_expiry)
        every = [r for rows, _ in fetched.values() for r in rows] + unrouted + expiring + movable
        await self._load_jobs({r.job_id for r in every if r.message_id not in self._in_flight})
        now = clock.now()
        started = 0
        for row in expiring:
            if row.message_id not in self._in_flight and row.job_id in self._jobs:
                if self._jobs[row.job_id].ttl == 0 and self._move(row, now, ttl0=True):
                    started += 1  # "now or never" goes to the next channel at once
                    continue
                self._finish_now(pipeline_deliveries.Result(row.message_id, row.job_id, row.device_id, "expired",
                                              attempts=row.attempts, error=self._expiry_reason(row)))
                started += 1
        for row in unrouted:
            if row.message_id not in self._in_flight:
                started += self._route(row)
        for name, (rows, next_due) in fetched.items():
            if next_due is not None:
                wake_at = min(wake_at, next_due)
            for row in rows:
                if row.message_id in self._in_flight:
                    continue
                if self.slots[name].free <= 0:
                    break
                started += self._start(row, now)
        for row in movable:
            if row.message_id not in self._in_flight and row.job_id in self._jobs:
                started += self._move(row, now) or self._explain(row, now)
        return started, wake_at

    def _explain(self, row: pipeline_deliveries.DueDelivery, now: float) -> int:
        """Say why a delivery waits on an unhealthy bridge (contract §8: a queued delivery
        shows why it waits); its due time and attempts stay as they are."""
        slot = self.slots.get(row.route or "")
        if slot is None or slot.unhealthy_since is None:
            return 0
        other = routing.choose_channel(row.channels, row.invalid, [p for p in self.slots if p != row.route])
        later = (f"; moves to the device's next channel {self.cfg.fallback_after_s:.0f} s after it became unhealthy"
                 if row.route not in self._down and type(other) is routing.Route else "; no other channel to move to")
        self._finish_now(pipeline_deliveries.Result(row.message_id, row.job_id, row.device_id, "queued", attempts=row.attempts,
                                      next_at=now, error=f"{row.route} unhealthy: {slot.pause_reason}{later}"))
        return 1

    def _move(self, row: pipeline_deliveries.DueDelivery, now: float, ttl0: bool = False) -> int:
        """Queue a delivery on its device's next channel, recording why; 0 if it has none."""
        picked = self._choose(row.channels, row.invalid, ttl0=ttl0)
        if isinstance(picked, tuple) or picked.platform == row.route:
            return 0
        job = self._jobs[row.job_id]
        self._finish_now(pipeline_deliveries.Result(row.message_id, row.job_id, row.device_id, "queued", attempts=row.attempts,
                                      next_at=min(now, job.expires_at), route=picked.platform,
                                      moved=self._why_moved(row.route, picked.platform, now)))
        return 1

    def _expiry_reason(self, row: pipeline_deliveries.DueDelivery) -> str:
        job = self._jobs[row.job_id]
        if job.ttl == 0:
            return f"ttl 0 (now or never) and {row.route} is paused: {self.slots[row.route].pause_reason}" \
                if row.route in self.slots else "ttl 0 (now or never)"
        return "ttl elapsed before delivery"

    async def _load_jobs(self, job_ids: set[str]) -> None:
        missing = [j for j in job_ids if j not in self._jobs]
        if missing:
            def read(conn: Any) -> tuple[dict[str, Any], dict[str, str]]:
                rows = jobs.job_rows(conn, missing)
                alarm_jobs = [j for j, r in rows.items() if r["source"] == "alarm"]
                return rows, alarm_rules(conn, alarm_jobs) if self.people is not None else {}

            rows, rules = await self.db.run(read)
            for job_id, row in rows.items():
                self._jobs[job_id] = JobInfo.from_row(row, rules.get(job_id))
        for j in job_ids:
            if j in self._jobs:
                self._jobs.move_to_end(j)
        while len(self._jobs) > 256:
            self._jobs.popitem(last=False)

    @staticmethod
    def _expired(job: JobInfo, attempts: int, now: float) -> bool:
        if job.ttl == 0:
            return attempts > 0  # "deliver now or never": one attempt, no retries
        return now >= job.expires_at

    def _route(self, row: pipeline_deliveries.DueDelivery) -> int:
        """A queued delivery without a usable route: give it one (fetched next pass) or finish it."""
        job = self._jobs.get(row.job_id)
        choice = self._choose(row.channels, row.invalid, ttl0=job is not None and job.ttl == 0)
        if isinstance(choice, tuple):
            state, error = choice
            self._finish_now(pipeline_deliveries.Result(row.message_id, row.job_id, row.device_id, state,
                                          attempts=row.attempts, error=error))
        else:
            now = clock.now()
            self._finish_now(pipeline_deliveries.Result(row.message_id, row.job_id, row.device_id, "queued", attempts=row.attempts,
                                          next_at=min(now, job.expires_at) if job else now, route=choice.platform,
                                          moved=self._why_moved(row.route, choice.platform, now)))
        return 1

    def _start(self, row: pipeline_deliveries.DueDelivery, now: float) -> int:
        job = self._jobs.get(row.job_id)
        if job is None:
            return 0
        gate = self.people
        if gate is not None and gate.concerns(row.person_id, row.device_id) and self._gated(gate, row, job, now):
            return 1
        if row.resend or job.ttl == 0 or now >= job.expires_at:
            return self._start_other(row, job, now)
        picked = self._choose(row.channels, row.invalid)
        if type(picked) is not routing.Route or picked.platform != row.route:
            probe = self._probe(row, now)
            if probe is None:
                return self._start_other(row, job, now)
            picked = probe
        # The usual case: a first attempt on the row's route, well inside the TTL.
        slot = self.slots[picked.platform]
        slot.in_flight += 1
        self._in_flight[row.message_id] = picked.platform
        self._spawn(self._send(slot, picked.platform, picked.channel, picked.key, row, job))
        return 1

    def _gated(self, gate: PeopleGate, row: pipeline_deliveries.DueDelivery, job: JobInfo, now: float) -> bool:
        """Apply the person's mutes and quiet hours to a due delivery (contract §12): True
        when it was suppressed or held (its result is on its way to the recorder)."""
        if row.resend and now >= job.expires_at:
            return False  # its resends end with the ttl anyway
        verdict = gate.decide(row.person_id, row.device_id, job.facts, now)
        if verdict is None:
            return False
        result = functools.partial(pipeline_deliveries.Result, row.message_id, row.job_id, row.device_id,
                                   attempts=row.attempts)
        if verdict.hold and job.ttl > 0 and now >= job.expires_at:
            # Held until its ttl ended: it expires, saying why it was never sent.
            self._finish_now(result(DeliveryState.EXPIRED, error=f"ttl elapsed during {verdict.reason}"))
        elif not verdict.hold:
            self._finish_now(result(DeliveryState.SUPPRESSED, error=verdict.reason))
        elif row.resend:
            # Sent once and unacked: its next resend waits for the end of quiet hours too.
            at = verdict.until if verdict.until < job.expires_at else None
            self._finish_now(result(DeliveryState.SENT, resend=True, resend_at=at, error=verdict.reason
                                    if at is not None else f"{verdict.reason}, after the ttl; no more resends"))
        elif job.ttl == 0:
            self._finish_now(result(DeliveryState.EXPIRED, error=f"ttl 0 (now or never) and {verdict.reason}"))
        else:
            self._finish_now(result(DeliveryState.QUEUED, next_at=min(verdict.until, job.expires_at),
                                    error=verdict.reason))
        return True

    def _probe(self, row: pipeline_deliveries.DueDelivery, now: float) -> routing.Route | None:
        """A down bridge whose pause is over is probed with one of its own deliveries (else,
        with every delivery moved away, nothing would find out that it works again)."""
        slot = self.slots.get(row.route or "")
        if row.route not in self._down or slot is None or slot.paused_until > now:
            return None
        return routing.channel_for(row.channels, row.invalid, row.route or "")

    def _start_other(self, row: pipeline_deliveries.DueDelivery, job: JobInfo, now: float) -> int:
        """:meth:`_start` for everything but a plain first attempt: resends, expiry, no usable
        channel, a route that changed."""
        base = dict(message_id=row.message_id, job_id=row.job_id, device_id=row.device_id)
        if row.resend:
            if job.ttl == 0 or now >= job.expires_at:
                self._finish_now(pipeline_deliveries.Result(**base, state="sent", attempts=row.attempts, resend=True,
                                              error="ttl ended; no more resends"))
                return 1
            found = routing.channel_for(row.channels, row.invalid, row.route or "")
            if found is None:
                self._finish_now(pipeline_deliveries.Result(**base, state="sent", attempts=row.attempts, resend=True,
                                              error=f"no usable {row.route} channel left; no more resends"))
                return 1
            choice: routing.Route = found
        else:
            if self._expired(job, row.attempts, now):
                self._finish_now(pipeline_deliveries.Result(**base, state="expired", attempts=row.attempts,
                                              error="ttl elapsed before delivery"))
                return 1
            picked = self._choose(row.channels, row.invalid, ttl0=job.ttl == 0)
            if isinstance(picked, tuple):
                self._finish_now(pipeline_deliveries.Result(**base, state=picked[0], attempts=row.attempts, error=picked[1]))
                return 1
            if picked.platform != row.route:  # the device, the config or a bridge's health changed
                self._finish_now(pipeline_deliveries.Result(**base, state="queued", attempts=row.attempts,
                                              next_at=min(now, job.expires_at), route=picked.platform,
                                              moved=self._why_moved(row.route, picked.platform, now)))
                return 1
            choice = picked
        slot = self.slots[choice.platform]
        slot.in_flight += 1
        self._in_flight[row.message_id] = choice.platform
        self._spawn(self._send(slot, choice.platform, choice.channel, choice.key, row, job))
        return 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish_now(self, result: pipeline_deliveries.Result) -> None:
        self._in_flight[result.message_id] = None
        self._record_soon(result)

    def _record_soon(self, result: pipeline_deliveries.Result) -> None:
        """Queue a result for the recorder. Every result decided in this turn of the event
        loop goes in one recorder item (one future, one waiting task), instead of a future
        and a coroutine per delivery; the commit is the recorder's batch either way."""
        self._results.append(result)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_results)

    def _flush_results(self) -> None:
        self._flush_scheduled = False
        if self._results:
            results, self._results = self._results, []
            self._spawn(self._record(results))

    async def _record(self, results: list[pipeline_deliveries.Result]) -> None:
        """Commit results; while the database refuses (disk full), keep them and try again
        (the rows stay out of fetching, so they are neither lost nor sent twice meanwhile)."""
        try:
            while True:
                try:
                    await self.recorder.results(results)
                    self.record_failures.ok()
                    return
                except Exception as exc:
                    if not is_storage_error(exc):
                        log.exception("recording results failed", deliveries=len(results),
                                      message_id=results[0].message_id)
                        return  # the rows keep their stored state and are retried from there
                    await asyncio.sleep(self.record_failures.failed(exc))
        finally:
            for result in results:
                self._in_flight.pop(result.message_id, None)
            self.wake.set()

    # ----------------------------------------------------------------- one send
    async def _send(self, slot: BridgeSlot, platform: str, channel: Any, key: str,
                    row: pipeline_deliveries.DueDelivery, job: JobInfo) -> None:
        attempt = row.attempts + 1
        sent_at = clock.utcnow()
        delivery = Delivery(
            message_id=row.message_id, job_id=row.job_id, device_id=row.device_id, channel=channel,
            notification=job.notification, options=job.options.get(split_bridge_key(platform)[0]) or {},
            sent_at=sent_at, expires_at=job.expires_dt, attempt=attempt,
            ack_url=self.ack_url(row.message_id) if self.ack_url is not None else None)
        released = False
        try:
            try:
                outcome = await slot.bridge.send(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bridge bug must not stop the pipeline
                log.exception("bridge raised", platform=platform, message_id=row.message_id)
                outcome = Outcome.retry(f"bridge error: {exc.__class__.__name__}")
            result = self._decide(slot, platform, key, row, job, attempt, outcome, sent_at.timestamp())
            # The bridge is free again; the row stays excluded from fetching until committed.
            slot.in_flight -= 1
            released = True
            self._in_flight[row.message_id] = None
        finally:
            if not released:
                slot.in_flight -= 1
                self._in_flight.pop(row.message_id, None)
                self.wake.set()
        self._record_soon(result)

    def _resend_at(self, platform: str, attempt: int, job: JobInfo, now: float) -> float | None:
        """When a sent delivery is sent again if no ack came (bridges with resend_unacked)."""
        if platform not in self.resend or self.cfg.ack_timeout_s <= 0 or attempt >= self.cfg.max_attempts:
            return None
        at = now + self.cfg.ack_timeout_s
        return at if at < job.expires_at else None

    def _health(self, slot: BridgeSlot, platform: str, outcome: Outcome, now: float) -> None:
        if outcome.kind is not OutcomeKind.UNHEALTHY:
            if slot.unhealthy:
                log.warning("bridge healthy again", platform=platform, was=slot.pause_reason)
                slot.paused_until, slot.pauses, slot.unhealthy_since = 0.0, 0, None
                self._refresh_routes(now)
            return
        if slot.paused_until <= now:
            pause = outcome.retry_after or min(self.cfg.backoff_max_s,
                                               max(5.0, self.cfg.backoff_initial_s * 5) * (2 ** slot.pauses))
            if not slot.unhealthy or outcome.reason != slot.pause_reason:
                # Logged once per episode, not per delivery or per probe.
                log.error("bridge unhealthy; paused, deliveries kept", platform=platform,
                          reason=outcome.reason, retry_in_s=round(pause, 1))
            slot.pauses += 1
            slot.paused_until = now + pause
            slot.pause_reason = outcome.reason
            if slot.unhealthy_since is None:
                slot.unhealthy_since = now
            self._refresh_routes(now)

    def _decide(self, slot: BridgeSlot, platform: str, key: str, row: pipeline_deliveries.DueDelivery, job: JobInfo,
                attempt: int, outcome: Outcome, sent_at: float) -> pipeline_deliveries.Result:
        now = clock.now()
        self._health(slot, platform, outcome, now)
        name = outcome_name(outcome)
        slot.outcomes[name] = slot.outcomes.get(name, 0) + 1
        if row.resend:
            return self._decide_resend(platform, key, row, job, attempt, outcome, now)
        kind = outcome.kind
        if kind is OutcomeKind.ACCEPTED:  # the usual case: built positionally, no keyword dict
            slot.sent += 1
            return pipeline_deliveries.Result(row.message_id, row.job_id, row.device_id, "sent", platform, attempt,
                                resend_at=self._resend_at(platform, attempt, job, now), sent_at=sent_at)
        base = dict(message_id=row.message_id, job_id=row.job_id, device_id=row.device_id, platform=platform)
        if kind is OutcomeKind.INVALID_ADDRESS:
            # Not an attempt against the delivery: it falls over to the next channel now.
            error = f"{platform}: {outcome.reason}"
            nxt = self._choose(row.channels, row.invalid, ttl0=job.ttl == 0, also_invalid=key)
            if isinstance(nxt, tuple):
                return pipeline_deliveries.Result(**base, state=nxt[0], attempts=row.attempts, error=error, invalid_key=key)
            return pipeline_deliveries.Result(**base, state="queued", attempts=row.attempts, next_at=min(now, job.expires_at),
                                route=nxt.platform, error=error, invalid_key=key)
        if kind is OutcomeKind.FAILED:
            return pipeline_deliveries.Result(**base, state="failed", attempts=attempt, error=f"{platform}: {outcome.reason}")
        if kind is OutcomeKind.UNHEALTHY:
            # At once for ttl 0, after the grace otherwise: the device's next channel.
            nxt = self._choose(row.channels, row.invalid, ttl0=job.ttl == 0)
            if type(nxt) is routing.Route and nxt.platform != platform:
                return pipeline_deliveries.Result(**base, state="queued", attempts=row.attempts, next_at=min(now, job.expires_at),
                                    route=nxt.platform, error=f"{platform} unhealthy: {outcome.reason}",
                                    moved=self._why_moved(platform, nxt.platform, now))
            if job.ttl == 0:
                return pipeline_deliveries.Result(**base, state="expired", attempts=row.attempts,
                                    error=f"ttl 0 (now or never) and {platform} is unhealthy: {outcome.reason}")
            # Waits (no attempt spent) while the bridge is paused in memory; stored time stays finite.
            return pipeline_deliveries.Result(**base, state="queued", attempts=row.attempts, next_at=min(now, job.expires_at),
                                error=f"{platform} unhealthy: {outcome.reason}")
        # RETRY
        if attempt >= self.cfg.max_attempts:
            return pipeline_deliveries.Result(**base, state="failed", attempts=attempt,
                                error=f"{platform}: {outcome.reason} (gave up after {attempt} attempts)")
        delay = retry_delay(attempt, outcome.retry_after, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self.rng)
        next_at = now + delay
        if job.ttl == 0 or next_at >= job.expires_at:
            return pipeline_deliveries.Result(**base, state="expired", attempts=attempt,
                                error=f"{platform}: {outcome.reason}; ttl ends before the next attempt")
        return pipeline_deliveries.Result(**base, state="queued", attempts=attempt, next_at=next_at,
                            error=f"{platform}: {outcome.reason}")

    def _decide_resend(self, platform: str, key: str, row: pipeline_deliveries.DueDelivery, job: JobInfo, attempt: int,
                       outcome: Outcome, now: float) -> pipeline_deliveries.Result:
        """A resend never changes the delivery's state (it was accepted once and stays
        ``sent``); it counts as an attempt and decides when, if ever, to send again."""
        base = dict(message_id=row.message_id, job_id=row.job_id, device_id=row.device_id, platform=platform,
                    state="sent", resend=True)
        kind = outcome.kind
        if kind is OutcomeKind.ACCEPTED:
            self.slots[platform].sent += 1
            at = self._resend_at(platform, attempt, job, now)
            return pipeline_deliveries.Result(**base, attempts=attempt, resend_at=at, until_ack=at is None,
                                error=None if at is not None else f"no ack after {attempt} sends; no more resends")
        if kind is OutcomeKind.UNHEALTHY:
            return pipeline_deliveries.Result(**base, attempts=row.attempts, resend_at=now,
                                error=f"{platform} unhealthy: {outcome.reason}")
        if kind is OutcomeKind.RETRY and attempt < self.cfg.max_attempts:
            at = now + retry_delay(attempt, outcome.retry_after, self.cfg.backoff_initial_s,
                                   self.cfg.backoff_max_s, self.rng)
            return pipeline_deliveries.Result(**base, attempts=attempt, resend_at=at if at < job.expires_at else None,
                                error=f"resend: {platform}: {outcome.reason}")
        return pipeline_deliveries.Result(**base, attempts=attempt, resend_at=None,
                            invalid_key=key if kind is OutcomeKind.INVALID_ADDRESS else None,
                            error=f"resend: {platform}: {outcome.reason}; no more resends")

    def metrics(self) -> dict[str, Any]:
        return {name: {"in_flight": s.in_flight, "sent": s.sent, "paused": s.paused_until > clock.now(),
                       "pause_reason": s.pause_reason if s.paused_until > clock.now() else None}
                for name, s in self.slots.items()}


class Expander:
    """Turns accepted jobs into delivery rows, one page (``batch_size``) per transaction."""

    def __init__(self, db: Database, batch_size: int, on_page: Any, platforms: list[str] | None = None,
                 reach_after_s: float = 120.0):
        self.db = db
        self.batch_size = batch_size
        self.reach_after_s = reach_after_s  # [people] reach_after_s: a person's steps without their own
        self.on_page = on_page
        self.platforms = platforms
        self.channels = routing.ChannelCache()  # the registry's channel lists decoded once per distinct text
        self.wake = asyncio.Event()
        self.failures = FailureEpisode(log, "expanding jobs")

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            try:
                busy = await self._expand(stopping)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                await _wait(stopping, None, self.failures.failed(exc))
                continue
            self.failures.ok()
            if busy:
                continue
            # Jobs written by the CLI (another process) are found by this poll.
            await _wait(stopping, self.wake, 0.5)

    async def _expand(self, stopping: asyncio.Event) -> bool:
        job_ids = await self.db.run(jobs.jobs_to_expand)
        for job_id in job_ids:
            done = False
            while not done and not stopping.is_set():
                done = await self.db.run(
                    lambda conn, j=job_id: pipeline_deliveries.expand_page(conn, j, self.batch_size, clock.now(), self.platforms,
                                                             self.channels, self.reach_after_s))
                self.on_page()
        return bool(job_ids)


async def _wait(stopping: asyncio.Event, wake: asyncio.Event | None, timeout: float) -> None:
    """Sleep up to ``timeout``; return early on stop (or on ``wake``)."""
    waiters = {asyncio.ensure_future(stopping.wait())}
    if wake is not None:
        waiters.add(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
