"""Job and delivery states are named once (gateway/states.py); times are written one way
(gateway/timeutil.py)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

from gateway.pipeline import schema
from gateway.pipeline import deliveries as pipeline_deliveries
from gateway.pipeline import jobs as pipeline_jobs
from gateway.states import DELIVERY_STATES, FINAL_JOB_STATES, PROBLEM_DELIVERY_STATES, DeliveryState, JobState
from gateway.timeutil import iso, iso_ts


def _sql_states(index: str) -> set[str]:
    m = re.search(rf"CREATE INDEX IF NOT EXISTS {index} ON .*? WHERE state IN \(([^)]*)\);", schema.INDEXES)
    assert m, index
    return {s.strip().strip("'") for s in m.group(1).split(",")}


def test_the_sql_literals_that_must_stay_literals_match_the_enums():
    """A partial index's WHERE must be literal; it has to agree with the enum."""
    assert _sql_states("jobs_finished") == set(FINAL_JOB_STATES)
    assert _sql_states("jobs_open") == {JobState.ACCEPTED, JobState.DISPATCHING}
    assert set(FINAL_JOB_STATES) | {JobState.ACCEPTED, JobState.DISPATCHING} == set(JobState)


def test_states_are_their_strings_in_rows_and_json():
    assert DELIVERY_STATES == ("queued", "sent", "acknowledged", "failed", "expired", "invalid_address", "suppressed")
    assert set(PROBLEM_DELIVERY_STATES) == set(DeliveryState) - {"queued", "sent", "acknowledged", "suppressed"}
    assert "suppressed" in pipeline_deliveries.FINAL_DELIVERY_STATES
    status = pipeline_jobs.rejected_status("j-1", "invalid_job", "x: required")
    assert json.loads(json.dumps(status))["counts"] == {"targets": 0, **dict.fromkeys(DELIVERY_STATES, 0)}
    assert json.dumps({"state": JobState.REJECTED}) == '{"state": "rejected"}'
    assert "completed" in FINAL_JOB_STATES and f"{JobState.COMPLETED}" == "completed"


def test_one_time_format_whatever_the_zone():
    t = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
    assert iso(t) == "2025-03-04T05:06:07.891Z"
    assert iso(t.astimezone(timezone(timedelta(hours=-7)))) == "2025-03-04T05:06:07.891Z"
    assert iso_ts(t.timestamp()) == "2025-03-04T05:06:07.891Z" and iso_ts(None) is None


def test_alarm_states_are_their_strings_and_loaded_rows_carry_the_enum():
    import sqlite3

    from gateway import migrations
    from gateway.alarms import store as alarm_store
    from gateway.alarms.engine import AlarmRow
    from gateway.states import ACTIVE_ALARM_STATES, ALARM_STATES, AlarmState

    assert [s.value for s in AlarmState] == ["idle", "pending", "firing", "acknowledged", "cleared"]
    assert ALARM_STATES == ("pending", "firing", "acknowledged", "cleared")
    assert ACTIVE_ALARM_STATES == {"pending", "firing", "acknowledged"}
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    migrations.migrate(conn)
    alarm_store.write_rows(conn, [AlarmRow(rule="door", key="hall", state=AlarmState.FIRING, jobs=[])])
    assert conn.execute("SELECT state, typeof(state) FROM alarms").fetchone()[:] == ("firing", "text")
    row = alarm_store.get_row(conn, "door", "hall")
    assert row is not None and row.state is AlarmState.FIRING
    assert alarm_store.counts(conn)["firing"] == 1


def test_no_state_is_compared_with_a_literal_in_the_code():
    """Python code names states by the enums of gateway/states.py (SQL keeps its literals)."""
    from pathlib import Path

    import gateway

    names = "|".join({*DeliveryState, *JobState, "idle", "pending", "firing", "cleared"})
    literal = re.compile(rf"""state"?\]?\s*(?:==|!=|in|not in)\s*\(?"(?:{names})\"""")
    root = Path(gateway.__file__).parent
    hits = [f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert hits == []
