"""Faults against the real daemon: a full disk, devices that are offline, a bridge that
cannot start, a shutdown with everything hung, retention. Every check is on what an
independent receiver got (MQTT devices as paho clients, a status subscriber, a fake
platform), not only on the gateway's own database."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli_in_process as cli  # the operator's commands, in this process: no interpreter start each
from tests.helpers import wait_until
from tests.pipeline.devices import P, MqttDevice, close_all
from tests.support import (
    MqttProbe,
    Mosquitto,
    bulk_register,
    fill_disk,
    free_port,
    job_status_from_db,
    mounted_tmpfs,
)


def sims(n: int, prefix: str, segment: str) -> list[dict[str, Any]]:
    return [{"device_id": f"{prefix}-{i:03}", "segment": segment, "channels": [{"platform": "simulation"}]}
            for i in range(n)]


def statuses(probe: MqttProbe, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(p) for _, _, p, _ in probe.on(f"{P}/jobs/{job_id}/status") if p]


def wait_state(probe: MqttProbe, job_id: str, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
    def seen(_msgs: Any) -> dict[str, Any] | None:
        for status in reversed(statuses(probe, job_id)):
            if status["state"] in states:
                return status
        return None
    return probe.wait_for(seen, timeout)


def external(mosq: Mosquitto, **extra: Any) -> dict[str, Any]:
    return {"broker": {"mode": "external", "url": f"mqtt://127.0.0.1:{mosq.port}"}, **extra}


# ------------------------------------------------------------------ a real full disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted as the daemon's data dir (CI runs as root)."""
    with mounted_tmpfs(tmp_path / "var", "16m") as mnt:
        yield mnt


def test_full_disk_nothing_publishers_saw_acknowledged_is_lost(gateway_factory, mosquitto, small_disk: Path,
                                                              tmp_path: Path):
    """Jobs, acks and a registration published (QoS 1) while the gateway's disk is full are
    not acknowledged by the gateway: Mosquitto keeps them and redelivers when the gateway
    reconnects after space returns. Every one arrives; the daemon never dies."""
    gw = gateway_factory(external(mosquitto, bridges={"simulation": {"latency_ms": 30, "ack": True},
                                                      "mqtt": {"enabled": True}},
                                  dispatch={"max_in_flight": 4}))
    bulk_register(small_disk, sims(5, "sim", "s") + sims(120, "bulk", "bulk")
                  + [{"device_id": d, "segment": "s", "channels": [{"platform": "mqtt"}]} for d in ("plc-1", "plc-2")])
    plcs = [MqttDevice(mosquitto.port, d, auto_ack=False) for d in ("plc-1", "plc-2")]
    probe = MqttProbe(mosquitto.port, [f"{P}/jobs/+/status", f"{P}/gateway/errors"])
    try:
        # Before: a job whose MQTT acks are held by the devices until the disk is full.
        probe.publish(f"{P}/jobs", json.dumps({"job_id": "before", "target": {"segment": "s"},
                                               "notification": {"title": "before"}}))
        for plc in plcs:
            plc.wait_for_job("before")
        wait_state(probe, "before", ("completed",))
        # A big job still being sent (slow fleet) when the disk fills.
        probe.publish(f"{P}/jobs", json.dumps({"job_id": "mid", "target": {"segment": "bulk"},
                                               "notification": {"title": "mid"}}))
        probe.wait_for(lambda _m: any(s["counts"]["acknowledged"] >= 10 for s in statuses(probe, "mid")))

        filler = fill_disk(small_disk / "filler")
        refused = cli(gw.config, "send", "--title", "t", "--all", "--yes", "--job-id", "cli-full")
        assert refused.returncode == 1, refused
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("send: the job was not stored")
        assert "Traceback" not in refused.stderr and refused.stdout == ""

        for plc in plcs:
            plc.release()  # acks for "before", published while the gateway cannot store them
        for i in range(3):
            probe.publish(f"{P}/jobs", json.dumps({"job_id": f"full-{i}", "target": {"segment": "s"},
                                                   "notification": {"title": f"full {i}"}}))
        probe.publish(f"{P}/jobs", json.dumps({"job_id": "bad-full", "target": {"all": True},
                                               "notification": {"title": "x", "tll": 1}}))
        probe.publish(f"{P}/devices/late-1/register",
                      json.dumps({"device_id": "late-1", "channels": [{"platform": "simulation"}]}))
        # Barrier: the gateway has met the full disk (logged once), and stays up while it lasts.
        deadline = time.monotonic() + 20
        while "storing incoming messages failing" not in gw.log():
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.1)
        time.sleep(2)  # the disk stays full a while: retries keep failing, quietly
        assert gw.proc.poll() is None
        assert gw.log().count("storing incoming messages failing") == 1

        filler.unlink()  # space returns
        for i in range(3):
            done = wait_state(probe, f"full-{i}", ("acknowledged",), timeout=45)
            assert done["counts"] == {"targets": 7, "queued": 0, "sent": 0, "acknowledged": 7, "failed": 0,
                                      "expired": 0, "invalid_address": 0, "suppressed": 0}
            for plc in plcs:
                plc.wait_for_job(f"full-{i}", timeout=5)
        assert wait_state(probe, "before", ("acknowledged",))["counts"]["acknowledged"] == 7
        mid = wait_state(probe, "mid", ("acknowledged",), timeout=45)
        assert mid["counts"]["acknowledged"] == 120  # no result or simulated ack was lost, none stuck
        rejected = wait_state(probe, "bad-full", ("rejected",))
        assert "notification.tll: unknown field" in rejected["error"]["message"]
        # The registration made while full was stored: a job to that device is delivered.
        probe.publish(f"{P}/jobs", json.dumps({"job_id": "to-late", "target": {"devices": ["late-1"]},
                                               "notification": {"title": "hi"}}))
        assert wait_state(probe, "to-late", ("acknowledged",))["counts"]["acknowledged"] == 1
        assert job_status_from_db(small_disk, "cli-full") is None  # send said "not stored": nothing queued
        assert "recovered" in gw.log() and "Traceback" not in gw.log()
        assert gw.proc.poll() is None
        assert gw.stop() == 0
    finally:
        close_all(plcs)
        probe.close()


# ------------------------------------------------------------------ resend to an offline device
def test_an_offline_mqtt_device_gets_its_notification_by_resend_and_acks_it(gateway_factory, tmp_path: Path):
    """The device has no session when the job is sent (the broker takes the publish and
    drops it). It connects later; the resend after ack_timeout_s reaches it."""
    gw = gateway_factory({"dispatch": {"ack_timeout_s": 1.0}})
    bulk_register(tmp_path / "var", [{"device_id": "plc-late", "channels": [{"platform": "mqtt"}]}])
    probe = MqttProbe(gw.port, [f"{P}/jobs/+/status"])
    try:
        probe.publish(f"{P}/jobs", json.dumps({"job_id": "resend-1", "target": {"devices": ["plc-late"]},
                                               "notification": {"title": "late"}}))
        first = wait_state(probe, "resend-1", ("completed",))
        assert first["counts"]["sent"] == 1  # the broker accepted it: "sent", yet nobody had it
        plc = MqttDevice(gw.port, "plc-late")  # persistent session, subscribes, acks what it gets
        try:
            envelope = plc.wait_for_job("resend-1", timeout=10)
            done = wait_state(probe, "resend-1", ("acknowledged",), timeout=10)
        finally:
            plc.close()
        assert done["counts"] == {"targets": 1, "queued": 0, "sent": 0, "acknowledged": 1, "failed": 0,
                                  "expired": 0, "invalid_address": 0, "suppressed": 0}
        from gateway.storage import connect
        conn = connect(tmp_path / "var" / "gateway.db")
        try:
            # The resend's attempt is recorded in the writer's next batch, which may come
            # after the ack it brought (the ack keeps the row acknowledged; attempts still grow).
            row = wait_until(lambda: (r := conn.execute("SELECT message_id, attempts, state FROM deliveries "
                                                        "WHERE job_id = 'resend-1'").fetchone())["attempts"] >= 2 and r,
                             timeout=10, what="the resend counted in attempts")
        finally:
            conn.close()
        assert row["message_id"] == envelope["message_id"] and row["state"] == "acknowledged"
        assert gw.stop() == 0
    finally:
        probe.close()


# ------------------------------------------------------------------ a bridge that cannot start
def test_a_bridge_that_cannot_start_delivers_after_the_key_is_fixed_and_a_restart(gateway_factory, tmp_path: Path):
    from tests.fakes.apns import FakeApns
    from tests.fakes.common import Pki
    from tests.fakes.thread import LoopThread

    pki = Pki(tmp_path / "pki")
    thread = LoopThread()
    apns = thread.start(FakeApns(pki))
    try:
        key = tmp_path / "AuthKey.p8"
        key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")  # unreadable
        gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0}, "apns": {
            "enabled": True, "team_id": apns.team_id, "key_id": apns.key_id, "key_file": str(key),
            "topic": apns.topic, "endpoint": apns.endpoint, "ca_file": str(pki.ca_file)}}})
        deadline = time.monotonic() + 10
        while "bridge cannot start" not in gw.log():
            assert time.monotonic() < deadline, gw.log()[-2000:]
            time.sleep(0.05)
        bulk_register(tmp_path / "var", [{"device_id": "ios-1", "channels": [{"platform": "apns", "token": "ab" * 32}]},
                                         {"device_id": "sim-1", "channels": [{"platform": "simulation"}]}])
        assert cli(gw.config, "send", "--title", "t", "--all", "--yes", "--job-id", "keyfix", "--ttl", "600").returncode == 0
        deadline = time.monotonic() + 15
        while (job_status_from_db(tmp_path / "var", "keyfix") or {"counts": {"acknowledged": 0}})["counts"]["acknowledged"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        from gateway.storage import connect
        conn = connect(tmp_path / "var" / "gateway.db")
        row = conn.execute("SELECT d.state, d.next_at, j.expires_at FROM deliveries d JOIN jobs j USING (job_id) "
                           "WHERE d.device_id = 'ios-1'").fetchone()
        conn.close()
        assert row["state"] == "queued" and row["next_at"] <= row["expires_at"], tuple(row)  # finite, within TTL
        assert gw.stop() == 0
        key.write_text(apns.key_pem)  # the operator fixes the key and restarts
        gw.start()
        deadline = time.monotonic() + 15
        while job_status_from_db(tmp_path / "var", "keyfix")["state"] != "completed":
            assert time.monotonic() < deadline, job_status_from_db(tmp_path / "var", "keyfix")
            time.sleep(0.1)
        assert [a.decoded["job_id"] for a in apns.accepted] == ["keyfix"]
        assert job_status_from_db(tmp_path / "var", "keyfix")["counts"]["sent"] == 1
        assert gw.stop() == 0
    finally:
        thread.run(apns.stop())
        thread.stop()


# ------------------------------------------------------------------ shutdown budget
def test_stop_fits_the_10_s_budget_with_a_hung_broker_bridge_and_a_locked_database(gateway_factory, tmp_path: Path):
    """SIGTERM → exit 0 within 10 s while the broker never PUBACKs (the mqtt bridge hangs in
    send, the final status and 'offline' publishes hang) and another process holds the
    database's write lock (the recorder's commit cannot start)."""
    import sqlite3

    from tests.pipeline.hung_broker import HungBroker

    hung = HungBroker().start()
    lock: sqlite3.Connection | None = None
    try:
        gw = gateway_factory({"broker": {"mode": "external", "url": f"mqtt://127.0.0.1:{hung.port}"},
                              "bridges": {"simulation": {"latency_ms": 5, "ack": True}, "mqtt": {"enabled": True}},
                              "dispatch": {"max_in_flight": 10}})
        bulk_register(tmp_path / "var", sims(3000, "sim", "s")
                      + [{"device_id": f"plc-{i}", "segment": "s", "channels": [{"platform": "mqtt"}]} for i in range(5)])
        assert cli(gw.config, "send", "--title", "t", "--segment", "s", "--yes", "--job-id", "hang-1").returncode == 0
        deadline = time.monotonic() + 20
        while not (any(t.endswith("/notify") for t in hung.publishes)
                   and ((job_status_from_db(tmp_path / "var", "hang-1") or {}).get("counts") or {}).get("acknowledged", 0) > 20):
            assert time.monotonic() < deadline, (hung.publishes[-5:], gw.log()[-2000:])
            time.sleep(0.05)
        lock = sqlite3.connect(tmp_path / "var" / "gateway.db", isolation_level=None, timeout=10)
        lock.execute("BEGIN IMMEDIATE")  # the daemon's next write waits for this lock
        time.sleep(0.3)  # simulated acks keep arriving: the recorder is now stuck behind the lock
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        rc = gw.proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
        assert rc == 0, gw.log()[-3000:]
        assert elapsed <= 10.0, f"stopped after {elapsed:.1f} s"
        assert "Traceback" not in gw.log()
        assert '"event": "stopped"' in gw.log()
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        hung.stop()


# ------------------------------------------------------------------ retention
def test_retention_prunes_finished_jobs_and_clears_their_retained_status(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"storage": {"retention_days": 0.00002}})  # 1.7 s (the watcher keeps every status it saw)
    bulk_register(tmp_path / "var", sims(3, "sim", "s"))
    watcher = MqttProbe(gw.port, [f"{P}/jobs/+/status"])
    try:
        watcher.publish(f"{P}/jobs", json.dumps({"job_id": "old-1", "target": {"all": True},
                                                 "notification": {"title": "t"}}))
        watcher.publish(f"{P}/jobs", json.dumps({"job_id": "old-bad", "target": {"all": True},
                                                 "notification": {"title": "t", "tll": 3}}))
        assert wait_state(watcher, "old-1", ("acknowledged",))["counts"]["acknowledged"] == 3
        wait_state(watcher, "old-bad", ("rejected",))
        # Pruned after the retention: the watcher sees the retained status cleared (empty payload).
        watcher.wait_for(lambda m: all(any(t == f"{P}/jobs/{j}/status" and p == b"" for _, t, p, _ in m)
                                       for j in ("old-1", "old-bad")), timeout=25)
        assert cli(gw.config, "jobs", "show", "old-1").returncode == 1
        from gateway.storage import connect
        conn = connect(tmp_path / "var" / "gateway.db")
        assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM acks").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
        conn.close()
        # A new subscriber gets no retained status. Barrier: a second subscription whose
        # retained message the broker sends after those of the first.
        fresh = MqttProbe(gw.port, [f"{P}/jobs/+/status"])
        try:
            fresh.client.subscribe(f"{P}/gateway/status", qos=1)
            fresh.wait_for(lambda m: any(t == f"{P}/gateway/status" for _, t, _, _ in m))
            assert fresh.on(f"{P}/jobs/+/status") == []
        finally:
            fresh.close()
        log = gw.log()
        assert '"event": "job accepted"' in log and '"targets": 3' in log
        assert '"event": "job acknowledged"' in log and '"event": "job rejected"' in log
        assert '"event": "pruned finished jobs"' in log
        assert gw.stop() == 0
    finally:
        watcher.close()


# ------------------------------------------------------------------ the cloud while the local broker is away
def test_status_reaches_the_cloud_while_the_local_broker_is_down_and_rejections_are_published_later(
        gateway_factory, tmp_path: Path):
    """Issue 15.2 and 9.7: a cloud job (accepted) and a bad cloud job (rejected) arrive while
    the local broker is unreachable; the cloud gets both statuses at once, and the local
    broker gets the retained rejection when it is back."""
    from tests.support import MOSQUITTO
    from tests.upstream.cloud import Cloud, Observer

    assert MOSQUITTO, "mosquitto is not installed (make test installs it)"
    local = Mosquitto(tmp_path / "local", free_port())
    local.workdir.mkdir()
    local.start()
    cloud = Cloud(tmp_path / "cloud").start()
    try:
        gw = gateway_factory({**external(local), "upstream": cloud.upstream_section(),
                              "bridges": {"simulation": {"latency_ms": 0, "ack": True}}})
        bulk_register(tmp_path / "var", sims(4, "sim", "s"))
        deadline = time.monotonic() + 20  # the cloud link is up (its session subscribed)
        while json.loads(cloud.retained(f"{P}/gateway/status", timeout=0.5) or b"{}").get("state") != "online":
            assert time.monotonic() < deadline, gw.log()[-2000:]
        with Observer(cloud, f"{P}/jobs/+/status") as obs:
            local.stop()  # the local broker goes away; the cloud link stays up
            deadline = time.monotonic() + 10
            while "mqtt connection lost" not in gw.log():
                assert time.monotonic() < deadline, gw.log()[-2000:]
                time.sleep(0.05)
            cloud.publish(f"{P}/jobs", json.dumps({"job_id": "cloud-ok", "target": {"all": True},
                                                   "notification": {"title": "t"}}))
            cloud.publish(f"{P}/jobs", json.dumps({"job_id": "cloud-bad", "target": {"all": True},
                                                   "notification": {"title": "t", "tll": 5}}))

            def got(msgs: Any) -> bool:
                seen = {(json.loads(m.payload)["job_id"], json.loads(m.payload)["state"]) for m in msgs if m.payload}
                return {("cloud-ok", "acknowledged"), ("cloud-bad", "rejected")} <= seen
            msgs = obs.wait_for(got, timeout=20)
            bad = [json.loads(m.payload) for m in msgs if m.topic.endswith("/cloud-bad/status")][-1]
            assert bad["error"]["code"] == "invalid_job" and "notification.tll" in bad["error"]["message"]
            ok = [json.loads(m.payload) for m in msgs if m.topic.endswith("/cloud-ok/status")]
            assert ok[0]["counts"]["targets"] == 4  # known from the first status on
            assert ok[-1]["counts"]["acknowledged"] == 4
        shown = json.loads(cli(gw.config, "jobs", "show", "cloud-bad", "--json").stdout)
        assert shown["state"] == "rejected" and shown["error"]["code"] == "invalid_job"
        local.start()  # back: the statuses owed locally go out (retained)
        probe = MqttProbe(local.port, [f"{P}/jobs/+/status"])
        try:
            assert wait_state(probe, "cloud-bad", ("rejected",), timeout=20)["error"]["code"] == "invalid_job"
            assert wait_state(probe, "cloud-ok", ("acknowledged",), timeout=20)["counts"]["acknowledged"] == 4
        finally:
            probe.close()
        assert gw.stop() == 0
    finally:
        cloud.stop()
        local.stop()
