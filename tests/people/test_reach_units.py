"""Reaching people in-process, on a real database with the deliveries' writer guard: the
rows a people job makes, what the first ack withdraws, what removing a person ends, and
that the aggregates and the job's counts stay those a recount gives."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from devices.models import Device
from gateway import clock, migrations, stats
from gateway.people import store as people
from gateway.people.model import Person
from gateway.pipeline import acks, deliveries, jobs, reach, registry
from gateway.pipeline.deliveries import Result
from gateway.pipeline.models import parse_ack, parse_job
from gateway.storage import connect
from gateway.storage import transaction as tx
from tests.pipeline.writer_guard import guard_deliveries


@pytest.fixture
def conn(tmp_path: Path):
    c = connect(tmp_path / "gateway.db")
    tx(c, migrations.migrate)
    yield c
    c.close()


def _consistent(conn: sqlite3.Connection, job_id: str) -> dict:
    """The job's counts agree with its rows, and the aggregates with a recount."""
    status = jobs.job_status(conn, job_id)
    rows = dict(conn.execute("SELECT state, COUNT(*) FROM deliveries WHERE job_id = ? GROUP BY state", (job_id,)).fetchall())
    assert {k: v for k, v in status["counts"].items() if k != "targets" and v} == rows
    assert status["counts"]["targets"] == sum(rows.values())
    assert not stats.stale(conn)
    return status


def test_steps_the_first_ack_and_a_removal(conn):
    violations = guard_deliveries(conn)
    for d in ("a1", "a2", "a3", "b1", "shared"):
        tx(conn, lambda c, d=d: registry.upsert_device(c, Device(device_id=d, channels=[{"platform": "simulation"}]), "t"))
    tx(conn, lambda c: people.put(c, Person(person_id="anna", devices=["a1", "ghost", "a2", "shared", "a3"],
                                            reach_after_s=10)))
    tx(conn, lambda c: people.put(c, Person(person_id="ben", devices=["shared", "b1"])))
    tx(conn, lambda c: people.put(c, Person(person_id="nobody")))
    job = parse_job({"job_id": "j", "target": {"people": ["ben", "anna", "zed", "nobody", "anna"]},
                     "notification": {"title": "t", "ttl": 25}})
    tx(conn, lambda c: jobs.submit_job(c, job, "t"))
    assert jobs.job_status(conn, "j")["people"] == {"targets": 4, "reached": 0, "held": 0}
    now = clock.now()
    assert tx(conn, lambda c: deliveries.expand_page(c, "j", 500, now, ["simulation"], reach_after_s=99))
    due = {r[0]: (r[1], r[2], r[3]) for r in conn.execute(
        "SELECT device_id, person_id, state, next_at - ? FROM deliveries WHERE job_id = 'j'", (now,))}
    # anna: her own 10 s; the shared device is anna's (her id sorts first); the ghost failed
    # and takes no turn; no turn is past the TTL (25 s). ben: [people]'s 99 s.
    assert {d: (p, s, round(t)) for d, (p, s, t) in due.items()} == {
        "a1": ("anna", "queued", 0), "ghost": ("anna", "failed", 0), "a2": ("anna", "queued", 10),
        "shared": ("anna", "queued", 20), "a3": ("anna", "queued", 25), "b1": ("ben", "queued", 25)}
    assert {p["person_id"]: p["state"] for p in reach.people_of_job(conn, "j")} == {
        "anna": "reaching", "ben": "reaching", "zed": "unknown", "nobody": "no_devices"}
    _consistent(conn, "j")

    mid = {r[0]: r[1] for r in conn.execute("SELECT device_id, message_id FROM deliveries WHERE job_id = 'j'")}
    tx(conn, lambda c: deliveries.apply_results(c, [Result(mid["a1"], "j", "a1", "sent", platform="simulation", attempts=1,
                                                      resend_at=now + 5)], now))
    ack = parse_ack(json.dumps({"message_id": mid["a2"], "status": "received"}).encode())
    # a2 acks (say, it got it from an earlier job's retry): anna is reached, her later turns go.
    tx(conn, lambda c: acks.apply_acks(c, [("a2", ack)], clock.now()))
    status = _consistent(conn, "j")
    assert status["people"]["reached"] == 1 and status["counts"]["targets"] == 4
    assert set(mid) - {d for (d,) in conn.execute("SELECT device_id FROM deliveries WHERE job_id = 'j'")} == {"shared", "a3"}
    assert conn.execute("SELECT resend_at FROM deliveries WHERE message_id = ?", (mid["a1"],)).fetchone()[0] is None
    # A second ack of anna's reaches no one twice.
    again = parse_ack(json.dumps({"message_id": mid["a1"], "status": "opened"}).encode())
    tx(conn, lambda c: acks.apply_acks(c, [("a1", again)], clock.now()))
    assert _consistent(conn, "j")["people"]["reached"] == 1

    assert tx(conn, lambda c: reach.remove_person(c, "ben", clock.now()))
    assert not tx(conn, lambda c: reach.remove_person(c, "ben", clock.now()))
    status = _consistent(conn, "j")
    assert tuple(conn.execute("SELECT state, last_error FROM deliveries WHERE message_id = ?",
                              (mid["b1"],)).fetchone()) == ("failed", "person removed")
    assert status["state"] == "completed" and status["people"] == {"targets": 4, "reached": 1, "held": 0}
    assert violations == []


def test_a_device_that_fails_hands_its_turn_on(conn):
    for d in ("c1", "c2", "c3"):
        tx(conn, lambda c, d=d: registry.upsert_device(c, Device(device_id=d, channels=[{"platform": "simulation"}]), "t"))
    tx(conn, lambda c: people.put(c, Person(person_id="cy", devices=["c1", "c2", "c3"], reach_after_s=60)))
    tx(conn, lambda c: jobs.submit_job(c, parse_job({"job_id": "k", "target": {"people": ["cy"]},
                                                      "notification": {"title": "t"}}), "t"))
    now = clock.now()
    tx(conn, lambda c: deliveries.expand_page(c, "k", 500, now, ["simulation"]))
    mid = {r[0]: r[1] for r in conn.execute("SELECT device_id, message_id FROM deliveries WHERE job_id = 'k'")}
    tx(conn, lambda c: deliveries.apply_results(c, [Result(mid["c1"], "k", "c1", "invalid_address", attempts=1,
                                                      error="unregistered")], clock.now()))
    nxt = dict(conn.execute("SELECT device_id, next_at FROM deliveries WHERE job_id = 'k' AND state = 'queued'"))
    assert nxt["c2"] <= clock.now() and nxt["c3"] - now == pytest.approx(120, abs=1)
    _consistent(conn, "k")


def test_an_unknown_person_alone_is_no_target(conn):
    tx(conn, lambda c: jobs.submit_job(c, parse_job({"job_id": "u", "target": {"people": ["zed"]},
                                                      "notification": {"title": "t"}}), "t"))
    tx(conn, lambda c: deliveries.expand_page(c, "u", 500, clock.now(), ["simulation"]))
    status = jobs.job_status(conn, "u")
    assert status["state"] == "completed" and status["error"]["code"] == "no_targets"
    assert status["people"] == {"targets": 1, "reached": 0, "held": 0}
