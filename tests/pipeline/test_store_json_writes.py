"""The store writes a page of delivery rows and a batch's acks as one statement over a
JSON array (issue 11): what lands in the tables must be exactly what the values were,
whatever the text (non-ASCII, quotes, newlines, a NUL that SQLite's JSON functions would
cut) and to the last bit of every float."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from gateway import stats
from gateway.pipeline import deliveries
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline.models import Ack
from gateway.storage import Database

from .test_policies import Harness, ScriptedBridge, job, sim

ERRORS = [None, "plain", "quote \" backslash \\ newline \n tab \t", "emoji 😀 and é", "nul \x00 after the nul",
          "\u2028 line separator"]


async def test_ack_rows_and_first_ack_updates_keep_every_value_exactly(tmp_path: Path):
    db = await Database(tmp_path / "gw.db").open()
    try:
        h = Harness(db, {"simulation": ScriptedBridge("simulation")}, batch_size=50)
        await h.add_devices([sim(f"d.{i:03}:x-y") for i in range(30)])
        job_id = await h.submit(job({"all": True}, ttl=600))
        await db.run(lambda conn: deliveries.expand_page(conn, job_id, 50, time.time(), ["simulation"]))
        rows = await db.run(lambda conn: conn.execute(
            "SELECT message_id, device_id, route, state FROM deliveries WHERE job_id = ? ORDER BY rowid",
            (job_id,)).fetchall())
        assert [r[1] for r in rows] == [f"d.{i:03}:x-y" for i in range(30)]  # in order, as written
        assert {(r[2], r[3]) for r in rows} == {("simulation", "queued")}

        now = time.time()
        acks = []
        for n, r in enumerate(rows):
            at = datetime.fromtimestamp(now - n * 0.0137, UTC)
            text = at.isoformat(timespec="milliseconds")[:-6] + "Z"
            acks.append((r[1], Ack(r[0], "received", datetime.fromisoformat(text[:-1] + "+00:00"),
                                   ERRORS[n % len(ERRORS)], text)))
        # Half of them with their send in the same batch (the UPDATE that records both).
        sends = [deliveries.Result(r[0], job_id, r[1], "sent", "simulation", 1) for r in rows[::2]]
        out = await db.run(lambda conn: pipeline_acks.apply_batch(conn, sends, acks, now))
        assert all(o.accepted and o.first for o in out)

        stored = await db.run(lambda conn: conn.execute(
            "SELECT a.message_id, a.device_id, a.status, a.at, a.error, a.received_at, d.state, d.acked_at, "
            "d.latency_ms, d.platform, d.route, d.attempts, d.sent_at FROM acks a "
            "JOIN deliveries d ON d.message_id = a.message_id ORDER BY a.id").fetchall())
        assert len(stored) == len(acks)
        for n, ((device_id, ack), s, o) in enumerate(zip(acks, stored, out)):
            assert tuple(s[:6]) == (ack.message_id, device_id, "received", ack.at_text, ack.error, now)
            assert s[6] == "acknowledged"
            assert s[7] == ack.at.timestamp()  # bit for bit
            assert s[8] == o.latency_ms
            if n % 2 == 0:  # its send was recorded by the same update
                assert (s[9], s[10], s[11], s[12]) == ("simulation", "simulation", 1, now)
            else:  # acked with no send recorded: the row keeps what expansion wrote
                assert (s[9], s[10], s[11], s[12]) == (None, "simulation", 0, None)
        assert await db.run(stats.delivery_counts) == {("simulation", "acknowledged"): 30}  # platform key: platform, else route
    finally:
        await db.close()


def test_an_sqlite_older_than_the_batched_writes_need_is_refused_by_name():
    """The batched writes use ``->>`` (SQLite 3.38): an older library is refused when the
    database is opened, with both versions named, not with a syntax error mid fan-out."""
    import pytest

    from gateway.storage import MIN_SQLITE, SqliteTooOld, check_sqlite

    check_sqlite(MIN_SQLITE)
    with pytest.raises(SqliteTooOld, match=r"SQLite 3\.37\.2 is too old: the gateway needs 3\.38\.0"):
        check_sqlite((3, 37, 2))


async def test_a_send_and_its_ack_in_one_batch_count_latency_from_the_send(tmp_path: Path):
    """The merged write (result and first ack in one batch) stores the send's own time, and
    the latency runs from it to the device's ack: not from the batch's commit, which is
    later than the ack and would read 0 ms."""
    db = await Database(tmp_path / "gw.db").open()
    try:
        h = Harness(db, {"simulation": ScriptedBridge("simulation")}, batch_size=50)
        await h.add_devices([sim(f"d{i}") for i in range(4)])
        job_id = await h.submit(job({"all": True}, ttl=600))
        await db.run(lambda conn: deliveries.expand_page(conn, job_id, 50, time.time(), ["simulation"]))
        rows = await db.run(lambda conn: conn.execute(
            "SELECT message_id, device_id FROM deliveries WHERE job_id = ? ORDER BY device_id", (job_id,)).fetchall())
        sent = round(time.time() - 1.0, 3)
        at = datetime.fromtimestamp(round(sent + 0.2, 3), UTC)
        text = at.isoformat(timespec="milliseconds")[:-6] + "Z"
        # Two merged with their send in the ack's batch, two whose send was recorded before.
        early = [deliveries.Result(m, job_id, d, "sent", "simulation", 1, sent_at=sent) for m, d in rows[2:]]
        await db.run(lambda conn: pipeline_acks.apply_batch(conn, early, [], sent + 0.5))
        merged = [deliveries.Result(m, job_id, d, "sent", "simulation", 1, sent_at=sent) for m, d in rows[:2]]
        acks = [(d, Ack(m, "received", at, None, text)) for m, d in rows]
        out = await db.run(lambda conn: pipeline_acks.apply_batch(conn, merged, acks, sent + 0.9))
        assert [round(o.latency_ms) for o in out] == [200] * 4
        stored = await db.run(lambda conn: conn.execute(
            "SELECT sent_at, acked_at, latency_ms FROM deliveries WHERE job_id = ?", (job_id,)).fetchall())
        assert all(s == sent and a > s and round(lat) == 200 for s, a, lat in stored), [tuple(r) for r in stored]
        latency = (await db.run(stats.ack_latency))["simulation"]
        assert latency["count"] == 4 and abs(latency["sum_ms"] - 800) < 1
    finally:
        await db.close()


async def test_an_ack_after_the_last_resend_clears_the_no_ack_note(tmp_path: Path):
    """A device that acks after its delivery ran out of resends is acknowledged, and the
    job's detail must not keep saying "no ack after N sends"."""
    db = await Database(tmp_path / "gw.db").open()
    try:
        h = Harness(db, {"simulation": ScriptedBridge("simulation")}, batch_size=50)
        await h.add_devices([sim("d0")])
        job_id = await h.submit(job({"all": True}, ttl=600))
        await db.run(lambda conn: deliveries.expand_page(conn, job_id, 50, time.time(), ["simulation"]))
        (message_id,) = await db.run(lambda conn: conn.execute(
            "SELECT message_id FROM deliveries WHERE job_id = ?", (job_id,)).fetchone())
        now = time.time()
        sent = deliveries.Result(message_id, job_id, "d0", "sent", "simulation", 1, resend_at=now + 1, sent_at=now)
        await db.run(lambda conn: pipeline_acks.apply_batch(conn, [sent], [], now))
        last = deliveries.Result(message_id, job_id, "d0", "sent", "simulation", 10, resend=True, until_ack=True,
                                 error="no ack after 10 sends; no more resends")
        await db.run(lambda conn: pipeline_acks.apply_batch(conn, [last], [], now + 1))
        note = await db.run(lambda conn: conn.execute(
            "SELECT last_error FROM deliveries WHERE message_id = ?", (message_id,)).fetchone()[0])
        assert note.startswith("no ack after 10 sends")
        at = datetime.fromtimestamp(round(now + 2, 3), UTC)
        text = at.isoformat(timespec="milliseconds")[:-6] + "Z"
        out = await db.run(lambda conn: pipeline_acks.apply_batch(conn, [], [("d0", Ack(message_id, "opened", at, None, text))],
                                                          now + 2))
        assert out[0].accepted and out[0].first
        state, error = await db.run(lambda conn: tuple(conn.execute(
            "SELECT state, last_error FROM deliveries WHERE message_id = ?", (message_id,)).fetchone()))
        assert (state, error) == ("acknowledged", None)
    finally:
        await db.close()


async def test_an_ack_clears_the_no_ack_note_by_its_flag_not_by_its_wording(tmp_path: Path):
    """Only the note the dispatcher flags as true until an ack is cleared by the ack: a
    resend's other error stays, even one that happens to read like the note; and a database
    made before the flag has its notes flagged by the migration."""
    db = await Database(tmp_path / "gw.db").open()
    try:
        h = Harness(db, {"simulation": ScriptedBridge("simulation")}, batch_size=50)
        await h.add_devices([sim("d0"), sim("d1")])
        job_id = await h.submit(job({"all": True}, ttl=600))
        await db.run(lambda conn: deliveries.expand_page(conn, job_id, 50, time.time(), ["simulation"]))
        ids = dict(await db.run(lambda conn: conn.execute(
            "SELECT device_id, message_id FROM deliveries WHERE job_id = ?", (job_id,)).fetchall()))
        now = time.time()
        sent = [deliveries.Result(ids[d], job_id, d, "sent", "simulation", 1, resend_at=now + 1, sent_at=now)
                for d in ("d0", "d1")]
        await db.run(lambda conn: pipeline_acks.apply_batch(conn, sent, [], now))
        last = [deliveries.Result(ids["d0"], job_id, "d0", "sent", "simulation", 3, resend=True,
                                  error="no ack after lunch: the bridge said so"),
                deliveries.Result(ids["d1"], job_id, "d1", "sent", "simulation", 3, resend=True, until_ack=True,
                                  error="no ack after 3 sends; no more resends")]
        await db.run(lambda conn: pipeline_acks.apply_batch(conn, last, [], now + 1))
        at = datetime.fromtimestamp(round(now + 2, 3), UTC)
        text = at.isoformat(timespec="milliseconds")[:-6] + "Z"
        acks = [(d, Ack(ids[d], "opened", at, None, text)) for d in ("d0", "d1")]
        out = await db.run(lambda conn: pipeline_acks.apply_batch(conn, [], acks, now + 2))
        assert all(o.accepted and o.first for o in out)
        rows = dict(await db.run(lambda conn: [(r[0], (r[1], r[2])) for r in conn.execute(
            "SELECT device_id, state, last_error FROM deliveries WHERE job_id = ?", (job_id,))]))
        assert rows == {"d0": ("acknowledged", "no ack after lunch: the bridge said so"),
                        "d1": ("acknowledged", None)}
    finally:
        await db.close()


def test_the_migration_flags_the_notes_of_a_database_made_before_the_flag(tmp_path: Path):
    import sqlite3

    from gateway.pipeline import schema

    conn = sqlite3.connect(tmp_path / "old.db")
    for step in schema.MIGRATIONS[:3]:
        step(conn)
    conn.executemany("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, last_error) VALUES (?, 'j', ?, ?, 0, ?)",
                     [("m0", "d0", "sent", "no ack after 4 sends; no more resends"),
                      ("m1", "d1", "sent", "no ack after lunch"), ("m2", "d2", "failed", "fcm: 404")])
    schema.MIGRATIONS[3](conn)
    assert conn.execute("SELECT message_id, error_until_ack FROM deliveries ORDER BY message_id").fetchall() == [
        ("m0", 1), ("m1", 0), ("m2", 0)]
    conn.close()

