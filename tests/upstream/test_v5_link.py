"""The cloud link over MQTT 5.0 against a real Mosquitto 2.0: a publish the cloud refuses
(its ACL denies the topic, PUBACK 0x87) is told apart from a dead link."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiomqtt
import structlog

from gateway.storage import Database, connect
from gateway.upstream import outbox
from gateway.upstream.link import UpstreamLink
from tests.upstream.cloud import PREFIX, Cloud, Observer
from tests.upstream.conftest import FAST, RecordingIntake, make_config, running, wait_until

DENIED = f"{PREFIX}/jobs/job-denied/status"


async def _fill(db: Database) -> list[str]:
    """Ten acks with the denied status row in the middle; the ids of the acks."""
    ob = outbox.Outbox()
    ids = [f"m-{i}" for i in range(10)]

    def fill(conn: Any) -> None:
        for i, mid in enumerate(ids):
            if i == 5:
                ob.enqueue(conn, "status", DENIED, b'{"job_id": "job-denied"}', True, "job-denied")
            ob.enqueue(conn, "ack", f"{PREFIX}/acks", json.dumps({"message_id": mid}).encode(), False)

    await db.run(fill)
    return ids


def _seen_ids(obs: Observer) -> list[str]:
    return [json.loads(m.payload)["message_id"] for m in obs.snapshot() if m.topic == f"{PREFIX}/acks"]


async def test_a_refused_topic_is_set_aside_at_once_and_the_link_stays_up(cloud_factory, db: Database,
                                                                          tmp_path: Path):
    """``protocol = "auto"`` speaks 5.0 to Mosquitto 2.0; the denied row gets PUBACK 0x87 and
    goes aside on the first try with that reason (no reconnect, no retry, one warning), while
    every other row reaches the cloud in order."""
    cloud: Cloud = cloud_factory(start=False)
    cloud.deny = [DENIED]
    cloud.start()
    ids = await _fill(db)
    with Observer(cloud) as obs, structlog.testing.capture_logs() as logs:
        cfg, secrets = make_config(cloud, tmp_path)
        link = UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)
        async with running(link):
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0, timeout=20, what="outbox emptied")
            await wait_until(lambda: len(_seen_ids(obs)) >= 10, timeout=10, what="acks seen")
            metrics = link.metrics()
            assert link.client.protocol_version == aiomqtt.ProtocolVersion.V5
            assert (link.client.connects, link.client.drops) == (1, 0)   # the link never went down
    assert _seen_ids(obs) == ids
    assert all(m.topic != DENIED for m in obs.snapshot())
    assert metrics["set_aside"] == 1 and metrics["buffer_set_aside"] == 1 and metrics["resend_rounds"] == 1
    conn = connect(tmp_path / "var" / "gateway.db", readonly=True)
    try:
        aside = outbox.set_aside_rows(conn)
    finally:
        conn.close()
    assert [r["topic"] for r in aside] == [DENIED]
    assert "0x87" in str(aside[0]["reason"])
    warned = [e for e in logs if e["event"] == "upstream message set aside: the cloud broker refused it"]
    assert len(warned) == 1 and "0x87" in warned[0]["reason"]


async def test_protocol_311_cannot_tell_a_refusal(cloud_factory, db: Database, tmp_path: Path):
    """``protocol = "3.1.1"``: Mosquitto acknowledges the denied publish and drops it, so the row
    counts as published; this is what 5.0 (the default, "auto") is for."""
    cloud: Cloud = cloud_factory(start=False)
    cloud.deny = [DENIED]
    cloud.start()
    ids = await _fill(db)
    with Observer(cloud) as obs:
        cfg, secrets = make_config(cloud, tmp_path, protocol="3.1.1")
        link = UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)
        async with running(link):
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0, timeout=20, what="outbox emptied")
            await wait_until(lambda: len(_seen_ids(obs)) >= 10, timeout=10, what="acks seen")
            assert link.client.protocol_version == aiomqtt.ProtocolVersion.V311
            metrics = link.metrics()
    assert _seen_ids(obs) == ids
    assert metrics["set_aside"] == 0 and metrics["published"] == 11


async def test_the_window_stays_within_the_cloud_brokers_receive_maximum(cloud: Cloud, db: Database,
                                                                       tmp_path: Path):
    """Mosquitto tells a 5.0 client its Receive Maximum (here 100, its max_inflight_messages)
    and disconnects one that has more QoS 1 publishes unacknowledged; the drain's window
    (``max_inflight`` 1000) is bounded by it, so 1500 rows go on one connection."""
    ob = outbox.Outbox()

    def fill(conn: Any) -> None:
        for i in range(1500):
            ob.enqueue(conn, "ack", f"{PREFIX}/acks", json.dumps({"message_id": f"m-{i}"}).encode(), False)

    await db.run(fill)
    with Observer(cloud) as obs:
        cfg, secrets = make_config(cloud, tmp_path)
        link = UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)
        async with running(link):
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0, timeout=30, what="outbox emptied")
            await wait_until(lambda: len(_seen_ids(obs)) >= 1500, timeout=10, what="acks seen")
            assert link.client.receive_maximum == 100
            assert (link.client.connects, link.client.drops) == (1, 0)
    assert _seen_ids(obs) == [f"m-{i}" for i in range(1500)]
