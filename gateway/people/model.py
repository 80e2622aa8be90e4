"""The Person object of contract §12: who a notification is for, and how to reach them.

A person names their devices in reach order (the first device is tried first, the next one
after ``reach_after_s`` without an ack), a time zone their quiet hours are read in, the
priority from which a notification goes through quiet hours, and what they muted. Unknown
fields are errors that name the field, like every other input of the gateway.

``quiet_hours`` and ``reach_after_s`` may be left out (``None``): the person then follows
``[people] quiet_hours_default`` and ``[people] reach_after_s`` as the config says at the
time (:meth:`Person.effective`), so changing the default changes it for everyone who has
none of their own.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictStr, ValidationError, field_serializer, field_validator

from gateway.ids import DEVICE_ID_RE, NOT_DOTS, is_id, not_dot_segment

PERSON_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")  # gateway.broker.passwords.NAME_RE
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
PRIORITIES = ("low", "normal", "high", "critical")  # a job's notification.priority, lowest first
Priority = Literal["low", "normal", "high", "critical"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
MAX_DEVICES = 32
MAX_WINDOWS = 14
MAX_REACH_AFTER_S = 86400.0
DEFAULT_TIMEZONE = "UTC"
DEFAULT_BYPASS = "critical"
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def minutes_of(hhmm: str) -> int:
    """``"22:30"`` → 1350 (minutes after midnight); the string was validated before."""
    return int(hhmm[:2]) * 60 + int(hhmm[3:])


def _hhmm(value: str) -> str:
    if not _HHMM.fullmatch(value):
        raise ValueError("must be a time of day HH:MM, 00:00 to 23:59")
    return value


HhMm = Annotated[StrictStr, AfterValidator(_hhmm)]


class QuietWindow(_Strict):
    """On each of ``days``, from ``from`` to ``to`` in the person's time zone. A window whose
    ``to`` is not after its ``from`` ends on the next day (``22:00``-``06:00``: the night
    that starts on each of the days)."""

    days: Annotated[list[Day], Field(min_length=1, max_length=7,
                                     description="Days the window starts on: `mon` .. `sun`.")]
    from_: HhMm = Field(alias="from", description="Start, `HH:MM` (24 h) in the person's time zone.")
    to: HhMm = Field(description="End, `HH:MM`; not after `from`: the next day (equal to `from`: a whole day).")

    @field_validator("days")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        twice = sorted({d for d in v if v.count(d) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice")
        return sorted(v, key=DAYS.index)

    def as_json(self) -> dict[str, Any]:
        return {"days": list(self.days), "from": self.from_, "to": self.to}


def _account(value: str) -> str:
    if not is_id(ACCOUNT_RE, value):
        raise ValueError(f"must match [A-Za-z0-9._:@-]{{1,128}} {NOT_DOTS} (a broker account name)")
    return value


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{value[:64]!r} is not an IANA time zone (e.g. Europe/Berlin, UTC)") from None
    return value


PersonId = Annotated[StrictStr, Field(pattern=PERSON_ID_RE.pattern), AfterValidator(not_dot_segment)]
DeviceRef = Annotated[StrictStr, Field(pattern=DEVICE_ID_RE.pattern), AfterValidator(not_dot_segment)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class Muted(_Strict):
    """Segments and alarm rules whose notifications this person does not get (``suppressed``)."""

    segments: Annotated[list[Name], Field(max_length=64)] = Field(default_factory=list)
    rules: Annotated[list[Name], Field(max_length=64)] = Field(default_factory=list)

    @field_validator("segments", "rules")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class Person(_Strict):
    person_id: PersonId
    name: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    account: Annotated[StrictStr, AfterValidator(_account)] | None = None
    devices: Annotated[list[DeviceRef], Field(max_length=MAX_DEVICES)] = Field(default_factory=list)
    timezone: Annotated[StrictStr, Field(min_length=1, max_length=64), AfterValidator(_timezone)] = DEFAULT_TIMEZONE
    quiet_hours: Annotated[list[QuietWindow], Field(max_length=MAX_WINDOWS)] | None = None
    bypass_priority: Priority = DEFAULT_BYPASS
    muted: Muted = Field(default_factory=Muted)
    reach_after_s: Annotated[StrictFloat, Field(ge=0, le=MAX_REACH_AFTER_S)] | None = None

    @field_serializer("reach_after_s")
    def _whole_seconds(self, v: float | None) -> float | int | None:
        return int(v) if v is not None and v.is_integer() else v

    @field_validator("devices")
    @classmethod
    def _devices_once(cls, v: list[str]) -> list[str]:
        twice = [d for i, d in enumerate(v) if d in v[:i]]
        if twice:
            raise ValueError(f"{twice[0]!r} given twice (each device has one place in the reach order)")
        return v

    def effective(self, quiet_hours_default: list[QuietWindow], reach_after_s: float) -> "Person":
        """This person with the config's defaults where they have none of their own."""
        return self.model_copy(update={
            "quiet_hours": self.quiet_hours if self.quiet_hours is not None else list(quiet_hours_default),
            "reach_after_s": self.reach_after_s if self.reach_after_s is not None else reach_after_s})

    def as_json(self) -> dict[str, Any]:
        """The contract's JSON (``from`` spelled as such; ``None`` kept: it means the default)."""
        return self.model_dump(mode="json", by_alias=True)


def parse_person(obj: Any, person_id: str | None = None) -> Person:
    """A Person from decoded JSON, or :class:`InputError` naming each bad field. With
    ``person_id`` (the URL's), the body may leave ``person_id`` out but not contradict it."""
    from gateway.pipeline.models import InputError

    if not isinstance(obj, dict):
        raise InputError.at("invalid_person", "person", "must be a JSON object")
    if person_id is not None:
        given = obj.get("person_id", person_id)
        if given != person_id:
            raise InputError.at("invalid_person", "person_id", f"{str(given)[:64]!r} differs from the URL's {person_id!r}")
        obj = {**obj, "person_id": person_id}
    try:
        return Person.model_validate(obj)
    except ValidationError as exc:
        raise InputError.from_validation("invalid_person", exc) from None


# ------------------------------------------------------------------ the CLI's --quiet
_RANGE = re.compile(r"(?P<days>[a-z,\-]+)\s+(?P<from>[0-9]{2}:[0-9]{2})\s*-\s*(?P<to>[0-9]{2}:[0-9]{2})")
_EVERY_DAY = ("daily", "every-day", "all")


def parse_quiet(text: str, where: str = "--quiet") -> dict[str, Any]:
    """``"mon-fri 22:00-06:00"`` → ``{"days": [...], "from": "22:00", "to": "06:00"}``.

    Days are names (``mon``..``sun``), ranges (``mon-fri``; ``fri-mon`` wraps over the
    weekend) and lists of both (``sat,sun``), or ``daily``. Raises ``ValueError`` whose
    text starts with ``where``."""
    m = _RANGE.fullmatch(text.strip().lower())
    if m is None:
        raise ValueError(f"{where}: expected DAYS HH:MM-HH:MM, e.g. \"mon-fri 22:00-06:00\" or \"daily 23:00-07:00\"; "
                         f"got {text[:80]!r}")
    days: list[str] = []
    for part in m["days"].split(","):
        if part in _EVERY_DAY:
            days.extend(DAYS)
            continue
        first, sep, last = part.partition("-")
        for day in (first, last) if sep else (first,):
            if day not in DAYS:
                raise ValueError(f"{where}: {day!r} is not a day (one of {', '.join(DAYS)}, or daily)")
        if not sep:
            days.append(first)
            continue
        i, j = DAYS.index(first), DAYS.index(last)
        days.extend(DAYS[(i + k) % 7] for k in range(((j - i) % 7) + 1))
    window = {"days": sorted(set(days), key=DAYS.index), "from": m["from"], "to": m["to"]}
    try:
        QuietWindow.model_validate(window)
    except ValidationError as exc:
        from gateway.pipeline.models import field_error_list

        raise ValueError(f"{where}: {'; '.join(e.message.removeprefix('job: ') for e in field_error_list(exc))}") from None
    return window


def quiet_text(window: dict[str, Any]) -> str:
    """The CLI's form of a window again (``mon-fri 22:00-06:00``), for ``people show``."""
    idx = sorted(DAYS.index(d) for d in window["days"])
    if len(idx) == 7:
        days = "daily"
    else:
        runs: list[list[int]] = []
        for i in idx:
            if runs and i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        days = ",".join(DAYS[r[0]] if len(r) == 1 else f"{DAYS[r[0]]}-{DAYS[r[-1]]}" for r in runs)
    return f"{days} {window['from']}-{window['to']}"


__all__ = ["DAYS", "MAX_DEVICES", "PERSON_ID_RE", "PRIORITIES", "Muted", "Person", "PersonId", "Priority",
           "QuietWindow", "minutes_of", "parse_person", "parse_quiet", "quiet_text"]
