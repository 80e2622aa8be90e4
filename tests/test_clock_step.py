"""A step of the system clock while the daemon runs neither fires, freezes nor repeats
timers: stale sensors, escalation, resends of unacked deliveries (across a restart:
test_clock_step_restart.py).

The daemon runs under libfaketime (Debian ``faketime``, :mod:`tests.helpers.faketime`): its
offset is read from a file, which the test rewrites to step the
clock mid-run; ``CLOCK_MONOTONIC`` is left alone, as a real step by NTP or an operator
leaves it. Receivers and the test itself run on the real clock.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.timeutil import parse_iso
from tests.helpers.faketime import faketime_env, step
from tests.support import MqttProbe, bulk_register

P = "homepot/site-t"
BEAT_S = 0.25  # each live sensor beats this often
STALE_S = 5.0  # twenty beats missed in a row, even on a loaded machine, is not expected


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


def test_a_timed_wait_under_faketime_waits_its_time(tmp_path: Path):
    """A timed wait on a ``CLOCK_MONOTONIC`` condition variable (how CPython waits for its
    GIL) lasts its time under the tool: returning at once makes every thread that wants the
    GIL spin, and a daemon under libfaketime burns a core's third while idle."""
    code = ("import ctypes, time\n"
            "libc = ctypes.CDLL(None)\n"
            "class Timespec(ctypes.Structure):\n"
            "    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]\n"
            "attr, cond, mutex = (ctypes.create_string_buffer(128) for _ in range(3))\n"
            "assert libc.pthread_condattr_init(attr) == 0\n"
            "assert libc.pthread_condattr_setclock(attr, time.CLOCK_MONOTONIC) == 0\n"
            "assert libc.pthread_cond_init(cond, attr) == 0 and libc.pthread_mutex_init(mutex, None) == 0\n"
            "assert libc.pthread_mutex_lock(mutex) == 0\n"
            "start = time.monotonic()\n"
            "due = time.clock_gettime(time.CLOCK_MONOTONIC) + 0.3\n"
            "rc = libc.pthread_cond_timedwait(cond, mutex, ctypes.byref(Timespec(int(due), int(due % 1 * 1e9))))\n"
            "print(rc, time.monotonic() - start)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**faketime_env(tmp_path / "offset"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rc, waited = out.stdout.split()
    assert int(rc) == errno.ETIMEDOUT and float(waited) >= 0.3 - 0.01, out.stdout


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
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify", f"{P}/devices/+/telemetry/heartbeat"])
    alive = {f"s-{i}" for i in range(10)}
    beating = threading.Event()

    def heartbeats() -> None:  # every sensor in `alive`, every BEAT_S, until the test ends
        while not beating.is_set():
            for s in sorted(alive):
                probe.client.publish(f"{P}/devices/{s}/telemetry/heartbeat", "1", qos=1)
            beating.wait(BEAT_S)

    beater = threading.Thread(target=heartbeats, daemon=True)
    try:
        beater.start()
        # A delivery that is never acked: resent every ack_timeout_s while its 10-minute TTL lasts.
        send_job(probe, "resend-me", "phone-r", ttl=600)
        wait_count(probe, "phone-r", "resend-me", 2, timeout=20)
        # Heard a few times at the old clock (barrier: the broker passed on each sensor's
        # second beat, the gateway's subscription came before the probe's).
        probe.wait_for(lambda _m: all(len(probe.on(f"{P}/devices/s-{i}/telemetry/heartbeat")) >= 2
                                      for i in range(10)), timeout=20)
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
