"""One producer of live changes for every open operator page (``GET /ui/api/events``).

Each open page holds one server-sent-events stream and polls nothing. Behind all the
streams runs a single task, only while at least one stream is open, that looks at the
database when the pipeline commits (the HTTP service's change pulse; at most every
:data:`TICK_MIN_S`) or every :data:`TICK_MAX_S` otherwise, and hands the same events to
every stream:

- ``jobs``: the summaries (JobStatus + source and title) of jobs that changed. It reads the
  jobs updated in the last :data:`LOOKBACK_S` (index ``ui_jobs_by_updated``) and sends those
  that differ from what it sent before. The look-back, not a high-water mark, because
  writers stamp ``updated_at`` before they commit (the alarm engine's jobs carry the time
  of its batch), so commit order and ``updated_at`` order can differ by a moment.
- ``alarms``: alarm counts and a revision number that moves when any alarm changes state or
  escalates; the page refetches the alarm list it shows then.
- ``now``: the "now" view (health snapshot + queue, backlog, alarms) every :data:`NOW_EVERY_S`.
- ``resync``: more changed than one event carries, or a stream fell behind: refetch.

So ten open pages cost what one does, and a 100,000-delivery job costs one row read per tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway import clock
from gateway.http import ui_queries as q
from gateway.http.pulse import Pulse
from gateway.http.reader import Reader

log = structlog.get_logger(__name__)

TICK_MIN_S = 0.5
TICK_MAX_S = 1.0
NOW_EVERY_S = 2.0
LOOKBACK_S = 10.0
MAX_JOBS_PER_EVENT = 500
QUEUE_MAX = 64


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_MAX))
    behind: bool = False  # events were dropped: the stream sends ``resync``

    def put(self, event: str, data: Any) -> None:
        if self.behind:
            return
        try:
            self.queue.put_nowait((event, data))
        except asyncio.QueueFull:
            self.behind = True
            while not self.queue.empty():
                self.queue.get_nowait()


class EventHub:
    def __init__(self, reader: Reader, pulse: Pulse, stopping: asyncio.Event,
                 now_view: Callable[[], Awaitable[dict[str, Any]]]):
        self.reader = reader
        self.pulse = pulse
        self.stopping = stopping
        self.now_view = now_view
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._sent: dict[str, tuple[float, dict[str, Any]]] = {}  # job_id → (updated_at, summary sent)
        self._now: dict[str, Any] | None = None
        self._now_at = 0.0
        self._alarms: tuple[Any, ...] | None = None
        self.alarms_rev = 0
        self._alarm_counts: dict[str, int] = {}
        self.ticks = 0

    # ------------------------------------------------------------------ streams
    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self.subscribers.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="ui-events")
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def hello(self) -> list[tuple[str, Any]]:
        """What a new stream starts with: the current view and the jobs changed lately."""
        if self._now is None or time.monotonic() - self._now_at > NOW_EVERY_S:
            await self._refresh_now()
        if self._alarms is None:
            await self._refresh_alarms()
        recent = [s for _, s in sorted(self._sent.values(), key=lambda v: v[0])]
        out: list[tuple[str, Any]] = [("now", self._now), ("alarms", self._alarms_event())]
        if recent:
            out.append(("jobs", recent))
        return out

    def stop(self) -> None:
        for sub in self.subscribers:
            sub.put("bye", {})

    # ------------------------------------------------------------------ the producer
    async def _run(self) -> None:
        last = 0.0
        while self.subscribers and not self.stopping.is_set():
            await self.pulse.wait(TICK_MAX_S, self.stopping)
            if self.stopping.is_set():
                break
            wait = TICK_MIN_S - (time.monotonic() - last)
            if wait > 0:
                await asyncio.sleep(wait)
            last = time.monotonic()
            try:
                await self._tick()
            except Exception as exc:  # a transient database error: the next tick tries again
                log.warning("operator page events: read failed", error=f"{type(exc).__name__}: {exc}"[:300])
        self._task = None

    async def _tick(self) -> None:
        self.ticks += 1
        now = clock.now()
        rows = await self.reader.run(lambda conn: q.jobs_changed_since(conn, now - LOOKBACK_S, MAX_JOBS_PER_EVENT + 1))
        changed: list[dict[str, Any]] = []
        for row in rows[:MAX_JOBS_PER_EVENT]:
            summary = q.job_summary(row)
            sent = self._sent.get(row["job_id"])
            if sent is None or sent[1] != summary:
                changed.append(summary)
            self._sent[row["job_id"]] = (row["updated_at"], summary)
        for job_id in [j for j, (t, _) in self._sent.items() if t < now - 2 * LOOKBACK_S]:
            del self._sent[job_id]
        if len(rows) > MAX_JOBS_PER_EVENT:
            self._broadcast("resync", {"why": "many jobs changed"})
        elif changed:
            self._broadcast("jobs", changed)
        if await self._refresh_alarms():
            self._broadcast("alarms", self._alarms_event())
        if time.monotonic() - self._now_at >= NOW_EVERY_S:
            await self._refresh_now()
            self._broadcast("now", self._now)

    async def _refresh_now(self) -> None:
        self._now = await self.now_view()
        self._now_at = time.monotonic()

    async def _refresh_alarms(self) -> bool:
        def read(conn: Any) -> tuple[tuple[Any, ...], dict[str, int]]:
            return q.alarms_digest(conn), q.alarm_counts(conn)

        digest, counts = await self.reader.run(read)
        if digest == self._alarms:
            return False
        self._alarms, self._alarm_counts = digest, counts
        self.alarms_rev += 1
        return True

    def _alarms_event(self) -> dict[str, Any]:
        return {"rev": self.alarms_rev, "counts": self._alarm_counts}

    def _broadcast(self, event: str, data: Any) -> None:
        for sub in list(self.subscribers):
            sub.put(event, data)


__all__ = ["EventHub", "Subscriber"]
