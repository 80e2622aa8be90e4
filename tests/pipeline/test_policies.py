"""Delivery policy, in process: the dispatcher against scripted bridges and real SQLite.

Each test drives the same Dispatcher/Recorder/Expander the daemon runs, with a bridge
that answers from a script, so retry, Retry-After, TTL, fallback, health and
concurrency are checked exactly (and quickly) without a network.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

from bridges.base import Bridge, Delivery, Outcome
from devices.models import Device
from gateway.config import DispatchSection
from gateway.pipeline import jobs, registry
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline import deliveries as pipeline_deliveries
from gateway.pipeline.backoff import backoff_delay, retry_delay
from gateway.pipeline.dispatcher import Dispatcher, Expander
from gateway.pipeline.models import parse_job
from gateway.pipeline.recorder import Recorder
from gateway.storage import Database

from .writer_guard import guard_deliveries


class ScriptedBridge(Bridge):
    """Answers each delivery from a per-device script of outcomes (then accepts)."""

    def __init__(self, platform: str, script: dict[str, list[Outcome]] | None = None, delay: float = 0.0,
                 default: Outcome | None = None):
        self.platform = platform  # type: ignore[misc]
        self.script = defaultdict(list, {k: list(v) for k, v in (script or {}).items()})
        self.delay = delay
        self.default = default or Outcome.accepted()
        self.calls: list[tuple[float, Delivery]] = []
        self.concurrent = 0
        self.max_concurrent = 0

    async def send(self, delivery: Delivery) -> Outcome:
        self.calls.append((time.monotonic(), delivery))
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            queue = self.script[delivery.device_id]
            return queue.pop(0) if queue else self.default
        finally:
            self.concurrent -= 1


class Harness:
    def __init__(self, db: Database, bridges: dict[str, Bridge], **dispatch):
        self.db = db
        self.cfg = DispatchSection(**{"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **dispatch})
        self.recorder = Recorder(db)
        self.dispatcher = Dispatcher(self.cfg, db, bridges, self.recorder, rng=random.Random(1))
        self.expander = Expander(db, self.cfg.batch_size, self.dispatcher.new_rows)
        self.stopping = asyncio.Event()

    async def add_devices(self, devices: list[dict]) -> None:
        def work(conn):
            for d in devices:
                registry.upsert_device(conn, Device.model_validate(d), "test")
        await self.db.run(work)

    async def submit(self, job: dict) -> str:
        parsed = parse_job(job)
        await self.db.run(lambda conn: jobs.insert_job(conn, parsed, "test"))
        self.expander.wake.set()
        return parsed.job_id

    async def run_until_complete(self, job_id: str, timeout: float = 10.0) -> dict:
        tasks = [asyncio.create_task(self.recorder.run()), asyncio.create_task(self.expander.run(self.stopping)),
                 asyncio.create_task(self.dispatcher.run(self.stopping))]
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status = await self.db.run(lambda conn: jobs.job_status(conn, job_id))
                if status and status["state"] in ("completed", "acknowledged"):
                    return status
                await asyncio.sleep(0.02)
            raise AssertionError(f"job not complete: {status}")
        finally:
            self.stopping.set()
            await self.dispatcher.drain(1)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def deliveries(self, job_id: str) -> dict[str, dict]:
        rows = await self.db.run(lambda conn: pipeline_deliveries.delivery_rows(conn, job_id))
        return {r["device_id"]: r for r in rows}


@pytest.fixture
async def db(tmp_path: Path):
    """The real database, with the guard that refuses a write of deliveries outside its one
    writer (tests/pipeline/writer_guard.py)."""
    database = await Database(tmp_path / "gw.db").open()
    violations = await database.run(guard_deliveries)
    yield database
    await database.close()
    assert violations == []


def sim(device_id: str, *platforms: str, segment: str | None = None) -> dict:
    chans = []
    for p in platforms or ("simulation",):
        chans.append({"platform": p} if p in ("simulation", "mqtt") else {"platform": p, "token": f"tok-{device_id}"})
    return {"device_id": device_id, "segment": segment, "channels": chans}


def job(target: dict, **notification) -> dict:
    return {"target": target, "notification": {"title": "t", "body": "b", **notification}}


async def test_every_device_gets_one_delivery_with_exact_counts(db):
    bridge = ScriptedBridge("simulation")
    h = Harness(db, {"simulation": bridge}, batch_size=7)
    await h.add_devices([sim(f"d{i:03}", segment="a" if i % 2 else "b") for i in range(50)])
    job_id = await h.submit(job({"segment": "a"}))
    status = await h.run_until_complete(job_id)
    assert status["state"] == "completed"
    assert status["counts"] == {"targets": 25, "queued": 0, "sent": 25, "acknowledged": 0, "failed": 0,
                                "expired": 0, "invalid_address": 0, "suppressed": 0}
    assert sorted(d.device_id for _, d in bridge.calls) == [f"d{i:03}" for i in range(1, 50, 2)]
    assert all(d.message_id == d.message_id.lower() and len(d.message_id) == 36 for _, d in bridge.calls)


async def test_explicit_device_list_with_unknown_device_fails_that_one(db):
    h = Harness(db, {"simulation": ScriptedBridge("simulation")})
    await h.add_devices([sim("known")])
    job_id = await h.submit(job({"devices": ["known", "ghost", "known"]}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["targets"] == 2 and status["counts"]["sent"] == 1 and status["counts"]["failed"] == 1
    assert (await h.deliveries(job_id))["ghost"]["last_error"] == "unknown device"


async def test_retry_after_is_honoured_then_delivered(db):
    bridge = ScriptedBridge("simulation", {"d1": [Outcome.retry("429", retry_after=0.4), Outcome.retry("429", retry_after=0.3)]})
    h = Harness(db, {"simulation": bridge})
    await h.add_devices([sim("d1")])
    job_id = await h.submit(job({"all": True}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["sent"] == 1
    times = [t for t, _ in bridge.calls]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.38 and times[2] - times[1] >= 0.28
    assert [d.attempt for _, d in bridge.calls] == [1, 2, 3]
    assert (await h.deliveries(job_id))["d1"]["attempts"] == 3


async def test_max_attempts_then_failed_with_reason(db):
    bridge = ScriptedBridge("simulation", default=Outcome.retry("HTTP 503"))
    h = Harness(db, {"simulation": bridge}, max_attempts=4)
    await h.add_devices([sim("d1")])
    job_id = await h.submit(job({"all": True}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["failed"] == 1 and len(bridge.calls) == 4
    row = (await h.deliveries(job_id))["d1"]
    assert row["state"] == "failed" and "gave up after 4 attempts" in row["last_error"]


def test_backoff_is_full_jitter_exponential_and_capped():
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (20, 30.0)]:
        samples = [backoff_delay(attempt, 1.0, 30.0, rng) for _ in range(300)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.9 and min(samples) < ceiling * 0.1  # full jitter spans the range
    assert retry_delay(3, 120.0, 1.0, 30.0) == 120.0  # Retry-After wins, even above the cap


async def test_ttl_expires_instead_of_delivering_late(db):
    bridge = ScriptedBridge("simulation", default=Outcome.retry("429", retry_after=5))
    h = Harness(db, {"simulation": bridge})
    await h.add_devices([sim("d1")])
    job_id = await h.submit(job({"all": True}, ttl=2))
    status = await h.run_until_complete(job_id, timeout=5)
    assert status["counts"]["expired"] == 1 and len(bridge.calls) == 1  # next try would be after the TTL


async def test_ttl_zero_means_one_attempt_now_or_never(db):
    bridge = ScriptedBridge("simulation", {"d1": [Outcome.retry("503")]})
    h = Harness(db, {"simulation": bridge})
    await h.add_devices([sim("d1"), sim("d2")])
    job_id = await h.submit(job({"all": True}, ttl=0))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["expired"] == 1 and status["counts"]["sent"] == 1
    assert all(d.ttl_remaining == 0 for _, d in bridge.calls)


async def test_invalid_address_marks_channel_and_falls_over(db):
    fcm = ScriptedBridge("fcm", default=Outcome.invalid_address("UNREGISTERED", status=404))
    simb = ScriptedBridge("simulation")
    h = Harness(db, {"fcm": fcm, "simulation": simb})
    await h.add_devices([sim("d1", "fcm", "simulation"), sim("d2", "fcm")])
    job_id = await h.submit(job({"all": True}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["sent"] == 1 and status["counts"]["invalid_address"] == 1
    rows = await h.deliveries(job_id)
    assert rows["d1"]["platform"] == "simulation" and rows["d1"]["state"] == "sent"
    device = await db.run(lambda conn: registry.get_device(conn, "d1"))
    mark = device["channels"][0]["invalid"]
    assert mark["reason"].startswith("fcm: UNREGISTERED") and mark["at"].endswith("Z")
    # The mark is kept: the next job skips the invalid channel without asking FCM again.
    fcm.calls.clear()
    h2 = Harness(db, {"fcm": fcm, "simulation": simb})
    job2 = await h2.submit(job({"devices": ["d1"]}))
    assert (await h2.run_until_complete(job2))["counts"]["sent"] == 1
    assert fcm.calls == []


async def test_reregistering_with_a_new_token_clears_the_mark(db):
    h = Harness(db, {"fcm": ScriptedBridge("fcm")})
    await h.add_devices([sim("d1", "fcm")])
    await db.run(lambda conn: registry.mark_invalid(conn, "d1", "fcm|tok-d1", "UNREGISTERED", time.time()))
    await h.add_devices([sim("d1", "fcm")])  # same token: mark kept
    assert "invalid" in (await db.run(lambda c: registry.get_device(c, "d1")))["channels"][0]
    await h.add_devices([{"device_id": "d1", "channels": [{"platform": "fcm", "token": "new"}]}])
    assert "invalid" not in (await db.run(lambda c: registry.get_device(c, "d1")))["channels"][0]


async def test_unhealthy_bridge_pauses_and_others_flow(db):
    bad = ScriptedBridge("fcm", default=Outcome.unhealthy("THIRD_PARTY_AUTH_ERROR", retry_after=0.5))
    good = ScriptedBridge("simulation")
    h = Harness(db, {"fcm": bad, "simulation": good}, max_attempts=2)
    await h.add_devices([sim(f"f{i}", "fcm") for i in range(5)] + [sim(f"s{i}") for i in range(5)])
    job_id = await h.submit(job({"all": True}))
    tasks = [asyncio.create_task(h.recorder.run()), asyncio.create_task(h.expander.run(h.stopping)),
             asyncio.create_task(h.dispatcher.run(h.stopping))]
    await asyncio.sleep(1.3)
    status = await db.run(lambda conn: jobs.job_status(conn, job_id))
    # The healthy bridge delivered everything; the FCM deliveries wait (not failed, no attempts spent).
    assert status["counts"]["sent"] == 5 and status["counts"]["queued"] == 5 and status["counts"]["failed"] == 0
    rows = await h.deliveries(job_id)
    assert all(rows[f"f{i}"]["attempts"] == 0 for i in range(5))
    # Paused: a probe roughly every 0.5 s, not one request per queued delivery per loop.
    assert 2 <= len(bad.calls) <= 12, len(bad.calls)
    # The platform recovers: the queued deliveries go out.
    bad.default = Outcome.accepted()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status = await db.run(lambda conn: jobs.job_status(conn, job_id))
        if status["state"] == "completed":
            break
        await asyncio.sleep(0.05)
    h.stopping.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert status["counts"]["sent"] == 10


async def test_concurrency_per_bridge_is_bounded(db):
    bridge = ScriptedBridge("simulation", delay=0.02)
    h = Harness(db, {"simulation": bridge}, max_in_flight=8, batch_size=100)
    await h.add_devices([sim(f"d{i:03}") for i in range(200)])
    job_id = await h.submit(job({"all": True}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["sent"] == 200
    assert bridge.max_concurrent == 8


async def test_bridge_exception_is_a_retry_not_a_crash(db):
    class Broken(ScriptedBridge):
        async def send(self, delivery):
            self.calls.append((time.monotonic(), delivery))
            if len(self.calls) == 1:
                raise RuntimeError("bug")
            return Outcome.accepted()

    bridge = Broken("simulation")
    h = Harness(db, {"simulation": bridge})
    await h.add_devices([sim("d1")])
    job_id = await h.submit(job({"all": True}))
    assert (await h.run_until_complete(job_id))["counts"]["sent"] == 1 and len(bridge.calls) == 2


async def test_no_enabled_bridge_fails_clearly(db):
    h = Harness(db, {"simulation": ScriptedBridge("simulation")})
    await h.add_devices([{"device_id": "d1", "channels": [{"platform": "apns", "token": "ab" * 32}]}])
    job_id = await h.submit(job({"all": True}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["failed"] == 1
    assert "no enabled bridge" in (await h.deliveries(job_id))["d1"]["last_error"]


async def test_acks_first_moves_state_every_ack_stored_foreign_refused(db):
    from gateway.pipeline.models import parse_ack

    h = Harness(db, {"simulation": ScriptedBridge("simulation")})
    await h.add_devices([sim("d1"), sim("d2")])
    job_id = await h.submit(job({"all": True}))
    await h.run_until_complete(job_id)
    rows = await h.deliveries(job_id)
    m1 = rows["d1"]["message_id"]
    acks = [
        ("d1", parse_ack(f'{{"message_id":"{m1}","status":"received","at":"2030-01-01T10:00:00"}}'.encode())),
        ("d1", parse_ack(f'{{"message_id":"{m1.upper()}","status":"opened","at":"2030-01-01T12:00:00+02:00"}}'.encode())),
        ("d2", parse_ack(f'{{"message_id":"{m1}","status":"received","at":"2030-01-01T10:00:00Z"}}'.encode())),
        ("d1", parse_ack(b'{"message_id":"00000000-0000-0000-0000-000000000000","status":"received","at":"2030-01-01T10:00:00Z"}')),
    ]
    results = await db.run(lambda conn: pipeline_acks.apply_acks(conn, acks, time.time()))
    assert [r.accepted for r in results] == [True, True, False, False]
    assert results[0].first and not results[1].first
    stored = await db.run(lambda conn: conn.execute("SELECT status, at FROM acks ORDER BY id").fetchall())
    # naive time = UTC; +02:00 converted to UTC
    assert [tuple(r) for r in stored] == [("received", "2030-01-01T10:00:00.000Z"), ("opened", "2030-01-01T10:00:00.000Z")]
    status = await db.run(lambda conn: jobs.job_status(conn, job_id))
    assert status["counts"]["acknowledged"] == 1 and status["counts"]["sent"] == 1 and status["state"] == "completed"
    counts = await db.run(jobs.counters)
    assert counts["acks_refused"] == 2 and counts["acks_stored"] == 2
    m2 = rows["d2"]["message_id"]
    await db.run(lambda conn: pipeline_acks.apply_acks(conn, [("d2", parse_ack(
        f'{{"message_id":"{m2}","status":"received","at":"2030-01-01T10:00:00Z"}}'.encode()))], time.time()))
    assert (await db.run(lambda conn: jobs.job_status(conn, job_id)))["state"] == "acknowledged"


# ---------------------------------------------------------------------------------------------
# Issue 9 (items 4, 6, 7, 8) and issue 14 (items 5, 6): targets, pauses, fairness, resends.

class CountingDatabase(Database):
    """The real database, counting transactions (a dispatcher polling SQLite shows up here)."""

    calls = 0

    async def run(self, fn):  # noqa: ANN001, ANN201
        self.calls += 1
        return await super().run(fn)


async def run_for(h: Harness, seconds: float) -> None:
    h.stopping = asyncio.Event()
    tasks = [asyncio.create_task(h.recorder.run()), asyncio.create_task(h.expander.run(h.stopping)),
             asyncio.create_task(h.dispatcher.run(h.stopping))]
    await asyncio.sleep(seconds)
    h.stopping.set()
    await h.dispatcher.drain(1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_targets_are_counted_when_the_job_is_accepted_and_an_empty_target_says_so(db):
    h = Harness(db, {"simulation": ScriptedBridge("simulation")}, batch_size=3)
    await h.add_devices([sim(f"d{i}", segment="pos") for i in range(7)])
    job_id = await h.submit(job({"segment": "pos"}))
    # Before any expansion: the first status already has the right total, and counts add up.
    status = await db.run(lambda conn: jobs.job_status(conn, job_id))
    assert status["state"] == "accepted" and status["counts"]["targets"] == 7 and status["counts"]["queued"] == 7
    done = await h.run_until_complete(job_id)
    assert done["counts"]["targets"] == 7 and done["counts"]["sent"] == 7 and done["error"] is None
    h2 = Harness(db, {"simulation": ScriptedBridge("simulation")})
    empty = await h2.submit(job({"segment": "nobody-here"}))
    status = await h2.run_until_complete(empty)
    assert status["state"] == "completed" and status["counts"]["targets"] == 0
    assert status["error"]["code"] == "no_targets" and "nobody-here" in status["error"]["message"]


async def test_a_paused_bridge_does_not_make_the_dispatcher_poll(tmp_path: Path):
    db = await CountingDatabase(tmp_path / "gw.db").open()
    try:
        h = Harness(db, {"fcm": ScriptedBridge("fcm")})
        await h.add_devices([sim(f"f{i}", "fcm") for i in range(20)])
        h.dispatcher.slots["fcm"].paused_until = float("inf")  # as a bridge that could not start
        h.dispatcher.slots["fcm"].pause_reason = "bridges.fcm: bad key"
        await h.submit(job({"all": True}))
        await run_for(h, 0.5)  # expansion done; everything due belongs to the paused bridge
        before = db.calls
        await run_for(h, 2.0)
        assert db.calls - before <= 12, f"{db.calls - before} transactions in 2 s with nothing to do"
    finally:
        await db.close()


async def test_a_bridge_that_cannot_start_keeps_finite_times_and_delivers_after_a_restart(db):
    fcm = ScriptedBridge("fcm")
    h = Harness(db, {"fcm": fcm, "simulation": ScriptedBridge("simulation")})
    await h.add_devices([sim("f1", "fcm"), sim("s1")])
    h.dispatcher.slots["fcm"].paused_until = float("inf")
    h.dispatcher.slots["fcm"].pause_reason = "bridges.fcm: bad key"
    job_id = await h.submit(job({"all": True}, ttl=600))
    await run_for(h, 1.0)
    rows = await db.run(lambda conn: conn.execute(
        "SELECT d.state, d.next_at, j.expires_at FROM deliveries d JOIN jobs j USING (job_id)").fetchall())
    assert {r["state"] for r in rows} == {"queued", "sent"}
    assert all(r["next_at"] <= r["expires_at"] for r in rows), [tuple(r) for r in rows]
    assert fcm.calls == []
    # "Restart" with the key fixed: a fresh dispatcher on the same database.
    h2 = Harness(db, {"fcm": fcm, "simulation": ScriptedBridge("simulation")})
    status = await h2.run_until_complete(job_id, timeout=5)
    assert status["counts"]["sent"] == 2 and len(fcm.calls) == 1


async def test_ttl_zero_is_now_or_never_also_when_the_bridge_is_unhealthy(db):
    bridge = ScriptedBridge("fcm", {"f0": [Outcome.unhealthy("THIRD_PARTY_AUTH_ERROR", retry_after=0.3)]})
    h = Harness(db, {"fcm": bridge})
    await h.add_devices([sim("f0", "fcm")])
    job_id = await h.submit(job({"all": True}, ttl=0))
    status = await h.run_until_complete(job_id, timeout=3)
    assert status["counts"]["expired"] == 1 and status["counts"]["sent"] == 0
    assert len(bridge.calls) == 1  # not sent again once the bridge recovered
    # A ttl=0 job that arrives while the bridge is paused is not kept for later either.
    h2 = Harness(db, {"fcm": bridge})
    h2.dispatcher.slots["fcm"].paused_until = time.time() + 0.6
    h2.dispatcher.slots["fcm"].pauses = 1
    job2 = await h2.submit(job({"all": True}, ttl=0))
    status = await h2.run_until_complete(job2, timeout=3)
    assert status["counts"]["expired"] == 1 and len(bridge.calls) == 1


async def test_a_saturated_bridge_does_not_hold_other_bridges_behind_it(db):
    slow = ScriptedBridge("fcm", delay=0.2)
    fast = ScriptedBridge("simulation")
    h = Harness(db, {"fcm": slow, "simulation": fast}, max_in_flight=4, batch_size=200)
    await h.add_devices([sim(f"f{i:04}", "fcm", segment="phones") for i in range(600)]
                        + [sim(f"s{i}", segment="plcs") for i in range(5)])
    big = await h.submit(job({"segment": "phones"}))
    tasks = [asyncio.create_task(h.recorder.run()), asyncio.create_task(h.expander.run(h.stopping)),
             asyncio.create_task(h.dispatcher.run(h.stopping))]
    try:
        await asyncio.sleep(0.5)  # the slow bridge is saturated with 600 due deliveries
        t0 = time.monotonic()
        small = await h.submit(job({"segment": "plcs"}))
        while (await db.run(lambda conn: jobs.job_status(conn, small)))["state"] != "completed":
            assert time.monotonic() - t0 < 2.0, "the small job waited behind the saturated bridge"
            await asyncio.sleep(0.02)
        assert (await db.run(lambda conn: jobs.job_status(conn, big)))["counts"]["queued"] > 400
        assert len(fast.calls) == 5
    finally:
        h.stopping.set()
        await h.dispatcher.drain(0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_unacked_deliveries_are_resent_until_acked_or_out_of_attempts(db):
    from gateway.pipeline.models import parse_ack

    mqtt = ScriptedBridge("mqtt")
    h = Harness(db, {"mqtt": mqtt}, ack_timeout_s=0.3, max_attempts=3)
    h.dispatcher.resend = {"mqtt"}
    await h.add_devices([sim("plc-1", "mqtt"), sim("plc-2", "mqtt")])
    job_id = await h.submit(job({"all": True}))
    status = await h.run_until_complete(job_id)
    assert status["counts"]["sent"] == 2  # completed: nothing queued; resends go on while unacked
    rows = await h.deliveries(job_id)
    m1 = rows["plc-1"]["message_id"]
    await run_for(h, 0.45)  # one ack timeout later: each sent once more
    ack = parse_ack(f'{{"message_id":"{m1}","status":"received","at":"2030-01-01T10:00:00Z"}}'.encode())
    await db.run(lambda conn: pipeline_acks.apply_acks(conn, [("plc-1", ack)], time.time()))
    await run_for(h, 1.2)  # plc-2 runs out of attempts (3); plc-1 is acked: no more resends
    sent = defaultdict(list)
    for _, d in mqtt.calls:
        sent[d.device_id].append((d.message_id, d.attempt))
    assert [a for _, a in sent["plc-1"]] == [1, 2] and len({m for m, _ in sent["plc-1"]}) == 1
    assert [a for _, a in sent["plc-2"]] == [1, 2, 3] and {m for m, _ in sent["plc-2"]} == {rows["plc-2"]["message_id"]}
    rows = await h.deliveries(job_id)
    assert rows["plc-2"]["state"] == "sent" and rows["plc-2"]["attempts"] == 3
    assert "no more resends" in rows["plc-2"]["last_error"]
    status = await db.run(lambda conn: jobs.job_status(conn, job_id))
    c = status["counts"]
    assert (c["sent"], c["acknowledged"], c["queued"]) == (1, 1, 0) and status["state"] == "completed"
    assert sum(c[k] for k in jobs.COUNT_KEYS) == c["targets"]


async def test_one_ack_that_cannot_be_stored_fails_alone_not_its_batch(db):
    from gateway.pipeline.models import parse_ack
    from gateway.storage import NotStored

    class RefusingOutbox:
        """Stands in for the upstream outbox under overflow = "refuse-new" (for one device)."""

        def enqueue(self, conn, kind, topic, payload, retain, coalesce_key=None):  # noqa: ANN001
            if b'"device_id": "d2"' in payload:
                raise NotStored("upstream buffer full")
            conn.execute("INSERT INTO counters(name, value) VALUES ('forwarded', 1) "
                         "ON CONFLICT(name) DO UPDATE SET value = value + 1")

    h = Harness(db, {"simulation": ScriptedBridge("simulation")})
    await h.add_devices([sim("d1"), sim("d2"), sim("d3")])
    job_id = await h.submit(job({"all": True}))
    await h.run_until_complete(job_id)
    rows = await h.deliveries(job_id)
    recorder = Recorder(db, RefusingOutbox(), "p/acks")
    task = asyncio.create_task(recorder.run())
    try:
        acks = [recorder.ack(d, parse_ack(f'{{"message_id":"{rows[d]["message_id"]}","status":"received",'
                                          f'"at":"2030-01-01T10:00:00Z"}}'.encode())) for d in ("d1", "d2", "d3")]
        results = await asyncio.gather(*acks, return_exceptions=True)
    finally:
        task.cancel()
    assert recorder.batches == 1
    assert results[0].accepted and results[2].accepted
    assert isinstance(results[1], NotStored)
    states = {d: r["state"] for d, r in (await h.deliveries(job_id)).items()}
    assert states == {"d1": "acknowledged", "d2": "sent", "d3": "acknowledged"}
    stored = await db.run(lambda conn: conn.execute("SELECT device_id FROM acks ORDER BY device_id").fetchall())
    assert [r[0] for r in stored] == ["d1", "d3"]
    assert (await db.run(jobs.counters))["forwarded"] == 2


async def _until(pred, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await pred()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached in {timeout} s: {await pred()}")


def _start(h: Harness) -> list[asyncio.Task]:
    return [asyncio.create_task(h.recorder.run()), asyncio.create_task(h.expander.run(h.stopping)),
            asyncio.create_task(h.dispatcher.run(h.stopping))]


async def _stop(h: Harness, tasks: list[asyncio.Task]) -> None:
    h.stopping.set()
    await h.dispatcher.drain(1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_device_falls_over_to_its_next_channel_after_the_grace_and_back_when_healthy(db):
    bad = ScriptedBridge("fcm", default=Outcome.unhealthy("THIRD_PARTY_AUTH_ERROR", retry_after=0.4))
    good = ScriptedBridge("simulation")
    h = Harness(db, {"fcm": bad, "simulation": good}, fallback_after_s=1.0)
    await h.add_devices([sim(f"d{i}", "fcm", "simulation") for i in range(5)] + [sim("only-fcm", "fcm")])
    tasks = _start(h)
    try:
        t0 = time.monotonic()
        job_id = await h.submit(job({"all": True}, ttl=600))

        async def rows():
            return await h.deliveries(job_id)
        # Within the grace: queued, and each says why it waits.
        waiting = await _until(lambda: _all_explained(rows), 0.9)
        assert all(r["state"] == "queued" for r in waiting.values())
        assert all(r["reason"].startswith("bridge fcm unhealthy: THIRD_PARTY_AUTH_ERROR") for r in waiting.values())
        # After it: the next channel delivers, and the delivery says why it moved.
        async def moved():
            r = await rows()
            return r if sum(x["state"] == "sent" for x in r.values()) == 5 else None
        done = await _until(moved, 5)
        assert time.monotonic() - t0 >= 1.0
        for i in range(5):
            assert done[f"d{i}"]["platform"] == "simulation"
            assert done[f"d{i}"]["moved"].startswith("moved from fcm to simulation: fcm unhealthy for ")
            assert "THIRD_PARTY_AUTH_ERROR" in done[f"d{i}"]["moved"]
        assert done["only-fcm"]["state"] == "queued" and "fcm unhealthy" in done["only-fcm"]["reason"]
        # FCM works again: the next probe finds it, and new deliveries use it again.
        bad.default = Outcome.accepted()
        await _until(lambda: _status_is(h, job_id, "completed"), 5)
        job2 = await h.submit(job({"all": True}, ttl=600))
        await _until(lambda: _status_is(h, job2, "completed"), 5)
        job3 = await h.submit(job({"all": True}, ttl=600))
        await _until(lambda: _status_is(h, job3, "completed"), 5)
        third = await h.deliveries(job3)
        assert {r["platform"] for r in third.values()} == {"fcm"}, third
        assert all(r["moved"] is None for r in third.values())
    finally:
        await _stop(h, tasks)


async def _all_explained(rows):
    r = await rows()
    return r if r and all(x["reason"] for x in r.values()) else None


async def _status_is(h: Harness, job_id: str, state: str):
    status = await h.db.run(lambda conn: jobs.job_status(conn, job_id))
    return status if status and status["state"] == state else None


async def test_ttl_zero_moves_to_the_next_channel_at_once(db):
    bad = ScriptedBridge("fcm", default=Outcome.unhealthy("THIRD_PARTY_AUTH_ERROR", retry_after=5))
    h = Harness(db, {"fcm": bad, "simulation": ScriptedBridge("simulation")})  # default grace: 30 s
    await h.add_devices([sim("d0", "fcm", "simulation"), sim("d1", "fcm", "simulation")])
    t0 = time.monotonic()
    job_id = await h.submit(job({"all": True}, ttl=0))
    status = await h.run_until_complete(job_id, timeout=5)
    assert status["counts"]["sent"] == 2 and time.monotonic() - t0 < 5
    rows = await h.deliveries(job_id)
    assert {r["platform"] for r in rows.values()} == {"simulation"}
    assert all(r["moved"].startswith("moved from fcm to simulation") for r in rows.values()), rows
    assert len(bad.calls) <= 2  # each tried FCM at most once (both may have been in flight together)


async def test_a_bridge_that_cannot_start_is_fallen_over_after_the_grace(db):
    fcm = ScriptedBridge("fcm")
    h = Harness(db, {"fcm": fcm, "simulation": ScriptedBridge("simulation")}, fallback_after_s=0.3)
    h.dispatcher.pause("fcm", "bridges.fcm: service_account_file: not valid JSON")
    await h.add_devices([sim("d0", "fcm", "simulation")])
    job_id = await h.submit(job({"all": True}, ttl=600))
    status = await h.run_until_complete(job_id, timeout=5)
    assert status["counts"]["sent"] == 1 and fcm.calls == []
    row = (await h.deliveries(job_id))["d0"]
    assert row["platform"] == "simulation" and "not valid JSON" in row["moved"]


def app_device(device_id: str, app: str | None) -> dict:
    fcm = {"platform": "fcm", "token": f"tok-{device_id}", **({"app": app} if app else {})}
    return {"device_id": device_id, "channels": [fcm, {"platform": "simulation"}]}


async def test_one_apps_unhealthy_bridge_moves_only_its_devices(db):
    """Each app of a platform is its own bridge slot: the shop app's broken key moves its
    devices to their next channel after the grace, the main app's devices stay on FCM."""
    main = ScriptedBridge("fcm")
    shop = ScriptedBridge("fcm", default=Outcome.unhealthy("oauth token refresh refused", retry_after=5))
    h = Harness(db, {"fcm": main, "fcm:shop": shop, "simulation": ScriptedBridge("simulation")},
                fallback_after_s=0.5)
    await h.add_devices([app_device("main-1", None), app_device("shop-1", "shop")])
    job_id = await h.submit(job({"all": True}, ttl=600) | {"options": {"fcm": {"android": {"restricted_package_name": "x"}}}})
    status = await h.run_until_complete(job_id, timeout=10)
    assert status["counts"]["sent"] == 2
    rows = await h.deliveries(job_id)
    assert rows["main-1"]["platform"] == "fcm" and rows["shop-1"]["platform"] == "simulation", rows
    assert rows["shop-1"]["moved"].startswith("moved from fcm:shop to simulation: fcm:shop unhealthy for "), rows
    # The platform's job options reach every app of it.
    assert [d.options for _, d in shop.calls[:1]] == [{"android": {"restricted_package_name": "x"}}]
    assert [d.device_id for _, d in main.calls] == ["main-1"] and {d.device_id for _, d in shop.calls} == {"shop-1"}


async def test_deliveries_routed_to_an_app_no_longer_configured_take_the_next_channel(db):
    gone = ScriptedBridge("fcm", delay=30)  # never answers while this dispatcher runs
    first = Harness(db, {"fcm:gone": gone, "simulation": ScriptedBridge("simulation")})
    await first.add_devices([app_device("d1", "gone")])
    job_id = await first.submit(job({"all": True}, ttl=600))
    tasks = _start(first)
    try:
        await _until(lambda: first.deliveries(job_id), 5)
        rows = await first.deliveries(job_id)
        assert rows["d1"]["state"] == "queued"

        async def in_flight() -> bool:  # the dispatcher has routed it and is sending it
            return bool(gone.calls)

        await _until(in_flight, 5)
    finally:
        await _stop(first, tasks)  # the send in flight is cancelled: the row stays queued on fcm:gone
    route = await db.run(lambda c: c.execute("SELECT route FROM deliveries WHERE job_id = ?", (job_id,)).fetchone()[0])
    assert route == "fcm:gone"
    # Restarted without [bridges.fcm.apps.gone]: the delivery is routed again, to the next channel.
    second = Harness(db, {"fcm": ScriptedBridge("fcm"), "simulation": ScriptedBridge("simulation")})
    status = await second.run_until_complete(job_id, timeout=10)
    assert status["counts"]["sent"] == 1
    assert (await second.deliveries(job_id))["d1"]["platform"] == "simulation"
