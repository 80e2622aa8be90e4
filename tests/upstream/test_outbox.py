"""The outbox on its own: ordering, the running size, the cap, coalescing, durability."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
import structlog

from gateway import migrations
from gateway.storage import Database, connect
from gateway.storage import transaction as tx  # one write transaction, as Database.run
from gateway.upstream import outbox

P = "homepot/site-t"


# The outbox object of the test running now (a fresh one per test: nothing carries over).
OB = outbox.Outbox()


@pytest.fixture(autouse=True)
def fresh_outbox() -> None:
    global OB
    OB = outbox.Outbox()


def migrated(path: Path) -> sqlite3.Connection:
    """A connection to a database the schema registry has migrated, as the daemon opens it."""
    c = connect(path)
    tx(c, migrations.migrate)
    return c


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = migrated(tmp_path / "gateway.db")
    yield c
    c.close()


def status(conn: sqlite3.Connection, job: str, n: int, pad: int = 0) -> None:
    payload = json.dumps({"job_id": job, "n": n, "pad": "x" * pad}).encode()
    OB.enqueue(conn, "status", f"{P}/jobs/{job}/status", payload, True, coalesce_key=job)


def ack(conn: sqlite3.Connection, n: int, pad: int = 0) -> None:
    payload = json.dumps({"message_id": f"m{n}", "n": n, "pad": "y" * pad}).encode()
    OB.enqueue(conn, "ack", f"{P}/acks", payload, False)


def rows(conn: sqlite3.Connection) -> list[outbox.OutboxRow]:
    return outbox.fetch(conn, 0, 1_000_000)


def consistent(conn: sqlite3.Connection) -> outbox.OutboxStats:
    """The running counters equal what a full scan says."""
    st = outbox.stats(conn)
    total, count = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM upstream_outbox").fetchone()
    assert (st.bytes, st.rows) == (total, count)
    return st


def test_enqueue_works_without_a_state_row_and_ensure_state_is_repeatable(conn):
    tx(conn, lambda c: ack(c, 1))  # the pipeline may write before the link started
    tx(conn, outbox.ensure_state)
    tx(conn, outbox.ensure_state)
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
    tx(conn, outbox.ensure_state)

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
    tx(conn, lambda c: OB.delete_sent(c, [r.seq for r in rows(c)]))
    tx(conn, lambda c: ack(c, 9))
    assert rows(conn)[0].seq > last  # a drain cursor at `last` still finds it


def test_bad_kind_is_a_programming_error(conn):
    with pytest.raises(ValueError):
        OB.enqueue(conn, "telemetry", "t", b"", False)  # type: ignore[arg-type]


def test_below_the_warning_level_nothing_is_coalesced(conn):
    tx(conn, lambda c: OB.configure(c, 1_000_000))
    tx(conn, lambda c: [status(c, "job-a", i) for i in range(50)])
    st = consistent(conn)
    assert st.rows == 50 and st.coalesced == 0 and not st.near_cap  # every snapshot is forwarded


def test_near_the_cap_status_snapshots_are_coalesced_oldest_first_and_acks_kept(conn):
    cap = 20_000
    tx(conn, lambda c: OB.configure(c, cap))
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
    tx(conn, lambda c: OB.configure(c, cap))
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
    tx(conn, lambda c: OB.configure(c, 3_000))
    tx(conn, lambda c: [status(c, f"job-{j}", j, pad=100) for j in range(40)])
    st = consistent(conn)
    assert st.bytes <= 3_000 and st.dropped > 0
    kept = [json.loads(r.payload)["job_id"] for r in rows(conn)]
    assert kept == [f"job-{j}" for j in range(40 - len(kept), 40)]  # the newest jobs' statuses


def test_the_warning_rearms_after_the_buffer_drains(conn):
    tx(conn, lambda c: OB.configure(c, 5_000))
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            tx(conn, lambda c: [ack(c, i) for i in range(60)])
            assert outbox.stats(conn).near_cap
            tx(conn, lambda c: OB.delete_sent(c, [r.seq for r in rows(c)]))  # the link returned
            assert not outbox.stats(conn).near_cap
    near = [e for e in logs if e["event"].startswith("upstream buffer nearly full")]
    assert len(near) == 2  # once per episode, not once per row


def test_counters_stay_exact_under_random_traffic(conn):
    rnd = random.Random(6)
    tx(conn, lambda c: OB.configure(c, 8_000))
    for step in range(300):
        op = rnd.random()
        if op < 0.45:
            tx(conn, lambda c: status(c, f"job-{rnd.randrange(8)}", step, pad=rnd.randrange(200)))
        elif op < 0.9:
            tx(conn, lambda c: ack(c, step, pad=rnd.randrange(200)))
        else:
            sent = [r.seq for r in outbox.fetch(conn, 0, rnd.randrange(1, 20))]
            tx(conn, lambda c: OB.delete_sent(c, sent))
        st = consistent(conn)
        assert st.bytes <= 8_000


def test_an_oversized_message_is_dropped_not_raised(conn):
    tx(conn, lambda c: OB.configure(c, 1_000))
    tx(conn, lambda c: OB.enqueue(c, "ack", f"{P}/acks", b"z" * 5_000, False))
    st = consistent(conn)
    assert st.rows == 0 and st.dropped == 1


async def test_enqueue_through_the_database_thread_and_stats_for_other_processes(tmp_path: Path):
    db = await Database(tmp_path / "gateway.db").open()
    try:
        await db.run(lambda c: OB.configure(c, 4 * 1024 * 1024))
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


# --------------------------------------------------------------------------- overflow (issue 15.5)


def device_ack(conn: sqlite3.Connection, message_id: str, status: str, n: int, latency: float | None = None,
               pad: int = 0) -> None:
    payload = {"message_id": message_id, "status": status, "device_id": "pos-1", "job_id": "job-a",
               "latency_ms": latency, "n": n, "pad": "z" * pad}
    OB.enqueue(conn, "ack", f"{P}/acks", json.dumps(payload).encode(), False)


def acks_left(conn: sqlite3.Connection) -> list[dict]:
    return [json.loads(r.payload) for r in rows(conn) if r.kind == "ack"]


def test_drop_oldest_merges_a_deliverys_acks_into_its_most_advanced_before_dropping(conn):
    cap = 12_000
    tx(conn, lambda c: OB.configure(c, cap, "drop-oldest"))

    def fill(c):
        # 20 deliveries, each acked received → displayed → opened (and one dismissed), in waves
        for wave, status in enumerate(("received", "displayed", "opened")):
            for d in range(20):
                if (d, status) == (3, "opened"):
                    status_d = "dismissed"
                else:
                    status_d = status
                device_ack(c, f"msg-{d}", status_d, wave * 100 + d, latency=40.0 + d if wave == 0 else None, pad=60)
    with structlog.testing.capture_logs() as logs:
        tx(conn, fill)
    st = consistent(conn)
    assert st.dropped == 0 and st.coalesced_acks > 0 and st.near_cap
    left = acks_left(conn)
    by_msg = {}
    for a in left:
        assert a["message_id"] not in by_msg  # one ack per delivery once coalesced
        by_msg[a["message_id"]] = a
    # each delivery kept its most advanced ack, with the delivery's latency from its first ack
    assert by_msg["msg-3"]["status"] == "dismissed"
    assert {a["status"] for m, a in by_msg.items() if m != "msg-3"} <= {"opened", "displayed", "received"}
    for m, a in by_msg.items():
        d = int(m.split("-")[1])
        assert a["latency_ms"] == 40.0 + d
    assert any(e["event"] == "upstream buffer nearly full; coalescing" for e in logs)


def test_ack_rank_order_and_a_less_advanced_ack_does_not_replace_a_more_advanced_one(conn):
    assert list(outbox.ACK_RANK) == ["received", "failed", "displayed", "dismissed", "opened"]
    tx(conn, lambda c: OB.configure(c, 2_000, "drop-oldest"))
    tx(conn, lambda c: [ack(c, i, pad=40) for i in range(12)])  # near the cap
    assert outbox.stats(conn).near_cap
    tx(conn, lambda c: device_ack(c, "late", "opened", 100, latency=12.0))
    tx(conn, lambda c: device_ack(c, "late", "received", 101))  # arrives after the open: adds nothing
    late = [a for a in acks_left(conn) if a["message_id"] == "late"]
    assert [(a["status"], a["n"], a["latency_ms"]) for a in late] == [("opened", 100, 12.0)]


def test_drop_oldest_at_the_cap_drops_oldest_acks_counted(conn):
    tx(conn, lambda c: OB.configure(c, 6_000, "drop-oldest"))
    for i in range(120):
        tx(conn, lambda c, i=i: device_ack(c, f"m{i}", "received", i))
    st = consistent(conn)
    kept = [a["n"] for a in acks_left(conn)]
    assert st.bytes <= 6_000 and st.dropped == 120 - len(kept) > 0
    assert kept == list(range(120 - len(kept), 120))


def held_rows(conn: sqlite3.Connection) -> list[dict]:
    return [json.loads(r[0]) for r in conn.execute("SELECT payload FROM upstream_outbox_held ORDER BY seq")]


def test_refuse_new_holds_an_acks_upstream_copy_back_and_never_fails_the_callers_commit(conn):
    """At the cap an ack's transaction still commits (the ack counts locally, the device is
    acknowledged): only its copy for the cloud waits, outside the buffer, in order."""
    cap = 6_000
    tx(conn, lambda c: OB.configure(c, cap, "refuse-new"))
    tx(conn, lambda c: status(c, "job-s", 0))
    with structlog.testing.capture_logs() as logs:
        for i in range(200):
            tx(conn, lambda c, i=i: device_ack(c, f"m{i}", "received", i))  # never raises
    st = consistent(conn)
    queued = [a["n"] for a in acks_left(conn)]
    held = [a["n"] for a in held_rows(conn)]
    assert 0 < len(queued) < 200 and st.dropped == 0 and st.bytes <= cap
    assert queued + held == list(range(200))  # nothing dropped, arrival order kept across both
    assert st.refused == st.held == len(held)
    assert st.as_dict()["buffer_held"] == len(held)
    holding = [e for e in logs if e["event"].startswith("upstream buffer full; device acks are stored")]
    assert len(holding) == 1  # rate-limited, not one line per held ack


def test_refuse_new_never_holds_a_status_snapshot_back(conn):
    tx(conn, lambda c: OB.configure(c, 4_000, "refuse-new"))
    while not outbox.stats(conn).held:
        tx(conn, lambda c: device_ack(c, f"m{outbox.stats(c).rows}", "received", 0, pad=50))
    for n in range(5):  # the buffer is full of acks: snapshots still go in (one per job kept)
        tx(conn, lambda c, n=n: [status(c, f"job-{j}", n, pad=100) for j in range(3)])
    statuses = [json.loads(r.payload) for r in rows(conn) if r.kind == "status"]
    assert sorted((s["job_id"], s["n"]) for s in statuses) == [("job-0", 4), ("job-1", 4), ("job-2", 4)]
    st = consistent(conn)
    assert st.dropped == 0 and st.bytes > 4_000  # over the cap by the snapshots, by design


def test_refuse_new_moves_held_acks_in_as_the_cloud_takes_rows_and_loses_none(conn):
    cap = 3_000
    tx(conn, lambda c: OB.configure(c, cap, "refuse-new"))
    for n in range(40):
        tx(conn, lambda c, n=n: device_ack(c, f"m{n}", "received", n))
    assert outbox.stats(conn).held > 0
    sent: list[int] = []
    while rows(conn) or held_rows(conn):
        batch = outbox.fetch(conn, 0, 5)
        sent += [json.loads(r.payload)["n"] for r in batch]
        tx(conn, lambda c, batch=batch: OB.delete_sent(c, [r.seq for r in batch]))  # PUBACKed
        st = consistent(conn)
        assert st.bytes <= cap and st.held == len(held_rows(conn))
        if len(sent) == 10:
            tx(conn, lambda c: device_ack(c, "late", "received", 40))  # behind the held ones
    assert sent == list(range(41))  # every ack once, in arrival order
    assert outbox.stats(conn).refused >= 1 and outbox.stats(conn).held == 0


def test_a_held_ack_that_can_no_longer_fit_is_dropped_not_left_blocking_the_rest(conn):
    """Restarted with a smaller buffer_max_mb: a held ack larger than the whole new cap is
    dropped and counted (it could never move in), the ones behind it still arrive, in order."""
    tx(conn, lambda c: OB.configure(c, 3_000, "refuse-new"))
    n = 0
    while not outbox.stats(conn).held:
        tx(conn, lambda c, n=n: device_ack(c, f"m{n}", "received", n))
        n += 1
    tx(conn, lambda c: device_ack(c, "big", "received", n, pad=1_500))  # held, ~1.7 KB
    for k in range(n + 1, n + 4):
        tx(conn, lambda c, k=k: device_ack(c, f"m{k}", "received", k))
    tx(conn, lambda c: OB.configure(c, 1_000, "refuse-new"))
    sent: list[int] = []
    for _ in range(100):  # bounded: a held ack that never fits would block the rest for ever
        batch = outbox.fetch(conn, 0, 3)
        if not batch:
            break
        sent += [json.loads(r.payload)["n"] for r in batch]
        tx(conn, lambda c, batch=batch: OB.delete_sent(c, [r.seq for r in batch]))
    assert sent == [k for k in range(n + 4) if k != n]  # only the big one is gone, the rest in order
    st = consistent(conn)
    assert st.dropped == 1 and st.held == 0


def test_held_acks_join_the_buffer_when_the_policy_becomes_drop_oldest(conn):
    tx(conn, lambda c: OB.configure(c, 3_000, "refuse-new"))
    for n in range(30):
        tx(conn, lambda c, n=n: device_ack(c, f"m{n}", "received", n))
    assert outbox.stats(conn).held > 0
    tx(conn, lambda c: OB.configure(c, 3_000, "drop-oldest"))  # restarted with the other policy
    st = consistent(conn)
    assert st.held == 0 and not held_rows(conn) and st.bytes <= 3_000
    assert acks_left(conn)[-1]["n"] == 29  # the newest survive, as drop-oldest promises


def test_configure_rejects_an_unknown_overflow(conn):
    with pytest.raises(ValueError):
        tx(conn, lambda c: OB.configure(c, 1000, "drop-newest"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ids and set-aside (15.3, 15.6)


def test_every_row_goes_up_with_an_id_that_survives_resends_and_a_wiped_database(tmp_path: Path):
    def ids_of(path: Path) -> list[str]:
        c = migrated(path)
        try:
            tx(c, lambda c: [ack(c, i) for i in range(3)])
            tx(c, lambda c: status(c, "job-a", 1))
            prefix = outbox.id_prefix(c)
            wire = [json.loads(outbox.wire_payload(r, prefix)) for r in rows(c)]
            again = [json.loads(outbox.wire_payload(r, outbox.id_prefix(c))) for r in rows(c)]
        finally:
            c.close()
        assert wire == again  # the same id on every resend
        assert [w["n"] for w in wire] == [0, 1, 2, 1]  # the payload otherwise unchanged
        return [w["id"] for w in wire]

    first = ids_of(tmp_path / "a.db")
    assert len(set(first)) == 4
    (tmp_path / "a.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"a.db{suffix}").unlink(missing_ok=True)
    assert not set(first) & set(ids_of(tmp_path / "a.db"))  # a wiped database reuses no id


def test_wire_payload_keeps_an_existing_id_key_and_odd_payloads(conn):
    row = outbox.OutboxRow(7, "ack", "t", b'{"id": "mine", "a": 1}', False)
    assert outbox.wire_payload(row, "p") == row.payload
    value_only = outbox.OutboxRow(8, "ack", "t", b'{"device_id": "id", "a": 1}', False)
    assert json.loads(outbox.wire_payload(value_only, "p")) == {"device_id": "id", "a": 1, "id": "p-8"}
    assert outbox.wire_payload(outbox.OutboxRow(9, "ack", "t", b"[1]", False), "p") == b"[1]"
    assert json.loads(outbox.wire_payload(outbox.OutboxRow(10, "ack", "t", b"{}", False), "p")) == {"id": "p-10"}


def test_a_row_set_aside_is_kept_counted_and_out_of_the_drain(conn):
    tx(conn, lambda c: [ack(c, i) for i in range(3)])
    victim = rows(conn)[1]
    moved = tx(conn, lambda c: OB.set_aside(c, victim.seq, "3 sessions in a row"))
    assert moved == victim
    assert [json.loads(r.payload)["n"] for r in rows(conn)] == [0, 2]
    st = consistent(conn)
    assert st.set_aside == 1 and st.as_dict()["buffer_set_aside"] == 1
    aside = outbox.set_aside_rows(conn)
    assert [(a["seq"], a["payload"], a["reason"]) for a in aside] == [(victim.seq, victim.payload,
                                                                       "3 sessions in a row")]


def test_refusals_are_stored_with_the_ack_and_belong_to_their_database(tmp_path: Path):
    """A held-back ack is counted in its own transaction: a reader on its own read-only
    connection (the /metrics scrape, the operator page) sees the count, and another
    database of the same process never does (this once flaked the upgrade test below)."""
    a, b = migrated(tmp_path / "a.db"), migrated(tmp_path / "b.db")
    tx(a, lambda c: OB.configure(c, 1_000, "refuse-new"))
    tx(b, outbox.ensure_state)
    for i in range(40):
        tx(a, lambda c, i=i: device_ack(c, f"m{i}", "received", i))
    refused = a.execute("SELECT refused FROM upstream_outbox_state").fetchone()[0]
    assert refused > 0
    reader = connect(tmp_path / "a.db", readonly=True)
    assert outbox.stats(reader).refused == refused == outbox.stats(reader).held
    tx(b, lambda c: ack(c, 1))
    assert outbox.stats(b).refused == 0 and outbox.stats(b).held == 0
    for c in (reader, a, b):
        c.close()


def test_a_database_from_the_previous_release_is_upgraded_in_place(tmp_path: Path):
    """The state table gained columns: an old one is altered, its rows and counters kept."""
    c = connect(tmp_path / "old.db")
    c.execute("CREATE TABLE upstream_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
              "topic TEXT NOT NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL, coalesce_key TEXT, "
              "size INTEGER NOT NULL, created_at REAL NOT NULL)")
    c.execute("CREATE TABLE upstream_outbox_state (id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL "
              "DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0, coalesced INTEGER "
              "NOT NULL DEFAULT 0, max_bytes INTEGER NOT NULL, near INTEGER NOT NULL DEFAULT 0, dropping INTEGER "
              "NOT NULL DEFAULT 0)")
    c.execute("INSERT INTO upstream_outbox (kind, topic, payload, retain, coalesce_key, size, created_at) "
              "VALUES ('ack', 't', '{\"n\": 0}', 0, NULL, 73, 0)")
    c.execute("INSERT INTO upstream_outbox_state (id, bytes, rows, dropped, max_bytes) VALUES (1, 73, 1, 5, 100000)")
    tx(c, migrations.migrate)  # the upgrade happens when the database is opened
    tx(c, lambda c: ack(c, 1))  # the pipeline writes first
    st = consistent(c)
    assert (st.rows, st.dropped, st.max_bytes, st.set_aside, st.refused) == (2, 5, 100000, 0, 0)
    assert outbox.id_prefix(c) not in ("", "None")
    c.close()


def test_two_outboxes_in_one_process_share_no_listeners_and_no_warnings(tmp_path: Path):
    """Each daemon (or test) has its own outbox object: who is woken and when the held-back
    warning was last logged belong to it, never to the module."""
    a, b = outbox.Outbox(1_000, "refuse-new"), outbox.Outbox(1_000, "refuse-new")
    woke: list[str] = []
    a.add_listener(lambda: woke.append("a"))
    b.add_listener(lambda: woke.append("b"))
    ca, cb = migrated(tmp_path / "a.db"), migrated(tmp_path / "b.db")
    tx(ca, a.prepare)
    tx(cb, b.prepare)
    with structlog.testing.capture_logs() as logs:
        for i in range(40):
            tx(ca, lambda c, i=i: a.enqueue(c, "ack", f"{P}/acks", json.dumps({"message_id": f"m{i}"}).encode(),
                                            False))
            tx(cb, lambda c, i=i: b.enqueue(c, "ack", f"{P}/acks", json.dumps({"message_id": f"m{i}"}).encode(),
                                            False))
    assert woke.count("a") == woke.count("b") == 40
    assert len([e for e in logs if e["event"].startswith("upstream buffer full; device acks")]) == 2  # one each
    ca.close()
    cb.close()
