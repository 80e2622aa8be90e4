"""``overflow = "refuse-new"`` with the buffer full during a cloud outage, against the real
daemon: local work goes on (every online MQTT device gets every local job, no delivery
fails, every device ack counts locally at once) and no ack is lost (each reaches the cloud
once it is back)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.storage import connect
from gateway.upstream import outbox
from tests.pipeline.devices import MqttDevice, close_all
from tests.support import MqttProbe, bulk_register, job_status_from_db
from tests.upstream.cloud import PREFIX, Cloud, Observer
from tests.upstream.test_e2e import acks_of, online, wait

N_DEVICES = 100


def deliveries_by_state(db_path: Path) -> dict[str, int]:
    conn = connect(db_path, readonly=True)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
    finally:
        conn.close()


def outbox_figures(db_path: Path) -> dict[str, object]:
    conn = connect(db_path, readonly=True)
    try:
        return outbox.stats(conn).as_dict()
    finally:
        conn.close()


@pytest.mark.slow
def test_refused_acks_never_stop_local_delivery_and_reach_the_cloud_later(gateway_factory, cloud: Cloud,
                                                                          tmp_path: Path):
    fleet = [f"plc-{i:03}" for i in range(N_DEVICES)]
    db_path = tmp_path / "var" / "gateway.db"
    devices: list[MqttDevice] = []
    with Observer(cloud) as obs:  # a persistent session: the cloud keeps what it missed
        gw = gateway_factory(extra={
            # ~4 KB: a few dozen acks fill it, the rest of the jobs' acks find it full.
            "upstream": cloud.upstream_section(buffer_max_mb=0.004, overflow="refuse-new"),
            "bridges": {"simulation": {"enabled": False}, "mqtt": {"enabled": True}},
            # A delivery that failed for a broker the gateway left would give up within seconds.
            "dispatch": {"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
        }, start=False)
        bulk_register(tmp_path / "var", [{"device_id": d, "segment": "plc", "channels": [{"platform": "mqtt"}]}
                                         for d in fleet])
        gw.start()
        try:
            wait(lambda: online(cloud), what="gateway online on the cloud")
            devices = [MqttDevice(gw.port, d) for d in fleet]
            cloud.stop()  # the WAN goes away

            publisher = MqttProbe(gw.port)
            jobs = ["outage-1", "outage-2"]

            def local_job(job_id: str) -> None:
                publisher.publish(f"{PREFIX}/jobs", json.dumps({
                    "job_id": job_id, "target": {"segment": "plc"}, "notification": {"title": job_id}}))
                deadline = time.monotonic() + 90
                while not all(job_id in d.jobs() for d in devices):
                    missing = sum(job_id not in d.jobs() for d in devices)
                    assert time.monotonic() < deadline, (job_id, missing, deliveries_by_state(db_path),
                                                         gw.log()[-3000:])
                    time.sleep(0.1)

            local_job("outage-1")  # its acks fill the buffer
            wait(lambda: "upstream buffer full" in gw.log(), timeout=30, what="the buffer full")
            local_job("outage-2")  # sent while the buffer is full and acks keep coming
            publisher.close()
            # Every device acked at once; every ack counts locally although the buffer is full.
            wait(lambda: all((job_status_from_db(tmp_path / "var", j) or {}).get("state") == "acknowledged"
                             for j in jobs), timeout=60,
                 what=f"both jobs acknowledged locally: {deliveries_by_state(db_path)}")
            states = deliveries_by_state(db_path)
            assert states == {"acknowledged": 2 * N_DEVICES}, states
            figures = outbox_figures(db_path)
            assert figures["buffer_refused"] and figures["buffer_held"], figures  # the buffer was full
            assert figures["buffer_dropped"] == 0, figures

            cloud.start()  # the WAN is back: every ack goes up, none lost, none twice
            msgs = obs.wait_for(lambda m: all(len({a["message_id"] for a in acks_of(m, j)}) == N_DEVICES
                                              for j in jobs), timeout=120)
            for j in jobs:
                assert sorted(a["device_id"] for a in acks_of(msgs, j)) == fleet
            wait(lambda: outbox_figures(db_path)["buffer_held"] == 0, what="nothing held back any more")
            assert gw.stop() == 0
        finally:
            close_all(devices)
    log = gw.log()
    assert "Traceback" not in log and "gave up" not in log
