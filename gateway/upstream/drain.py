"""The outbound half of the cloud link: a sliding window over the outbox.

Why a window and not batches: at 100 ms round trip, "publish 64, wait for every PUBACK,
commit, repeat" caps the link at a few hundred messages a second. Here up to ``window``
publishes are in flight at once; each PUBACK frees a slot that is refilled at once from
rows read ahead, and the confirmed rows are deleted in batches (one transaction per batch,
not per message), so the rate is set by the window and the round trip, not by commits.

What makes it safe:

* **Only the confirmed prefix is forgotten.** Rows are published in ``seq`` order on one
  connection; a row is deleted only when it *and every row before it* has its PUBACK. A
  PUBACK that never comes (lost, or the connection dropped) stops the prefix there: that
  row and every later one, acknowledged or not, stay and are sent again, in order, after
  the reconnect. So a resend never lands after a newer message of the same job (a retained
  status on the cloud never ends older than it was), across a lost PUBACK, a reconnect, a
  clean stop or ``kill -9``. The price is duplicates of the rows after the gap; every row
  carries an ``id`` for the cloud to drop them (:func:`gateway.upstream.outbox.wire_payload`).
* **A gap is noticed.** MQTT 3.1.1 brokers acknowledge in order; when later rows are
  acknowledged and the oldest is not within ``gap_grace`` (or any publish times out), the
  session ends and the client reconnects, so the resend cannot overtake the original.
* **A row the cloud will not take is set aside.** Some brokers (AWS IoT, HiveMQ) drop a
  3.1.1 client that publishes where it may not. When ``set_aside_after`` sessions in a row
  end with the same row as the oldest unconfirmed (the connection dropped shortly after
  it was sent, or its PUBACK never came while later ones did), it is moved to
  ``upstream_outbox_aside`` (kept, counted, logged) and the drain goes on with the rest.
* **A clean stop waits for what is in flight.** On stop the drain goes on sending only
  while a row sent now can still be confirmed within ``stop_flush_s`` (twice the moving
  average of publish → PUBACK, plus 50 ms), then awaits the PUBACKs still due until
  ``stop_flush_s`` and deletes the confirmed prefix. Only rows truly unconfirmed are sent
  again after the restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.mqtt import NotConnected
from gateway.storage import Database
from gateway.upstream.outbox import Outbox, OutboxRow, OutboxStats, wire_payload
from gateway.upstream.connection import UpstreamClient

log = structlog.get_logger(__name__)

PENDING, ACKED, FAILED = 0, 1, 2


@dataclass(slots=True)
class _Slot:
    row: OutboxRow
    sent_at: float
    state: int = PENDING


@dataclass
class DrainCounters:
    """What the drain did, for :meth:`UpstreamLink.metrics`."""

    published: int = 0          # rows confirmed by the cloud broker (PUBACK), this process
    resent: int = 0             # rows published again because an earlier one was not confirmed
    sessions: int = 0           # drain sessions (one per connection that came up)
    gaps: int = 0               # sessions ended by a missing PUBACK or a publish timeout
    set_aside: int = 0          # rows set aside by this process
    in_flight: int = 0          # publishes awaiting PUBACK now
    forget_commits: int = 0     # transactions that deleted confirmed rows

    def as_dict(self) -> dict[str, int]:
        return {"published": self.published, "resent": self.resent, "resend_rounds": self.sessions,
                "puback_gaps": self.gaps, "set_aside": self.set_aside, "in_flight": self.in_flight,
                "forget_commits": self.forget_commits}


@dataclass
class _Session:
    inflight: deque[_Slot] = field(default_factory=deque)
    ahead: deque[OutboxRow] = field(default_factory=deque)  # read, not sent yet
    forget: list[int] = field(default_factory=list)  # confirmed prefix, not yet deleted
    cursor: int = 0  # the last seq read
    exhausted: bool = False  # the last read found nothing more
    max_acked: int = 0  # the highest seq acknowledged in this session
    failed: str | None = None
    error: BaseException | None = None  # a database error in a background step
    gap_since: float | None = None
    last_forget: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # any of the above moved
    pending: set[asyncio.Future[None]] = field(default_factory=set)  # publishes awaiting PUBACK
    # The database work runs beside the publishing (an fsync must not stall the window):
    fetching: asyncio.Task[None] | None = None
    forgetting: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.fetching is not None or self.forgetting is not None


class Drain:
    """Publishes the outbox through an :class:`UpstreamClient`, one session per connection."""

    def __init__(self, db: Database, client: UpstreamClient, outbox: Outbox, *, window: int = 1000,
                 publish_timeout: float = 30.0, poll_interval: float = 1.0, gap_grace: float = 2.0,
                 forget_batch: int = 500, forget_interval: float = 0.1, set_aside_after: int = 5,
                 suspect_s: float = 10.0, stop_flush_s: float = 2.0):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.db = db
        self.client = client
        self.outbox = outbox
        self.window = window
        self.publish_timeout = publish_timeout
        self.poll_interval = poll_interval
        self.gap_grace = gap_grace
        self.forget_batch = forget_batch
        self.forget_interval = forget_interval
        self.set_aside_after = set_aside_after
        self.suspect_s = suspect_s
        self.stop_flush_s = stop_flush_s
        self.wake = asyncio.Event()  # the pipeline queued a row since the last read
        self.counters = DrainCounters()
        self.stats: OutboxStats | None = None
        self._session: _Session | None = None
        self._id_prefix: str | None = None
        self._highest_sent = 0  # rows up to this seq were published before (a resend otherwise)
        self._strike_seq: int | None = None
        self._strikes = 0
        self._confirm_s = 0.2  # moving average of publish → PUBACK, for the stop's last sends

    def notify(self) -> None:
        """A row was queued (called on the loop, via ``call_soon_threadsafe``)."""
        self.wake.set()
        if self._session is not None:
            self._session.changed.set()

    # ------------------------------------------------------------------ the loop
    async def run(self, stopping: asyncio.Event) -> None:
        """Drain while connected, wait while not; on ``stopping``, finish as described above."""
        up = self.client.up
        while not stopping.is_set():
            if not up.is_set():
                self.stats = await self.db.run(self.outbox.stats)  # fresh metrics while offline
                await first_of(up.wait(), stopping.wait(), timeout=max(self.poll_interval, 1.0))
                continue
            try:
                await self.session(stopping)
            except Exception:
                # e.g. a disk error: keep the rows, say so, try again; never crash the daemon.
                log.exception("upstream drain failed; retrying")
                await first_of(stopping.wait(), timeout=1.0)

    async def session(self, stopping: asyncio.Event) -> None:
        """Publish in order until the connection drops, a PUBACK goes missing, or we stop."""
        if self._id_prefix is None:
            self._id_prefix = await self.db.run(self.outbox.id_prefix)
        self.counters.sessions += 1
        lost = self.client.lost
        s = self._session = _Session()
        watchers = [asyncio.create_task(_set_when(ev, s.changed)) for ev in (lost, stopping)]
        hard_deadline: float | None = None
        ended = "stopped"
        try:
            while True:
                s.changed.clear()
                now = time.monotonic()
                if s.error is not None:
                    raise s.error
                if lost.is_set():
                    ended = "lost"
                    break
                if stopping.is_set() and hard_deadline is None:
                    hard_deadline = now + self.stop_flush_s
                self._retire(s)
                s.failed = s.failed or self._overdue(s, now)
                if s.failed is not None:
                    ended = "broken"
                    break
                # Stopping: send only what can still be confirmed before the deadline.
                sending = hard_deadline is None or now + 2 * self._confirm_s + 0.05 < hard_deadline
                if (s.fetching is None and sending and len(s.ahead) < self.window
                        and (not s.exhausted or self.wake.is_set())):
                    s.fetching = self._background(s, self._fetch(s))
                if s.forget and s.forgetting is None and (
                        len(s.forget) >= self.forget_batch or not s.inflight
                        or now - s.last_forget >= self.forget_interval):
                    s.forgetting = self._background(s, self._forget(s))
                while sending and s.ahead and len(s.inflight) < self.window:
                    self._send(s, s.ahead.popleft())
                self.counters.in_flight = len(s.inflight)
                settled = not s.inflight and not s.forget and not s.busy
                idle = settled and not s.ahead and s.exhausted
                if hard_deadline is not None and ((settled and (idle or not sending)) or now >= hard_deadline):
                    break  # stopping: everything sent is confirmed (or the time is up)
                if s.changed.is_set():
                    continue
                try:
                    async with asyncio.timeout(self._timeout(s, now, idle, hard_deadline)):
                        await s.changed.wait()
                except TimeoutError:
                    if idle:
                        s.exhausted = False  # poll: rows may come from elsewhere
        finally:
            for w in watchers:
                w.cancel()
            self._session = None
            await self._end(s, ended)

    def _overdue(self, s: _Session, now: float) -> str | None:
        """Why the oldest unconfirmed row counts as lost, if it does."""
        if not s.inflight:
            return None
        head = s.inflight[0]
        if now - head.sent_at >= self.publish_timeout:
            return f"no PUBACK for row {head.row.seq} within {self.publish_timeout:g} s"
        if s.max_acked > head.row.seq:  # later rows acknowledged, the oldest not
            s.gap_since = s.gap_since or now
            if now - s.gap_since >= self.gap_grace:
                return f"no PUBACK for row {head.row.seq} while later rows were acknowledged"
        return None

    def _timeout(self, s: _Session, now: float, idle: bool, hard_deadline: float | None) -> float:
        """How long to sleep when nothing changes: until the next deadline that matters."""
        timeout = self.poll_interval if idle else self.publish_timeout
        if s.forget:
            timeout = min(timeout, max(0.0, s.last_forget + self.forget_interval - now))
        if s.inflight:
            timeout = min(timeout, max(0.0, s.inflight[0].sent_at + self.publish_timeout - now))
        if s.gap_since is not None:
            timeout = min(timeout, max(0.0, s.gap_since + self.gap_grace - now))
        if hard_deadline is not None:
            timeout = min(timeout, max(0.0, hard_deadline - now))
        return timeout

    # ------------------------------------------------------------------ steps
    def _send(self, s: _Session, row: OutboxRow) -> None:
        slot = _Slot(row, time.monotonic())
        s.inflight.append(slot)
        if row.seq <= self._highest_sent:
            self.counters.resent += 1
        self._highest_sent = max(self._highest_sent, row.seq)
        try:
            fut = self.client.publish_nowait(row.topic, wire_payload(row, self._id_prefix or ""),
                                             retain=row.retain)
        except NotConnected as exc:
            slot.state = FAILED
            s.failed = s.failed or str(exc)
            return
        s.pending.add(fut)
        fut.add_done_callback(lambda f: self._settled(s, slot, f))

    def _settled(self, s: _Session, slot: _Slot, fut: asyncio.Future[None]) -> None:
        s.pending.discard(fut)
        if fut.cancelled():
            slot.state = FAILED
        elif (exc := fut.exception()) is not None:
            slot.state = FAILED
            s.failed = s.failed or str(exc)
        else:
            slot.state = ACKED
            s.max_acked = max(s.max_acked, slot.row.seq)
            # how long a row takes from publish to PUBACK now (round trip plus queueing)
            self._confirm_s += 0.05 * (time.monotonic() - slot.sent_at - self._confirm_s)
        s.changed.set()

    def _retire(self, s: _Session) -> None:
        """Move the acknowledged prefix to the forget list."""
        progressed = False
        while s.inflight and s.inflight[0].state == ACKED:
            slot = s.inflight.popleft()
            s.forget.append(slot.row.seq)
            self.counters.published += 1
            progressed = True
        if progressed:
            s.gap_since = None
            self._strike_seq, self._strikes = None, 0
            self.client.progress()

    def _background(self, s: _Session, step: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(step)

        def done(t: asyncio.Task[None]) -> None:
            if t is s.fetching:
                s.fetching = None
            if t is s.forgetting:
                s.forgetting = None
            if not t.cancelled() and t.exception() is not None:
                s.error = s.error or t.exception()
            s.changed.set()

        task.add_done_callback(done)
        return task

    async def _fetch(self, s: _Session) -> None:
        """Read the next rows after the cursor (one read transaction)."""
        cursor, limit = s.cursor, self.window
        self.wake.clear()

        def work(conn: Any) -> tuple[list[OutboxRow], OutboxStats]:
            return self.outbox.fetch(conn, cursor, limit), self.outbox.stats(conn)

        rows, self.stats = await self.db.run(work)
        s.ahead.extend(rows)
        if rows:
            s.cursor = rows[-1].seq
        s.exhausted = len(rows) < limit

    async def _forget(self, s: _Session) -> None:
        """Delete the confirmed prefix gathered so far (one transaction for the batch)."""
        done, s.forget = s.forget, []

        def work(conn: Any) -> OutboxStats:
            self.outbox.delete_sent(conn, done)
            return self.outbox.stats(conn)

        try:
            self.stats = await self.db.run(work)
        except BaseException:
            s.forget[:0] = done  # not deleted: still owed to the next attempt
            raise
        self.counters.forget_commits += 1
        s.last_forget = time.monotonic()

    async def _end(self, s: _Session, ended: str) -> None:
        """Cancel what is still awaited, forget the confirmed prefix, judge the head row."""
        self._retire(s)
        for fut in list(s.pending):
            fut.cancel()  # a PUBACK after this no longer counts: the row stays and goes again
        head = s.inflight[0] if s.inflight else None
        self.counters.in_flight = 0
        for task in (s.fetching, s.forgetting):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)  # database work: let it finish
        if s.forget:
            await self._forget(s)
        if ended == "broken":
            self.counters.gaps += 1
        if ended in ("lost", "broken") and head is not None:
            suspect = ended == "broken" or time.monotonic() - head.sent_at <= self.suspect_s
            if suspect:
                await self._strike(head.row, ended, s.failed)
        if ended == "broken" and not self.client.lost.is_set():
            # A PUBACK did not come on a link that looks up: reconnect, so the resend from
            # the outbox cannot overtake a message still pending on the old connection.
            log.warning("upstream publish not confirmed; reconnecting", error=s.failed)
            await self.client.disconnect()

    async def _strike(self, row: OutboxRow, ended: str, error: str | None) -> None:
        if row.seq == self._strike_seq:
            self._strikes += 1
        else:
            self._strike_seq, self._strikes = row.seq, 1
        if self._strikes < self.set_aside_after:
            return
        reason = (f"{self._strikes} sessions in a row ended with this row unconfirmed "
                  f"({'no PUBACK' if ended == 'broken' else 'connection closed after it was sent'})")
        moved = await self.db.run(lambda conn: self.outbox.set_aside(conn, row.seq, reason))
        self._strike_seq, self._strikes = None, 0
        if moved is not None:
            self.counters.set_aside += 1
            log.warning("upstream message set aside: the cloud broker will not take it", seq=row.seq,
                        kind=row.kind, topic=row.topic, reason=reason, last_error=error)

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, Any]:
        return self.counters.as_dict()


async def _set_when(event: asyncio.Event, target: asyncio.Event) -> None:
    await event.wait()
    target.set()


async def first_of(*aws: Awaitable[Any], timeout: float | None = None) -> None:
    """Wait until the first of ``aws`` completes (or ``timeout``); cancel the rest."""
    owned = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(owned, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in owned:
            f.cancel()


__all__ = ["Drain", "DrainCounters", "first_of"]
