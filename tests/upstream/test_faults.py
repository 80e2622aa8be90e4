"""The cloud link faulted mid-drain: a fault proxy (tests/upstream/proxy.py) between the link
and a real Mosquitto drops a PUBACK, delays every packet, cuts the connection, or behaves
like a cloud broker that drops a client on a denied publish. An independent subscriber on
the cloud broker says what arrived; the link's own database only says what is left.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

from gateway.config import parse_config
from gateway.storage import Database, connect
from gateway.upstream import outbox
from gateway.upstream.link import UpstreamLink
from tests.support import base_config, free_port
from tests.upstream.cloud import PREFIX, Cloud, Observer, Seen
from tests.upstream.conftest import FAST, RecordingIntake, running, wait_until
from tests.upstream.proxy import MqttFaultProxy, Publish

JOBS = 4


def plain_config(cloud: Cloud, proxy: MqttFaultProxy, tmp: Path, **upstream: Any):
    return parse_config(base_config(tmp, free_port(), upstream=cloud.plain_section(proxy.port, **upstream)),
                        environ={})


async def enqueue_mix(db: Database, start: int, count: int) -> list[tuple[str, bytes]]:
    """Status snapshots of a few jobs (each newer than the last) interleaved with acks."""
    sent: list[tuple[str, bytes]] = []
    ob = outbox.Outbox()

    def fill(conn: Any) -> None:
        for i in range(start, start + count):
            job = f"job-{i % JOBS}"
            if i % 3 == 0:
                topic = f"{PREFIX}/jobs/{job}/status"
                payload = json.dumps({"job_id": job, "state": "dispatching", "n": i}).encode()
                ob.enqueue(conn, "status", topic, payload, True, coalesce_key=job)
            else:
                topic = f"{PREFIX}/acks"
                payload = json.dumps({"message_id": f"m-{i}", "status": "received", "job_id": job,
                                      "device_id": f"pos-{i}", "latency_ms": 5, "n": i}).encode()
                ob.enqueue(conn, "ack", topic, payload, False)
            sent.append((topic, payload))

    await db.run(fill)  # one transaction, as a pipeline batch commit
    return sent


def rows_seen(msgs: list[Seen]) -> list[Seen]:
    return [m for m in msgs if "/gateway/status" not in m.topic and m.topic != BARRIER]


BARRIER = f"{PREFIX}/test-barrier"


async def everything_seen(cloud: Cloud, obs: Observer) -> list[Seen]:
    """What the observer got of all the cloud broker accepted so far.

    Called once the link's outbox is empty (every row PUBACKed): a marker published now
    reaches the observer after everything the broker took before it (one FIFO queue per
    subscriber), so the snapshot that contains it is complete; no fixed sleep.
    """
    marker = f"barrier-{time.monotonic_ns()}".encode()
    await asyncio.to_thread(cloud.publish, BARRIER, marker)
    msgs = await asyncio.to_thread(obs.wait_for, lambda m: any(x.payload == marker for x in m), 20)
    return msgs


def last_occurrences(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Each item where it was seen for the last time, in arrival order.

    A resend that restarts at the oldest unconfirmed row replays a suffix, which keeps
    this equal to the order sent; a stale row resent after newer ones does not.
    """
    last = {item: i for i, item in enumerate(items)}
    return [item for i, item in enumerate(items) if last[item] == i]


def assert_in_order_and_complete(msgs: list[Seen], sent: list[tuple[str, bytes]]) -> None:
    got = [(m.topic, m.body) for m in rows_seen(msgs)]
    assert set(got) == set(sent), f"missing: {len(set(sent) - set(got))}"
    assert last_occurrences(got) == sent  # per job and overall: no stale resend after a newer row
    by_id: dict[str, tuple[str, bytes]] = {}
    for m in rows_seen(msgs):  # every copy of a row carries the same id, and ids are unique
        assert m.id is not None
        assert by_id.setdefault(m.id, (m.topic, m.body)) == (m.topic, m.body)
    assert len(by_id) == len(sent)


def newest_status(sent: list[tuple[str, bytes]], job: str) -> bytes:
    return [p for t, p in sent if t == f"{PREFIX}/jobs/{job}/status"][-1]


def assert_retained_newest(cloud: Cloud, sent: list[tuple[str, bytes]]) -> None:
    """The status the cloud keeps for each job is the newest one (issue 15.1)."""
    retained = cloud.retained_many(f"{PREFIX}/jobs/+/status", JOBS)
    for j in range(JOBS):
        topic = f"{PREFIX}/jobs/job-{j}/status"
        assert Seen("", retained[topic], True, 0).body == newest_status(sent, f"job-{j}")


async def test_a_lost_puback_never_lets_an_older_status_win(cloud: Cloud, db: Database, tmp_path: Path):
    """Issue 15.1: the PUBACK of one status snapshot is lost while later rows are confirmed."""
    lost: list[Publish] = []

    def policy(p: Publish) -> str:
        if not lost and p.topic == f"{PREFIX}/jobs/job-1/status" and json.loads(p.payload)["n"] >= 60:
            lost.append(p)
            return "drop_puback"
        return "forward"

    sent = await enqueue_mix(db, 0, 300)
    with MqttFaultProxy(cloud.plain_port, policy=policy) as proxy, Observer(cloud) as obs:
        cfg, secrets = plain_config(cloud, proxy, tmp_path)
        async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)) as link:
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0 and link.metrics()["connected"],
                             what="outbox emptied")
            msgs = await everything_seen(cloud, obs)
            metrics = link.metrics()
    assert proxy.stats.dropped_pubacks == 1
    assert_in_order_and_complete(msgs, sent)
    assert_retained_newest(cloud, sent)
    # only the rows from the unconfirmed one on were sent twice
    lost_n = json.loads(lost[0].payload)["n"]
    copies = Counter(m.id for m in rows_seen(msgs))
    twice = [json.loads(m.body)["n"] for m in rows_seen(msgs) if copies[m.id] > 1]
    assert twice and min(twice) == lost_n
    assert metrics["puback_gaps"] == 1 and metrics["published"] == 300


async def test_a_slow_link_keeps_a_window_in_flight_and_deletes_in_batches(cloud: Cloud, db: Database,
                                                                          tmp_path: Path):
    """Issue 15.4: at 200 ms round trip the link keeps hundreds of publishes in flight."""
    sent = await enqueue_mix(db, 0, 1500)
    with MqttFaultProxy(cloud.plain_port, delay_s=0.1) as proxy, Observer(cloud) as obs:
        cfg, secrets = plain_config(cloud, proxy, tmp_path, max_inflight=400)
        async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)) as link:
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0, timeout=30, what="outbox emptied")
            msgs = await everything_seen(cloud, obs)
            metrics = link.metrics()
    assert [(m.topic, m.body) for m in rows_seen(msgs)] == sent  # exactly once, in order
    # what the proxy saw on the wire: far more than one batch of 64 unacknowledged at once
    assert 200 <= proxy.stats.max_unacked <= 400 + 1  # the window, plus the "online" announcement
    # confirmed rows are deleted a batch per transaction, not one by one
    assert metrics["forget_commits"] < 1500 / 20


async def test_cuts_after_n_publishes_resend_only_the_unconfirmed_suffix(cloud: Cloud, db: Database,
                                                                       tmp_path: Path):
    """The connection dies three times mid-drain (PUBACKs in flight are lost with it)."""
    def policy(p: Publish) -> str:
        return "cut" if p.connection <= 3 and p.index == 120 else "forward"

    sent = await enqueue_mix(db, 0, 600)
    with MqttFaultProxy(cloud.plain_port, policy=policy, delay_s=0.02) as proxy, Observer(cloud) as obs:
        cfg, secrets = plain_config(cloud, proxy, tmp_path)
        async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)) as link:
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0, timeout=30, what="outbox emptied")
            msgs = await everything_seen(cloud, obs)
            metrics = link.metrics()
    assert proxy.stats.cuts == 3
    assert_in_order_and_complete(msgs, sent)
    assert_retained_newest(cloud, sent)
    # each cut costs at most what the broker had taken but not yet confirmed back
    assert len(rows_seen(msgs)) - len(sent) <= 3 * 119
    assert metrics["connection_drops"] == 3 and metrics["published"] == 600


async def test_a_broker_that_kicks_on_one_topic_gets_backoff_and_the_row_is_set_aside(
        cloud: Cloud, db: Database, tmp_path: Path):
    """Issue 15.3: like AWS IoT, the broker drops the client on a denied publish."""
    denied = f"{PREFIX}/jobs/job-denied/status"

    def policy(p: Publish) -> str:
        return "kick" if p.topic == denied else "forward"

    before = await enqueue_mix(db, 0, 30)
    await db.run(lambda c: outbox.Outbox().enqueue(c, "status", denied, b'{"job_id": "job-denied"}', True, "job-denied"))
    after = await enqueue_mix(db, 30, 30)
    with (MqttFaultProxy(cloud.plain_port, policy=policy) as proxy, Observer(cloud) as obs,
          structlog.testing.capture_logs() as logs):
        cfg, secrets = plain_config(cloud, proxy, tmp_path)
        link = UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, backoff_initial=0.1, backoff_max=0.4,
                            poll_interval=0.2, set_aside_after=4)
        async with running(link):
            await wait_until(lambda: link.metrics().get("buffer_rows") == 0, timeout=20, what="outbox emptied")
            msgs = await everything_seen(cloud, obs)
            metrics = link.metrics()
            connections = proxy.stats.connections
    # no reconnect storm: the first session made progress (backoff reset), then each kick
    # waited longer than the last, and after 4 rounds on the same row it went aside
    assert proxy.stats.kicks == 4
    assert connections == 5
    gaps = [b - a for a, b in zip(proxy.stats.connected_at[1:], proxy.stats.connected_at[2:])]
    assert all(g >= 0.04 for g in gaps) and sum(gaps) >= 0.3, gaps
    assert_in_order_and_complete(msgs, before + after)
    assert all(m.topic != denied for m in msgs)  # the broker never took it
    assert metrics["buffer_set_aside"] == 1 and metrics["set_aside"] == 1
    conn = connect(cfg.db_path, readonly=True)
    try:
        aside = outbox.set_aside_rows(conn)
    finally:
        conn.close()
    assert [(r["topic"], r["payload"]) for r in aside] == [(denied, b'{"job_id": "job-denied"}')]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings].count("mqtt connection lost") == 1  # rate-limited
    assert [e["event"] for e in warnings].count("upstream message set aside: the cloud broker will not take it") == 1


async def test_a_clean_stop_mid_drain_sends_nothing_twice(cloud: Cloud, db: Database, tmp_path: Path):
    """Issue 15.6: stopping while hundreds are in flight waits for their PUBACKs."""
    sent = await enqueue_mix(db, 0, 3000)
    with MqttFaultProxy(cloud.plain_port, delay_s=0.05) as proxy, Observer(cloud) as obs:
        cfg, secrets = plain_config(cloud, proxy, tmp_path, max_inflight=300)
        link = UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, stop_flush_s=0.6, **FAST)
        async with running(link):
            await wait_until(lambda: link.metrics()["published"] >= 300,
                             what="a window in flight")
        stopped = await link.refresh_metrics()
        assert 0 < stopped["buffer_rows"] < 3000  # stopped mid-drain
        async with running(UpstreamLink(cfg, db, RecordingIntake(), secrets=secrets.upstream, **FAST)) as again:
            await wait_until(lambda: again.metrics().get("buffer_rows") == 0, timeout=30, what="outbox emptied")
            msgs = await everything_seen(cloud, obs)
    assert [(m.topic, m.body) for m in rows_seen(msgs)] == sent  # once each, in order, across the stop

