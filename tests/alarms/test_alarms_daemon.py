"""Sensor alarms through the real daemon: telemetry in over MQTT, notifications out to
independent receivers (MQTT device clients), AlarmState on the broker.

"Nothing arrived" is always shown with a barrier: a later event that the gateway can only
produce after the one that must not happen would have (a later deadline on the same timer
heap, or a job number that proves nothing was submitted in between).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.helpers import cli_in_process as cli  # the operator's commands, in this process: no interpreter start each
from tests.support import MqttProbe, bulk_register, free_port

P = "homepot/site-t"


# ------------------------------------------------------------------ helpers
def mqtt_device(device_id: str, segment: str | None = None) -> dict[str, Any]:
    return {"device_id": device_id, "segment": segment, "channels": [{"platform": "mqtt"}]}


def envelopes(probe: MqttProbe, device: str) -> list[tuple[float, dict]]:
    return [(t, json.loads(p)) for t, _, p, _ in probe.on(f"{P}/devices/{device}/notify")]


def wait_envelope(probe: MqttProbe, device: str, job_id: str, timeout: float = 15) -> tuple[float, dict]:
    def found(_msgs):
        for t, env in envelopes(probe, device):
            if env["job_id"] == job_id:
                return t, env
        return None
    return probe.wait_for(found, timeout)


def states(probe: MqttProbe, rule: str, key: str) -> list[dict]:
    return [json.loads(p) for _, _, p, _ in probe.on(f"{P}/alarms/{rule}/{key}") if p]


def wait_state(probe: MqttProbe, rule: str, key: str, state: str, timeout: float = 15, **match: Any) -> dict:
    def found(_msgs):
        for s in reversed(states(probe, rule, key)):
            if s["state"] == state and all(s.get(k) == v for k, v in match.items()):
                return s
        return None
    return probe.wait_for(found, timeout)


MS = 0.002  # ISO times carry milliseconds: allow for the truncation of both ends


def iso_ts(text: str) -> float:
    from gateway.timeutil import parse_iso

    return parse_iso(text).timestamp()


def alarm_jobs(data_dir: Path, prefix: str) -> list[dict]:
    from gateway.pipeline import jobs as pipeline_jobs
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        rows = conn.execute("SELECT job_id, target, notification FROM jobs WHERE job_id LIKE ? ORDER BY created_at",
                            (prefix + "%",)).fetchall()
        return [{"job_id": r[0], "target": json.loads(r[1]), "notification": json.loads(r[2]),
                 "status": pipeline_jobs.job_status(conn, r[0])} for r in rows]
    finally:
        conn.close()


def alarm_list(data_dir: Path) -> list[dict]:
    from gateway.alarms import store
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        return store.list_states(conn)
    finally:
        conn.close()


def ack(probe: MqttProbe, device: str, message_id: str, status: str) -> None:
    """The device answers on its ack topic, as an MQTT device client does (contract §9)."""
    probe.publish(f"{P}/devices/{device}/ack",
                  json.dumps({"message_id": message_id, "status": status, "at": "2030-01-01T00:00:00Z"}))


# ------------------------------------------------------------------ threshold, debounce, hysteresis, clear
def test_threshold_with_debounce_hysteresis_and_clear(gateway_factory, tmp_path: Path):
    rule = {"name": "freezer-high", "topic": "{prefix}/devices/+/telemetry/temp", "value": "celsius",
            "above": -15.0, "clear_at": -17.0, "for_s": 1.0, "key": "{device_id}",
            "target": {"segment": "technicians"}, "title": "Freezer {device_id} at {value} C",
            "body": "Above -15 C for a second", "priority": "critical"}
    gw = gateway_factory({"rules": [rule]})
    bulk_register(tmp_path / "var", [mqtt_device("tech-1", "technicians")])
    probe = MqttProbe(gw.port, [f"{P}/alarms/#", f"{P}/devices/+/notify"])
    temp = lambda dev, c: probe.publish(f"{P}/devices/{dev}/telemetry/temp", json.dumps({"celsius": c}))  # noqa: E731

    # fz-2 warms up for less than for_s: debounce, never fires.
    temp("fz-2", -14.0)
    temp("fz-2", -15.5)
    # fz-1 warms up and stays warm.
    t0 = time.monotonic()
    temp("fz-1", -14.0)
    pending = wait_state(probe, "freezer-high", "fz-1", "pending")
    assert pending["fired_at"] is None and pending["value"] == -14 and pending["jobs"] == []
    arrived, env = wait_envelope(probe, "tech-1", "alarm.freezer-high.fz-1.1")
    assert arrived - t0 >= 1.0, "fired before for_s had passed"
    assert env["title"] == "Freezer fz-1 at -14 C" and env["body"] == "Above -15 C for a second"
    assert env["priority"] == "critical"
    assert env["data"] == {"alarm_rule": "freezer-high", "alarm_key": "fz-1", "alarm_event": "fired", "value": "-14"}
    firing = wait_state(probe, "freezer-high", "fz-1", "firing")
    assert iso_ts(firing["fired_at"]) - iso_ts(pending["since"]) >= 1.0 - MS
    assert firing["jobs"] == ["alarm.freezer-high.fz-1.1"] and firing["escalation_step"] == 0
    # Barrier: fz-2's for_s would have ended before fz-1's did.
    # The state topic is retained and carries the latest state: a 'pending' that is cleared
    # before the publisher ran may be replaced by the 'cleared' one, never by 'firing'.
    fz2 = [s["state"] for s in states(probe, "freezer-high", "fz-2")]
    assert fz2 and fz2[-1] == "cleared" and set(fz2) <= {"pending", "cleared"}, fz2
    assert not [e for _, e in envelopes(probe, "tech-1") if "fz-2" in e["job_id"]]

    # A sensor flapping around the threshold, inside the hysteresis band: nothing is sent.
    for c in (-16.0, -14.0, -16.9, -15.2, -13.0, -16.5, -17.0 + 1e-9):
        temp("fz-1", c)
    temp("fz-1", -17.5)  # at/below clear_at: cleared
    _, cleared = wait_envelope(probe, "tech-1", "alarm.freezer-high.fz-1.2")
    # Job number 2 is the clearing one: nothing was submitted while the sensor flapped.
    assert cleared["title"] == "Cleared: Freezer fz-1 at -17.5 C" and cleared["priority"] == "normal"
    assert cleared["data"]["alarm_event"] == "cleared"
    assert [e["job_id"] for _, e in envelopes(probe, "tech-1")] == ["alarm.freezer-high.fz-1.1",
                                                                      "alarm.freezer-high.fz-1.2"]
    final = wait_state(probe, "freezer-high", "fz-1", "cleared")
    assert final["value"] == -17.5 and final["jobs"] == ["alarm.freezer-high.fz-1.1", "alarm.freezer-high.fz-1.2"]
    assert [s["state"] for s in states(probe, "freezer-high", "fz-1")] == ["pending", "firing", "cleared"]

    listed = json.loads(cli(gw.config, "alarms", "list", "--json").stdout)
    assert [(a["key"], a["state"]) for a in listed] == [("fz-1", "cleared"), ("fz-2", "cleared")]
    assert listed[0] == final
    probe.close()
    assert gw.stop() == 0


# ------------------------------------------------------------------ stale sensor
def test_stale_sensor_fires_and_clears_when_heard_from(gateway_factory, tmp_path: Path):
    rule = {"name": "heartbeat", "topic": "{prefix}/devices/+/telemetry/heartbeat", "stale_s": 1.0,
            "key": "{device_id}", "target": {"devices": ["tech-1"]}, "title": "{device_id} is silent"}
    gw = gateway_factory({"rules": [rule]})
    bulk_register(tmp_path / "var", [mqtt_device("tech-1")])
    probe = MqttProbe(gw.port, [f"{P}/alarms/#", f"{P}/devices/+/notify"])
    beat = lambda dev: probe.publish(f"{P}/devices/{dev}/telemetry/heartbeat", "1")  # noqa: E731

    t1 = time.monotonic()
    beat("s-1")  # then silent
    last_s2 = 0.0
    while time.monotonic() - t1 < 2.0:  # s-2 stays alive
        beat("s-2")
        last_s2 = time.monotonic()
        time.sleep(0.2)
    arrived, env = wait_envelope(probe, "tech-1", "alarm.heartbeat.s-1.1")
    assert arrived - t1 >= 1.0 and env["title"] == "s-1 is silent"
    assert env["data"]["alarm_event"] == "fired"
    # s-2 went silent only now: its alarm comes stale_s after its last heartbeat, never before.
    arrived2, _ = wait_envelope(probe, "tech-1", "alarm.heartbeat.s-2.1")
    assert arrived2 - last_s2 >= 1.0
    assert len([e for _, e in envelopes(probe, "tech-1") if e["job_id"].startswith("alarm.heartbeat.s-2.")]) == 1

    beat("s-1")  # heard from again
    _, cleared = wait_envelope(probe, "tech-1", "alarm.heartbeat.s-1.2")
    assert cleared["title"] == "Cleared: s-1 is silent"
    state = wait_state(probe, "heartbeat", "s-1", "cleared")
    assert state["jobs"] == ["alarm.heartbeat.s-1.1", "alarm.heartbeat.s-1.2"]
    probe.close()
    assert gw.stop() == 0


# ------------------------------------------------------------------ escalation and opened acks
def test_escalation_when_nobody_opens_and_none_once_someone_does(gateway_factory, tmp_path: Path):
    rule = {"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
            "target": {"segment": "technicians"}, "title": "Door {device_id} is {value}",
            "escalate": [{"after_s": 1.5, "target": {"segment": "shift-leads"}}]}
    gw = gateway_factory({"rules": [rule]})
    bulk_register(tmp_path / "var", [mqtt_device("tech-1", "technicians"), mqtt_device("lead-1", "shift-leads")])
    probe = MqttProbe(gw.port, [f"{P}/alarms/#", f"{P}/devices/+/notify"])
    door = lambda dev, v: probe.publish(f"{P}/devices/{dev}/telemetry/door", v)  # noqa: E731

    door("door-a", "open")
    _, env_a = wait_envelope(probe, "tech-1", "alarm.door.door-a.1")
    fired_a = iso_ts(wait_state(probe, "door", "door-a", "firing")["fired_at"])
    # The phone got it and showed it; nobody opened it: that is no acknowledgement.
    ack(probe, "tech-1", env_a["message_id"], "received")
    ack(probe, "tech-1", env_a["message_id"], "displayed")

    door("door-b", "open")
    _, env_b = wait_envelope(probe, "tech-1", "alarm.door.door-b.1")
    ack(probe, "tech-1", env_b["message_id"], "opened")
    acked = wait_state(probe, "door", "door-b", "acknowledged")
    assert acked["acknowledged_by"] == "mqtt:tech-1" and acked["escalation_step"] == 0

    door("door-c", "open")  # fires after door-b was acknowledged: the barrier for door-b's escalation

    _, esc_a = wait_envelope(probe, "lead-1", "alarm.door.door-a.2")
    assert esc_a["title"] == "Door door-a is open" and esc_a["data"]["alarm_event"] == "escalated"
    assert iso_ts(esc_a["sent_at"]) >= fired_a + 1.5 - MS
    assert wait_state(probe, "door", "door-a", "firing", escalation_step=1)["jobs"] == [
        "alarm.door.door-a.1", "alarm.door.door-a.2"]
    wait_envelope(probe, "lead-1", "alarm.door.door-c.2")
    assert not [e for _, e in envelopes(probe, "lead-1") if e["job_id"].startswith("alarm.door.door-b.")]
    assert [s["state"] for s in states(probe, "door", "door-b")] == ["firing", "acknowledged"]

    # Clearing tells everyone notified: door-a's technicians and the shift lead it escalated to.
    door("door-a", "closed")
    _, clear_tech = wait_envelope(probe, "tech-1", "alarm.door.door-a.3")
    _, clear_lead = wait_envelope(probe, "lead-1", "alarm.door.door-a.3")
    assert clear_tech["title"] == clear_lead["title"] == "Cleared: Door door-a is closed"
    # door-b never escalated: its clearing goes to the technicians only.
    door("door-b", "closed")
    door("door-c", "closed")
    _, _ = wait_envelope(probe, "tech-1", "alarm.door.door-b.2")
    wait_envelope(probe, "lead-1", "alarm.door.door-c.3")  # barrier: door-b's clearing was submitted earlier
    assert not [e for _, e in envelopes(probe, "lead-1") if e["job_id"].startswith("alarm.door.door-b.")]
    jobs = {j["job_id"]: j for j in alarm_jobs(tmp_path / "var", "alarm.door.door-b.")}
    assert jobs["alarm.door.door-b.2"]["target"] == {"segment": "technicians"}
    assert wait_state(probe, "door", "door-b", "cleared")["acknowledged_by"] == "mqtt:tech-1"
    probe.close()
    assert gw.stop() == 0


# ------------------------------------------------------------------ operators: CLI and MQTT acks, ACL
def test_operator_acks_by_cli_and_mqtt_stop_escalation(gateway_factory, tmp_path: Path):
    rule = {"name": "smoke", "topic": "{prefix}/devices/+/telemetry/smoke", "value": "detected", "equals": True,
            "key": "{device_id}", "target": {"segment": "technicians"},
            "escalate": [{"after_s": 5.0, "target": {"devices": ["lead-1"]}}]}
    port, tech_port = free_port(), free_port()
    listeners = [{"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
                  "anonymous_role": "admin"},
                 {"name": "shop", "type": "tcp", "bind": f"127.0.0.1:{tech_port}", "allow_anonymous": True,
                  "anonymous_role": "technician"}]
    gw = gateway_factory({"rules": [rule], "broker": {"listeners": listeners}}, port=port)
    bulk_register(tmp_path / "var", [{"device_id": "tech-1", "segment": "technicians",
                                      "channels": [{"platform": "simulation"}]}, mqtt_device("lead-1")])
    probe = MqttProbe(gw.port, [f"{P}/alarms/#", f"{P}/devices/+/notify", f"{P}/gateway/errors"])
    smoke = lambda dev, v: probe.publish(f"{P}/devices/{dev}/telemetry/smoke", json.dumps({"detected": v}))  # noqa: E731

    smoke("k1", True)
    smoke("k2", True)
    wait_state(probe, "smoke", "k1", "firing")
    wait_state(probe, "smoke", "k2", "firing")

    res = cli(gw.config, "alarms", "ack", "smoke", "k1", "--by", "alice", "--note", "on my way")
    assert res.returncode == 0, res.stderr
    assert "acknowledged by cli:alice" in res.stdout
    assert wait_state(probe, "smoke", "k1", "acknowledged")["acknowledged_by"] == "cli:alice"

    # A technician may publish the ack topic (default ACL).
    tech = MqttProbe(tech_port)
    tech.publish(f"{P}/alarms/smoke/k2/ack", json.dumps({"by": "bob", "note": "checked, a toaster"}))
    assert wait_state(probe, "smoke", "k2", "acknowledged")["acknowledged_by"] == "alarm-topic:bob"
    # Bad and unknown acks are answered on P/gateway/errors and change nothing.
    tech.publish(f"{P}/alarms/smoke/k2/ack", json.dumps({"by": 5}))
    tech.publish(f"{P}/alarms/smoke/nope/ack", json.dumps({"by": "carol"}))
    errors = probe.wait_for(lambda m: len(probe.on(f"{P}/gateway/errors")) >= 2 and probe.on(f"{P}/gateway/errors"))
    codes = [json.loads(p)["error"] for _, _, p, _ in errors]
    assert codes[0]["code"] == "invalid_alarm_ack" and codes[0]["message"].startswith("by:")
    assert codes[1]["code"] == "unknown_alarm"
    tech.close()

    smoke("k3", True)  # fires after both acks: the barrier
    wait_envelope(probe, "lead-1", "alarm.smoke.k3.2")
    assert [e["job_id"] for _, e in envelopes(probe, "lead-1")] == ["alarm.smoke.k3.2"]
    assert [j["job_id"] for j in alarm_jobs(tmp_path / "var", "alarm.smoke.k1.")] == ["alarm.smoke.k1.1"]
    assert [j["job_id"] for j in alarm_jobs(tmp_path / "var", "alarm.smoke.k2.")] == ["alarm.smoke.k2.1"]
    listed = alarm_list(tmp_path / "var")
    assert [(a["key"], a["state"], a["acknowledged_by"]) for a in listed] == [
        ("k1", "acknowledged", "cli:alice"), ("k2", "acknowledged", "alarm-topic:bob"), ("k3", "firing", None)]
    assert listed[2]["escalation_step"] == 1 and listed[2]["jobs"] == ["alarm.smoke.k3.1", "alarm.smoke.k3.2"]
    probe.close()
    assert gw.stop() == 0
