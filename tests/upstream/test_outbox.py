"""The outbox on its own: ordering, the running size, the cap, coalescing, durability."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
import structlog

from gateway.storage import Database, connect
from gateway.storage import transaction as tx  # one write transaction, as Database.run
from gateway.upstream import outbox

P = "homepot/site-t"


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = connect(tmp_path / "gateway.db")
    yield c
    c.close()


def status(conn: sqlite3.Connection, job: str, n: int, pad: int = 0) -> None:
    payload = json.dumps({"job_id": job, "n": n, "pad": "x" * pad}).encode()
    outbox.enqueue(conn, "status", f"{P}/jobs/{job}/status", payload, True, coalesce_key=job)


def ack(conn: sqlite3.Connection, n: int, pad: int = 0) -> None:
    payload = json.dumps({"message_id": f"m{n}", "n": n, "pad": "y" * pad}).encode()
    outbox.enqueue(conn, "ack", f"{P}/acks", payload, False)


def rows(conn: sqlite3.Connection) -> list[outbox.OutboxRow]:
    return outbox.fetch(conn, 0, 1_000_000)


def consistent(conn: sqlite3.Connection) -> outbox.OutboxStats:
    """The running counters equal what a full scan says."""
    st = outbox.stats(conn)
    total, count = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM upstream_outbox").fetchone()
    assert (st.bytes, st.rows) == (total, count)
    return st


def test_enqueue_works_without_explicit_schema_and_ensure_schema_is_repeatable(conn):
    tx(conn, lambda c: ack(c, 1))  # the pipeline may write before the link started
    tx(conn, outbox.ensure_schema)
    tx(conn, outbox.ensure_schema)
    tx(conn, lambda c: ack(c, 2))
    got = rows(conn)
    assert [json.loads(r.payload)["n"] for r in got] == [1, 2]
    assert all(r.kind == "ack" and r.retain is False and r.topic == f"{P}/acks" for r in got)
    consistent(conn)


def test_rows_come_back_in_enqueue_order_with_retain_flags(conn):
    def fill(c):
        for i in range(30):
            status(c, f"job-{i % 3}", i)
            ack(c, i)
    tx(conn, fill)
    got = rows(conn)
    assert [r.seq for r in got] == sorted(r.seq for r in got)
    assert [(r.kind, json.loads(r.payload)["n"]) for r in got] == [
        (kind, i) for i in range(30) for kind in ("status", "ack")]
    assert all(r.retain == (r.kind == "status") for r in got)
    # the drain reads in pages after a cursor
    first = outbox.fetch(conn, 0, 10)
    second = outbox.fetch(conn, first[-1].seq, 10)
    assert [r.seq for r in first + second] == [r.seq for r in got[:20]]


def test_a_rolled_back_pipeline_transaction_leaves_no_forward(conn):
    tx(conn, outbox.ensure_schema)

    def fails(c):
        ack(c, 1)
        raise RuntimeError("the pipeline's own write failed")
    with pytest.raises(RuntimeError):
        tx(conn, fails)
    assert rows(conn) == []
    assert consistent(conn).bytes == 0


def test_seq_is_never_reused_after_the_buffer_empties(conn):
    tx(conn, lambda c: [ack(c, i) for i in range(3)])
    last = rows(conn)[-1].seq
    tx(conn, lambda c: outbox.delete_sent(c, [r.seq for r in rows(c)]))
    tx(conn, lambda c: ack(c, 9))
    assert rows(conn)[0].seq > last  # a drain cursor at `last` still finds it


def test_bad_kind_is_a_programming_error(conn):
    with pytest.raises(ValueError):
        outbox.enqueue(conn, "telemetry", "t", b"", False)  # type: ignore[arg-type]


def test_below_the_warning_level_nothing_is_coalesced(conn):
    tx(conn, lambda c: outbox.configure(c, 1_000_000))
    tx(conn, lambda c: [status(c, "job-a", i) for i in range(50)])
    st = consistent(conn)
    assert st.rows == 50 and st.coalesced == 0 and not st.near_cap  # every snapshot is forwarded


def test_near_the_cap_status_snapshots_are_coalesced_oldest_first_and_acks_kept(conn):
    cap = 20_000
    tx(conn, lambda c: outbox.configure(c, cap))
    with structlog.testing.capture_logs() as logs:
        def fill(c):
            n = 0
            # ~150 B per row; statuses of 4 jobs and acks interleaved, up to ~85 % of the cap
            while outbox.stats(c).bytes < 0.85 * cap:
                status(c, f"job-{n % 4}", n)
                ack(c, n)
                n += 1
            return n
        n = tx(conn, fill)
        before = consistent(conn)
        assert before.coalesced == 0 and before.dropped == 0
        acks_before = [r.payload for r in rows(conn) if r.kind == "ack"]

        # crossing 90 %: one warning, the redundant snapshots go, every ack stays
        tx(conn, lambda c: [ack(c, n + i) for i in range(12)])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["upstream buffer nearly full; coalescing"]
    st = consistent(conn)
    assert st.near_cap and st.dropped == 0 and st.coalesced > 0
    assert st.bytes <= cap
    left = rows(conn)
    statuses = [r for r in left if r.kind == "status"]
    assert sorted(json.loads(r.payload)["job_id"] for r in statuses) == ["job-0", "job-1", "job-2", "job-3"]
    # the one kept per job is its newest snapshot
    assert {json.loads(r.payload)["job_id"]: json.loads(r.payload)["n"] for r in statuses} == {
        f"job-{j}": max(i for i in range(n) if i % 4 == j) for j in range(4)}
    assert [r.payload for r in left if r.kind == "ack"][:len(acks_before)] == acks_before

    # while near the cap a new snapshot replaces the unsent older one of its job (no growth)
    tx(conn, lambda c: status(c, "job-1", 10_000))
    statuses = [json.loads(r.payload) for r in rows(conn) if r.kind == "status"]
    assert [s["n"] for s in statuses if s["job_id"] == "job-1"] == [10_000]
    assert consistent(conn).dropped == 0


def test_at_the_cap_oldest_acks_drop_first_counted_and_warned_once(conn):
    cap = 10_000
    tx(conn, lambda c: outbox.configure(c, cap))
    tx(conn, lambda c: [status(c, f"job-{j}", j) for j in range(3)])
    with structlog.testing.capture_logs() as logs:
        for i in range(200):  # far past the cap, one transaction per ack as the pipeline does
            tx(conn, lambda c, i=i: ack(c, i))
            assert outbox.stats(conn).bytes <= cap
    st = consistent(conn)
    assert st.dropped > 0
    left = rows(conn)
    # the newest acks survive, the oldest were dropped, contiguous and in order
    kept = [json.loads(r.payload)["n"] for r in left if r.kind == "ack"]
    assert kept == list(range(200 - len(kept), 200))
    assert st.dropped == 200 - len(kept)
    # the job statuses (one per job, nothing to coalesce) were kept while acks could give way
    assert sorted(json.loads(r.payload)["job_id"] for r in left if r.kind == "status") == ["job-0", "job-1", "job-2"]
    events = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert events.count("upstream buffer full; dropping the oldest messages (overflow = drop-oldest)") == 1
    assert events.count("upstream buffer nearly full; coalescing") == 1


def test_statuses_drop_only_when_no_ack_is_left(conn):
    tx(conn, lambda c: outbox.configure(c, 3_000))
    tx(conn, lambda c: [status(c, f"job-{j}", j, pad=100) for j in range(40)])
    st = consistent(conn)
    assert st.bytes <= 3_000 and st.dropped > 0
    kept = [json.loads(r.payload)["job_id"] for r in rows(conn)]
    assert kept == [f"job-{j}" for j in range(40 - len(kept), 40)]  # the newest jobs' statuses


def test_the_warning_rearms_after_the_buffer_drains(conn):
    tx(conn, lambda c: outbox.configure(c, 5_000))
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            tx(conn, lambda c: [ack(c, i) for i in range(60)])
            assert outbox.stats(conn).near_cap
            tx(conn, lambda c: outbox.delete_sent(c, [r.seq for r in rows(c)]))  # the link returned
            assert not outbox.stats(conn).near_cap
    near = [e for e in logs if e["event"].startswith("upstream buffer nearly full")]
    assert len(near) == 2  # once per episode, not once per row


def test_counters_stay_exact_under_random_traffic(conn):
    rnd = random.Random(6)
    tx(conn, lambda c: outbox.configure(c, 8_000))
    for step in range(300):
        op = rnd.random()
        if op < 0.45:
            tx(conn, lambda c: status(c, f"job-{rnd.randrange(8)}", step, pad=rnd.randrange(200)))
        elif op < 0.9:
            tx(conn, lambda c: ack(c, step, pad=rnd.randrange(200)))
        else:
            sent = [r.seq for r in outbox.fetch(conn, 0, rnd.randrange(1, 20))]
            tx(conn, lambda c: outbox.delete_sent(c, sent))
        st = consistent(conn)
        assert st.bytes <= 8_000


def test_an_oversized_message_is_dropped_not_raised(conn):
    tx(conn, lambda c: outbox.configure(c, 1_000))
    tx(conn, lambda c: outbox.enqueue(c, "ack", f"{P}/acks", b"z" * 5_000, False))
    st = consistent(conn)
    assert st.rows == 0 and st.dropped == 1


async def test_enqueue_through_the_database_thread_and_stats_for_other_processes(tmp_path: Path):
    db = await Database(tmp_path / "gateway.db").open()
    try:
        await db.run(lambda c: outbox.configure(c, 4 * 1024 * 1024))
        for i in range(5):
            await db.run(lambda c, i=i: ack(c, i))
    finally:
        await db.close()
    # another process (the CLI) can read the metrics from the state table
    reader = connect(tmp_path / "gateway.db", readonly=True)
    try:
        st = outbox.stats(reader)
        assert st.rows == 5 and st.max_bytes == 4 * 1024 * 1024
        assert st.as_dict()["buffer_rows"] == 5 and st.oldest_age_s is not None
    finally:
        reader.close()
