"""The pipeline through the running daemon: real process, real broker, real clients."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway import stats
from tests.conftest import needs_mosquitto_clients
from tests.helpers import cli_in_process as cli  # the operator's commands, in this process: no interpreter start each
from tests.support import ROOT, MqttProbe, bulk_register, job_status_from_db

P = "homepot/site-t"


def sim_devices(n: int, prefix: str = "sim", segment: str | None = None) -> list[dict]:
    return [{"device_id": f"{prefix}-{i:05}", "segment": segment, "channels": [{"platform": "simulation"}]}
            for i in range(n)]


def final_status(probe: MqttProbe, job_id: str, state: str = "acknowledged", timeout: float = 60) -> dict:
    def done(msgs):
        for _, topic, payload, _ in reversed(msgs):
            if topic == f"{P}/jobs/{job_id}/status":
                status = json.loads(payload)
                if status["state"] == state:
                    return status
        return None
    return probe.wait_for(done, timeout)


def test_10000_simulated_devices_complete_with_exact_counts(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "ack": True}},
                          "dispatch": {"batch_size": 500}})
    bulk_register(tmp_path / "var", sim_devices(10_000))
    probe = MqttProbe(gw.port, [f"{P}/jobs/+/status"])
    t0 = time.monotonic()
    res = cli(gw.config, "send", "--title", "Config update", "--body", "2.1.0", "--all", "--yes", "--job-id", "big-1",
              "--wait", "--timeout", "120")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "big-1"
    status = final_status(probe, "big-1")
    elapsed = time.monotonic() - t0
    assert status["counts"] == {"targets": 10_000, "queued": 0, "sent": 0, "acknowledged": 10_000, "failed": 0,
                                "expired": 0, "invalid_address": 0, "suppressed": 0}
    # Status was throttled: far fewer snapshots than deliveries.
    assert len(probe.on(f"{P}/jobs/big-1/status")) <= elapsed + 3
    shown = json.loads(cli(gw.config, "jobs", "show", "big-1", "--json").stdout)
    assert shown["state"] == "acknowledged" and shown["counts"]["acknowledged"] == 10_000
    probe.close()
    assert gw.stop() == 0


@needs_mosquitto_clients
def test_mqtt_devices_receive_and_ack(gateway_factory, tmp_path: Path):
    gw = gateway_factory()
    agent_log = open(tmp_path / "agent.out", "w+")
    agent = subprocess.Popen([sys.executable, "-m", "devices.agent", "--device-id", "plc-1", "--url",
                              f"mqtt://127.0.0.1:{gw.port}", "--prefix", P, "--register", "--count", "1"],
                             stdout=agent_log, stderr=subprocess.STDOUT, cwd=ROOT)
    assert cli(gw.config, "devices", "add", "term-2", "--platform", "mqtt").returncode == 0
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(gw.port), "-q", "1", "-c", "-i", "term-2",
                            "-t", f"{P}/devices/term-2/notify", "-C", "1", "-W", "30"], stdout=subprocess.PIPE, text=True)
    probe = MqttProbe(gw.port, [f"{P}/jobs/+/status"])
    deadline = time.monotonic() + 10
    while "ready" not in (tmp_path / "agent.out").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    res = cli(gw.config, "send", "--title", "Hi", "--body", "PLC", "--data", "recipe=7", "--device", "plc-1",
              "--device", "term-2", "--priority", "high", "--job-id", "mq-1")
    assert res.returncode == 0, res.stderr
    out, _ = sub.communicate(timeout=30)
    envelope = json.loads(out)
    assert envelope["job_id"] == "mq-1" and envelope["title"] == "Hi" and envelope["data"] == {"recipe": "7"}
    assert envelope["priority"] == "high" and envelope["sent_at"].endswith("Z") and envelope["expires_at"].endswith("Z")
    assert agent.wait(timeout=20) == 0
    agent_out = (tmp_path / "agent.out").read_text()
    assert '"job_id": "mq-1"' in agent_out
    # term-2 acks with mosquitto_pub, as a shell-scripted terminal would.
    ack = json.dumps({"message_id": envelope["message_id"], "status": "displayed", "at": "2030-01-01T00:00:00"})
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "-q", "1", "-t",
                    f"{P}/devices/term-2/ack", "-m", ack], check=True)
    status = final_status(probe, "mq-1", "acknowledged", timeout=20)
    assert status["counts"]["acknowledged"] == 2 and status["counts"]["targets"] == 2
    probe.close()
    assert gw.stop() == 0


def test_kill_9_twice_mid_work_then_every_device_got_every_notification(gateway_factory, tmp_path: Path):
    """kill -9 at two points mid-work (the embedded broker dies with it), restart each time:
    every MQTT device — a real paho client with a persistent session, the independent
    receiver — got every job's notification at least once, always under the same
    message_id, and acked it; every job ends acknowledged."""
    from tests.pipeline.devices import MqttDevice, close_all

    n_devices, n_jobs = 12, 30
    gw = gateway_factory({"dispatch": {"max_in_flight": 10, "ack_timeout_s": 3.0}})
    names = [f"plc-{i:02}" for i in range(n_devices)]
    bulk_register(tmp_path / "var", [{"device_id": d, "segment": "plc", "channels": [{"platform": "mqtt"}]}
                                     for d in names])
    devices = [MqttDevice(gw.port, d) for d in names]
    publisher = MqttProbe(gw.port)
    job_ids = [f"crashy-{j:02}" for j in range(n_jobs)]
    from gateway.storage import connect

    def progress() -> int:
        conn = connect(tmp_path / "var" / "gateway.db")
        try:
            return conn.execute("SELECT COUNT(*) FROM deliveries WHERE state IN ('sent', 'acknowledged')").fetchone()[0]
        finally:
            conn.close()

    try:
        for job_id in job_ids:
            publisher.client.publish(f"{P}/jobs", json.dumps({"job_id": job_id, "target": {"segment": "plc"},
                                                              "notification": {"title": job_id}}), qos=1)
        publisher.close()
        total = n_devices * n_jobs
        for fraction in (0.2, 0.55):
            deadline = time.monotonic() + 60
            while progress() < total * fraction:
                assert time.monotonic() < deadline, gw.log()[-2000:]
                time.sleep(0.02)
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait(timeout=10)
            assert progress() < total  # killed mid-work
            gw.start()
        deadline = time.monotonic() + 120
        while True:
            states = {j: (job_status_from_db(tmp_path / "var", j) or {}).get("state") for j in job_ids}
            if set(states.values()) == {"acknowledged"}:
                break
            assert time.monotonic() < deadline, {s: list(states.values()).count(s) for s in set(states.values())}
            time.sleep(0.2)
        conn = connect(tmp_path / "var" / "gateway.db")
        message_ids = {(r[0], r[1]): r[2] for r in conn.execute(
            "SELECT device_id, job_id, message_id FROM deliveries WHERE job_id LIKE 'crashy-%'")}
        # The aggregates status, /metrics and the operator page read are kept in the same
        # transactions as the rows, so two kill -9s mid-batch leave them exact (the start-up
        # check repairs only a wrong total or queue, not counts moved between final states).
        kept = stats.delivery_counts(conn)
        key = stats.platform_key(conn)
        counted = {(r[0], r[1]): r[2] for r in conn.execute(
            f"SELECT {key}, state, COUNT(*) FROM deliveries GROUP BY 1, 2")}
        conn.close()
        assert kept == counted
        for device in devices:
            got: dict[str, set[str]] = {}
            for envelope in list(device.received):
                got.setdefault(envelope["job_id"], set()).add(envelope["message_id"])
            assert set(got) == set(job_ids), (device.device_id, sorted(set(job_ids) - set(got)))
            for job_id, ids in got.items():
                assert ids == {message_ids[(device.device_id, job_id)]}, (device.device_id, job_id, ids)
        assert gw.stop() == 0
    finally:
        close_all(devices)


def test_jobs_over_mqtt_validation_idempotency_and_legacy_shape(gateway_factory, tmp_path: Path):
    gw = gateway_factory()
    bulk_register(tmp_path / "var", sim_devices(3, segment="pos"))
    probe = MqttProbe(gw.port, [f"{P}/jobs/+/status", f"{P}/gateway/errors"])

    probe.publish(f"{P}/jobs", json.dumps({"job_id": "typo-1", "target": {"all": True},
                                           "notification": {"title": "x", "tll": 5}}))
    rejected = final_status(probe, "typo-1", "rejected")
    assert rejected["error"]["code"] == "invalid_job" and "notification.tll: unknown field" in rejected["error"]["message"]

    probe.publish(f"{P}/jobs", json.dumps({"target": {"all": True}, "notification": {"data": {"n": 5}}}))
    probe.publish(f"{P}/jobs", b"{not json")
    probe.publish(f"{P}/jobs", json.dumps({"job_id": "bad id!", "target": {"all": True}, "notification": {}}))
    probe.publish(f"{P}/jobs", b"{" + b" " * (256 * 1024) + b"}")
    errors = probe.wait_for(lambda m: [json.loads(p) for _, t, p, _ in m if t.endswith("/gateway/errors")]
                            if len([1 for _, t, _, _ in m if t.endswith("/gateway/errors")]) >= 4 else None)
    messages = [e["error"]["message"] for e in errors]
    assert any("notification.data.n: Input should be a valid string" in m for m in messages)
    assert [e["error"]["code"] for e in errors][1:] == ["invalid_json", "invalid_job", "too_large"]
    assert any(m.startswith("job_id:") for m in messages)
    assert all(e["topic"] == f"{P}/jobs" for e in errors)

    legacy = {"job_id": "legacy-1", "name": "rollout", "target": {"segment": "pos"},
              "push_notification": {"config_url": "https://cfg.example/v2.json", "version": "2.1.0", "priority": "high"}}
    probe.publish(f"{P}/jobs", json.dumps(legacy))
    done = final_status(probe, "legacy-1", "acknowledged")
    assert done["counts"]["targets"] == 3
    before = len(probe.on(f"{P}/jobs/legacy-1/status"))
    probe.publish(f"{P}/jobs", json.dumps(legacy))  # same job_id: not dispatched again, status re-published
    probe.wait_for(lambda m: len([1 for _, t, _, _ in m if t == f"{P}/jobs/legacy-1/status"]) > before)
    again = json.loads(probe.on(f"{P}/jobs/legacy-1/status")[-1][2])
    assert again["counts"] == done["counts"] and again["state"] == "acknowledged"
    from gateway.storage import connect
    conn = connect(tmp_path / "var" / "gateway.db")
    notification = json.loads(conn.execute("SELECT notification FROM jobs WHERE job_id='legacy-1'").fetchone()[0])
    assert notification["title"] == "Configuration update 2.1.0"
    assert notification["data"] == {"config_url": "https://cfg.example/v2.json", "config_version": "2.1.0"}
    assert conn.execute("SELECT COUNT(*) FROM deliveries WHERE job_id='legacy-1'").fetchone()[0] == 3
    probe.close()
    assert gw.stop() == 0


def test_status_is_throttled_to_one_per_second_plus_final(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 20, "ack": False}},
                          "dispatch": {"max_in_flight": 4}})
    bulk_register(tmp_path / "var", sim_devices(500))
    probe = MqttProbe(gw.port, [f"{P}/jobs/+/status"])
    assert cli(gw.config, "send", "--title", "t", "--all", "--yes", "--job-id", "slow-1").returncode == 0
    final_status(probe, "slow-1", "completed", timeout=60)
    times = [t for t, _, p, _ in probe.on(f"{P}/jobs/slow-1/status")]
    states = [json.loads(p)["state"] for _, _, p, _ in probe.on(f"{P}/jobs/slow-1/status")]
    assert len(times) >= 3
    gaps = [b - a for a, b in zip(times[:-1], times[1:-1])]  # all but the final one
    assert all(g >= 0.85 for g in gaps), gaps
    assert states[-1] == "completed" and "dispatching" in states
    probe.close()
    assert gw.stop() == 0


@needs_mosquitto_clients
def test_fallback_after_invalid_address_and_registration_over_mqtt(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "invalid_rate": 1.0}}})
    probe = MqttProbe(gw.port, [f"{P}/gateway/errors", f"{P}/devices/+/notify"])
    device = {"device_id": "pos-9", "segment": "pos", "channels": [{"platform": "simulation"}, {"platform": "mqtt"}]}
    probe.publish(f"{P}/devices/pos-9/register", json.dumps(device))
    probe.publish(f"{P}/devices/pos-8/register", json.dumps({**device, "device_id": "pos-9"}))  # id mismatch
    probe.publish(f"{P}/devices/pos-7/register", json.dumps({"device_id": "pos-7", "channels": [{"platform": "fax"}]}))
    errors = probe.wait_for(lambda m: [json.loads(p) for _, t, p, _ in m if t.endswith("errors")]
                            if len([1 for _, t, _, _ in m if t.endswith("errors")]) >= 2 else None)
    assert errors[0]["topic"] == f"{P}/devices/pos-8/register" and "does not match the topic" in errors[0]["error"]["message"]
    assert errors[1]["error"]["message"].startswith("channels.0")
    deadline = time.monotonic() + 5
    while cli(gw.config, "devices", "show", "pos-9").returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli(gw.config, "send", "--title", "t", "--segment", "pos", "--job-id", "fb-1").returncode == 0
    notify = probe.wait_for(lambda m: [json.loads(p) for _, t, p, _ in m if t == f"{P}/devices/pos-9/notify"])
    assert notify[0]["job_id"] == "fb-1"
    shown = json.loads(cli(gw.config, "devices", "show", "pos-9", "--json").stdout)
    assert shown["channels"][0]["invalid"]["reason"] == "simulation: simulated Unregistered"
    assert "invalid" not in shown["channels"][1]
    # Empty payload removes the device.
    probe.publish(f"{P}/devices/pos-9/register", b"")
    deadline = time.monotonic() + 5
    while cli(gw.config, "devices", "show", "pos-9").returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cli(gw.config, "devices", "show", "pos-9").returncode == 1
    probe.close()
    assert gw.stop() == 0


def test_transient_failures_are_retried_and_send_wait_exit_codes(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "transient_attempts": 2, "retry_after_s": 0.3}},
                          "dispatch": {"max_attempts": 5}})
    bulk_register(tmp_path / "var", sim_devices(20))
    t0 = time.monotonic()
    ok = cli(gw.config, "send", "--title", "t", "--all", "--yes", "--wait", "--timeout", "30")
    assert ok.returncode == 0, ok.stderr
    assert time.monotonic() - t0 >= 0.6  # two Retry-After waits
    job_id = ok.stdout.strip()
    from gateway.storage import connect
    conn = connect(tmp_path / "var" / "gateway.db")
    assert {r[0] for r in conn.execute("SELECT attempts FROM deliveries WHERE job_id = ?", (job_id,))} == {3}
    # An unknown device makes the job fail: --wait exits 1.
    bad = cli(gw.config, "send", "--title", "t", "--device", "nobody", "--wait", "--timeout", "30")
    assert bad.returncode == 1 and "failed=1" in bad.stderr
    usage = cli(gw.config, "send", "--title", "t")
    assert usage.returncode == 2 and "exactly one of --device, --segment, --all" in usage.stderr
    assert gw.stop() == 0


def test_ttl_and_backoff_with_simulation_fault_injection(gateway_factory, tmp_path: Path):
    """Throttled forever with a Retry-After beyond the TTL → expired; 503s forever → failed
    after max_attempts with jittered backoff in between."""
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "throttle_rate": 1.0, "retry_after_s": 5}},
                          "dispatch": {"max_attempts": 3, "backoff_initial_s": 0.1, "backoff_max_s": 0.2}})
    bulk_register(tmp_path / "var", sim_devices(4))
    res = cli(gw.config, "send", "--title", "t", "--all", "--yes", "--ttl", "2", "--wait", "--timeout", "30")
    assert res.returncode == 1 and "expired=4" in res.stderr
    assert gw.stop() == 0
    gw2 = gateway_factory({"bridges": {"simulation": {"latency_ms": 0, "fail_rate": 1.0}},
                           "dispatch": {"max_attempts": 3, "backoff_initial_s": 0.1, "backoff_max_s": 0.2}})
    bulk_register(tmp_path / "var", sim_devices(4))
    res = cli(gw2.config, "send", "--title", "t", "--all", "--yes", "--job-id", "doomed", "--wait", "--timeout", "30")
    assert res.returncode == 1 and "failed=4" in res.stderr
    from gateway.storage import connect
    conn = connect(tmp_path / "var" / "gateway.db")
    rows = conn.execute("SELECT attempts, last_error FROM deliveries WHERE job_id = 'doomed'").fetchall()
    assert all(r[0] == 3 and "gave up after 3 attempts" in r[1] for r in rows)
    assert gw2.stop() == 0
