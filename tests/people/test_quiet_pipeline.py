"""Quiet hours and mutes in the dispatcher, in process: the same Dispatcher, Recorder and
Expander the daemon runs, a scripted bridge and real SQLite (with the deliveries' one-writer
guard), persons stored by the registry's own code, and the gateway's clock set to a chosen
instant (``gateway.clock`` is what the dispatcher reads)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from gateway import clock, stats
from gateway.people import store as people_store
from gateway.people.gate import PeopleGate
from gateway.people.model import Person
from gateway.pipeline import jobs as pipeline_jobs
from tests.pipeline.test_policies import Harness, ScriptedBridge, db, job, sim  # noqa: F401 - db is a fixture

EVERY_DAY = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def at(*a: int) -> float:
    return datetime(*a, tzinfo=UTC).timestamp()


@pytest.fixture
def gateway_time(monkeypatch):
    """Set the gateway's clock to read ``instant`` now (it runs on from there)."""
    def set_to(instant: float) -> None:
        monkeypatch.setattr(clock, "_offset", instant - time.monotonic())
    return set_to


async def people_harness(db, persons: list[dict], devices: list[dict], **dispatch) -> tuple[Harness, ScriptedBridge]:
    bridge = ScriptedBridge("simulation")
    h = Harness(db, {"simulation": bridge}, **dispatch)
    h.dispatcher.people = PeopleGate()
    await h.add_devices(devices)

    def put(conn):
        for p in persons:
            people_store.put(conn, Person.model_validate(p))
    await db.run(put)
    return h, bridge


async def run_for(h: Harness, seconds: float, until=None) -> None:
    """Run the pipeline's tasks for up to ``seconds`` (or until ``until()`` holds)."""
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(h.recorder.run()), asyncio.create_task(h.expander.run(stopping)),
             asyncio.create_task(h.dispatcher.run(stopping))]
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and await until():
                return
            await asyncio.sleep(0.02)
        if until is not None:
            raise AssertionError("condition not met in time")
    finally:
        stopping.set()
        await h.dispatcher.drain(1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_held_until_the_window_ends_then_sent(db, gateway_time):
    gateway_time(at(2026, 12, 7, 21, 59, 58, 500000))  # Monday, 1.5 s before the night ends at 22:00 UTC
    h, bridge = await people_harness(
        db, [{"person_id": "ulf", "devices": ["ulf-phone"], "timezone": "UTC",
              "quiet_hours": [{"days": EVERY_DAY, "from": "21:00", "to": "22:00"}]}],
        [sim("ulf-phone"), sim("kiosk")])
    job_id = await h.submit(job({"devices": ["ulf-phone", "kiosk"]}))

    async def held():
        rows = await h.deliveries(job_id)
        return len(rows) == 2 and rows["ulf-phone"]["reason"] and rows["kiosk"]["state"] == "sent"
    await run_for(h, 5, held)
    rows = await h.deliveries(job_id)
    assert rows["ulf-phone"]["state"] == "queued"
    assert rows["ulf-phone"]["reason"] == "quiet hours until 2026-12-07 22:00 UTC (UTC)"
    assert [d.device_id for _, d in bridge.calls] == ["kiosk"]
    status = await h.run_until_complete(job_id, timeout=10)
    assert status["counts"]["sent"] == 2 and status["counts"]["queued"] == 0
    sent_at = [d.sent_at.timestamp() for _, d in bridge.calls if d.device_id == "ulf-phone"]
    assert len(sent_at) == 1 and at(2026, 12, 7, 22, 0) <= sent_at[0] < at(2026, 12, 7, 22, 0, 2)


async def test_bypass_priority_goes_through_and_below_it_is_held(db, gateway_time):
    gateway_time(at(2026, 12, 8, 2, 0))
    h, bridge = await people_harness(
        db, [{"person_id": "anna", "devices": ["anna-phone"], "timezone": "Europe/Berlin", "bypass_priority": "high",
              "quiet_hours": [{"days": EVERY_DAY, "from": "22:00", "to": "06:00"}]}], [sim("anna-phone")])
    high = await h.submit(job({"devices": ["anna-phone"]}, priority="high"))
    status = await h.run_until_complete(high, timeout=10)
    assert status["counts"]["sent"] == 1
    normal = await h.submit(job({"devices": ["anna-phone"]}, priority="normal"))

    async def held():
        return (await h.deliveries(normal)).get("anna-phone", {}).get("reason")
    await run_for(h, 5, held)
    assert (await h.deliveries(normal))["anna-phone"]["reason"] == \
        "quiet hours until 2026-12-08 06:00 CET (Europe/Berlin)"
    assert len(bridge.calls) == 1


async def test_a_short_ttl_expires_during_quiet_hours(db, gateway_time):
    gateway_time(at(2026, 12, 8, 2, 0))
    h, bridge = await people_harness(
        db, [{"person_id": "anna", "devices": ["anna-phone"], "timezone": "Europe/Berlin",
              "quiet_hours": [{"days": EVERY_DAY, "from": "22:00", "to": "06:00"}]}], [sim("anna-phone")])
    short = await h.submit(job({"devices": ["anna-phone"]}, ttl=1))
    now_or_never = await h.submit(job({"devices": ["anna-phone"]}, ttl=0))
    status = await h.run_until_complete(short, timeout=10)
    assert status["counts"]["expired"] == 1
    rows = await h.deliveries(short)
    assert rows["anna-phone"]["last_error"] == \
        "ttl elapsed during quiet hours until 2026-12-08 06:00 CET (Europe/Berlin)"
    assert (await h.run_until_complete(now_or_never, timeout=10))["counts"]["expired"] == 1
    assert bridge.calls == []


async def test_muted_segment_and_rule_are_suppressed_and_counted(db, gateway_time):
    gateway_time(at(2026, 12, 8, 12, 0))
    h, bridge = await people_harness(
        db, [{"person_id": "mia", "devices": ["mia-phone"], "timezone": "UTC",
              "muted": {"segments": ["pos"], "rules": ["door-open"]}}],
        [sim("mia-phone", segment="pos"), sim("kiosk", segment="pos")])
    seg = await h.submit(job({"segment": "pos"}, priority="critical"))
    status = await h.run_until_complete(seg, timeout=10)
    assert status["state"] == "completed"
    assert status["counts"] == {"targets": 2, "queued": 0, "sent": 1, "acknowledged": 0, "failed": 0, "expired": 0,
                                "invalid_address": 0, "suppressed": 1}
    assert (await h.deliveries(seg))["mia-phone"]["last_error"] == "muted by mia: segment pos"
    # An alarm job of a muted rule (the alarm store records which rule a job is for).
    alarm = await h.submit({"job_id": "alarm.door-open.d1.1", **job({"devices": ["mia-phone"]})})
    await db.run(lambda conn: conn.execute("INSERT INTO alarm_jobs(job_id, rule, akey, episode, kind) "
                                           "VALUES ('alarm.door-open.d1.1', 'door-open', 'd1', 1, 'fire')"))
    await db.run(lambda conn: conn.execute("UPDATE jobs SET source = 'alarm' WHERE job_id = ?", (alarm,)))
    h.stopping = asyncio.Event()
    status = await h.run_until_complete(alarm, timeout=10)
    assert status["counts"]["suppressed"] == 1
    assert (await h.deliveries(alarm))["mia-phone"]["last_error"] == "muted by mia: alarm rule door-open"
    assert [d.device_id for _, d in bridge.calls] == ["kiosk"]
    # The aggregates /metrics and `status` read count them too.
    counts = await db.run(stats.delivery_counts)
    assert counts[("simulation", "suppressed")] == 2


async def test_a_people_job_holds_the_person_then_reaches_them_in_turn_after_the_window(db, gateway_time):
    end = at(2026, 12, 7, 22, 0)
    gateway_time(end - 1.5)
    h, bridge = await people_harness(
        db, [{"person_id": "ulf", "devices": ["ulf-phone", "ulf-browser"], "timezone": "UTC", "reach_after_s": 1,
              "quiet_hours": [{"days": EVERY_DAY, "from": "21:00", "to": "22:00"}]},
             {"person_id": "eve", "devices": ["eve-phone"], "timezone": "UTC"}],
        [sim("ulf-phone"), sim("ulf-browser"), sim("eve-phone")])
    job_id = await h.submit(job({"people": ["ulf", "eve"]}))

    async def held():
        rows = await h.deliveries(job_id)
        return len(rows) == 3 and rows["ulf-phone"]["reason"] and rows["eve-phone"]["state"] == "sent"
    await run_for(h, 5, held)
    rows = await h.deliveries(job_id)
    assert rows["ulf-phone"]["reason"] == "quiet hours until 2026-12-07 22:00 UTC (UTC)"
    # The browser waits its turn (1 s after the job), then for the window's end and its turn after it.
    assert rows["ulf-browser"]["state"] == "queued"
    status = await db.run(lambda conn: pipeline_jobs.job_status(conn, job_id))
    assert status["people"] == {"targets": 2, "reached": 0, "held": 1}
    status = await h.run_until_complete(job_id, timeout=10)
    assert status["people"] == {"targets": 2, "reached": 0, "held": 0}
    sent = {d.device_id: d.sent_at.timestamp() for _, d in bridge.calls}
    # Not before the window's end (the upper bounds leave room for a loaded machine).
    assert end <= sent["ulf-phone"] < end + 3, sent["ulf-phone"] - end
    # The browser's turn comes reach_after_s after the window's end, as if the job came at 22:00.
    assert end + 1 <= sent["ulf-browser"] < end + 4, sent["ulf-browser"] - end


async def test_an_unacked_deliverys_resend_waits_for_the_end_of_quiet_hours(db, gateway_time):
    start = at(2026, 12, 7, 22, 0)
    gateway_time(start - 0.4)  # sent just before the window; its resend would fall inside it
    h, bridge = await people_harness(
        db, [{"person_id": "ulf", "devices": ["ulf-phone"], "timezone": "UTC",
              "quiet_hours": [{"days": EVERY_DAY, "from": "22:00", "to": "23:00"}]}], [sim("ulf-phone")],
        ack_timeout_s=0.8)
    h.dispatcher.resend = {"simulation"}
    job_id = await h.submit(job({"devices": ["ulf-phone"]}, ttl=7200))

    async def resend_held():
        rows = await db.run(lambda conn: conn.execute("SELECT resend_at, last_error FROM deliveries").fetchall())
        return rows and rows[0][1] and rows[0]
    await run_for(h, 5, resend_held)
    resend_at, reason = await resend_of(db)
    assert reason == "quiet hours until 2026-12-07 23:00 UTC (UTC)"
    assert resend_at == at(2026, 12, 7, 23, 0)
    assert len(bridge.calls) == 1 and bridge.calls[0][1].sent_at.timestamp() < start


async def resend_of(db):
    return tuple((await db.run(lambda conn: conn.execute("SELECT resend_at, last_error FROM deliveries").fetchall()))[0])


async def test_a_changed_preference_decides_held_deliveries_again(db, gateway_time):
    gateway_time(at(2026, 12, 8, 2, 0))
    anna = {"person_id": "anna", "devices": ["anna-phone"], "timezone": "Europe/Berlin",
            "quiet_hours": [{"days": EVERY_DAY, "from": "22:00", "to": "06:00"}]}
    h, bridge = await people_harness(db, [anna], [sim("anna-phone")])
    job_id = await h.submit(job({"devices": ["anna-phone"]}))

    async def held():
        return (await h.deliveries(job_id)).get("anna-phone", {}).get("reason")
    await run_for(h, 5, held)
    assert bridge.calls == []
    # She turns quiet hours off (as `people set` or /v1/me/preferences would): sent now, not at 06:00.
    await db.run(lambda conn: people_store.put(conn, Person.model_validate({**anna, "quiet_hours": []})))
    h.stopping = asyncio.Event()
    status = await h.run_until_complete(job_id, timeout=10)
    assert status["counts"]["sent"] == 1 and len(bridge.calls) == 1
