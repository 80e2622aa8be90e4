"""Job and delivery states are named once (gateway/states.py); times are written one way
(gateway/timeutil.py)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

from gateway.pipeline import schema, store
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
    assert "suppressed" in store.FINAL_DELIVERY_STATES
    status = store.rejected_status("j-1", "invalid_job", "x: required")
    assert json.loads(json.dumps(status))["counts"] == {"targets": 0, **dict.fromkeys(DELIVERY_STATES, 0)}
    assert json.dumps({"state": JobState.REJECTED}) == '{"state": "rejected"}'
    assert "completed" in FINAL_JOB_STATES and f"{JobState.COMPLETED}" == "completed"


def test_one_time_format_whatever_the_zone():
    t = datetime(2025, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
    assert iso(t) == "2025-03-04T05:06:07.891Z"
    assert iso(t.astimezone(timezone(timedelta(hours=-7)))) == "2025-03-04T05:06:07.891Z"
    assert iso_ts(t.timestamp()) == "2025-03-04T05:06:07.891Z" and iso_ts(None) is None
