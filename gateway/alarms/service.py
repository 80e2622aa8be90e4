"""The alarm engine as a daemon service.

It subscribes to every rule's topic filter through the gateway's own MQTT client (so
embedded and external mode take the same path) and feeds one worker task, which
evaluates messages strictly in arrival order. The worker batches: acks from the inbox,
then due timers, then the queued messages; the changed alarms and the jobs they submit
are committed in one transaction (:func:`gateway.alarms.store.commit`), and only then is
each message's handler released, so its PUBACK follows the commit. Telemetry that changes
no alarm costs no write at all.

AlarmState is published (retained) by a separate task from the committed rows; what is
still owed is ``version > published_version``, kept in SQLite, so a state a crash kept
from going out is published after the restart. Stale watches' ``last_seen``, counters and
published versions are written lazily (every ``flush_s``): losing a few seconds of them to
a ``kill -9`` shifts a stale deadline by at most that much and never loses or repeats an
alarm.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import aiomqtt
import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from gateway import clock
from gateway.alarms import store
from gateway.alarms.engine import AlarmRow, Engine
from gateway.alarms.rules import compile_rule, key_from_level, key_level
from gateway.config import Config
from gateway.mqtt import GatewayClient, NotConnected
from gateway.pipeline.models import MAX_ACK_BYTES, InputError, decode_json_object
from gateway.states import ACTIVE_ALARM_STATES, ALARM_STATES, AlarmState
from gateway.storage import Database, NotStored
from gateway.topics import Topics

log = structlog.get_logger(__name__)

MAX_BATCH = 2000
PRUNE_EVERY_S = 3600.0
DEFAULT_RETENTION_DAYS = 30
ALARM_TOPIC_CHANNEL = "alarm-topic"  # acknowledged_by of an ack on P/alarms/<rule>/<key>/ack


class AlarmAckIn(BaseModel):
    """``P/alarms/<rule>/<key>/ack`` (contract §5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    by: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    note: Annotated[StrictStr, Field(max_length=1024)] | None = None


def parse_alarm_ack(payload: bytes) -> AlarmAckIn:
    obj = decode_json_object(payload, MAX_ACK_BYTES, "alarm ack")
    try:
        return AlarmAckIn.model_validate(obj)
    except ValidationError as exc:
        raise InputError.from_validation("invalid_alarm_ack", exc) from None


def retention_days(cfg: Config) -> float:
    """``[storage] retention_days`` (contract §4) once the config has that section."""
    section = getattr(cfg, "storage", None)
    return float(getattr(section, "retention_days", DEFAULT_RETENTION_DAYS))


@dataclass(slots=True)
class _Item:
    kind: str  # msg | ack
    topic: str
    payload: bytes
    retained: bool
    fut: asyncio.Future[Any]
    rule: str = ""
    key: str = ""
    by: str = ""
    note: str | None = None
    source: str = "mqtt"


@dataclass
class _Pending:
    removed: dict[tuple[str, str], str] = field(default_factory=dict)  # rows whose retained state must be cleared
    deletable: list[tuple[str, str]] = field(default_factory=list)  # cleared on the broker; delete at the next flush


class JobSink(Protocol):
    """The pipeline as the alarms see it: they write their jobs straight into SQLite (in the
    transaction that stores the alarm's state) once it is ready, then wake it."""

    @property
    def ready(self) -> asyncio.Event: ...

    def wake_for_new_jobs(self) -> None: ...


class AlarmService:
    name = "alarms"
    started: asyncio.Event | None = None

    def __init__(self, cfg: Config, db: Database, pipeline: JobSink | None = None, *,
                 inbox_poll_s: float = 0.25, flush_s: float = 5.0):
        self.cfg = cfg
        self.db = db
        self.pipeline = pipeline
        self.topics = Topics(cfg.prefix)
        self.rules = [compile_rule(r, cfg.prefix) for r in cfg.rules]
        self.engine = Engine(self.rules)
        self.inbox_poll_s = inbox_poll_s
        self.flush_s = flush_s
        self.client: GatewayClient | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._publish_wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._worker_done = False
        self._pending = _Pending()
        self._has_stale = any(r.kind == "stale" for r in self.rules)
        self._store_failing = False
        self.jobs_submitted = 0

    # ------------------------------------------------------------------ set-up
    def attach(self, client: GatewayClient) -> None:
        self.client = client
        if not self.rules:
            return
        # The ack route first: the client hands a message to the first route that matches.
        client.route(f"{self.topics.prefix}/alarms/+/+/ack", self._on_ack_message, qos=1)
        for topic_filter in dict.fromkeys(r.topic_filter for r in self.rules):
            # One route per distinct filter; each evaluates every rule matching the topic.
            client.route(topic_filter, self._on_telemetry, qos=1)

    def state_topic(self, rule: str, key: str) -> str:
        return f"{self.topics.prefix}/alarms/{rule}/{key_level(key)}"

    # ------------------------------------------------------------------ MQTT handlers
    async def _on_telemetry(self, message: aiomqtt.Message) -> None:
        fut = asyncio.get_running_loop().create_future()
        await self._submit(_Item("msg", message.topic.value, message.payload, bool(message.retain), fut))

    async def _on_ack_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        levels = topic.split("/")
        rule, key = levels[-3], key_from_level(levels[-2])
        try:
            ack = parse_alarm_ack(message.payload)
        except InputError as err:
            await self._error(topic, err.code, err.message)
            return
        fut = asyncio.get_running_loop().create_future()
        # The gateway cannot see the account behind a message: ``by`` is the publisher's word,
        # recorded with the channel it came by.
        result = await self._submit(_Item("ack", topic, b"", False, fut, rule=rule, key=key,
                                          by=f"{ALARM_TOPIC_CHANNEL}:{ack.by}", note=ack.note))
        if result == "unknown":
            await self._error(topic, "unknown_alarm", f"topic: no alarm {key!r} of rule {rule!r}")
        elif result == "not_firing":
            await self._error(topic, "alarm_not_firing", f"topic: alarm {key!r} of rule {rule!r} is not firing")

    async def acknowledge(self, rule: str, key: str, by: str, note: str | None, source: str) -> str:
        """Acknowledge a firing alarm in this process (the operator page); resolves once the
        engine applied it and the new state is committed.

        The outcome is ``acknowledged``, ``already``, ``unknown`` (no such alarm) or
        ``not_firing``; raises :class:`NotStored` when the state could not be committed.
        """
        fut = asyncio.get_running_loop().create_future()
        return await self._submit(_Item("ack", self.state_topic(rule, key) + "/ack", b"", False, fut,
                                        rule=rule, key=key, by=by, note=note, source=source))

    async def _error(self, topic: str, code: str, message: str) -> None:
        log.info("alarm ack refused", topic=topic, code=code, error=message)
        payload = json.dumps({"topic": topic, "error": {"code": code, "message": message}}).encode()
        try:
            assert self.client is not None
            await self.client.publish(self.topics.gateway_errors, payload, qos=1)
        except NotConnected:
            pass

    async def _submit(self, item: _Item) -> Any:
        if self._worker_done:
            # After the worker stopped (shutdown), late messages are still evaluated and
            # committed before their PUBACK, one at a time.
            async with self._lock:
                await self._process([item], poll_inbox=False)
        else:
            self._queue.put_nowait(item)
            self._wake.set()
        return await item.fut

    # ------------------------------------------------------------------ run
    async def run(self, stopping: asyncio.Event) -> None:
        if not await self._start(stopping):
            return
        worker = asyncio.create_task(self._worker(stopping), name="alarms-worker")
        publisher = asyncio.create_task(self._publisher(stopping), name="alarms-publisher")

        async def relay_stop() -> None:
            await stopping.wait()
            self._wake.set()
            self._publish_wake.set()

        relay = asyncio.create_task(relay_stop())
        try:
            await worker
        finally:
            relay.cancel()
            self._worker_done = True
            try:
                await asyncio.wait_for(self._publish_pending(), 2)
            except (TimeoutError, Exception) as exc:  # owed states stay owed; published after restart
                log.warning("final alarm state publish incomplete", error=repr(exc))
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            async with self._lock:
                await self._flush(clock.now())

    async def _start(self, stopping: asyncio.Event) -> bool:
        if self.pipeline is not None:
            ready = asyncio.ensure_future(self.pipeline.ready.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stop.cancel()
            if not self.pipeline.ready.is_set():
                self._worker_done = True
                queued = []
                while not self._queue.empty():
                    queued.append(self._queue.get_nowait())
                self._fail(queued, RuntimeError("stopped before the alarm engine started"))
                return False
        # The alarm tables exist: the schema registry ran when the database was opened.
        rows, stats, alive_at = await self.db.run(store.load)
        now = clock.now()
        downtime = max(0.0, now - alive_at) if alive_at is not None else 0.0
        for row in self.engine.load(rows, stats, now, downtime):
            if row.state == AlarmState.IDLE:
                self._pending.deletable.append(row.rk)
            else:
                self._pending.removed[row.rk] = self.state_topic(*row.rk)
        if self._pending.removed or self._pending.deletable:
            log.warning("alarms of rules no longer configured are dropped",
                        rules=sorted({rk[0] for rk in [*self._pending.removed, *self._pending.deletable]}))
        active = sum(1 for r in self.engine.rows.values() if r.state in ACTIVE_ALARM_STATES)
        log.info("alarms running", rules=[r.name for r in self.rules], active=active,
                 downtime_s=round(downtime, 1) if self._has_stale else None)
        self._publish_wake.set()
        return True

    # ------------------------------------------------------------------ the worker
    async def _worker(self, stopping: asyncio.Event) -> None:
        now = clock.now()
        next_poll = now if self.rules else float("inf")
        next_flush = now + self.flush_s
        next_prune = now + 60.0
        while True:
            now = clock.now()
            due = self.engine.next_due()
            wake_at = min(next_poll, next_flush, next_prune, due if due is not None else float("inf"))
            if self._queue.empty() and not stopping.is_set() and wake_at > now:
                try:
                    async with asyncio.timeout(min(wake_at - now, 3600)):
                        await self._wake.wait()  # set by handlers, and once by stopping
                except TimeoutError:
                    pass
            self._wake.clear()
            items: list[_Item] = []
            while len(items) < MAX_BATCH and not self._queue.empty():
                items.append(self._queue.get_nowait())
            now = clock.now()
            due = self.engine.next_due()
            timers_due = due is not None and due <= now
            # An escalation about to go out first looks for an ack that just landed.
            poll = now >= next_poll or self.engine.escalation_due(now)
            if poll:
                next_poll = now + self.inbox_poll_s if self.rules else float("inf")
            if items or poll or timers_due:
                async with self._lock:
                    try:
                        await self._process(items, poll_inbox=poll)
                    except Exception as exc:
                        # A bug, not bad input: keep the daemon and the other alarms running,
                        # acknowledge nothing of this batch, and do not spin on it.
                        log.exception("alarm batch failed")
                        self._fail(items, exc)
                        self.engine.rebuild_timers()
                        await asyncio.sleep(1.0)
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_S
                self._prune(now)
            if now >= next_flush:
                next_flush = now + self.flush_s
                async with self._lock:
                    await self._flush(now)
            if stopping.is_set() and self._queue.empty():
                self._worker_done = True
                return

    async def _process(self, items: list[_Item], poll_inbox: bool) -> None:
        engine = self.engine
        try:
            inbox = await self.db.run(store.read_inbox) if poll_inbox else []
        except Exception as exc:
            inbox = []
            self._store_failed(exc)
        batch = engine.begin(clock.now())
        for r in inbox:
            outcome = engine.on_ack(batch, r["rule"], r["akey"], r["episode"], r["by"], r["note"])
            batch.inbox_ids.append(r["id"])
            log.info("alarm ack applied" if outcome == "acknowledged" else "alarm ack ignored", rule=r["rule"],
                     key=r["akey"], by=r["by"], source=r["source"], outcome=outcome)
        engine.on_timers(batch)
        results: list[Any] = []
        for item in items:
            try:
                if item.kind == "msg":
                    engine.on_message(batch, item.topic, item.payload, item.retained)
                    results.append(None)
                else:
                    outcome = engine.on_ack(batch, item.rule, item.key, None, item.by, item.note)
                    if outcome in ("acknowledged", "already"):
                        log.info("alarm ack applied", rule=item.rule, key=item.key, by=item.by, source=item.source,
                                 outcome=outcome)
                    results.append(outcome)
            except Exception:
                # A bug must not stop every other alarm; the message is acknowledged and logged.
                log.exception("alarm evaluation failed", topic=item.topic)
                results.append(None)
        if not batch.empty:
            before = {rk: (engine.rows[rk].state if rk in engine.rows else None) for rk in batch.drafts}
            try:
                submitted = await self.db.run(lambda conn: store.commit(conn, batch))
            except Exception as exc:
                engine.discard(batch)
                self._store_failed(exc)
                self._fail(items, exc)
                return
            if self._store_failing:
                self._store_failing = False
                log.warning("alarm state is being stored again")
            engine.merge(batch)
            self.jobs_submitted += len(submitted)
            for rk, draft in batch.drafts.items():
                if before.get(rk) != draft.state and draft.state != AlarmState.IDLE:
                    log.info(f"alarm {draft.state}", rule=rk[0], key=rk[1], value=draft.value,
                             escalation_step=draft.escalation_step, jobs=draft.jobs)
                elif before.get(rk) == draft.state == AlarmState.FIRING:
                    log.info("alarm escalated", rule=rk[0], key=rk[1], escalation_step=draft.escalation_step,
                             jobs=draft.jobs)
            if submitted:
                self._wake_pipeline()
            self._publish_wake.set()
        for item, result in zip(items, results):
            if not item.fut.done():
                item.fut.set_result(result)

    @staticmethod
    def _fail(items: list[_Item], exc: Exception) -> None:
        """Their handlers raise NotStored: the shared "not committed, do not acknowledge"
        signal (gateway.storage) that the MQTT client turns into a withheld PUBACK."""
        err = NotStored(f"alarm state not stored: {exc}")
        for item in items:
            if not item.fut.done():
                item.fut.set_exception(err)

    def _store_failed(self, exc: Exception) -> None:
        if not self._store_failing:
            self._store_failing = True
            log.error("alarm state cannot be stored; messages are not acknowledged until it can", error=repr(exc))

    def _wake_pipeline(self) -> None:
        """Our jobs went straight into SQLite; tell the pipeline instead of waiting for its poll."""
        if self.pipeline is not None:
            self.pipeline.wake_for_new_jobs()

    def _prune(self, now: float) -> None:
        older = now - retention_days(self.cfg) * 86400
        for row in self.engine.take_prunable(older):
            self._pending.removed[row.rk] = self.state_topic(*row.rk)
        if self._pending.removed:
            self._publish_wake.set()

    async def _flush(self, now: float) -> None:
        engine = self.engine
        keys = set(engine.lazy_dirty)
        engine.lazy_dirty -= keys
        rows = [engine.rows[k].copy() for k in keys if k in engine.rows]
        stats_dirty = engine.stats_dirty
        stats = {name: (s.evaluated, s.unparseable) for name, s in engine.stats.items()} if stats_dirty else {}
        alive = now if self._has_stale else None
        delete = list(self._pending.deletable)
        if not (rows or stats or alive or delete):
            return
        engine.stats_dirty = False
        try:
            await self.db.run(lambda conn: store.flush(conn, rows, stats, alive, delete))
        except Exception as exc:
            engine.lazy_dirty |= keys
            engine.stats_dirty = engine.stats_dirty or stats_dirty
            self._store_failed(exc)
            return
        self._pending.deletable = [d for d in self._pending.deletable if d not in set(delete)]

    # ------------------------------------------------------------------ AlarmState out
    async def _publisher(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                async with asyncio.timeout(1.0):
                    await self._publish_wake.wait()
            except TimeoutError:
                pass
            self._publish_wake.clear()
            await self._publish_pending()

    async def _publish_pending(self) -> bool:
        """Publish every owed AlarmState (retained); False if the broker is away."""
        assert self.client is not None
        engine = self.engine
        for rk in list(engine.unpublished):
            row = engine.rows.get(rk)
            if row is None:
                engine.unpublished.discard(rk)
                continue
            version = row.version
            payload = json.dumps(row.state_json()).encode()
            try:
                await self.client.publish(self.state_topic(*rk), payload, qos=1, retain=True)
            except NotConnected:
                return False
            row = engine.rows.get(rk)
            if row is not None and row.published_version < version <= row.version:
                row.published_version = version
                engine.lazy_dirty.add(rk)
            if row is None or row.version == version:
                engine.unpublished.discard(rk)
        for rk, topic in list(self._pending.removed.items()):
            try:
                await self.client.publish(topic, b"", qos=1, retain=True)
            except NotConnected:
                return False
            del self._pending.removed[rk]
            self._pending.deletable.append(rk)
        return True

    # ------------------------------------------------------------------ introspection
    def metrics(self) -> dict[str, Any]:
        by_state = {s.value: 0 for s in ALARM_STATES}
        for row in self.engine.rows.values():
            if row.state in by_state:
                by_state[row.state] += 1
        return {"rules": len(self.rules), **by_state,
                "evaluated": sum(s.evaluated for s in self.engine.stats.values()),
                "unparseable": sum(s.unparseable for s in self.engine.stats.values()),
                "jobs_submitted": self.jobs_submitted}

    def alarm(self, rule: str, key: str) -> AlarmRow | None:
        return self.engine.rows.get((rule, key))


__all__ = ["AlarmService", "parse_alarm_ack"]
