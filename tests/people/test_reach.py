"""Reaching a person (contract §12) against the real daemon, with MQTT devices as real paho
clients: the first device at once, the next after ``reach_after_s`` without an ack, none
after the first ack; kill -9 in the middle of a step; removing a person or a device.
The operator's commands run in this process (tests.helpers.cli_in_process: the same code,
without an interpreter start per command); the daemon is a real process."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest

from tests.helpers import bulk_register, db_rows, job_status_from_db, put_persons, wait_until
from tests.helpers import cli_in_process as cli
from tests.pipeline.devices import MqttDevice, close_all


class TimedDevice(MqttDevice):
    """An MQTT device that also notes when (monotonic) each envelope arrived, and may run
    a hook on its first one (from paho's thread)."""

    def __init__(self, *args: Any, on_first: Any = None, **kw: Any):
        self.times: list[float] = []
        self.on_first = on_first
        super().__init__(*args, **kw)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.times.append(time.monotonic())
        if len(self.times) == 1 and self.on_first is not None:
            self.on_first()
        super()._on_message(client, userdata, msg)

    def message_ids(self) -> set[str]:
        return {e["message_id"] for e in list(self.received)}


def register(gw: Any, *device_ids: str) -> None:
    """MQTT devices in the registry, as `devices add --platform mqtt` puts them (same store code)."""
    bulk_register(gw.runtime_dir(), [{"device_id": d, "channels": [{"platform": "mqtt"}]} for d in device_ids])


def send(gw: Any, job_id: str, *people: str, ttl: int = 600) -> None:
    args = [a for p in people for a in ("--person", p)]
    res = cli(gw.config, "send", "--title", "Freezer 3 at -9 C", "--job-id", job_id, "--ttl", str(ttl), *args)
    assert res.returncode == 0, res.stderr


def deliveries(gw: Any, job_id: str) -> dict[str, tuple[str, str | None]]:
    """device_id → (state, last_error) of the job's rows."""
    return {r[0]: (r[1], r[2]) for r in db_rows(gw.runtime_dir(), "SELECT device_id, state, last_error FROM deliveries "
                                                "WHERE job_id = ?", job_id)}


def test_devices_are_tried_in_order_and_the_first_ack_stops_the_reach(gateway_factory):
    # 3 s a turn: the tablet's ack has that long to be recorded before the browser's turn,
    # even on a loaded machine.
    gw = gateway_factory({"people": {"reach_after_s": 3}})
    register(gw, "anna-phone", "anna-tablet", "anna-browser")
    put_persons(gw.runtime_dir(), [{"person_id": "anna", "devices": ["anna-phone", "anna-tablet", "anna-browser"]}])
    phone = TimedDevice(gw.port, "anna-phone", auto_ack=False)  # off in a pocket: never acks
    tablet = TimedDevice(gw.port, "anna-tablet")
    browser = TimedDevice(gw.port, "anna-browser")
    try:
        t0 = time.monotonic()
        send(gw, "reach-1", "anna")
        status = wait_until(lambda: (s := job_status_from_db(gw.runtime_dir(), "reach-1")) and s["state"] == "acknowledged"
                            and s, timeout=40, what="anna reached")
        assert status["people"] == {"targets": 1, "reached": 1, "held": 0}
        assert status["counts"]["targets"] == 2 and status["counts"]["acknowledged"] == 1 and status["counts"]["sent"] == 1
        assert phone.times and tablet.times and not browser.times
        # The tablet's turn came a reach_after_s after the job, not before (t0 is before the
        # job was even sent; the phone's own receipt may lag its send under load).
        assert tablet.times[0] - t0 >= 3.0, (t0, phone.times, tablet.times)
        # The browser's step was withdrawn with the ack: it can never be sent.
        assert set(deliveries(gw, "reach-1")) == {"anna-phone", "anna-tablet"}
        reached = db_rows(gw.runtime_dir(), "SELECT state, reached_by FROM job_people WHERE job_id = 'reach-1'")
        assert reached == [("reached", "anna-tablet")]
        shown = cli(gw.config, "jobs", "show", "reach-1").stdout
        assert "people: targets=1  reached=1  held=0" in shown and "anna  reached by anna-tablet" in shown
        assert not browser.times and len(phone.message_ids()) == 1
    finally:
        close_all([phone, tablet, browser])


def test_a_waiting_step_says_why_and_a_removed_person_ends_it_with_a_reason(gateway_factory):
    gw = gateway_factory({"people": {"reach_after_s": 60}})
    register(gw, "ben-phone", "ben-browser")
    put_persons(gw.runtime_dir(), [{"person_id": "ben", "devices": ["ben-phone", "ben-browser"]}])
    phone = TimedDevice(gw.port, "ben-phone", auto_ack=False)
    try:
        send(gw, "reach-2", "ben")
        wait_until(lambda: phone.times, timeout=40, what="ben's phone got it")
        shown = json.loads(cli(gw.config, "jobs", "show", "reach-2", "--deliveries", "--json").stdout)
        rows = {d["device_id"]: d for d in shown["deliveries"]}
        assert rows["ben-browser"]["state"] == "queued" and rows["ben-browser"]["person_id"] == "ben"
        assert rows["ben-browser"]["reason"].startswith("waiting for the person's earlier device until ")
        assert shown["state"] == "dispatching" and shown["people"] == {"targets": 1, "reached": 0, "held": 0}
        removed = cli(gw.config, "people", "remove", "ben")
        assert removed.returncode == 0, removed.stderr
        status = wait_until(lambda: (s := job_status_from_db(gw.runtime_dir(), "reach-2")) and s["state"] == "completed"
                            and s, timeout=40, what="the job completes")
        assert status["counts"]["failed"] == 1 and status["counts"]["queued"] == 0
        assert deliveries(gw, "reach-2")["ben-browser"] == ("failed", "person removed")
        assert db_rows(gw.runtime_dir(), "SELECT state, note FROM job_people WHERE job_id = 'reach-2'") == \
            [("removed", "person removed")]
    finally:
        phone.close()


def test_a_removed_device_fails_with_a_reason_and_the_next_one_is_tried_at_once(gateway_factory):
    gw = gateway_factory({"people": {"reach_after_s": 60}})
    register(gw, "cy-phone", "cy-tablet", "cy-browser")
    # The person's own 5 s: the phone's receipt and the stop below fit in it on a loaded machine.
    put_persons(gw.runtime_dir(), [{"person_id": "cy", "devices": ["cy-phone", "cy-tablet", "cy-browser"],
                                  "reach_after_s": 5}])
    phone = TimedDevice(gw.port, "cy-phone", auto_ack=False)
    browser = TimedDevice(gw.port, "cy-browser")
    try:
        t0 = time.monotonic()
        send(gw, "reach-3", "cy")
        wait_until(lambda: phone.times, timeout=40, what="cy's phone got it")
        # The tablet is removed while its turn waits (the daemon stopped meanwhile, so the
        # turn cannot come between the check and the removal).
        assert gw.stop() == 0
        assert deliveries(gw, "reach-3")["cy-tablet"] == ("queued", None)
        assert cli(gw.config, "devices", "remove", "cy-tablet").returncode == 0
        gw.start()
        status = wait_until(lambda: (s := job_status_from_db(gw.runtime_dir(), "reach-3")) and s["state"] == "acknowledged"
                            and s, timeout=40, what="cy reached on the browser")
        rows = deliveries(gw, "reach-3")
        assert rows["cy-tablet"] == ("failed", "device removed from the registry")
        assert rows["cy-browser"][0] == "acknowledged"
        # The person's own reach_after_s (5 s) wins over [people]'s 60 s, and the removed
        # tablet kept its turn: the browser came after it (handing the turn on at once is
        # shown without timing in test_reach_units.py).
        assert 5.0 <= browser.times[0] - t0 < 60.0, browser.times[0] - t0
        assert status["people"]["reached"] == 1
    finally:
        phone.close()
        browser.close()


@pytest.mark.parametrize("kill_on", ["anna-1", "anna-2"])
def test_kill_9_in_the_middle_of_a_step_neither_repeats_nor_skips_one(gateway_factory, kill_on: str):
    """The daemon is killed (SIGKILL) the instant a device receives its step: its result
    may not be recorded yet. After a restart each device has had exactly one delivery of the
    job (the same message_id, if at least once sent it twice), none came before its turn,
    and the step after it still comes."""
    r = 1.0
    gw = gateway_factory({"people": {"reach_after_s": r}})
    names = ["anna-0", "anna-1", "anna-2", "anna-3"]
    register(gw, *names)
    put_persons(gw.runtime_dir(), [{"person_id": "anna", "devices": names}])
    killed = threading.Event()

    def kill() -> None:
        os.kill(gw.proc.pid, signal.SIGKILL)
        killed.set()

    devices = {n: TimedDevice(gw.port, n, auto_ack=False, on_first=kill if n == kill_on else None) for n in names}
    try:
        t0 = time.monotonic()
        send(gw, "reach-k", "anna")
        assert killed.wait(30), "the kill point never came"
        gw.proc.wait(timeout=10)
        gw.start()
        wait_until(lambda: all(d.times for d in devices.values()), timeout=30, what="every device got its step")
        for k, name in enumerate(names):
            d = devices[name]
            assert len(d.message_ids()) == 1, (name, d.received)
            assert d.times[0] - t0 >= k * r - 0.05, (name, k, d.times[0] - t0)
        rows = db_rows(gw.runtime_dir(), "SELECT device_id, COUNT(*) FROM deliveries WHERE job_id = 'reach-k' GROUP BY 1")
        assert dict(rows) == dict.fromkeys(names, 1)
        status = wait_until(lambda: (s := job_status_from_db(gw.runtime_dir(), "reach-k")) and s["state"] == "completed"
                            and s, timeout=40, what="every step sent")
        assert status["counts"] == {"targets": 4, "queued": 0, "sent": 4, "acknowledged": 0, "failed": 0,
                                    "expired": 0, "invalid_address": 0, "suppressed": 0}
        devices["anna-2"].release()  # an ack, any device, any time: the person is reached
        status = wait_until(lambda: (s := job_status_from_db(gw.runtime_dir(), "reach-k")) and s["state"] == "acknowledged"
                            and s, timeout=40, what="anna reached")
        assert status["people"] == {"targets": 1, "reached": 1, "held": 0}
    finally:
        close_all(list(devices.values()))


def test_a_forward_step_of_the_system_clock_does_not_fire_the_next_turn_early(gateway_factory, tmp_path: Path):
    """The turns are due times on the gateway's clock: a day's jump of the wall clock right
    after the first device got it leaves the next turn reach_after_s later, as it was."""
    from tests.helpers.faketime import faketime_env, step

    offset = tmp_path / "offset"
    gw = gateway_factory({"people": {"reach_after_s": 6}}, env=faketime_env(offset))
    register(gw, "dee-phone", "dee-tablet")
    put_persons(gw.runtime_dir(), [{"person_id": "dee", "devices": ["dee-phone", "dee-tablet"]}])
    phone = TimedDevice(gw.port, "dee-phone", auto_ack=False)
    tablet = TimedDevice(gw.port, "dee-tablet")
    try:
        t0 = time.monotonic()
        send(gw, "reach-step", "dee", ttl=7200)
        wait_until(lambda: phone.times, timeout=40, what="dee's phone got it")
        step(offset, "+1d")
        stepped = time.monotonic()
        wait_until(lambda: tablet.times, timeout=40, what="the tablet's turn")
        # Not at the step (a turn kept on the wall clock would be due at once), but 6 s after
        # the job; the phone's receipt may lag its send by a second or two under load.
        assert tablet.times[0] - t0 >= 6.0 and tablet.times[0] - stepped >= 2.0, \
            (tablet.times[0] - t0, tablet.times[0] - stepped)
        wait_until(lambda: (s := job_status_from_db(gw.runtime_dir(), "reach-step")) and s["state"] == "acknowledged",
                   timeout=40, what=f"dee reached (tablet acks sent: {tablet.acks_published})")
    finally:
        phone.close()
        tablet.close()
