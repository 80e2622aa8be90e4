"""Faults against the real daemon: a full disk, devices that are offline, a bridge that
cannot start, a shutdown with everything hung, retention. Every check is on what an
independent receiver got (MQTT devices as paho clients, a status subscriber, a fake
platform), not only on the gateway's own database."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.devices import P, MqttDevice
from tests.support import MqttProbe, Mosquitto, bulk_register, cli, free_port, job_status_from_db


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
    mnt = tmp_path / "var"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Fill the filesystem to the last block."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 512):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


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

        filler = fill(small_disk)
        refused = cli(gw.config, "send", "--title", "t", "--all", "--job-id", "cli-full")
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
                                      "expired": 0, "invalid_address": 0}
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
        for plc in plcs:
            plc.close()
        probe.close()
