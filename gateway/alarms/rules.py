"""Compiled ``[[rules]]``: what the alarm engine evaluates per message.

The schema and its checks are :mod:`gateway.rule_schema` (the configuration validates them
without importing this package); a rule that passes is turned into a :class:`CompiledRule`
here, which the engine uses per message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.rule_schema import (
    EscalateStep,
    RuleSection,
    Template,
    check_rules,
    device_level,
    wildcard_levels,
)

# ---------------------------------------------------------------------- topics and keys
def key_level(key: str) -> str:
    """The key as one topic level of ``P/alarms/<rule>/<key>``: ``%`` and ``/`` are
    percent-encoded, so a key that is a whole topic (the default) stays one level."""
    return key.replace("%", "%25").replace("/", "%2F")


def key_from_level(level: str) -> str:
    return level.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


# ---------------------------------------------------------------------- compiled rules
def _canonical(v: Any) -> str:
    """Text form of a value for ``equals`` and templates: JSON spelling for booleans,
    integral numbers without a fraction, strings as they are."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e16 else repr(v)
    return "" if v is None else str(v)


def values_equal(value: Any, wanted: Any) -> bool:
    if (isinstance(value, (int, float)) and not isinstance(value, bool)
            and isinstance(wanted, (int, float)) and not isinstance(wanted, bool)):
        return value == wanted
    return _canonical(value) == _canonical(wanted)


def format_value(value: Any) -> str:
    return _canonical(value)


@dataclass(frozen=True)
class Step:
    after_s: float
    target: dict[str, Any]


@dataclass(frozen=True)
class CompiledRule:
    """A checked rule with ``{prefix}`` substituted, ready to evaluate messages."""

    name: str
    topic_filter: str
    kind: str  # above | below | equals | stale
    threshold: Any
    clear_at: float | None
    for_s: float
    stale_s: float | None
    path: tuple[str, ...]
    key_t: Template
    title_t: Template
    body_t: Template
    target: dict[str, Any]
    priority: str
    escalate: tuple[Step, ...]
    wildcards: tuple[tuple[int, bool], ...]  # (level index, is '#')
    device_level: int | None
    static_topic: str | None  # the filter itself when it has no wildcard
    key_sig: tuple[str, str]  # rules with the same filter and key template share the key of a message

    @property
    def numeric(self) -> bool:
        return self.kind in ("above", "below")

    # -- conditions ---------------------------------------------------------------
    def active(self, v: Any) -> bool:
        """The condition holds (the alarm goes pending, or stays firing)."""
        if self.kind == "above":
            return v > self.threshold
        if self.kind == "below":
            return v < self.threshold
        if self.kind == "equals":
            return values_equal(v, self.threshold)
        return False

    def clears(self, v: Any) -> bool:
        """A firing alarm clears: at or past ``clear_at`` (hysteresis), or no longer equal."""
        if self.kind == "above":
            return v <= self.clear_at  # type: ignore[operator]
        if self.kind == "below":
            return v >= self.clear_at  # type: ignore[operator]
        if self.kind == "equals":
            return not values_equal(v, self.threshold)
        return False

    # -- topics -------------------------------------------------------------------
    def context(self, topic: str, levels: list[str] | None = None) -> dict[str, str]:
        levels = levels if levels is not None else topic.split("/")
        ctx = {"topic": topic, "rule": self.name}
        for n, (i, multi) in enumerate(self.wildcards, 1):
            ctx[str(n)] = "/".join(levels[i:]) if multi else (levels[i] if i < len(levels) else "")
        if self.device_level is not None:
            ctx["device_id"] = levels[self.device_level] if self.device_level < len(levels) else ""
        return ctx

    def key_for(self, topic: str, levels: list[str] | None = None) -> str:
        """Per message and rule, so it reads only the fields the key uses."""
        if self.key_t.fields == {"topic"} and len(self.key_t.parts) == 1:
            return topic  # the default key
        levels = levels if levels is not None else topic.split("/")
        out = []
        for is_field, t in self.key_t.parts:
            if not is_field:
                out.append(t)
            elif t == "topic":
                out.append(topic)
            elif t == "device_id":
                i = self.device_level
                out.append(levels[i] if i is not None and i < len(levels) else "")
            else:
                i, multi = self.wildcards[int(t) - 1]
                out.append("/".join(levels[i:]) if multi else (levels[i] if i < len(levels) else ""))
        return "".join(out)


def compile_rule(rule: RuleSection, prefix: str) -> CompiledRule:
    topic_filter = rule.topic.replace("{prefix}", prefix)
    levels = topic_filter.split("/")
    kind = "stale" if rule.condition == "stale_s" else rule.condition
    assert kind is not None, "check_rules() runs first"
    threshold = {"above": rule.above, "below": rule.below, "equals": rule.equals, "stale": None}[kind]
    clear_at = rule.clear_at if rule.clear_at is not None else (threshold if kind in ("above", "below") else None)
    if rule.title is not None:
        title = rule.title
    else:
        title = "Alarm {rule}: {key}"
    if rule.body is not None:
        body = rule.body
    else:
        shown = {"above": f"{{value}} is above {_canonical(rule.above)}",
                 "below": f"{{value}} is below {_canonical(rule.below)}",
                 "equals": "{value} equals " + _canonical(rule.equals).replace("{", "{{").replace("}", "}}"),
                 "stale": f"no message on {{topic}} for {_canonical(rule.stale_s)} s"}
        body = shown[kind]
    wild = tuple((i, levels[i] == "#") for i in wildcard_levels(levels))
    return CompiledRule(
        name=rule.name, topic_filter=topic_filter, kind=kind, threshold=threshold, clear_at=clear_at,
        for_s=rule.for_s, stale_s=rule.stale_s, path=tuple(rule.value.split(".")) if rule.value else (),
        key_t=Template(rule.key), title_t=Template(title), body_t=Template(body), target=dict(rule.target),
        priority=rule.priority,
        escalate=tuple(sorted((Step(s.after_s, dict(s.target)) for s in rule.escalate), key=lambda s: s.after_s)),
        wildcards=wild, device_level=device_level(levels), static_topic=None if wild else topic_filter,
        key_sig=(topic_filter, rule.key),
    )


__all__ = ["CompiledRule", "EscalateStep", "RuleSection", "Template", "check_rules", "compile_rule",
           "format_value", "key_from_level", "key_level", "values_equal"]
