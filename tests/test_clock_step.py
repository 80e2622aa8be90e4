"""A step of the system clock while the daemon runs (and across a restart) neither fires,
freezes nor repeats timers: stale sensors, escalation, resends of unacked deliveries.

The daemon runs under libfaketime (Debian ``faketime``): its offset is read from a file
on every call (``FAKETIME_NO_CACHE``), which the test rewrites to step the clock mid-run;
``CLOCK_MONOTONIC`` is left alone (``FAKETIME_DONT_FAKE_MONOTONIC``), as a real step by
NTP or an operator leaves it. Receivers and the test itself run on the real clock.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.timeutil import parse_iso
from tests.support import MqttProbe, bulk_register, require_tool

P = "homepot/site-t"
STALE_S = 8.0  # heartbeats come every 0.5 s: sixteen missed in a row, even on a loaded machine, is not expected


def faketime_env(offset_file: Path) -> dict[str, str]:
    require_tool("faketime")  # the Debian package that ships libfaketime
    libs = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    if not libs:
        pytest.fail("libfaketime.so.1 not found although faketime is installed", pytrace=False)
    offset_file.write_text("+0\n")
    return {"LD_PRELOAD": libs[0], "FAKETIME_TIMESTAMP_FILE": str(offset_file), "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def step(offset_file: Path, offset: str) -> None:
    """Set the daemon's clock offset (libfaketime syntax: "+1d", "-1h"); atomic rewrite."""
    tmp = offset_file.with_suffix(".new")
    tmp.write_text(offset + "\n")
    tmp.replace(offset_file)


def test_faketime_steps_wall_clock_but_not_monotonic(tmp_path: Path):
    """The tool does what the other tests rely on: time.time() steps, time.monotonic() does not."""
    offset = tmp_path / "offset"
    env = faketime_env(offset)
    code = ("import time, select, sys\n"
            "print(time.time(), time.monotonic(), flush=True)\n"
            "sys.stdin.readline()\n"
            "print(time.time(), time.monotonic(), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**env, "PATH": "/usr/bin:/bin"}, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    wall0, mono0 = map(float, proc.stdout.readline().split())
    step(offset, "+1d")
    proc.stdin.write("\n")
    proc.stdin.flush()
    wall1, mono1 = map(float, proc.stdout.readline().split())
    proc.wait(10)
    assert 86400 - 5 < wall1 - wall0 < 86400 + 5
    assert 0 <= mono1 - mono0 < 5


def mqtt_device(device_id: str, segment: str | None = None) -> dict:
    return {"device_id": device_id, "segment": segment, "channels": [{"platform": "mqtt"}]}


def envelopes(probe: MqttProbe, device: str) -> list[tuple[float, dict]]:
    return [(t, json.loads(p)) for t, _, p, _ in probe.on(f"{P}/devices/{device}/notify")]


def wait_count(probe: MqttProbe, device: str, job_id: str, n: int, timeout: float) -> list[float]:
    """Arrival times (test's monotonic clock) of the first n envelopes of a job."""
    def found(_msgs):
        times = [t for t, e in envelopes(probe, device) if e["job_id"] == job_id]
        return times if len(times) >= n else None
    return probe.wait_for(found, timeout)


def send_job(probe: MqttProbe, job_id: str, device: str, ttl: int = 3600) -> None:
    probe.publish(f"{P}/jobs", json.dumps({"job_id": job_id, "target": {"devices": [device]},
                                           "notification": {"title": job_id, "ttl": ttl}}))


def alarm_job_ids(data_dir: Path, prefix: str) -> list[str]:
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        return [r[0] for r in conn.execute("SELECT job_id FROM jobs WHERE job_id LIKE ? ORDER BY job_id",
                                           (prefix + "%",))]
    finally:
        conn.close()


def delivery(data_dir: Path, job_id: str) -> dict:
    row = delivery_or_none(data_dir, job_id)
    assert row is not None, f"no delivery of {job_id}"
    return row


def delivery_or_none(data_dir: Path, job_id: str) -> dict | None:
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        conn.row_factory = None
        cur = conn.execute("SELECT * FROM deliveries WHERE job_id = ?", (job_id,))
        names = [d[0] for d in cur.description]
        found = cur.fetchone()
        return None if found is None else dict(zip(names, found, strict=True))
    finally:
        conn.close()


@pytest.mark.slow
def test_forward_step_of_a_day_fires_no_stale_alarm_and_expires_no_resend(gateway_factory, tmp_path: Path):
    offset = tmp_path / "offset"
    rule = {"name": "heartbeat", "topic": "{prefix}/devices/+/telemetry/heartbeat", "stale_s": STALE_S,
            "key": "{device_id}", "target": {"devices": ["tech-1"]}, "title": "{device_id} is silent"}
    gw = gateway_factory({"rules": [rule], "dispatch": {"ack_timeout_s": 1.0, "max_attempts": 100}},
                         env=faketime_env(offset))
    bulk_register(tmp_path / "var", [mqtt_device("tech-1"), mqtt_device("phone-r")])
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify"])
    alive = {f"s-{i}" for i in range(10)}
    beating = threading.Event()

    def heartbeats() -> None:  # every sensor in `alive`, every 0.5 s, until the test ends
        while not beating.is_set():
            for s in sorted(alive):
                probe.client.publish(f"{P}/devices/{s}/telemetry/heartbeat", "1", qos=1)
            beating.wait(0.5)

    beater = threading.Thread(target=heartbeats, daemon=True)
    try:
        # A delivery that is never acked: resent every ack_timeout_s while its 10-minute TTL lasts.
        send_job(probe, "resend-me", "phone-r", ttl=600)
        wait_count(probe, "phone-r", "resend-me", 2, timeout=20)
        beater.start()
        time.sleep(2.0)  # heard a few times at the old clock
        step(offset, "+1d")
        stepped = time.monotonic()
        # Resends go on after the step: 3 more, a second apart, none "expired" by the jump.
        before = len(wait_count(probe, "phone-r", "resend-me", 1, 1))
        wait_count(probe, "phone-r", "resend-me", before + 3, timeout=60)
        row = delivery(tmp_path / "var", "resend-me")
        assert row["state"] == "sent" and row["resend_at"] is not None, row
        while time.monotonic() - stepped < STALE_S + 1:  # sensors heard all along
            time.sleep(0.1)
        # Barrier: s-0 falls silent now; its alarm comes stale_s later, after anything the step fired.
        alive.discard("s-0")
        silent_at = time.monotonic()
        arrived = wait_count(probe, "tech-1", "alarm.heartbeat.s-0.1", 1, timeout=60)[0]
        fired = alarm_job_ids(tmp_path / "var", "alarm.heartbeat.")
        assert fired == ["alarm.heartbeat.s-0.1"], (fired, round(arrived - stepped, 2), gw.log()[-3000:])
        # A beat may be in flight when s-0 leaves the set.
        assert arrived - silent_at >= STALE_S - 0.6, ("fired before stale_s had passed", round(arrived - stepped, 2))
    finally:
        beating.set()
        if beater.is_alive():
            beater.join(5)
    probe.close()
    assert gw.stop() == 0


@pytest.mark.slow
def test_backward_step_of_an_hour_freezes_neither_escalation_nor_resends(gateway_factory, tmp_path: Path):
    offset = tmp_path / "offset"
    rule = {"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
            "target": {"segment": "technicians"}, "title": "Door {device_id} is {value}",
            "escalate": [{"after_s": 3.0, "target": {"segment": "shift-leads"}}]}
    env = faketime_env(offset)
    # The simulation bridge answers the first 3 attempts of every delivery 503, Retry-After 2 s.
    gw = gateway_factory({"rules": [rule], "dispatch": {"ack_timeout_s": 1.0, "max_attempts": 100},
                          "bridges": {"simulation": {"latency_ms": 0, "transient_attempts": 3, "retry_after_s": 2.0}}},
                         env=env)
    bulk_register(tmp_path / "var", [mqtt_device("tech-1", "technicians"), mqtt_device("lead-1", "shift-leads"),
                                     mqtt_device("phone-r"), {"device_id": "sim-1", "channels": [{"platform": "simulation"}]}])
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify", f"{P}/alarms/#"])

    send_job(probe, "resend-me", "phone-r", ttl=600)
    send_job(probe, "retry-me", "sim-1", ttl=600)
    wait_count(probe, "phone-r", "resend-me", 2, timeout=20)
    probe.publish(f"{P}/devices/door-a/telemetry/door", "open")
    fired = wait_count(probe, "tech-1", "alarm.door.door-a.1", 1, timeout=15)[0]
    deadline = time.monotonic() + 15
    while (row := delivery(tmp_path / "var", "retry-me"))["attempts"] < 1:  # waiting for its retry
        assert time.monotonic() < deadline, row
        time.sleep(0.05)
    assert row["state"] == "queued", row
    step(offset, "-1h")
    stepped = time.monotonic()
    # Escalation comes after_s after firing, as without the step (not an hour later).
    escalated = wait_count(probe, "lead-1", "alarm.door.door-a.2", 1, timeout=60)[0]
    assert escalated - fired < 3.0 + 30  # not an hour later (a loaded machine adds seconds)
    # On the gateway's own clock, the escalation went out after_s after the alarm fired.
    firing = [json.loads(p) for _, _, p, _ in probe.on(f"{P}/alarms/door/door-a") if p]
    fired_at = next(parse_iso(s["fired_at"]).timestamp() for s in firing if s["state"] == "firing")
    sent_at = next(parse_iso(e["sent_at"]).timestamp() for _, e in envelopes(probe, "lead-1")
                   if e["job_id"] == "alarm.door.door-a.2")
    assert 3.0 - 0.002 <= sent_at - fired_at < 3.0 + 30
    # Resends go on, a second apart.
    before = len(wait_count(probe, "phone-r", "resend-me", 1, 1))
    times = wait_count(probe, "phone-r", "resend-me", before + 3, timeout=60)
    assert times[-1] - stepped < 60, [round(t - stepped, 2) for t in times]
    # The retry backoff is not stretched by an hour either: two more 503s, then accepted.
    deadline = time.monotonic() + 60
    while (row := delivery(tmp_path / "var", "retry-me"))["state"] not in ("sent", "acknowledged"):
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    assert row["attempts"] == 4, row

    assert "system clock stepped" in gw.log()  # noticed while running (logged once)
    assert gw.log().count("system clock stepped") == 1
    # A restart under the stepped clock: stored resend times still mean "in a second".
    assert gw.stop() == 0
    restarted = time.monotonic()
    gw.start()
    before = len(envelopes(probe, "phone-r"))
    wait_count(probe, "phone-r", "resend-me", before + 2, timeout=60)
    assert time.monotonic() - restarted < 60
    assert "gateway clock re-anchored to the system clock" in gw.log()  # and the restart re-anchored
    probe.close()
    assert gw.stop() == 0


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


WAIT_S = 45.0  # resend, retry and escalation timers set before the step: longer than a restart on a loaded machine


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
            beating.wait(0.5)

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
        assert gw.stop() == 0
        gw.start(timeout=60)
        restarted = time.monotonic()
        assert "gateway clock re-anchored to the system clock" in gw.log()
        assert restarted < min(resend_due, retry_due, escalation_due) - 3, \
            "the restart took too long for this test to tell early from on time"
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
