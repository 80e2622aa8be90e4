"""Quiet hours and mutes against the real daemon (contract §12), at instants chosen with
libfaketime (Debian ``faketime``): the daemon starts with its wall clock set a few seconds
before a window's end on a DST night in Europe/Berlin, so hold, release, expiry, bypass and
suppression are seen as a user would, in seconds. The daemon's clock is the gateway's own
(anchored to the faked wall clock at start, then monotonic), so a step of the faked wall
clock mid-test must neither release nor freeze a held delivery.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.timeutil import parse_iso
from tests.helpers import MqttProbe, bulk_register, db_rows, job_status_from_db, put_persons, wait_until
from tests.helpers import cli_in_process as cli  # the operator's command, in this process
from tests.helpers.faketime import faketime_env, step

P = "homepot/site-t"
# When the daemon is ready its clock reads at least this long before the instant a window
# ends: what the test checks before the release (holds, a step noticed) fits in it.
READY_LEAD_S = 6.0
# A start's allowance in the first try; a slower start is measured and the daemon started
# again that much earlier (the window's end is a fixed instant: a DST night).
START_S = 4.0


def at(*a: int) -> float:
    return datetime(*a, tzinfo=UTC).timestamp()


def gateway_now(data_dir: Path) -> float:
    """The daemon's clock now: the time base it stored at start (gateway.clock) plus the
    system-wide CLOCK_MONOTONIC, which libfaketime leaves alone."""
    (mono_offset,), = db_rows(data_dir, "SELECT mono_offset FROM gateway_clock WHERE id = 1")
    return mono_offset + time.monotonic()


def before_release(data_dir: Path, job_id: str, release: float) -> None:
    """The test's premise: the job was accepted before the window's end."""
    created = parse_iso(job_status_from_db(data_dir, job_id)["created_at"]).timestamp()
    assert created < release - 2, f"the daemon came up {created - release:+.1f} s after the window's end: too slow to test"


def noticed_before(data_dir: Path, release: float) -> None:
    """The premise of a step's check: the daemon noticed the step before the window's end."""
    left = release - gateway_now(data_dir)
    assert left > 0.5, f"the step was noticed {-left:.1f} s after the window's end: too slow to test"


def shift(offset_file: Path, seconds: float) -> None:
    """Step the daemon's wall clock by ``seconds`` from where it is."""
    step(offset_file, f"{float(offset_file.read_text()) + seconds:+.3f}")


def start_before(gateway_factory, tmp_path: Path, instant: float, extra: dict | None = None,
                 devices: list[dict] = (), persons: list[dict] = ()):
    """A daemon whose clock reads READY_LEAD_S or more before ``instant`` once it is ready,
    registered first. Its clock is the wall clock when it starts, so the offset is set before
    the start; a start slower than START_S is tried again, earlier by what it took."""
    offset = tmp_path / "offset"
    data = tmp_path / "var"
    lead = READY_LEAD_S + START_S
    for _ in range(3):
        shutil.rmtree(data, ignore_errors=True)
        gw = gateway_factory(extra or {}, env=faketime_env(offset), start=False)
        bulk_register(data, list(devices))
        put_persons(data, list(persons))
        step(offset, f"{instant - lead - time.time():+.3f}")
        gw.start()
        left = instant - gateway_now(data)
        if left >= READY_LEAD_S:
            return gw, offset
        gw.kill()
        lead += READY_LEAD_S - left + START_S
    raise AssertionError(f"three starts took longer than their allowance (last: {lead - left:.1f} s)")


def mqtt(device_id: str, segment: str | None = None) -> dict:
    return {"device_id": device_id, "segment": segment, "channels": [{"platform": "mqtt"}]}


def send(probe: MqttProbe, job_id: str, target: dict, **notification) -> None:
    probe.publish(f"{P}/jobs", json.dumps({"job_id": job_id, "target": target,
                                           "notification": {"title": job_id, **notification}}))


def arrivals(probe: MqttProbe, device: str, job_id: str) -> list[dict]:
    return [json.loads(p) for _, _, p, _ in probe.on(f"{P}/devices/{device}/notify")
            if json.loads(p)["job_id"] == job_id]


def delivery(data_dir: Path, job_id: str) -> dict:
    rows = db_rows(data_dir, "SELECT state, last_error, next_at FROM deliveries WHERE job_id = ?", job_id)
    assert len(rows) == 1, rows
    return dict(zip(("state", "last_error", "next_at"), rows[0]))


def settled(data_dir: Path, job_id: str, state: str, timeout: float = 20.0) -> dict:
    return wait_until(lambda: (d := delivery(data_dir, job_id)) and d["state"] == state and d, timeout=timeout)


def test_autumn_night_hold_release_expiry_bypass_mute_and_a_clock_step(gateway_factory, tmp_path: Path):
    # Sunday 2026-10-25, 00:30 UTC: 02:30 CEST in Berlin, whose clocks go back from 03:00 CEST
    # to 02:00 CET at 01:00 UTC, so 02:30 happens again at 01:30 UTC.
    release = at(2026, 10, 25, 0, 30)
    night = {"days": ["sat"], "from": "22:00", "to": "02:30"}  # across midnight: Saturday's night
    utc_night = {"days": ["sat"], "from": "22:00", "to": "00:30"}
    persons = [
        {"person_id": "berta", "devices": ["berta-phone"], "timezone": "Europe/Berlin", "quiet_hours": [night],
         "bypass_priority": "high"},
        {"person_id": "ulf", "devices": ["ulf-phone"], "timezone": "UTC", "quiet_hours": [utc_night]},
        {"person_id": "mia", "devices": ["mia-phone"], "timezone": "UTC", "muted": {"segments": ["pos"]}},
    ]
    devices = [mqtt("berta-phone"), mqtt("ulf-phone"), mqtt("mia-phone", "pos"), mqtt("kiosk", "pos")]
    gw, offset = start_before(gateway_factory, tmp_path, release, devices=devices, persons=persons)
    data = tmp_path / "var"
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify"])

    send(probe, "to-ulf", {"devices": ["ulf-phone"]})
    send(probe, "to-berta", {"devices": ["berta-phone"]}, ttl=7200)
    send(probe, "to-berta-short", {"devices": ["berta-phone"]}, ttl=2)
    send(probe, "to-berta-high", {"devices": ["berta-phone"]}, priority="high")
    send(probe, "to-pos", {"segment": "pos"})

    # Held: Ulf until 00:30 UTC; Berta until the *second* 02:30 in Berlin (CET), 01:30 UTC.
    wait_until(lambda: job_status_from_db(data, "to-ulf"), timeout=10)
    before_release(data, "to-ulf", release)
    wait_until(lambda: delivery(data, "to-ulf")["last_error"], timeout=10)
    ulf = delivery(data, "to-ulf")
    assert ulf["last_error"] == "quiet hours until 2026-10-25 00:30 UTC (UTC)", ulf
    assert ulf["next_at"] == release
    wait_until(lambda: delivery(data, "to-berta")["last_error"], timeout=10)
    berta = delivery(data, "to-berta")
    assert berta == {"state": "queued", "last_error": "quiet hours until 2026-10-25 02:30 CET (Europe/Berlin)",
                     "next_at": at(2026, 10, 25, 1, 30)}
    # A step of the wall clock by a day (to Monday, no quiet hours) releases nothing early; it
    # is made now so that the daemon notices it while the checks below wait.
    shift(offset, 86400)
    # At or above the bypass priority: through at once, in quiet hours.
    wait_until(lambda: arrivals(probe, "berta-phone", "to-berta-high"), timeout=10)
    # Muted segment: suppressed, counted; the other device of the segment gets it.
    wait_until(lambda: arrivals(probe, "kiosk", "to-pos"), timeout=10)
    pos = wait_until(lambda: (s := job_status_from_db(data, "to-pos")) and s["state"] == "completed" and s)
    assert pos["counts"]["suppressed"] == 1 and pos["counts"]["sent"] == 1, pos
    muted = db_rows(data, "SELECT state, last_error FROM deliveries WHERE job_id = 'to-pos' AND device_id = 'mia-phone'")
    assert muted == [("suppressed", "muted by mia: segment pos")]
    # The TTL ends first: expired, saying why it was never sent.
    short = settled(data, "to-berta-short", "expired", 10)
    assert short["last_error"].startswith("ttl elapsed during quiet hours until 2026-10-25 02:30 CET"), short
    # Barrier: the daemon noticed the step (it looks every 2 s; the dispatcher passes at least
    # once a second, and a release by the wall clock would have been sent by then).
    wait_until(lambda: "system clock stepped" in gw.log(), timeout=10)
    noticed_before(data, release)
    wait_until(lambda: delivery(data, "to-ulf")["state"] == "queued", timeout=1)
    assert not arrivals(probe, "ulf-phone", "to-ulf"), "released by the wall clock's step"
    # Released at the window's end on the gateway's clock.
    got = wait_until(lambda: arrivals(probe, "ulf-phone", "to-ulf"), timeout=release - gateway_now(data) + 10)[0]
    sent = parse_iso(got["sent_at"]).timestamp()
    assert release <= sent < release + 3, (got["sent_at"], "released at the window's end")
    wait_until(lambda: job_status_from_db(data, "to-ulf")["state"] == "completed", timeout=10)
    # Berlin's first 02:30 (CEST) has passed too: Berta is still held, for the second one.
    assert delivery(data, "to-berta")["state"] == "queued" and not arrivals(probe, "berta-phone", "to-berta")
    shown = cli(gw.config, "jobs", "show", "to-pos", "--deliveries")
    assert "suppressed=1" in shown.stdout and "suppressed (1):\n  mia-phone" in shown.stdout, shown.stdout
    assert "muted by mia: segment pos" in shown.stdout
    probe.close()
    assert gw.stop() == 0


def test_spring_night_ends_at_the_hour_the_clocks_skip_to_and_a_step_back_freezes_nothing(gateway_factory,
                                                                                         tmp_path: Path):
    # Sunday 2026-03-29, 01:00 UTC: Berlin goes from 02:00 CET to 03:00 CEST. A night to 03:00
    # ends then (not at 02:00 UTC, as a fixed +01:00 would say); so does one to 02:30, a time
    # that does not exist that night.
    release = at(2026, 3, 29, 1, 0)
    persons = [
        {"person_id": "anna", "devices": ["anna-phone"], "timezone": "Europe/Berlin",
         "quiet_hours": [{"days": ["sat"], "from": "22:00", "to": "03:00"}]},
        {"person_id": "gap", "devices": ["gap-phone"], "timezone": "Europe/Berlin",
         "quiet_hours": [{"days": ["sat"], "from": "23:00", "to": "02:30"}]},
    ]
    gw, offset = start_before(gateway_factory, tmp_path, release, devices=[mqtt("anna-phone"), mqtt("gap-phone")],
                              persons=persons)
    data = tmp_path / "var"
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify"])
    send(probe, "night", {"devices": ["anna-phone", "gap-phone"]}, priority="low")
    wait_until(lambda: job_status_from_db(data, "night"), timeout=10)
    before_release(data, "night", release)
    wait_until(lambda: [r for r in db_rows(data, "SELECT last_error FROM deliveries WHERE job_id = 'night'")
                        if r[0]].__len__() == 2 or None, timeout=10)
    held = dict(db_rows(data, "SELECT device_id, last_error FROM deliveries WHERE job_id = 'night'"))
    assert held == {"anna-phone": "quiet hours until 2026-03-29 03:00 CEST (Europe/Berlin)",
                    "gap-phone": "quiet hours until 2026-03-29 03:00 CEST (Europe/Berlin)"}
    status = job_status_from_db(data, "night")
    # A step of the wall clock back by an hour (to 01:00 CET, deep in the night) freezes nothing.
    shift(offset, -3600)
    wait_until(lambda: "system clock stepped" in gw.log(), timeout=10)  # barrier: the daemon noticed it
    noticed_before(data, release)
    got = wait_until(lambda: arrivals(probe, "anna-phone", "night") and arrivals(probe, "gap-phone", "night"),
                     timeout=release - gateway_now(data) + 10)
    for device in ("anna-phone", "gap-phone"):
        sent = parse_iso(arrivals(probe, device, "night")[0]["sent_at"]).timestamp()
        assert release <= sent < release + 3, (device, sent - release)
    assert got and status["state"] == "dispatching"
    probe.close()
    assert gw.stop() == 0
