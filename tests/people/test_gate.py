"""The people gate's decision (gateway.people.gate), without a database: mutes suppress,
quiet hours hold below the bypass priority, a shared device follows all of its persons."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from zoneinfo import ZoneInfo

from gateway.people.gate import JobFacts, PeopleGate, Policy, Snapshot, rank
from gateway.people.quiet import windows

BERLIN = ZoneInfo("Europe/Berlin")
NIGHT = windows([{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "22:00", "to": "06:00"}])
MIDNIGHT_BERLIN = datetime(2026, 12, 7, 23, 0, tzinfo=UTC).timestamp()  # Tuesday 00:00 CET
NOON_BERLIN = datetime(2026, 12, 8, 11, 0, tzinfo=UTC).timestamp()


def policy(pid: str, ws=NIGHT, bypass: str = "high", segments=(), rules=()) -> Policy:
    return Policy(pid, BERLIN, ws, rank(bypass), frozenset(segments), frozenset(rules))


def gate(*policies: Policy, devices: dict[str, tuple[str, ...]] | None = None) -> PeopleGate:
    g = PeopleGate()
    g.snapshot = Snapshot({p.person_id: p for p in policies}, devices or {}, ("test",))
    return g


def test_quiet_hours_hold_below_the_bypass_and_say_until_when():
    g = gate(policy("anna"))
    verdict = g.decide("anna", "anna-phone", JobFacts("normal"), MIDNIGHT_BERLIN)
    assert verdict is not None and verdict.hold
    assert verdict.until == datetime(2026, 12, 8, 5, 0, tzinfo=UTC).timestamp()
    assert verdict.reason == "quiet hours until 2026-12-08 06:00 CET (Europe/Berlin)"
    assert g.decide("anna", "anna-phone", JobFacts("high"), MIDNIGHT_BERLIN) is None  # at the bypass
    assert g.decide("anna", "anna-phone", JobFacts("critical"), MIDNIGHT_BERLIN) is None
    assert g.decide("anna", "anna-phone", JobFacts("low"), NOON_BERLIN) is None  # awake


def test_mutes_suppress_whatever_the_hour_and_priority():
    g = gate(policy("anna", segments=["pos-terminals"], rules=["door-open"]))
    for at in (MIDNIGHT_BERLIN, NOON_BERLIN):
        v = g.decide("anna", "x", JobFacts("critical", rule="door-open"), at)
        assert v is not None and not v.hold and v.reason == "muted by anna: alarm rule door-open"
        v = g.decide("anna", "x", JobFacts("low", segment="pos-terminals"), at)
        assert v is not None and not v.hold and v.reason == "muted by anna: segment pos-terminals"
    assert g.decide("anna", "x", JobFacts("normal", segment="other", rule="freezer"), NOON_BERLIN) is None


def test_a_device_is_its_persons_when_the_job_named_none():
    g = gate(policy("anna"), policy("ben", ws=()), devices={"anna-phone": ("anna",), "shared": ("anna", "ben")})
    assert g.concerns(None, "anna-phone") and g.concerns(None, "shared") and not g.concerns(None, "kiosk")
    assert g.decide(None, "anna-phone", JobFacts("normal"), MIDNIGHT_BERLIN).hold
    # Ben has no quiet hours: the shared device is not held for Anna's.
    assert g.decide(None, "shared", JobFacts("normal"), MIDNIGHT_BERLIN) is None
    # A job that reached Anna through the shared device follows Anna alone.
    assert g.decide("anna", "shared", JobFacts("normal"), MIDNIGHT_BERLIN).hold


def test_a_shared_device_is_suppressed_only_when_every_person_muted():
    g = gate(policy("anna", rules=["door-open"]), policy("ben"), devices={"shared": ("anna", "ben")})
    assert g.decide(None, "shared", JobFacts("normal", rule="door-open"), NOON_BERLIN) is None
    g = gate(policy("anna", rules=["door-open"]), policy("ben", segments=["s"]), devices={"shared": ("anna", "ben")})
    v = g.decide(None, "shared", JobFacts("normal", segment="s", rule="door-open"), NOON_BERLIN)
    assert v is not None and not v.hold
    assert v.reason == "muted by anna: alarm rule door-open; muted by ben: segment s"


def test_nobody_known_changes_nothing():
    g = gate()
    assert not g.concerns("anna", "anna-phone")
    g = gate(policy("ben"))
    assert g.decide("anna", "anna-phone", JobFacts("low"), MIDNIGHT_BERLIN) is None  # removed meanwhile


def test_a_person_without_quiet_hours_of_their_own_takes_the_default():
    default = [{"days": ["tue"], "from": "00:00", "to": "01:00"}]
    person = SimpleNamespace(person_id="anna", timezone="Europe/Berlin", quiet_hours=None, bypass_priority="critical",
                             muted=SimpleNamespace(segments=[], rules=[]))
    p = Policy.of(person, windows(default))
    assert p.windows == windows(default) and p.bypass == rank("critical")
    own = SimpleNamespace(**{**vars(person), "quiet_hours": []})
    assert Policy.of(own, windows(default)).windows == ()  # an empty list of their own: never quiet


def test_a_persons_later_devices_keep_their_turns_after_the_window():
    p = Policy("anna", BERLIN, NIGHT, rank("critical"), frozenset(), frozenset(), ("phone", "browser"), 120.0)
    g = gate(p, devices={"phone": ("anna",), "browser": ("anna",)})
    end = datetime(2026, 12, 8, 5, 0, tzinfo=UTC).timestamp()
    assert g.decide("anna", "phone", JobFacts("normal"), MIDNIGHT_BERLIN).until == end
    later = g.decide("anna", "browser", JobFacts("normal"), MIDNIGHT_BERLIN)
    assert later.until == end + 120 and later.reason == "quiet hours until 2026-12-08 06:00 CET (Europe/Berlin)"
    # A segment job to the same device is no step of reaching her: due at the end.
    assert g.decide(None, "browser", JobFacts("normal"), MIDNIGHT_BERLIN).until == end


def test_windows_that_cover_the_week_hold_until_further_notice():
    week = windows([{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "00:00", "to": "12:00"},
                    {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "12:00", "to": "00:00"}])
    v = gate(policy("anna", ws=week)).decide("anna", "x", JobFacts("normal"), NOON_BERLIN)
    assert v.hold and v.reason == "quiet hours until further notice (the windows cover the whole week)"
