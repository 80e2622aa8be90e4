"""The alarm state machine and its timers. Pure: no I/O, no clock, no asyncio.

One alarm per (rule, key)::

    (no alarm) ──condition──▶ pending ──for_s elapsed──▶ firing ──ack──▶ acknowledged
         ▲                      │                          │ escalate[i] at     │
         │                      │ condition gone           │ fired_at+after_s   │
         │                      ▼                          ▼                    │
         └──────────────────  cleared ◀──── value at clear_at (hysteresis) ─────┘

Everything that changes an alarm goes through a :class:`Batch`: the service collects a
batch (acks, due timers, then messages in arrival order), the store commits the changed
rows and the jobs they submit in one transaction, and only then are the drafts merged into
the engine's rows (:meth:`Engine.merge`). A batch the store could not commit is dropped
(:meth:`Engine.discard`) and the rows stay as they were on disk, so the engine's memory
never runs ahead of SQLite — that is what makes a ``kill -9`` at any instant lose no firing
alarm and fire none twice.

Timers are deadlines in the rows (``due_at``, or ``last_seen + stale_s``), kept in a heap
only as hints; a popped hint is checked against the row, so a restart simply rebuilds the
heap from the stored deadlines.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.alarms.jobs import JobPlan
from gateway.alarms.rules import CompiledRule, format_value
from gateway.alarms.values import Payload, Unparseable, extract
from gateway.states import ACTIVE_ALARM_STATES, AlarmState
from gateway.timeutil import iso_ts

log = structlog.get_logger(__name__)

RowKey = tuple[str, str]
ACTIVE = ACTIVE_ALARM_STATES
MAX_LOGGED_BAD = 10_000
TOPIC_CACHE = 10_000


@dataclass
class AlarmRow:
    """One alarm, as stored in the ``alarms`` table. ``idle`` rows are stale watches
    (a key heard from, never alarmed); they are not published."""

    rule: str
    key: str
    state: AlarmState = AlarmState.IDLE
    topic: str | None = None
    value: Any = None  # the value when the state last changed
    last_value: Any = None  # the latest value seen (texts, stale alarms)
    since: float | None = None  # when the current state began
    fired_at: float | None = None
    acknowledged_by: str | None = None
    note: str | None = None
    escalation_step: int = 0  # escalation jobs sent in this episode
    episode: int = 0  # firings so far; acks name the episode they answer
    seq: int = 0  # jobs submitted so far (the n of the last job id)
    jobs: list[str] = field(default_factory=list)  # job ids of this episode
    due_at: float | None = None  # pending: when it fires; firing: next escalation
    last_seen: float | None = None  # stale rules: the last message (gateway uptime only)
    version: int = 0
    published_version: int = 0
    updated_at: float = 0.0

    @property
    def rk(self) -> RowKey:
        return (self.rule, self.key)

    def copy(self) -> "AlarmRow":
        return dataclasses.replace(self, jobs=list(self.jobs))

    def state_json(self) -> dict[str, Any]:
        """AlarmState (contract §11)."""
        return {"rule": self.rule, "key": self.key, "state": self.state, "value": self.value,
                "since": iso_ts(self.since), "fired_at": iso_ts(self.fired_at),
                "acknowledged_by": self.acknowledged_by, "escalation_step": self.escalation_step,
                "jobs": list(self.jobs)}


@dataclass
class RuleStats:
    evaluated: int = 0
    unparseable: int = 0


@dataclass
class Batch:
    now: float
    drafts: dict[RowKey, AlarmRow] = field(default_factory=dict)
    jobs: list[tuple[AlarmRow, JobPlan]] = field(default_factory=list)
    inbox_ids: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.drafts or self.jobs or self.inbox_ids)


class _Message:
    """One message as the rules see it; what several rules would compute alike (the value
    of the same field, the key from the same filter and template) is computed once."""

    __slots__ = ("topic", "payload", "retained", "_levels", "_values", "_keys")

    def __init__(self, topic: str, payload: Payload, retained: bool):
        self.topic, self.payload, self.retained = topic, payload, retained
        self._levels: list[str] | None = None
        self._values: dict[tuple[tuple[str, ...], bool], Any] = {}
        self._keys: dict[tuple[str, str], str] = {}

    def value(self, rule: CompiledRule) -> Any:
        sig = (rule.path, rule.numeric)
        found = self._values.get(sig, _MISSING)
        if found is _MISSING:
            try:
                found = extract(self.payload, rule.path, rule.numeric)
            except Unparseable as exc:
                found = exc
            self._values[sig] = found
        if isinstance(found, Unparseable):
            raise found
        return found

    def key(self, rule: CompiledRule) -> str:
        key = self._keys.get(rule.key_sig)
        if key is None:
            if self._levels is None:
                self._levels = self.topic.split("/")
            key = self._keys[rule.key_sig] = rule.key_for(self.topic, self._levels)
        return key


_MISSING: Any = object()


class Engine:
    def __init__(self, rules: list[CompiledRule]):
        self.rules: dict[str, CompiledRule] = {r.name: r for r in rules}
        self.rows: dict[RowKey, AlarmRow] = {}
        self.stats: dict[str, RuleStats] = {r.name: RuleStats() for r in rules}
        self.lazy_dirty: set[RowKey] = set()  # rows to write at the next flush (last_seen, published_version)
        self.unpublished: set[RowKey] = set()
        self.stats_dirty = False
        self._heap: list[tuple[float, RowKey]] = []
        self._scheduled: dict[RowKey, float] = {}
        self._escalating: dict[RowKey, float] = {}  # firing alarms' next escalation
        self._topic_rules: dict[str, tuple[CompiledRule, ...]] = {}
        self._logged_bad: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ start-up
    def load(self, rows: list[AlarmRow], stats: dict[str, tuple[int, int]], now: float,
             downtime: float) -> list[AlarmRow]:
        """Take the stored rows; return those of rules no longer configured.

        ``downtime`` (how long the gateway was not running) is added to every stale
        watch's ``last_seen``: silence while nobody listened is no evidence of a dead sensor.
        """
        removed = []
        for row in rows:
            rule = self.rules.get(row.rule)
            if rule is None:
                removed.append(row)
                continue
            if rule.kind == "stale" and row.last_seen is not None and downtime > 0:
                row.last_seen += downtime
                self.lazy_dirty.add(row.rk)
            self.rows[row.rk] = row
            if row.version > row.published_version and row.state != AlarmState.IDLE:
                self.unpublished.add(row.rk)
        for name, (evaluated, unparseable) in stats.items():
            if name in self.stats:
                self.stats[name] = RuleStats(evaluated, unparseable)
        # A stale rule on a fixed topic is watched from the first start, not from its first message.
        for rule in self.rules.values():
            if rule.kind == "stale" and rule.static_topic is not None:
                rk = (rule.name, rule.key_for(rule.static_topic))
                if rk not in self.rows:
                    self.rows[rk] = AlarmRow(rule.name, rk[1], topic=rule.static_topic, last_seen=now, updated_at=now)
                    self.lazy_dirty.add(rk)
        self.rebuild_timers()
        return removed

    def rebuild_timers(self) -> None:
        self._heap, self._scheduled, self._escalating = [], {}, {}
        for rk, row in self.rows.items():
            due = self.due(row)
            if due is not None:
                self._schedule(rk, due)
            self._track_escalation(row)

    def _track_escalation(self, row: AlarmRow) -> None:
        if row.state == AlarmState.FIRING and row.due_at is not None:
            self._escalating[row.rk] = row.due_at
        else:
            self._escalating.pop(row.rk, None)

    def escalation_due(self, now: float) -> bool:
        """An escalation is about to go out (the service first looks for a fresh ack)."""
        return any(t <= now for t in self._escalating.values())

    # ------------------------------------------------------------------ lookups
    def rules_for(self, topic: str) -> tuple[CompiledRule, ...]:
        found = self._topic_rules.get(topic)
        if found is None:
            from gateway.topics import matches

            found = tuple(r for r in self.rules.values() if matches(topic, r.topic_filter))
            if len(self._topic_rules) >= TOPIC_CACHE:
                self._topic_rules.clear()
            self._topic_rules[topic] = found
        return found

    def due(self, row: AlarmRow) -> float | None:
        rule = self.rules.get(row.rule)
        if rule is None:
            return None
        if row.state in (AlarmState.PENDING, AlarmState.FIRING):
            return row.due_at
        if rule.kind == "stale" and row.state in (AlarmState.IDLE, AlarmState.CLEARED) and row.last_seen is not None:
            return row.last_seen + rule.stale_s  # type: ignore[operator]
        return None

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def _schedule(self, rk: RowKey, due: float) -> None:
        current = self._scheduled.get(rk)
        if current is None or due < current:
            self._scheduled[rk] = due
            heapq.heappush(self._heap, (due, rk))

    # ------------------------------------------------------------------ batches
    def begin(self, now: float) -> Batch:
        return Batch(now)

    def _row(self, batch: Batch, rk: RowKey) -> AlarmRow | None:
        return batch.drafts.get(rk) or self.rows.get(rk)

    def _edit(self, batch: Batch, rk: RowKey) -> AlarmRow:
        draft = batch.drafts.get(rk)
        if draft is None:
            base = self.rows.get(rk)
            draft = base.copy() if base is not None else AlarmRow(*rk)
            batch.drafts[rk] = draft
        return draft

    @staticmethod
    def _changed(batch: Batch, row: AlarmRow, state: AlarmState) -> None:
        row.state = state
        row.since = batch.now
        row.updated_at = batch.now
        row.version += 1

    def merge(self, batch: Batch) -> list[AlarmRow]:
        """The batch is committed: its drafts become the rows."""
        for rk, draft in batch.drafts.items():
            self.rows[rk] = draft
            self.lazy_dirty.discard(rk)
            if draft.version > draft.published_version and draft.state != AlarmState.IDLE:
                self.unpublished.add(rk)
            due = self.due(draft)
            if due is not None:
                self._schedule(rk, due)
            self._track_escalation(draft)
        return list(batch.drafts.values())

    def discard(self, batch: Batch) -> None:
        """The batch could not be committed: forget it (timers popped for it come back)."""
        self.rebuild_timers()

    # ------------------------------------------------------------------ messages
    def on_message(self, batch: Batch, topic: str, payload: bytes, retained: bool = False) -> None:
        rules = self.rules_for(topic)
        if rules:
            msg = _Message(topic, Payload(payload), retained)
            for rule in rules:
                self._evaluate(batch, rule, msg)

    def _bad(self, rule: CompiledRule, topic: str, reason: str) -> None:
        self.stats[rule.name].unparseable += 1
        self.stats_dirty = True
        if (rule.name, topic) not in self._logged_bad and len(self._logged_bad) < MAX_LOGGED_BAD:
            self._logged_bad.add((rule.name, topic))
            log.warning("telemetry not evaluated (logged once per rule and topic)", rule=rule.name, topic=topic,
                        reason=reason)

    def _evaluate(self, batch: Batch, rule: CompiledRule, msg: "_Message") -> None:
        now, topic, retained = batch.now, msg.topic, msg.retained
        try:
            value = msg.value(rule)
        except Unparseable as exc:
            if rule.kind != "stale":
                self._bad(rule, topic, exc.reason)
                return
            value = None  # a stale rule listens for life, not for values
        self.stats[rule.name].evaluated += 1
        self.stats_dirty = True
        rk = (rule.name, msg.key(rule))
        row = self._row(batch, rk)

        if rule.kind == "stale":
            if row is None:
                row = AlarmRow(*rk, topic=topic, last_value=value, last_seen=now, updated_at=now)
                self.rows[rk] = row
                self.lazy_dirty.add(rk)
                self._schedule(rk, now + rule.stale_s)  # type: ignore[operator]
                return
            if retained:
                return  # a retained message is old news, not a sign of life
            if row.state in ACTIVE:
                d = self._edit(batch, rk)
                d.last_seen, d.last_value, d.topic = now, value, topic
                self._settle(batch, rule, d, value)
            else:
                row.last_seen, row.last_value, row.topic = now, value, topic
                self.lazy_dirty.add(rk)
            return

        state = row.state if row is not None else AlarmState.IDLE
        if state in (AlarmState.IDLE, AlarmState.CLEARED):
            if rule.active(value):
                d = self._edit(batch, rk)
                d.topic, d.value, d.last_value = topic, value, value
                self._changed(batch, d, AlarmState.PENDING)
                d.due_at = now + rule.for_s
                if rule.for_s <= 0:
                    self._fire(batch, rule, d)
        elif state == AlarmState.PENDING:
            if not rule.active(value):
                d = self._edit(batch, rk)
                d.topic, d.value, d.last_value = topic, value, value
                self._changed(batch, d, AlarmState.CLEARED)
                d.due_at = None
            elif row is not None:
                row.last_value, row.topic = value, topic  # texts show the latest; not worth a write
        else:  # firing | acknowledged
            if rule.clears(value):
                d = self._edit(batch, rk)
                d.topic, d.last_value = topic, value
                self._settle(batch, rule, d, value)
            elif row is not None:
                row.last_value, row.topic = value, topic

    def _settle(self, batch: Batch, rule: CompiledRule, d: AlarmRow, value: Any) -> None:
        """The condition is gone: a pending alarm just ends; a fired one sends ``Cleared``."""
        fired = d.state in (AlarmState.FIRING, AlarmState.ACKNOWLEDGED)
        d.value = value
        self._changed(batch, d, AlarmState.CLEARED)
        d.due_at = None
        if fired and d.jobs:
            ctx = self._context(rule, d)
            batch.jobs.append((d, JobPlan(
                kind="clear", episode=d.episode, target=None,
                title="Cleared: " + rule.title_t.render(ctx),
                body=f"{rule.name} on {d.key} is back to normal" + (f" ({ctx['value']})" if value is not None else ""),
                priority="normal", data=self._data(rule, d, AlarmState.CLEARED, value), episode_jobs=d.jobs)))

    # ------------------------------------------------------------------ timers
    def on_timers(self, batch: Batch) -> None:
        now = batch.now
        while self._heap and self._heap[0][0] <= now:
            due, rk = heapq.heappop(self._heap)
            if self._scheduled.get(rk) != due:
                continue  # superseded hint
            del self._scheduled[rk]
            row = self._row(batch, rk)
            rule = self.rules.get(rk[0])
            if row is None or rule is None:
                continue
            actual = self.due(row)
            if actual is None:
                continue
            if actual > now:
                self._schedule(rk, actual)
                continue
            d = self._edit(batch, rk)
            if d.state == AlarmState.PENDING:
                self._fire(batch, rule, d)
            elif d.state == AlarmState.FIRING:
                self._escalate(batch, rule, d)
            else:  # a stale watch ran out
                stale_at = d.last_seen + rule.stale_s  # type: ignore[operator]
                d.value = d.last_value
                self._changed(batch, d, AlarmState.PENDING)
                d.since = stale_at
                d.due_at = stale_at + rule.for_s
                if d.due_at <= now:
                    self._fire(batch, rule, d)

    def _fire(self, batch: Batch, rule: CompiledRule, d: AlarmRow) -> None:
        now = batch.now
        d.value = d.last_value
        self._changed(batch, d, AlarmState.FIRING)
        d.fired_at = now
        d.episode += 1
        d.jobs = []
        d.escalation_step = 0
        d.acknowledged_by = d.note = None
        d.due_at = now + rule.escalate[0].after_s if rule.escalate else None
        ctx = self._context(rule, d)
        batch.jobs.append((d, JobPlan(
            kind="fire", episode=d.episode, target=rule.target, title=rule.title_t.render(ctx),
            body=rule.body_t.render(ctx), priority=rule.priority, data=self._data(rule, d, "fired", d.value),
            episode_jobs=d.jobs)))
        if d.due_at is not None and d.due_at <= now:
            self._escalate(batch, rule, d)

    def _escalate(self, batch: Batch, rule: CompiledRule, d: AlarmRow) -> None:
        """Every step whose time has come (several at once after a long outage)."""
        now = batch.now
        while d.state == AlarmState.FIRING and d.due_at is not None and d.due_at <= now \
                and d.escalation_step < len(rule.escalate):
            step = rule.escalate[d.escalation_step]
            ctx = self._context(rule, d)
            batch.jobs.append((d, JobPlan(
                kind="escalate", episode=d.episode, target=step.target, title=rule.title_t.render(ctx),
                body=rule.body_t.render(ctx), priority=rule.priority,
                data=self._data(rule, d, "escalated", d.last_value), episode_jobs=d.jobs)))
            d.escalation_step += 1
            d.updated_at = now
            d.version += 1
            nxt = d.escalation_step
            # From the step just due, not from fired_at: a restart that re-anchors the clock
            # shifts due_at (gateway.clock) but leaves fired_at as it was written.
            d.due_at = (d.due_at + rule.escalate[nxt].after_s - step.after_s  # type: ignore[operator]
                        if nxt < len(rule.escalate) else None)

    # ------------------------------------------------------------------ acks
    def on_ack(self, batch: Batch, rule: str, key: str, episode: int | None, by: str,
               note: str | None = None) -> str:
        """``acknowledged``, ``already`` (no change), ``not_firing``, ``unknown`` or ``superseded``."""
        rk = (rule, key)
        row = self._row(batch, rk)
        if row is None or rule not in self.rules or row.state == AlarmState.IDLE:
            return "unknown"
        if episode is not None and episode != row.episode:
            return "superseded"  # an answer to an earlier firing
        if row.state == AlarmState.ACKNOWLEDGED:
            return "already"
        if row.state != AlarmState.FIRING:
            return "not_firing"
        d = self._edit(batch, rk)
        self._changed(batch, d, AlarmState.ACKNOWLEDGED)
        d.acknowledged_by = by
        d.note = note
        d.due_at = None
        return "acknowledged"

    # ------------------------------------------------------------------ removal
    def take_prunable(self, older_than: float) -> list[AlarmRow]:
        """Cleared alarms last changed before ``older_than`` leave the engine."""
        out = [r for r in self.rows.values() if r.state == AlarmState.CLEARED and r.updated_at < older_than
               and self.rules.get(r.rule) is not None and self.rules[r.rule].kind != "stale"]
        for r in out:
            del self.rows[r.rk]
            self._escalating.pop(r.rk, None)
            self.unpublished.discard(r.rk)
            self.lazy_dirty.discard(r.rk)
        return out

    # ------------------------------------------------------------------ texts
    @staticmethod
    def _context(rule: CompiledRule, d: AlarmRow) -> dict[str, str]:
        ctx = rule.context(d.topic or rule.topic_filter)
        ctx["key"] = d.key
        ctx["value"] = format_value(d.last_value) if d.last_value is not None else "none"
        return ctx

    @staticmethod
    def _data(rule: CompiledRule, d: AlarmRow, event: str, value: Any) -> dict[str, str]:
        return {"alarm_rule": rule.name, "alarm_key": d.key, "alarm_event": event,
                "value": format_value(value) if value is not None else ""}
