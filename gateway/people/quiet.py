"""Quiet hours: is a person's quiet window open at an instant, and when (UTC) does it end.

Pure functions over a person's IANA time zone and quiet windows (contract §12); the
pipeline asks them once per person when a delivery falls due (gateway/pipeline/quiet_gate.py),
on the gateway's clock, so a step of the system clock neither opens nor closes a window early.

A window ``{"days": [...], "from": "22:00", "to": "06:00"}`` is a stretch of local wall-clock
time that starts on each of ``days`` at ``from`` and ends at the next ``to``: on the same day
when ``to`` is later than ``from``, else on the next day (the window crosses midnight, and
``days`` are the days it *starts*: a Friday 22:00-06:00 window holds Saturday 05:00). ``from``
equal to ``to`` is a whole day (24 hours of wall clock from ``from``).

Daylight saving time: the window is the one stretch of instants between its start and its
end, each read in the zone on its own date, and it covers every instant the wall clock could
be read as inside it:

- a local time that does not exist (the hour the clocks skip in spring) stands for the first
  instant after the gap: a window from or to 02:30 on the night Berlin goes from 02:00 to
  03:00 starts or ends at 03:00 CEST;
- a local time that exists twice (the hour repeated in autumn) starts a window at its first
  occurrence and ends one at its second, so quiet never ends before the later reading.

Windows that meet or overlap (Friday's night running into a quiet Saturday) are one quiet
stretch: the end is when no window holds any more. A person quiet for more than
:data:`LONGEST_STRETCH` (windows that cover the whole week) is quiet until that bound, which
is later than any TTL a job can have in practice; the delivery expires first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
# The bound of one quiet stretch; far past any realistic TTL (a week's windows repeat).
LONGEST_STRETCH = timedelta(days=8)


@dataclass(frozen=True, slots=True)
class Window:
    """One quiet window: weekdays it starts on (0 = Monday) and its local start and end."""

    days: frozenset[int]
    start: time
    end: time

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    @classmethod
    def parse(cls, raw: Any) -> "Window":
        """From the contract's shape (a mapping with ``days``, ``from``, ``to``) or an object
        with those attributes (``from_`` for the reserved word); ValueError names the field."""
        if isinstance(raw, Window):
            return raw
        if isinstance(raw, Mapping):
            days, start, end = raw.get("days"), raw.get("from"), raw.get("to")
        else:
            days = getattr(raw, "days", None)
            start = getattr(raw, "from_", getattr(raw, "start", None))
            end = getattr(raw, "to", getattr(raw, "end", None))
        return cls(_parse_days(days), _parse_time(start, "from"), _parse_time(end, "to"))


def _parse_days(days: Any) -> frozenset[int]:
    if isinstance(days, str) or not isinstance(days, Iterable):
        raise ValueError("days: a list of mon, tue, wed, thu, fri, sat, sun")
    out = set()
    for d in days:
        name = str(d).lower()
        if name not in DAY_NAMES:
            raise ValueError(f"days: {d!r} is not one of {', '.join(DAY_NAMES)}")
        out.add(DAY_NAMES.index(name))
    if not out:
        raise ValueError("days: at least one day")
    return frozenset(out)


def _parse_time(value: Any, field: str) -> time:
    if isinstance(value, time):
        return value.replace(second=0, microsecond=0, tzinfo=None)
    m = _HHMM.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{field}: a local time HH:MM (00:00-23:59), got {value!r}")
    return time(int(m[1]), int(m[2]))


def windows(raw: Iterable[Any] | None) -> tuple[Window, ...]:
    """Windows from their stored or configured shape (None or empty: never quiet)."""
    return tuple(Window.parse(w) for w in raw or ())


def zone(name: str) -> ZoneInfo:
    """The IANA zone; ValueError names the field when it is unknown."""
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError) as exc:  # not found is a KeyError; a malformed key a ValueError
        raise ValueError(f"timezone: {name!r} is not an IANA time zone") from exc


# ------------------------------------------------------------------ local time → instants
def _candidates(local: datetime, tz: ZoneInfo) -> list[datetime]:
    """The UTC instants whose reading in ``tz`` is ``local`` (naive): one, two (the repeated
    hour) or none (the skipped hour)."""
    out = []
    for fold in (0, 1):
        u = local.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if u.astimezone(tz).replace(tzinfo=None) == local and u not in out:
            out.append(u)
    return sorted(out)


def _gap_end(local: datetime, tz: ZoneInfo) -> datetime:
    """The first instant after the gap that skips ``local``: the second at which the zone's
    offset changes, found between the two readings of ``local`` with the offsets before
    and after the change (offsets change on whole seconds)."""
    a = int(local.replace(tzinfo=tz, fold=1).timestamp())  # read with the offset after the change
    b = int(local.replace(tzinfo=tz, fold=0).timestamp())  # read with the offset before it
    lo, hi = min(a, b), max(a, b)
    before = datetime.fromtimestamp(lo, tz).utcoffset()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def first_instant(local: datetime, tz: ZoneInfo) -> datetime:
    """The first instant the wall clock reads ``local`` (a skipped reading: the gap's end)."""
    found = _candidates(local, tz)
    return found[0] if found else _gap_end(local, tz)


def last_instant(local: datetime, tz: ZoneInfo) -> datetime:
    """The last instant the wall clock reads ``local`` (a skipped reading: the gap's end)."""
    found = _candidates(local, tz)
    return found[-1] if found else _gap_end(local, tz)


def _span(w: Window, day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC interval [start, end) of ``w`` when it starts on local ``day``."""
    start = first_instant(datetime.combine(day, w.start), tz)
    end_day = day + timedelta(days=1) if w.crosses_midnight else day
    return start, last_instant(datetime.combine(end_day, w.end), tz)


def _window_end(ws: Sequence[Window], at: datetime, tz: ZoneInfo) -> datetime | None:
    """The latest end of a window that holds ``at`` (UTC), or None."""
    today = at.astimezone(tz).date()
    best = None
    for w in ws:
        for back in (2, 1, 0):  # a window holding ``at`` started today or yesterday (2: DST slack)
            day = today - timedelta(days=back)
            if day.weekday() not in w.days:
                continue
            start, end = _span(w, day, tz)
            if start <= at < end and (best is None or end > best):
                best = end
    return best


def quiet_until(ws: Sequence[Window], tz: ZoneInfo, at: datetime) -> datetime | None:
    """When the quiet stretch that holds instant ``at`` ends (UTC), or None when ``at`` is
    not in quiet hours. Windows that meet or overlap are followed to the stretch's end."""
    if not ws:
        return None
    at = at.astimezone(UTC)
    end = _window_end(ws, at, tz)
    if end is None:
        return None
    bound = at + LONGEST_STRETCH
    while end < bound:
        later = _window_end(ws, end, tz)
        if later is None:
            return end
        end = later
    return bound


def is_quiet(ws: Sequence[Window], tz: ZoneInfo, at: datetime) -> bool:
    return _window_end(ws, at.astimezone(UTC), tz) is not None if ws else False


def describe_until(end: datetime, tz: ZoneInfo) -> str:
    """The end of a quiet stretch as the person reads it: local date and time, the zone's
    abbreviation (CET or CEST: tells the repeated autumn hour apart) and its IANA name."""
    local = end.astimezone(tz)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname()} ({tz.key})"


def hold_reason(end: datetime, tz: ZoneInfo) -> str:
    """A held delivery's reason (contract §8: ``quiet hours until <time>``)."""
    return f"quiet hours until {describe_until(end, tz)}"


HOLD_PREFIX = "quiet hours until "
# The reason when the person's windows leave no gap for LONGEST_STRETCH: the TTL decides.
ALWAYS_REASON = f"{HOLD_PREFIX}further notice (the windows cover the whole week)"

__all__ = ["ALWAYS_REASON", "DAY_NAMES", "HOLD_PREFIX", "LONGEST_STRETCH", "Window", "describe_until", "first_instant",
           "hold_reason", "is_quiet", "last_instant", "quiet_until", "windows", "zone"]
