"""Alarm rules and their escalation steps that target people, against the real daemon
(contract §11, §12): the person who muted the rule is suppressed, the one in quiet hours is
held unless the rule's priority reaches their bypass, the escalation reaches its person, and
an `opened` ack by a person acknowledges the alarm and stops the escalation."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import MqttProbe, bulk_register, db_rows, wait_until
from tests.people.test_quiet_daemon import put_persons

P = "homepot/site-t"
ALL_DAY = [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "00:00", "to": "12:00"},
           {"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "from": "12:00", "to": "00:00"}]


def mqtt(device_id: str) -> dict:
    return {"device_id": device_id, "channels": [{"platform": "mqtt"}]}


def notified(probe: MqttProbe, device: str, job_id: str) -> list[dict]:
    return [e for _, _, p, _ in probe.on(f"{P}/devices/{device}/notify") if (e := json.loads(p))["job_id"] == job_id]


def alarm_state(probe: MqttProbe) -> dict | None:
    found = [json.loads(p) for _, _, p, _ in probe.on(f"{P}/alarms/door/d1") if p]
    return found[-1] if found else None


def test_an_alarm_reaches_people_and_a_persons_opened_ack_acknowledges_it(gateway_factory, tmp_path: Path):
    rule = {"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
            "target": {"people": ["ben", "dora", "mia"]}, "priority": "high",
            "escalate": [{"after_s": 1, "target": {"people": ["carl"]}}, {"after_s": 60, "target": {"people": ["carl"]}}]}
    gw = gateway_factory({"rules": [rule]}, start=False)
    data = tmp_path / "var"
    bulk_register(data, [mqtt(d) for d in ("ben-phone", "dora-phone", "mia-phone", "carl-phone")])
    put_persons(data, [
        {"person_id": "ben", "devices": ["ben-phone"], "quiet_hours": ALL_DAY, "bypass_priority": "high"},
        {"person_id": "dora", "devices": ["dora-phone"], "quiet_hours": ALL_DAY},  # bypass: critical only
        {"person_id": "mia", "devices": ["mia-phone"], "muted": {"rules": ["door"]}},
        {"person_id": "carl", "devices": ["carl-phone"]},
    ])
    gw.start()
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify", f"{P}/alarms/#"])
    probe.publish(f"{P}/devices/d1/telemetry/door", "open")

    # Ben is in quiet hours, but the rule's priority (high) is his bypass: he gets it.
    page = wait_until(lambda: notified(probe, "ben-phone", "alarm.door.d1.1"), timeout=15)[0]
    rows = wait_until(lambda: (r := dict((d, (s, e)) for d, s, e in db_rows(
        data, "SELECT device_id, state, last_error FROM deliveries WHERE job_id = 'alarm.door.d1.1'")))
        and r.get("mia-phone", ("",))[0] == "suppressed" and (r.get("dora-phone") or (0, None))[1] and r, timeout=10)
    assert rows["mia-phone"] == ("suppressed", "muted by mia: alarm rule door")
    assert rows["dora-phone"][0] == "queued" and rows["dora-phone"][1].startswith("quiet hours until "), rows
    # Unacknowledged: the first escalation step reaches Carl.
    wait_until(lambda: notified(probe, "carl-phone", "alarm.door.d1.2"), timeout=15)
    # Ben opens it: the alarm is acknowledged by his device, escalation stops.
    probe.publish(f"{P}/devices/ben-phone/ack", json.dumps({"message_id": page["message_id"], "status": "opened"}))
    state = wait_until(lambda: (s := alarm_state(probe)) and s["state"] == "acknowledged" and s, timeout=15)
    assert state["acknowledged_by"] == "mqtt:ben-phone" and state["escalation_step"] == 1, state
    assert db_rows(data, "SELECT people_reached FROM jobs WHERE job_id = 'alarm.door.d1.1'") == [(1,)]
    # The alarm clears: "Cleared" goes to everyone notified; Mia's is suppressed again.
    probe.publish(f"{P}/devices/d1/telemetry/door", "closed")
    cleared = wait_until(lambda: [j for (j,) in db_rows(data, "SELECT job_id FROM alarm_jobs WHERE kind = 'clear'")],
                         timeout=15)[0]
    wait_until(lambda: db_rows(data, "SELECT state FROM deliveries WHERE job_id = ? AND device_id = 'mia-phone'",
                               cleared) == [("suppressed",)], timeout=10)
    wait_until(lambda: notified(probe, "carl-phone", cleared), timeout=10)
    # Clearing jobs are `normal`: below Ben's bypass, so his waits for the end of his quiet hours.
    ben = wait_until(lambda: db_rows(data, "SELECT state, last_error FROM deliveries WHERE job_id = ? "
                                           "AND device_id = 'ben-phone' AND last_error IS NOT NULL", cleared), timeout=10)
    assert ben == [("queued", "quiet hours until further notice (the windows cover the whole week)")], ben
    probe.close()
    assert gw.stop() == 0
