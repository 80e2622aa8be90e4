"""Quiet windows evaluated in a person's time zone (gateway.people.quiet): properties over
any windows, zones and instants, and the edges by hand (midnight, DST in Berlin)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.people import quiet
from gateway.people.quiet import DAY_NAMES, Window, hold_reason, is_quiet, quiet_until, windows
from tests.helpers.fuzz import examples


BERLIN = ZoneInfo("Europe/Berlin")
FIXED = ["UTC", "Asia/Kolkata", "Asia/Tokyo", "Etc/GMT+5"]  # no DST: the wall clock is a plain shift
DST = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Pacific/Chatham",
       "Europe/London"]


def utc(*a: int) -> datetime:
    return datetime(*a, tzinfo=UTC)


def w(days: str, frm: str, to: str) -> Window:
    return Window.parse({"days": days.split(","), "from": frm, "to": to})


# ------------------------------------------------------------------ strategies
times = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45, 59]))
window_st = st.builds(Window, st.frozensets(st.integers(0, 6), min_size=1), times, times)
windows_st = st.lists(window_st, max_size=4).map(tuple)
instants = st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2030, 12, 31),
                        timezones=st.just(UTC))


def oracle(ws: tuple[Window, ...], local: datetime) -> bool:
    """Quiet by the wall-clock reading alone (right where the offset does not change)."""
    t, day, yday = local.time().replace(tzinfo=None), local.weekday(), (local.weekday() - 1) % 7
    for x in ws:
        if not x.crosses_midnight:
            if day in x.days and x.start <= t < x.end:
                return True
        elif (day in x.days and t >= x.start) or (yday in x.days and t < x.end):
            return True
    return False


def steady(tz: ZoneInfo, at: datetime) -> bool:
    """No offset change within two days either side of ``at``."""
    offsets = {(at + timedelta(hours=h)).astimezone(tz).utcoffset() for h in range(-48, 49)}
    return len(offsets) == 1


# ------------------------------------------------------------------ properties
@settings(max_examples=examples(300), deadline=None)
@given(ws=windows_st, zone_name=st.sampled_from(FIXED + DST), at=instants)
def test_the_end_is_after_now_and_not_quiet_and_everything_before_it_is(ws, zone_name, at):
    tz = ZoneInfo(zone_name)
    end = quiet_until(ws, tz, at)
    assert (end is not None) == is_quiet(ws, tz, at)
    if end is None:
        return
    assert end > at
    if end - at < quiet.LONGEST_STRETCH:
        assert not is_quiet(ws, tz, end), "the stretch ends where no window holds"
    for k in range(1, 8):  # instants inside the stretch are quiet and end at the same time
        inside = at + (end - at) * k / 8
        assert is_quiet(ws, tz, inside)
        if end - at < quiet.LONGEST_STRETCH:
            assert quiet_until(ws, tz, inside) == end


@settings(max_examples=examples(300), deadline=None)
@given(ws=windows_st, zone_name=st.sampled_from(FIXED), at=instants)
def test_without_dst_quiet_is_the_wall_clock_reading(ws, zone_name, at):
    tz = ZoneInfo(zone_name)
    assert is_quiet(ws, tz, at) == oracle(ws, at.astimezone(tz))


@settings(max_examples=examples(300), deadline=None)
@given(ws=windows_st, zone_name=st.sampled_from(DST), at=instants)
def test_with_dst_away_from_a_change_quiet_is_the_wall_clock_reading(ws, zone_name, at):
    tz = ZoneInfo(zone_name)
    assume(steady(tz, at))
    assert is_quiet(ws, tz, at) == oracle(ws, at.astimezone(tz))


@settings(max_examples=examples(200), deadline=None)
@given(zone_name=st.sampled_from(FIXED + DST), at=instants)
def test_no_windows_is_never_quiet(zone_name, at):
    assert quiet_until((), ZoneInfo(zone_name), at) is None
    assert not is_quiet(windows(None), ZoneInfo(zone_name), at)


@settings(max_examples=examples(300), deadline=None)
@given(raw=st.one_of(
    st.fixed_dictionaries({"days": st.one_of(st.lists(st.text(max_size=4)), st.text(), st.none(), st.integers()),
                           "from": st.one_of(st.text(max_size=6), st.none(), st.integers()),
                           "to": st.one_of(st.text(max_size=6), st.none())}),
    st.fixed_dictionaries({"days": st.lists(st.sampled_from(DAY_NAMES), min_size=1),
                           "from": st.from_regex(r"\A[0-9]{1,2}:[0-9]{1,3}\Z"),
                           "to": st.from_regex(r"\A[0-9]{2}:[0-9]{2}\Z")})))
def test_any_window_input_parses_or_names_its_field(raw):
    try:
        parsed = Window.parse(raw)
    except ValueError as exc:
        assert str(exc).split(":")[0] in ("days", "from", "to")
    else:
        assert parsed.days and parsed.start.minute < 60


# ------------------------------------------------------------------ edges by hand
def test_a_window_across_midnight_belongs_to_the_day_it_starts():
    ws = (w("fri", "22:00", "06:00"),)  # Friday night into Saturday morning
    # Saturday 2026-12-12 05:00 Berlin (04:00 UTC): held since Friday 22:00, until 06:00.
    assert quiet_until(ws, BERLIN, utc(2026, 12, 12, 4, 0)) == utc(2026, 12, 12, 5, 0)
    # Friday 2026-12-11 05:00: the window of Thursday night, which is not listed.
    assert quiet_until(ws, BERLIN, utc(2026, 12, 11, 4, 0)) is None
    # Friday 21:59:59 not yet; 22:00 on the dot yes; Saturday 06:00 on the dot no longer.
    assert not is_quiet(ws, BERLIN, utc(2026, 12, 11, 20, 59, 59))
    assert is_quiet(ws, BERLIN, utc(2026, 12, 11, 21, 0))
    assert not is_quiet(ws, BERLIN, utc(2026, 12, 12, 5, 0))


def test_a_same_day_window_and_a_whole_day():
    assert quiet_until((w("mon", "12:00", "13:30"),), BERLIN, utc(2026, 12, 7, 11, 15)) == utc(2026, 12, 7, 12, 30)
    whole = (w("sun", "00:00", "00:00"),)
    assert quiet_until(whole, BERLIN, utc(2026, 12, 13, 12, 0)) == utc(2026, 12, 13, 23, 0)
    assert not is_quiet(whole, BERLIN, utc(2026, 12, 13, 23, 0))


def test_windows_that_meet_are_one_stretch():
    ws = (w("fri", "22:00", "00:00"), w("sat", "00:00", "09:00"), w("sat", "09:00", "10:00"))
    assert quiet_until(ws, BERLIN, utc(2026, 12, 11, 22, 0)) == utc(2026, 12, 12, 9, 0)  # 10:00 CET


def test_spring_forward_inside_a_window_shortens_it_by_the_skipped_hour():
    # Berlin 2026-03-29: 02:00 CET becomes 03:00 CEST. Saturday 22:00 CET (21:00 UTC) to
    # Sunday 06:00 CEST (04:00 UTC) is seven hours, not eight.
    ws = (w("sat", "22:00", "06:00"),)
    end = quiet_until(ws, BERLIN, utc(2026, 3, 28, 21, 0))
    assert end == utc(2026, 3, 29, 4, 0)
    assert hold_reason(end, BERLIN) == "quiet hours until 2026-03-29 06:00 CEST (Europe/Berlin)"


def test_a_window_from_or_to_a_skipped_time_meets_the_gap_end():
    # 02:30 does not exist on 2026-03-29 in Berlin: the window starts/ends at 03:00 CEST (01:00 UTC).
    starts = (w("sun", "02:30", "05:00"),)
    assert not is_quiet(starts, BERLIN, utc(2026, 3, 29, 0, 59, 59))
    assert quiet_until(starts, BERLIN, utc(2026, 3, 29, 1, 0)) == utc(2026, 3, 29, 3, 0)
    ends = (w("sat", "23:00", "02:30"),)
    assert quiet_until(ends, BERLIN, utc(2026, 3, 29, 0, 30)) == utc(2026, 3, 29, 1, 0)
    assert not is_quiet(ends, BERLIN, utc(2026, 3, 29, 1, 0))


def test_fall_back_inside_a_window_lengthens_it_by_the_repeated_hour():
    # Berlin 2026-10-25: 03:00 CEST becomes 02:00 CET. Saturday 22:00 CEST (20:00 UTC) to
    # Sunday 06:00 CET (05:00 UTC) is nine hours.
    ws = (w("sat", "22:00", "06:00"),)
    assert quiet_until(ws, BERLIN, utc(2026, 10, 24, 20, 0)) == utc(2026, 10, 25, 5, 0)


def test_a_window_to_a_repeated_time_ends_at_its_second_reading():
    # 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET): quiet until the later.
    ends = (w("sat", "22:00", "02:30"),)
    end = quiet_until(ends, BERLIN, utc(2026, 10, 24, 23, 0))
    assert end == utc(2026, 10, 25, 1, 30)
    assert hold_reason(end, BERLIN) == "quiet hours until 2026-10-25 02:30 CET (Europe/Berlin)"
    assert is_quiet(ends, BERLIN, utc(2026, 10, 25, 0, 45))  # 02:45 CEST, between the two readings
    # A window from 02:30 starts at its first reading.
    starts = (w("sun", "02:30", "04:00"),)
    assert is_quiet(starts, BERLIN, utc(2026, 10, 25, 0, 30))
    assert not is_quiet(starts, BERLIN, utc(2026, 10, 25, 0, 29, 59))


def test_a_week_of_windows_is_quiet_until_the_bound():
    always = (w(",".join(DAY_NAMES), "00:00", "00:00"),)
    at = utc(2026, 12, 7, 12, 0)
    assert quiet_until(always, BERLIN, at) == at + quiet.LONGEST_STRETCH


@pytest.mark.parametrize("raw, field", [
    ({"days": ["mon"], "from": "24:00", "to": "06:00"}, "from"),
    ({"days": ["mon"], "from": "22:00", "to": "6:00"}, "to"),
    ({"days": ["monday"], "from": "22:00", "to": "06:00"}, "days"),
    ({"days": [], "from": "22:00", "to": "06:00"}, "days"),
    ({"days": "mon", "from": "22:00", "to": "06:00"}, "days"),
])
def test_bad_windows_name_their_field(raw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Window.parse(raw)


def test_an_unknown_zone_names_the_field():
    for name in ("Mars/Olympus", "../etc/passwd", ""):
        with pytest.raises(ValueError, match="^timezone:"):
            quiet.zone(name)
