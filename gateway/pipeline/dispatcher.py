"""Expansion and dispatch: jobs become delivery rows; due rows go to their bridges.

Every policy of delivery lives here, once: channel choice and fallback, TTL, retries
with backoff and Retry-After, max attempts, bridge health pauses and bounded
concurrency per bridge. Bridges only translate (see :mod:`bridges.base`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import TypeAdapter

from bridges.base import Bridge, Delivery, Notification, Outcome, OutcomeKind
from devices.models import Channel
from gateway.config import DispatchSection
from gateway.pipeline import store
from gateway.pipeline.backoff import retry_delay
from gateway.pipeline.recorder import Recorder
from gateway.storage import Database

log = structlog.get_logger(__name__)

_channel_adapter: TypeAdapter[Any] = TypeAdapter(Channel)


@dataclass(frozen=True, slots=True)
class JobInfo:
    notification: Notification
    options: dict[str, Any]
    created_at: float
    expires_at: float
    ttl: int

    @classmethod
    def from_row(cls, row: Any) -> "JobInfo":
        n = json.loads(row["notification"])
        return cls(
            Notification(title=n.get("title"), body=n.get("body"), data=n.get("data") or {},
                         priority=n.get("priority", "normal"), ttl=n.get("ttl", 3600),
                         collapse_key=n.get("collapse_key")),
            json.loads(row["options"]), row["created_at"], row["expires_at"], row["ttl"])


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

    @property
    def unhealthy(self) -> bool:
        return self.pauses > 0

    @property
    def free(self) -> int:
        # An unhealthy bridge is probed with one delivery at a time until it answers.
        return (1 if self.unhealthy else self.limit) - self.in_flight


class Dispatcher:
    def __init__(self, cfg: DispatchSection, db: Database, bridges: dict[str, Bridge], recorder: Recorder,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self.db = db
        self.slots = {name: BridgeSlot(b, cfg.max_in_flight) for name, b in bridges.items()}
        self.recorder = recorder
        self.rng = rng or random.Random()
        self.wake = asyncio.Event()
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: OrderedDict[str, JobInfo] = OrderedDict()
        self._accepting = True
        # message_id → signed ack URL, put in every payload when [http] is on (contract §8).
        self.ack_url: Callable[[str], str] | None = None

    # ----------------------------------------------------------------- loop
    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            started = await self._dispatch_once()
            if started:
                continue
            self.wake.clear()
            timeout = await self._idle_timeout()
            stop_wait = asyncio.ensure_future(stopping.wait())
            wake_wait = asyncio.ensure_future(self.wake.wait())
            await asyncio.wait({stop_wait, wake_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            wake_wait.cancel()
        self._accepting = False

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight sends (shutdown); those still running are cancelled and stay queued."""
        self._accepting = False
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _idle_timeout(self) -> float:
        nxt = await self.db.run(store.next_due_at)
        if nxt is None:
            return 1.0
        return min(1.0, max(0.005, nxt - time.time()))

    async def _dispatch_once(self) -> int:
        capacity = sum(max(0, s.free) for s in self.slots.values() if s.paused_until <= time.time())
        if capacity <= 0 and self.slots:
            return 0
        limit = max(capacity, 1) + len(self._in_flight)
        rows = await self.db.run(lambda conn: store.due_deliveries(conn, time.time(), min(limit, 5000)))
        rows = [r for r in rows if r.message_id not in self._in_flight]
        if not rows:
            return 0
        await self._load_jobs({r.job_id for r in rows})
        now = time.time()
        started = 0
        postponed: dict[float, list[str]] = {}
        for row in rows:
            job = self._jobs.get(row.job_id)
            if job is None:
                continue
            if self._expired(job, row.attempts, now):
                self._finish_now(store.Result(row.message_id, row.job_id, row.device_id, "expired",
                                              attempts=row.attempts, error="ttl elapsed before delivery"))
                started += 1
                continue
            choice = self._choose_channel(row)
            if isinstance(choice, store.Result):
                self._finish_now(choice)
                started += 1
                continue
            platform, channel, key = choice
            slot = self.slots[platform]
            if slot.paused_until > now:
                postponed.setdefault(slot.paused_until, []).append(row.message_id)
                continue
            if slot.free <= 0:
                continue
            slot.in_flight += 1
            self._in_flight.add(row.message_id)
            task = asyncio.create_task(self._send(slot, platform, channel, key, row, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        for until, ids in postponed.items():
            await self.recorder.postpone(ids, until)
        return started

    async def _load_jobs(self, job_ids: set[str]) -> None:
        missing = [j for j in job_ids if j not in self._jobs]
        if missing:
            rows = await self.db.run(lambda conn: store.job_rows(conn, missing))
            for job_id, row in rows.items():
                self._jobs[job_id] = JobInfo.from_row(row)
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

    def _choose_channel(self, row: store.DueDelivery) -> tuple[str, Any, str] | store.Result:
        """First channel whose bridge is enabled and whose address is not marked invalid."""
        if row.channels is None:
            return store.Result(row.message_id, row.job_id, row.device_id, "failed", attempts=row.attempts,
                                error="device removed from the registry")
        saw_invalid = False
        for raw in row.channels:
            try:
                channel = _channel_adapter.validate_python(raw)
            except ValueError:
                continue
            key = store.channel_key(channel)
            if key in row.invalid:
                saw_invalid = True
                continue
            if channel.platform in self.slots:
                return channel.platform, channel, key
        if saw_invalid:
            return store.Result(row.message_id, row.job_id, row.device_id, "invalid_address", attempts=row.attempts,
                                error="every channel's address is invalid")
        return store.Result(row.message_id, row.job_id, row.device_id, "failed", attempts=row.attempts,
                            error="no enabled bridge for any of the device's channels")

    def _finish_now(self, result: store.Result) -> None:
        self._in_flight.add(result.message_id)
        task = asyncio.create_task(self._record(result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, result: store.Result) -> None:
        try:
            await self.recorder.result(result)
        finally:
            self._in_flight.discard(result.message_id)
            self.wake.set()

    # ----------------------------------------------------------------- one send
    async def _send(self, slot: BridgeSlot, platform: str, channel: Any, key: str,
                    row: store.DueDelivery, job: JobInfo) -> None:
        attempt = row.attempts + 1
        now_dt = datetime.now(UTC)
        delivery = Delivery(
            message_id=row.message_id, job_id=row.job_id, device_id=row.device_id, channel=channel,
            notification=job.notification, options=job.options.get(platform) or {},
            sent_at=now_dt, expires_at=datetime.fromtimestamp(job.expires_at, UTC), attempt=attempt,
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
            result = self._decide(slot, platform, key, row, job, attempt, outcome)
            # The bridge is free again; the row stays excluded from fetching until committed.
            slot.in_flight -= 1
            released = True
            await self.recorder.result(result)
        finally:
            if not released:
                slot.in_flight -= 1
            self._in_flight.discard(row.message_id)
            self.wake.set()

    def _decide(self, slot: BridgeSlot, platform: str, key: str, row: store.DueDelivery, job: JobInfo,
                attempt: int, outcome: Outcome) -> store.Result:
        now = time.time()
        base = dict(message_id=row.message_id, job_id=row.job_id, device_id=row.device_id, platform=platform)
        kind = outcome.kind
        if kind is not OutcomeKind.UNHEALTHY and slot.unhealthy:
            log.warning("bridge healthy again", platform=platform, was=slot.pause_reason)
            slot.paused_until, slot.pauses = 0.0, 0
        if kind is OutcomeKind.ACCEPTED:
            slot.sent += 1
            return store.Result(**base, state="sent", attempts=attempt)
        if kind is OutcomeKind.INVALID_ADDRESS:
            # Not an attempt against the delivery: it falls over to the next channel now.
            return store.Result(**base, state="queued", attempts=row.attempts, next_at=now,
                                error=f"{platform}: {outcome.reason}", invalid_key=key)
        if kind is OutcomeKind.FAILED:
            return store.Result(**base, state="failed", attempts=attempt, error=f"{platform}: {outcome.reason}")
        if kind is OutcomeKind.UNHEALTHY:
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
            return store.Result(**base, state="queued", attempts=row.attempts, next_at=slot.paused_until,
                                error=f"{platform} unhealthy: {outcome.reason}")
        # RETRY
        if attempt >= self.cfg.max_attempts:
            return store.Result(**base, state="failed", attempts=attempt,
                                error=f"{platform}: {outcome.reason} (gave up after {attempt} attempts)")
        delay = retry_delay(attempt, outcome.retry_after, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self.rng)
        next_at = now + delay
        if job.ttl == 0 or next_at >= job.expires_at:
            return store.Result(**base, state="expired", attempts=attempt,
                                error=f"{platform}: {outcome.reason}; ttl ends before the next attempt")
        return store.Result(**base, state="queued", attempts=attempt, next_at=next_at,
                            error=f"{platform}: {outcome.reason}")

    def metrics(self) -> dict[str, Any]:
        return {name: {"in_flight": s.in_flight, "sent": s.sent, "paused": s.paused_until > time.time(),
                       "pause_reason": s.pause_reason if s.paused_until > time.time() else None}
                for name, s in self.slots.items()}


class Expander:
    """Turns accepted jobs into delivery rows, one page (``batch_size``) per transaction."""

    def __init__(self, db: Database, batch_size: int, on_page: Any):
        self.db = db
        self.batch_size = batch_size
        self.on_page = on_page
        self.wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            job_ids = await self.db.run(store.jobs_to_expand)
            for job_id in job_ids:
                done = False
                while not done and not stopping.is_set():
                    done = await self.db.run(
                        lambda conn, j=job_id: store.expand_page(conn, j, self.batch_size, time.time()))
                    self.on_page()
            if job_ids:
                continue
            stop_wait = asyncio.ensure_future(stopping.wait())
            wake_wait = asyncio.ensure_future(self.wake.wait())
            # Jobs written by the CLI (another process) are found by this poll.
            await asyncio.wait({stop_wait, wake_wait}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            wake_wait.cancel()

