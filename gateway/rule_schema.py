"""``[[rules]]``: what an alarm rule may say (contract §4, §11), checked at load time.

The schema lives here, apart from the alarms package, so the configuration can validate
``[[rules]]`` without importing the alarm engine; :mod:`gateway.alarms.rules` compiles what
passes. The pydantic model only checks types (so a wrong type is reported by the config
loader like any other key); :func:`check_rules` checks what a rule *means* — one condition,
a hysteresis on the right side of the threshold, a well-formed topic filter, templates that
only use placeholders the filter can fill, job-shaped targets — and reports each problem
under the rule's name, e.g. ``rules[freezer-high].clear_at: ...``.

It must import neither the config nor the alarms package nor, at module level, the pipeline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

RULE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PRIORITY = Literal["low", "normal", "high", "critical"]

Number = Annotated[float, Field(strict=True)]
Seconds = Annotated[float, Field(strict=True, ge=0)]
PositiveSeconds = Annotated[float, Field(strict=True, gt=0)]


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EscalateStep(_RuleModel):
    after_s: PositiveSeconds = Field(
        description="Seconds after firing at which this step's job goes out, while the alarm fires unacknowledged.")
    target: dict[str, Any] = Field(
        description="A Job target: `{devices = [...]}`, `{segment = \"...\"}`, `{all = true}` or "
                    "`{people = [...]}` (each person reached through their devices in order; an `opened` ack "
                    "by one of them acknowledges the alarm).")


class RuleSection(_RuleModel):
    """One ``[[rules]]`` table; each field's description is its documentation (docs/configuration.md is generated from it)."""

    name: str = Field(description="`[A-Za-z0-9_-]{1,64}`, unique; a topic level and part of job ids.")
    topic: str = Field(
        description="MQTT topic filter; `{prefix}` is replaced by P. The gateway subscribes to it (QoS 1).")
    value: str = Field(default="",
        description="Dotted JSON field (`celsius`, `sensor.temp`; a digit segment indexes an array); empty = the payload itself.")
    above: Number | None = Field(default=None,
        description="Alarm when the value is strictly above this. Exactly one of above, below, equals, stale_s.")
    below: Number | None = Field(default=None, description="Alarm when the value is strictly below this.")
    equals: Any = Field(default=None,
        description="Alarm when the value equals this string, number or boolean.")
    stale_s: PositiveSeconds | None = Field(default=None,
        description="Alarm when no message arrives on the key's topic for this many seconds.")
    for_s: Seconds = Field(default=0.0,
        description="The condition must hold this long before the alarm fires.")
    clear_at: Number | None = Field(default=None,
        description="Hysteresis: `above` clears at or below it, `below` at or above it; default the threshold.")
    key: str = Field(default="{topic}",
        description="One alarm per rendered key: `{device_id}`, `{1}`, `{2}`… (the filter's wildcards), `{topic}`.")
    target: dict[str, Any] = Field(
        description="A Job target: `{devices = [...]}`, `{segment = \"...\"}`, `{all = true}` or "
                    "`{people = [...]}` (each person reached through their devices in order; an `opened` ack "
                    "by one of them acknowledges the alarm).")
    title: str | None = Field(default=None,
        description="Template of the job's title (placeholders of the key plus `{value}`, `{rule}`, `{key}`); default `Alarm {rule}: {key}`.")
    body: str | None = Field(default=None,
        description="Template of the job's body; default per condition, e.g. `{value} is above -15`.")
    priority: PRIORITY = Field(default="high",
        description="`low`, `normal`, `high` or `critical` (firing and escalation jobs; clearing jobs are `normal`).")
    escalate: list[EscalateStep] = Field(default_factory=list,
        description="Steps `{after_s = N, target = {...}}` (keys below).")

    @property
    def condition(self) -> str | None:
        given = [c for c in ("above", "below", "equals", "stale_s") if getattr(self, c) is not None]
        return given[0] if len(given) == 1 else None


# ---------------------------------------------------------------------- templates
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class Template:
    """``{name}`` placeholders, ``{{``/``}}`` for literal braces; nothing else is evaluated
    (no attribute access or format specs: a telemetry value never reaches ``str.format``)."""

    __slots__ = ("parts", "fields")

    def __init__(self, text: str):
        self.parts: list[tuple[bool, str]] = []  # (is_field, text)
        pos = 0
        for m in _TOKEN.finditer(text):
            if m.start() > pos:
                self.parts.append((False, text[pos:m.start()]))
            tok = m.group(0)
            if tok in ("{{", "}}"):
                self.parts.append((False, tok[0]))
            elif tok in ("{", "}"):
                raise ValueError(f"unmatched {tok!r} at position {m.start()} (write {tok * 2} for a literal brace)")
            else:
                self.parts.append((True, m.group(1)))
            pos = m.end()
        if pos < len(text):
            self.parts.append((False, text[pos:]))
        self.fields = {t for is_field, t in self.parts if is_field}

    def render(self, ctx: Mapping[str, str]) -> str:
        return "".join(ctx.get(t, "") if is_field else t for is_field, t in self.parts)


def _filter_problem(topic_filter: str) -> str | None:
    if not topic_filter:
        return "must not be empty"
    if "\0" in topic_filter:
        return "must not contain NUL"
    if len(topic_filter.encode()) > 65535:
        return "too long"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
        if "{" in level or "}" in level:
            return "only {prefix} may be substituted in a topic filter"
    return None


def device_level(levels: list[str]) -> int | None:
    """Index of the level after the first ``devices`` level (the ``{device_id}`` segment)."""
    for i, level in enumerate(levels[:-1]):
        if level == "devices" and levels[i + 1] != "#":
            return i + 1
    return None


def wildcard_levels(levels: list[str]) -> list[int]:
    return [i for i, level in enumerate(levels) if level in ("+", "#")]


# ---------------------------------------------------------------------- semantic checks
def _target_problems(target: Any, key: str) -> list[tuple[str, str]]:
    """Validate as a Job target (contract §6) with the pipeline's own model."""
    from gateway.pipeline.models import Target  # lazy: the pipeline imports the config

    try:
        Target.model_validate(target)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = ""
            for p in err["loc"]:
                if isinstance(p, int):
                    loc += f"[{p}]"
                elif not p.startswith(("function-", "model-")):
                    loc += f".{p}" if loc else p
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            out.append((f"{key}.{loc}" if loc else key, msg))
        return out
    return []


def _template_problems(text: str, allowed: set[str], key: str, why: Mapping[str, str]) -> list[tuple[str, str]]:
    try:
        tpl = Template(text)
    except ValueError as exc:
        return [(key, str(exc))]
    out = []
    for name in sorted(tpl.fields - allowed):
        out.append((key, why.get(name) or f"unknown placeholder {{{name}}} (allowed: "
                    + ", ".join("{" + a + "}" for a in sorted(allowed, key=lambda a: (a.isdigit(), a))) + ")"))
    return out


def check_rule(rule: RuleSection) -> list[tuple[str, str]]:
    """Problems as ``(field, message)``; the caller prefixes ``rules[<name>].``."""
    problems: list[tuple[str, str]] = []
    if not RULE_NAME_RE.fullmatch(rule.name):
        problems.append(("name", "must match [A-Za-z0-9_-]{1,64} (it is a topic level and part of job ids)"))
    condition = rule.condition
    if condition is None:
        given = [c for c in ("above", "below", "equals", "stale_s") if getattr(rule, c) is not None]
        if given:
            problems.append((given[1], f"give exactly one condition; {given[0]} is already set"))
        else:
            problems.append(("above", "give exactly one condition: above, below, equals or stale_s"))
    if rule.equals is not None and (not isinstance(rule.equals, (str, int, float, bool))
                                    or (isinstance(rule.equals, float) and not math.isfinite(rule.equals))):
        problems.append(("equals", "must be a string, a number or a boolean"))
    if rule.clear_at is not None:
        if condition == "above" and rule.above is not None and rule.clear_at > rule.above:
            problems.append(("clear_at", f"must be at or below above ({rule.above:g}): the alarm clears when the value "
                                         "falls to clear_at"))
        elif condition == "below" and rule.below is not None and rule.clear_at < rule.below:
            problems.append(("clear_at", f"must be at or above below ({rule.below:g}): the alarm clears when the value "
                                         "rises to clear_at"))
        elif condition in ("equals", "stale_s"):
            article = "an" if condition == "equals" else "a"
            problems.append(("clear_at", f"only applies to above or below ({article} {condition} alarm clears when "
                                         "its condition no longer holds)"))
    for name in ("above", "below", "clear_at"):
        v = getattr(rule, name)
        if v is not None and not math.isfinite(v):
            problems.append((name, "must be a finite number"))

    topic_filter = rule.topic.replace("{prefix}", "p/p")
    levels = topic_filter.split("/")
    if (why := _filter_problem(topic_filter)) is not None:
        problems.append(("topic", why))
        levels = []
    if rule.value and any(part == "" for part in rule.value.split(".")):
        problems.append(("value", "a dotted JSON field such as \"celsius\" or \"sensor.temp\"; \"\" = the payload itself"))

    n_wild = len(wildcard_levels(levels))
    has_device = device_level(levels) is not None
    topic_fields = {"topic", *(str(i) for i in range(1, n_wild + 1))} | ({"device_id"} if has_device else set())
    why = {"device_id": "{device_id} needs a topic filter with a devices/<id> level",
           **{str(i): f"{{{i}}}: the topic filter has only {n_wild} wildcard(s)" for i in range(n_wild + 1, 10)},
           "value": "{value} is not allowed in the key (one alarm per device or topic, not per value)"}
    problems += _template_problems(rule.key, topic_fields, "key", why)
    if not any(k == "key" for k, _ in problems):
        literal = "".join(t for is_field, t in Template(rule.key).parts if not is_field)
        if any(c in literal for c in "+#\0"):
            problems.append(("key", "must not contain '+', '#' or NUL (the key is a topic level)"))
    text_fields = topic_fields | {"value", "rule", "key"}
    for name in ("title", "body"):
        text = getattr(rule, name)
        if text is not None:
            problems += _template_problems(text, text_fields, name, why)

    problems += _target_problems(rule.target, "target")
    for i, step in enumerate(rule.escalate):
        problems += _target_problems(step.target, f"escalate[{i}].target")
    return problems


def check_rules(rules: list[RuleSection]) -> list[tuple[str, str]]:
    """Every rule's problems as ``(key, message)`` with keys like ``rules[freezer-high].above``."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        label = f"rules[{rule.name or i}]"
        if rule.name in seen:
            problems.append((f"{label}.name", "duplicate rule name"))
        seen.add(rule.name)
        problems += [(f"{label}.{field}", msg) for field, msg in check_rule(rule)]
    return problems
