"""The one alarm summary that status, /metrics and the operator page read."""

from __future__ import annotations

import sqlite3

from gateway.alarms import store
from gateway.alarms.summary import summary
from gateway.http import ui_queries as q
from gateway import migrations


def test_the_summary_counts_every_state_and_lists_the_firing_longest_first():
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    assert summary(conn) is None  # no alarm ever ran: "none configured"
    migrations.migrate(conn)
    rows = [("door", "d-2", "firing", 200.0), ("door", "d-1", "firing", 100.0), ("temp", "t-1", "acknowledged", 50.0),
            ("temp", "t-2", "pending", None), ("temp", "t-3", "idle", None)]
    for rule, key, state, fired in rows:
        conn.execute("INSERT INTO alarms(rule, akey, state, value, fired_at, updated_at) VALUES (?, ?, ?, '1', ?, 0)",
                     (rule, key, state, fired))
    s = summary(conn)
    assert s is not None
    assert s.by_state == {"firing": 2, "acknowledged": 1, "pending": 1, "idle": 1}
    assert [(a["rule"], a["key"], a["fired_at"]) for a in s.firing] == [("door", "d-1", 100.0), ("door", "d-2", 200.0)]
    assert [a["key"] for a in summary(conn, firing_limit=1).firing] == ["d-1"]
    # The page: the same counts, for the states it shows.
    assert q.alarm_counts(conn) == {"firing": 2, "acknowledged": 1, "pending": 1, "cleared": 0}
