"""End to end: the real daemon (pipeline + simulation fleet) with a real Mosquitto over TLS
as the cloud controller's broker."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.helpers import cli_in_process
from tests.support import GatewayProcess, bulk_register
from tests.upstream.proxy import MqttFaultProxy
from tests.upstream.test_link_process import outbox_rows
from tests.upstream.cloud import GW_PASSWORD, PREFIX, Cloud, Observer, Seen

DEVICES = ["pos-1", "pos-2", "pos-3"]


def start_gateway(gateway_factory, cloud: Cloud) -> GatewayProcess:
    return gateway_factory(extra={
        "upstream": cloud.upstream_section(),
        "bridges": {"simulation": {"enabled": True, "latency_ms": 0, "ack": True}, "mqtt": {"enabled": True}},
    })


def local_publish(gw: GatewayProcess, topic: str, payload: bytes | str) -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.connect("127.0.0.1", gw.port)  # type: ignore[attr-defined]
    c.loop_start()
    try:
        info = c.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def cli_json(gw: GatewayProcess, *args: str) -> object:
    """An operator's command with ``--json``, run in this process (the same code and output
    as ``python -m gateway``, without an interpreter start each: the waits poll with it)."""
    out = cli_in_process(gw.config, *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def job_state(gw: GatewayProcess, job_id: str) -> str | None:
    """The job's state, or None while the gateway has not taken it in yet: the broker's
    PUBACK to the publisher comes before the gateway's own client has stored the job."""
    out = cli_in_process(gw.config, "jobs", "show", job_id, "--json")
    if out.returncode != 0 and "no such job" in out.stderr:
        return None
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["state"])


def wait(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_devices(gw: GatewayProcess, expected: list[str]) -> None:
    wait(lambda: sorted(d["device_id"] for d in cli_json(gw, "devices", "list")) == sorted(expected),  # type: ignore[union-attr]
         what=f"devices {expected} registered")


def acks_of(msgs: list[Seen], job_id: str) -> list[dict]:
    out = []
    for m in msgs:
        if m.topic == f"{PREFIX}/acks":
            ack = json.loads(m.payload)
            if ack["job_id"] == job_id:
                out.append(ack)
    return out


def statuses_of(msgs: list[Seen], job_id: str) -> list[dict]:
    return [json.loads(m.payload) for m in msgs if m.topic == f"{PREFIX}/jobs/{job_id}/status"]


def job(job_id: str) -> bytes:
    return json.dumps({"job_id": job_id, "target": {"devices": DEVICES},
                       "notification": {"title": "Config update", "body": "Version 2.1.0 is ready"}}).encode()


def online(cloud: Cloud) -> bool:
    return json.loads(cloud.retained(f"{PREFIX}/gateway/status", timeout=0.5) or b"{}").get("state") == "online"


@pytest.mark.slow
def test_a_cloud_job_is_delivered_locally_and_its_acks_and_status_come_back_up(gateway_factory, cloud: Cloud):
    with Observer(cloud) as obs:
        gw = start_gateway(gateway_factory, cloud)
        wait(lambda: online(cloud), what="gateway online on the cloud")
        for device in DEVICES:
            cloud.publish(f"{PREFIX}/devices/{device}/register",
                          json.dumps({"device_id": device, "channels": [{"platform": "simulation"}]}))
        wait_devices(gw, DEVICES)

        cloud.publish(f"{PREFIX}/jobs", job("cloud-job-1"))
        msgs = obs.wait_for(lambda m: len(acks_of(m, "cloud-job-1")) >= 3 and any(
            s["state"] == "acknowledged" for s in statuses_of(m, "cloud-job-1")), timeout=20)
        acks = acks_of(msgs, "cloud-job-1")
        assert sorted(a["device_id"] for a in acks) == DEVICES
        for a in acks:
            assert a["status"] == "received" and a["message_id"] and a["at"]
            assert isinstance(a["latency_ms"], (int, float)) and a["latency_ms"] >= 0
        final = statuses_of(msgs, "cloud-job-1")[-1]
        assert final["state"] == "acknowledged" and final["counts"]["acknowledged"] == 3
        # delivered locally: the local status says the same
        assert cli_json(gw, "jobs", "show", "cloud-job-1")["state"] == "acknowledged"  # type: ignore[index]
        assert json.loads(cloud.retained(f"{PREFIX}/jobs/cloud-job-1/status"))["state"] == "acknowledged"

        # the cloud redelivers the same job: not dispatched again, its status is re-published
        before = len(statuses_of(obs.snapshot(), "cloud-job-1"))
        cloud.publish(f"{PREFIX}/jobs", job("cloud-job-1"))
        msgs = obs.wait_for(lambda m: len(statuses_of(m, "cloud-job-1")) > before, timeout=10)
        time.sleep(0.5)
        assert len(acks_of(obs.snapshot(), "cloud-job-1")) == 3
        assert statuses_of(msgs, "cloud-job-1")[-1]["state"] == "acknowledged"

        assert gw.stop() == 0
    assert json.loads(cloud.retained(f"{PREFIX}/gateway/status"))["state"] == "offline"  # a clean stop says so
    log = gw.log()
    assert "Traceback" not in log and GW_PASSWORD not in log


@pytest.mark.slow
def test_acks_and_final_status_survive_a_cloud_outage_and_kill9(gateway_factory, cloud: Cloud):
    with Observer(cloud) as obs:  # a persistent session: the cloud keeps what it missed
        gw = start_gateway(gateway_factory, cloud)
        wait(lambda: online(cloud), what="gateway online on the cloud")
        for device in DEVICES:
            local_publish(gw, f"{PREFIX}/devices/{device}/register",
                          json.dumps({"device_id": device, "channels": [{"platform": "simulation"}]}))
        wait_devices(gw, DEVICES)

        cloud.stop()  # the WAN goes away; local work goes on
        local_publish(gw, f"{PREFIX}/jobs", job("local-job-1"))
        wait(lambda: job_state(gw, "local-job-1") == "acknowledged",
             what="local-job-1 acknowledged locally")
        gw.kill()  # kill -9 with everything for the cloud only in the outbox

        gw.start()  # ready without the cloud
        local_publish(gw, f"{PREFIX}/jobs", job("local-job-2"))
        wait(lambda: job_state(gw, "local-job-2") == "acknowledged",
             what="local-job-2 acknowledged locally")
        assert not obs.snapshot() or all("local-job" not in m.payload.decode() for m in obs.snapshot())

        cloud.start()
        msgs = obs.wait_for(lambda m: all(
            len({a["message_id"] for a in acks_of(m, j)}) == 3
            and any(s["state"] == "acknowledged" for s in statuses_of(m, j))
            for j in ("local-job-1", "local-job-2")), timeout=30)
        for j in ("local-job-1", "local-job-2"):
            acks = acks_of(msgs, j)
            assert sorted(a["device_id"] for a in acks) == DEVICES  # every ack, none twice
            assert statuses_of(msgs, j)[-1]["state"] == "acknowledged"  # the final status arrives last
            assert json.loads(cloud.retained(f"{PREFIX}/jobs/{j}/status"))["counts"]["acknowledged"] == 3
        assert gw.stop() == 0
    assert "Traceback" not in gw.log()


@pytest.mark.slow
def test_kill9_with_a_batch_in_flight_then_every_row_arrives_in_order(gateway_factory, cloud: Cloud,
                                                                     tmp_path: Path):
    """Issue 15.8: the daemon is killed while hundreds of rows await their PUBACK (500 ms
    round trip through a delay proxy); after the restart every ack arrives, each job's
    statuses keep their order, and the retained status is the final one."""
    fleet = [f"dev-{i:03}" for i in range(300)]
    with MqttFaultProxy(cloud.plain_port, delay_s=0.25) as proxy, Observer(cloud) as obs:
        gw = gateway_factory(extra={
            "upstream": cloud.plain_section(proxy.port),
            "bridges": {"simulation": {"enabled": True, "latency_ms": 0, "ack": True}, "mqtt": {"enabled": True}},
        }, start=False)
        bulk_register(tmp_path / "var", [{"device_id": d, "channels": [{"platform": "simulation"}]} for d in fleet])
        gw.start()
        wait(lambda: online(cloud), what="gateway online on the cloud")
        local_publish(gw, f"{PREFIX}/jobs", json.dumps({
            "job_id": "k9", "target": {"all": True}, "notification": {"title": "t", "body": "b"}}))
        wait(lambda: proxy.stats.publishes >= 150, what="a batch in flight", timeout=20)
        gw.kill()  # kill -9: the PUBACKs of what is in flight are 0.5 s away
        in_flight_at_kill = proxy.stats.publishes - proxy.stats.pubacks
        assert in_flight_at_kill >= 100
        gw.start()
        wait(lambda: len({a["message_id"] for a in acks_of(obs.snapshot(), "k9")}) == 300
             and any(s["state"] == "acknowledged" for s in statuses_of(obs.snapshot(), "k9")), timeout=40,
             what="every ack and the final status")
        wait(lambda: job_state(gw, "k9") == "acknowledged", what="local final state")
        wait(lambda: outbox_rows(tmp_path / "var" / "gateway.db") == 0, timeout=30,
             what="the restarted gateway confirmed every row")  # the first copies may all be there already
        assert gw.stop() == 0  # a clean stop: what is still in flight is awaited, then offline
        barrier = b"after-the-gateway"
        cloud.publish(f"{PREFIX}/test-barrier", barrier)
        msgs = obs.wait_for(lambda m: any(x.payload == barrier for x in m))
    rows = [m for m in msgs if m.topic == f"{PREFIX}/acks" or m.topic == f"{PREFIX}/jobs/k9/status"]
    # every row carries an id; copies of a row carry the same id and body (the cloud de-duplicates)
    bodies: dict[str, bytes] = {}
    for m in rows:
        assert m.id is not None and bodies.setdefault(m.id, m.body) == m.body
    copies = Counter(m.id for m in rows)
    assert sum(n - 1 for n in copies.values()) >= 1  # the batch in flight went up again after the restart
    acks = [json.loads(bodies[i]) for i in dict.fromkeys(m.id for m in rows if m.topic.endswith("/acks"))]
    assert sorted(a["device_id"] for a in acks) == fleet  # every ack, once per id
    # the job's statuses, in the order they were last seen, only move forward
    last_seen = {m.id: k for k, m in enumerate(rows)}
    statuses = [json.loads(m.body) for k, m in enumerate(rows)
                if m.topic.endswith("/status") and last_seen[m.id] == k]
    progress = [(s["counts"]["acknowledged"], s["updated_at"]) for s in statuses]
    assert progress == sorted(progress) and statuses[-1]["state"] == "acknowledged"
    final = json.loads(cloud.retained(f"{PREFIX}/jobs/k9/status"))
    assert final["state"] == "acknowledged" and final["counts"]["acknowledged"] == 300
    assert "Traceback" not in gw.log()
