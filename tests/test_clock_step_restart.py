"""A restart after a step of the system clock (NTP corrects a box that had no RTC): the
times the daemon writes are the system clock's, and the timers set before the step
(resend, retry backoff, escalation, stale watch) neither fire early nor wait an extra hour.

Its own file (the two directions take 20 s each, mostly waiting on timers), so
the test workers share it with the other clock-step tests. libfaketime as in
test_clock_step.py (the step is made while the daemon is stopped, the new one reads it at start).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.helpers.faketime import faketime_env, step
from tests.support import MqttProbe, bulk_register
from tests.test_clock_step import (
    BEAT_S, P, STALE_S, alarm_job_ids, delivery, delivery_or_none, mqtt_device, send_job, wait_count,
)

# The resend, retry and escalation timers set before the step. Longer than a restart on a
# loaded machine (the test checks that premise and says so when it fails; a restart takes
# 1-3 s at load 5, the premise allows 9); the verdicts below tell "early" (at the restart),
# "on time" and "an hour late" apart with margins that do not depend on it. No shorter than
# what the stale watch checks after the restart takes (STALE_S + 1, then STALE_S), which
# the test waits for anyway.
WAIT_S = 14.0


def job_created_at(data_dir: Path, job_id: str, timeout: float = 20.0) -> float:
    from gateway.storage import connect

    deadline = time.monotonic() + timeout
    while True:
        conn = connect(data_dir / "gateway.db")
        try:
            row = conn.execute("SELECT created_at FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        finally:
            conn.close()
        if row is not None:
            return float(row[0])
        assert time.monotonic() < deadline, f"job {job_id} not stored"
        time.sleep(0.05)


def alarm_due_at(data_dir: Path, rule: str, key: str) -> float:
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        row = conn.execute("SELECT due_at FROM alarms WHERE rule = ? AND akey = ?", (rule, key)).fetchone()
    finally:
        conn.close()
    assert row is not None and row[0] is not None, (rule, key, row)
    return float(row[0])


@pytest.mark.slow
@pytest.mark.parametrize("offset,step_s", [("+1h", 3600.0), ("-1h", -3600.0)])
def test_restart_after_a_step_shows_the_system_clock_and_keeps_every_remaining_duration(
        gateway_factory, tmp_path: Path, offset: str, step_s: float):
    """A box whose clock was wrong when the gateway started (no RTC) gets it corrected by
    NTP: after the next start the times it writes are the system clock's, and the timers
    set before (resend, retry backoff, escalation, stale watch) neither fire early nor wait
    an extra hour."""
    clock_file = tmp_path / "offset"
    rules = [{"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
              "target": {"segment": "technicians"}, "title": "Door {device_id}",
              "escalate": [{"after_s": WAIT_S, "target": {"segment": "shift-leads"}}]},
             {"name": "heartbeat", "topic": "{prefix}/devices/+/telemetry/heartbeat", "stale_s": STALE_S,
              "key": "{device_id}", "target": {"devices": ["tech-1"]}, "title": "{device_id} is silent"}]
    gw = gateway_factory({"rules": rules, "dispatch": {"ack_timeout_s": WAIT_S, "max_attempts": 100},
                          "bridges": {"simulation": {"latency_ms": 0, "transient_attempts": 1, "retry_after_s": WAIT_S}}},
                         env=faketime_env(clock_file))
    data = tmp_path / "var"
    bulk_register(data, [mqtt_device("tech-1", "technicians"), mqtt_device("lead-1", "shift-leads"),
                         mqtt_device("phone-r"), {"device_id": "sim-1", "channels": [{"platform": "simulation"}]}])
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify"])
    beats = [probe]  # the heartbeats go through the newest probe (a new one after the restart)
    alive = {"s-0", "s-1", "s-2"}
    beating = threading.Event()

    paused = threading.Event()  # no beats while the gateway restarts (see below)

    def heartbeats() -> None:
        while not beating.is_set():
            for s in sorted(alive) if not paused.is_set() else []:
                try:
                    beats[-1].client.publish(f"{P}/devices/{s}/telemetry/heartbeat", "1", qos=1)
                except Exception:  # noqa: BLE001 - the gateway restarts meanwhile; the next beat goes
                    pass
            beating.wait(BEAT_S)

    def on_test_clock(gateway_time: float) -> float:
        """A deadline the gateway stored before the step, on the test's monotonic clock (the
        gateway's clock is the real one until the step: it started at +0)."""
        return gateway_time - time.time() + time.monotonic()

    beater = threading.Thread(target=heartbeats, daemon=True)
    try:
        beater.start()
        send_job(probe, "resend-me", "phone-r", ttl=600)
        wait_count(probe, "phone-r", "resend-me", 1, timeout=20)
        send_job(probe, "retry-me", "sim-1", ttl=600)
        deadline = time.monotonic() + 20
        job_created_at(data, "retry-me")  # stored (its delivery row comes with the expansion)
        while (row := delivery_or_none(data, "retry-me")) is None or row["attempts"] < 1:  # first attempt: a 503
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        assert row["state"] == "queued", row
        retry_due_real = row["next_at"]  # the gateway's clock is the real one until the step
        retry_due = on_test_clock(retry_due_real)
        probe.publish(f"{P}/devices/door-a/telemetry/door", "open")
        wait_count(probe, "tech-1", "alarm.door.door-a.1", 1, timeout=20)
        deadline = time.monotonic() + 20
        while (resend := delivery(data, "resend-me"))["resend_at"] is None:
            assert time.monotonic() < deadline, resend
            time.sleep(0.05)
        resend_due = on_test_clock(resend["resend_at"])
        escalation_due = on_test_clock(alarm_due_at(data, "door", "door-a"))

        # NTP corrects the clock; the gateway restarts (a deploy, a reboot of the service).
        step(clock_file, offset)
        # Beats sent while the daemon stops queue in its own persistent session, and a start
        # that has them replayed can miss its 10 s connect wait on a loaded machine
        # (a start-up matter of its own, not of the clock): the sensors pause meanwhile.
        paused.set()
        stopping = time.monotonic()
        assert gw.stop() == 0
        gw.start(timeout=60)
        restarted = time.monotonic()
        assert "gateway clock re-anchored to the system clock" in gw.log()
        first_due = min(resend_due, retry_due, escalation_due)
        assert restarted < first_due - 3, ("the restart took too long for this test to tell early from on time",
                                           round(restarted - stopping, 2), round(first_due - restarted, 2))
        probe.close()
        probe = MqttProbe(gw.port, [f"{P}/devices/+/notify"])
        beats.append(probe)
        paused.clear()

        # A new job's created_at is the system clock's (the daemon's, stepped), not the old timeline.
        before = time.time() + step_s
        send_job(probe, "after-restart", "phone-r")
        created = job_created_at(data, "after-restart")
        after = time.time() + step_s
        assert before - 2 <= created <= after + 2, (created - before, step_s)

        # Sensors heard all along fire no stale alarm; one that falls silent fires stale_s later.
        # Started now (its alarm is checked below): the stale watch runs while the timers
        # set before the step come due, not after them.
        while time.monotonic() - restarted < STALE_S + 1:
            time.sleep(0.1)
        alive.discard("s-0")
        silent_at = time.monotonic()

        # The resend comes when it was due before the step: not at the restart, not an hour later.
        resent = wait_count(probe, "phone-r", "resend-me", 1, timeout=WAIT_S + 60)[0]
        assert resend_due - 0.5 <= resent < resend_due + 30, round(resent - resend_due, 2)
        # The escalation goes out after_s after the alarm fired.
        escalated = wait_count(probe, "lead-1", "alarm.door.door-a.2", 1, timeout=WAIT_S + 60)[0]
        assert escalation_due - 0.5 <= escalated < escalation_due + 30, round(escalated - escalation_due, 2)
        # The retry after the 503 waits its Retry-After, no more, no less (sent_at is on the
        # re-anchored clock, the system clock stepped by step_s).
        deadline = retry_due + 60
        while (row := delivery(data, "retry-me"))["attempts"] < 2:
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        retried_real = row["sent_at"] - step_s
        assert retry_due_real - 0.5 <= retried_real < retry_due_real + 30, (round(retried_real - retry_due_real, 2), row)

        # The silent sensor's alarm, stale_s after it fell silent, and no other.
        arrived = wait_count(probe, "tech-1", "alarm.heartbeat.s-0.1", 1, timeout=60)[0]
        assert alarm_job_ids(data, "alarm.heartbeat.") == ["alarm.heartbeat.s-0.1"], gw.log()[-3000:]
        assert arrived - silent_at >= STALE_S - 0.6
    finally:
        beating.set()
        if beater.is_alive():
            beater.join(5)
    probe.close()
    assert gw.stop() == 0
