"""``kill -9`` while an alarm waits on a timer: after the restart it fires exactly once, and
its escalation goes out at the time it was due, as seen by independent device agents
(separate processes with persistent sessions that outlive the gateway)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.alarms.test_alarms_daemon import MS, P, alarm_jobs, iso_ts, states, wait_state
from tests.support import ROOT, MqttProbe


class Agent:
    """``python -m devices.agent``: registers, receives its notify topic, acks ``received``."""

    def __init__(self, tmp_path: Path, port: int, device_id: str):
        self.out = tmp_path / f"agent-{device_id}.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devices.agent", "--device-id", device_id, "--url", f"mqtt://127.0.0.1:{port}",
             "--prefix", P, "--register"], stdout=open(self.out, "w"), stderr=subprocess.STDOUT, cwd=ROOT)

    def lines(self) -> list[dict]:
        out = []
        for line in self.out.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == "ready" for e in self.lines()):
                return
            time.sleep(0.05)
        raise TimeoutError(self.out.read_text())

    def envelopes(self) -> list[dict]:
        return [e["envelope"] for e in self.lines() if e.get("event") == "notify"]

    def wait_job(self, job_id: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for env in self.envelopes():
                if env["job_id"] == job_id:
                    return env
            time.sleep(0.05)
        raise TimeoutError(f"{job_id} never reached the agent; got {[e['job_id'] for e in self.envelopes()]}")

    def message_ids(self, job_id: str) -> set[str]:
        return {e["message_id"] for e in self.envelopes() if e["job_id"] == job_id}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def wait_registered(tmp_path: Path, *device_ids: str, timeout: float = 15) -> None:
    from gateway.storage import connect

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = connect(tmp_path / "var" / "gateway.db")
        try:
            found = {r[0] for r in conn.execute("SELECT device_id FROM devices")}
        finally:
            conn.close()
        if set(device_ids) <= found:
            return
        time.sleep(0.05)
    raise TimeoutError(f"devices {device_ids} not registered")


@pytest.mark.slow
def test_kill_9_during_for_s_fires_exactly_once_after_restart(gateway_factory, tmp_path: Path):
    rule = {"name": "pressure", "topic": "{prefix}/devices/+/telemetry/pressure", "above": 50.0, "for_s": 2.5,
            "key": "{device_id}", "target": {"devices": ["plc-1"]}, "title": "{device_id} at {value} bar"}
    gw = gateway_factory({"rules": [rule]})
    agent = Agent(tmp_path, gw.port, "plc-1")
    try:
        agent.wait_ready()
        wait_registered(tmp_path, "plc-1")
        probe = MqttProbe(gw.port, [f"{P}/alarms/#"])
        probe.publish(f"{P}/devices/p-1/telemetry/pressure", "60")  # PUBACKed: pending is on disk
        pending = wait_state(probe, "pressure", "p-1", "pending")
        probe.close()
        gw.proc.kill()  # kill -9 in the middle of for_s
        gw.proc.wait(timeout=10)
        gw.start()
        ready_at = time.time()
        probe = MqttProbe(gw.port, [f"{P}/alarms/#"])
        firing = wait_state(probe, "pressure", "p-1", "firing")
        due = iso_ts(pending["since"]) + 2.5
        assert due - MS <= iso_ts(firing["fired_at"]) <= max(due, ready_at) + 3.0
        env = agent.wait_job("alarm.pressure.p-1.1")
        assert env["title"] == "p-1 at 60 bar"
        probe.publish(f"{P}/devices/p-1/telemetry/pressure", "40")
        agent.wait_job("alarm.pressure.p-1.2")  # the clearing: every earlier job has arrived
        assert len(agent.message_ids("alarm.pressure.p-1.1")) == 1
        assert [j["job_id"] for j in alarm_jobs(tmp_path / "var", "alarm.pressure.")] == [
            "alarm.pressure.p-1.1", "alarm.pressure.p-1.2"]
        assert [s["state"] for s in states(probe, "pressure", "p-1")][-1] == "cleared"
        probe.close()
        assert gw.stop() == 0
        assert "Traceback" not in gw.log()
    finally:
        agent.stop()


@pytest.mark.slow
def test_kill_9_during_escalation_resumes_it_on_time(gateway_factory, tmp_path: Path):
    rule = {"name": "pressure", "topic": "{prefix}/devices/+/telemetry/pressure", "above": 50.0,
            "key": "{device_id}", "target": {"devices": ["plc-1"]},
            "escalate": [{"after_s": 3.0, "target": {"devices": ["lead-1"]}}]}
    gw = gateway_factory({"rules": [rule]})
    plc, lead = Agent(tmp_path, gw.port, "plc-1"), Agent(tmp_path, gw.port, "lead-1")
    try:
        plc.wait_ready()
        lead.wait_ready()
        wait_registered(tmp_path, "plc-1", "lead-1")
        probe = MqttProbe(gw.port, [f"{P}/alarms/#"])
        probe.publish(f"{P}/devices/p-1/telemetry/pressure", "70")
        fired_at = iso_ts(wait_state(probe, "pressure", "p-1", "firing")["fired_at"])
        probe.close()
        gw.proc.kill()  # kill -9 while the escalation is pending (and the firing job perhaps in flight)
        gw.proc.wait(timeout=10)
        killed_at = time.time()
        assert killed_at < fired_at + 3.0, "too slow to kill before the escalation was due"
        gw.start()
        ready_at = time.time()  # a restart on a loaded machine can outlast the escalation's due time
        plc.wait_job("alarm.pressure.p-1.1")
        env = lead.wait_job("alarm.pressure.p-1.2")
        sent = iso_ts(env["sent_at"])
        # Not early, and when due or as soon as the restarted daemon is ready, whichever is later.
        assert fired_at + 3.0 - MS <= sent <= max(fired_at + 3.0, ready_at) + 3.0, (fired_at, ready_at, sent)
        probe = MqttProbe(gw.port, [f"{P}/alarms/#"])
        state = wait_state(probe, "pressure", "p-1", "firing", escalation_step=1)
        assert state["jobs"] == ["alarm.pressure.p-1.1", "alarm.pressure.p-1.2"]
        probe.publish(f"{P}/devices/p-1/telemetry/pressure", "10")
        lead.wait_job("alarm.pressure.p-1.3")  # clearing, to both
        plc.wait_job("alarm.pressure.p-1.3")
        assert len(plc.message_ids("alarm.pressure.p-1.1")) == 1
        assert len(lead.message_ids("alarm.pressure.p-1.2")) == 1
        assert [j["job_id"] for j in alarm_jobs(tmp_path / "var", "alarm.pressure.")] == [
            "alarm.pressure.p-1.1", "alarm.pressure.p-1.2", "alarm.pressure.p-1.3"]
        probe.close()
        assert gw.stop() == 0
        assert "Traceback" not in gw.log()
    finally:
        plc.stop()
        lead.stop()
