"""In-process checks of the operator page's parts that a browser cannot see: the query
plans stay on indexes (so 100,000 devices cost what 1,000 do), the tag table follows every
registry write, sessions end when they must, and API errors reach the page per field."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from devices.models import Device
from gateway import migrations, stats
from gateway.broker.passwords import add_user, remove_user
from gateway.http import ui_queries as q
from gateway.http.sessions import IDLE_S, MAX_AGE_S, SessionStore, cookie_header
from gateway.http.errors import ApiError
from gateway.http.ui import error_fields
from gateway.pipeline import deliveries, jobs, registry
from gateway.pipeline.models import InputError, decode_json_object, parse_job


def fresh_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    migrations.migrate(conn)
    return conn


def device(device_id: str, segment: str | None = None, tags: list[str] | None = None, **extra: Any) -> Device:
    return Device.model_validate({"device_id": device_id, "segment": segment, "tags": tags or [],
                                  "channels": extra.get("channels", [{"platform": "simulation"}])})


def tag_rows(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    return {(r[0], r[1]) for r in conn.execute("SELECT tag, device_id FROM ui_device_tags")}


def test_the_tag_table_follows_every_registry_write_and_is_rebuilt_when_missing():
    conn = fresh_db()
    registry.upsert_device(conn, device("a", tags=["x", "y"]), "t")
    registry.upsert_device(conn, device("b", tags=["y"]), "t")
    assert tag_rows(conn) == {("x", "a"), ("y", "a"), ("y", "b")}
    registry.upsert_device(conn, device("a", tags=["z"]), "t")  # re-registration replaces the tags
    assert tag_rows(conn) == {("z", "a"), ("y", "b")}
    registry.remove_device(conn, "b")
    assert tag_rows(conn) == {("z", "a")}
    # A malformed tags value (no writer makes one) never makes a registry write fail.
    conn.execute("UPDATE devices SET tags = 'not json' WHERE device_id = 'a'")
    assert tag_rows(conn) == set()
    conn.execute("DELETE FROM devices")
    registry.upsert_device(conn, device("c", tags=["t"]), "t")
    # Written while the triggers were away (an older gateway): the next start recounts.
    conn.execute("DROP TRIGGER ui_device_tags_insert")
    registry.upsert_device(conn, device("d", tags=["t"]), "t")
    assert tag_rows(conn) == {("t", "c")}
    # ...whose pipeline schema was at the version before the tag table was its own.
    conn.execute("UPDATE schema_versions SET version = 2 WHERE component = 'pipeline'")
    migrations.migrate(conn)
    assert tag_rows(conn) == {("t", "c"), ("t", "d")}
    migrations.migrate(conn)  # idempotent
    assert tag_rows(conn) == {("t", "c"), ("t", "d")}


class Recorder:
    """A connection that remembers every statement (to ask SQLite for its plan)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        self.statements.append((sql, tuple(args)))
        return self.conn.execute(sql, args)


def test_every_page_is_read_through_an_index_whatever_the_fleet_size():
    conn = fresh_db()
    conn.execute("BEGIN")
    for i in range(5000):
        registry.upsert_device(conn, device(f"d-{i:05}", f"s{i % 10}", [f"t{i % 7}"]), "t")
    for j in range(50):
        jobs.insert_job(conn, parse_job({"job_id": f"job-{j:03}", "target": {"segment": "s1"},
                                          "notification": {"title": "x"}}), "t", now=1000.0 + j)
    while not deliveries.expand_page(conn, "job-049", 200, time.time()):
        pass
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    rec = Recorder(conn)
    pages = [
        q.devices_page(rec),
        q.devices_page(rec, after="d-04000"),
        q.devices_page(rec, prefix="d-01"),
        q.devices_page(rec, segment="s3", after="d-02000"),
        q.devices_page(rec, tag="t1", prefix="d-02"),
        q.devices_page(rec, tag="t1", segment="s2"),
        q.jobs_page(rec, 20),
        q.jobs_page(rec, 20, before=q.encode_job_cursor(1030.0, "job-030")),
        q.jobs_page(rec, 20, state="dispatching"),
        q.deliveries_page(rec, "job-049", (), "d-01000", 50),
        q.deliveries_page(rec, "job-049", q.PROBLEM_STATES, "", 50),
        q.alarms_page(rec, "firing"),
        {"jobs": q.jobs_changed_since(rec, 1020.0)},
    ]
    assert pages[1]["devices"][0]["device_id"] == "d-04001" and pages[1]["total"] == 5000
    assert pages[3]["devices"][0]["device_id"] == "d-02003" and pages[3]["total"] == 500
    assert [d["device_id"] for d in pages[4]["devices"]][:2] == ["d-02003", "d-02010"]  # i % 7 == 1
    assert pages[7]["jobs"][0]["job_id"] == "job-029" and pages[7]["next"] == pages[7]["jobs"][-1]["cursor"]
    assert len(pages[9]["deliveries"]) == 50 and pages[9]["deliveries"][0]["device_id"] == "d-01001"
    for sql, args in rec.statements:
        if sql.startswith(("PRAGMA", "SELECT 1 FROM sqlite_master")):
            continue
        plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
        text = " | ".join(plan)
        if "COUNT(*)" in sql:  # a total: an index count, never the table
            assert all("INDEX" in p or "PRIMARY KEY" in p for p in plan), (sql, text)
            continue
        if "state IN ('accepted', 'dispatching')" in sql:
            continue  # the "now" count of open jobs
        assert "TEMP B-TREE" not in text or "job_id >= ?" in sql, (sql, text)  # no sort of a whole table
        for p in plan:
            assert p.startswith("SEARCH") or "USING" in p, (sql, text)  # never a bare table scan


def test_job_latency_is_exact_for_small_jobs_and_a_bucket_bound_for_huge_ones(monkeypatch):
    conn = fresh_db()
    for i in range(100):
        registry.upsert_device(conn, device(f"d-{i:03}"), "t")
    jobs.insert_job(conn, parse_job({"job_id": "j", "target": {"all": True}, "notification": {"title": "t"}}), "t")
    while not deliveries.expand_page(conn, "j", 50, time.time()):
        pass
    conn.executemany("UPDATE deliveries SET state = 'acknowledged', latency_ms = ? WHERE device_id = ?",
                     [(float(i * 10), f"d-{i:03}") for i in range(100)])
    exact = q.job_latency(conn, "j")
    assert exact == {"count": 100, "mean_ms": 495.0, "max_ms": 990.0, "p50_ms": 500.0, "p95_ms": 950.0, "exact": True}
    monkeypatch.setattr(q, "EXACT_PERCENTILES_UP_TO", 10)
    bound = q.job_latency(conn, "j")
    assert bound["exact"] is False and bound["p50_ms"] == 500.0 and bound["p95_ms"] == 1000.0


def test_addresses_are_shown_shortened():
    assert q.redact_channel({"platform": "fcm", "token": "abcdefghijklmnopqrstuvwxyz"}) == "abcdef…wxyz"
    assert q.redact_channel({"platform": "wns", "channel_uri": "https://db5.notify.windows.com/?token=SECRET"}) \
        == "db5.notify.windows.com …"
    assert q.redact_channel({"platform": "webpush", "subscription": {
        "endpoint": "https://fcm.googleapis.com/fcm/send/SECRET", "keys": {"p256dh": "k", "auth": "a"}}}) \
        == "fcm.googleapis.com …"
    assert q.redact_channel({"platform": "mqtt"}) == ""


def test_api_errors_reach_the_page_per_field_as_data_in_the_apis_own_words():
    """Validation keeps each problem with its field; the page gets them as data, never by
    parsing the joined message (which a field's own text could break, e.g. a pattern with ';')."""
    with pytest.raises(InputError) as info:
        parse_job({"target": {"devices": ["ok-1", "not ok"]}, "notification": {"ttl": -1}})
    err = ApiError.from_input(info.value)
    assert error_fields(err) == [
        {"field": "target.devices.1", "message": "target.devices.1: String should match pattern "
                                                 "'^[A-Za-z0-9._:-]{1,128}$'"},
        {"field": "notification.ttl", "message": "notification.ttl: Input should be greater than or equal to 0"}]
    assert "; ".join(f["message"] for f in error_fields(err)) == err.message  # the API's one message
    with pytest.raises(InputError) as info:
        decode_json_object(b"{", 100, "job")
    [only] = error_fields(ApiError.from_input(info.value))
    assert only["field"] == "job" and only["message"] == info.value.message
    assert only["message"].startswith("job: not valid JSON (")
    named = ApiError(400, "x", "a: b; c: d", fields=[InputError.at("x", "a", "b; c: d").fields[0]])
    assert error_fields(named) == [{"field": "a", "message": "a: b; c: d"}]
    assert error_fields(ApiError(503, "not_stored", "the gateway could not store this now")) == [
        {"field": "", "message": "the gateway could not store this now"}]


# ------------------------------------------------------------------ sessions
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_sessions_expire_end_with_account_changes_and_are_bounded(tmp_path: Path, monkeypatch):
    from gateway.http import sessions as sessions_module

    monkeypatch.setattr(sessions_module, "MAX_SESSIONS", 20)
    passwd = tmp_path / "passwd"
    add_user(passwd, "tech", "pw", "technician")
    add_user(passwd, "mon", "pw", "monitor")
    clock = Clock()
    sessions = SessionStore(passwd, clock=clock)

    async def scenario() -> None:
        token, s = await sessions.create("tech", "technician")
        assert await sessions.get(token) is s and sessions.csrf_ok(s, s.csrf)
        assert not sessions.csrf_ok(s, "") and not sessions.csrf_ok(s, s.csrf[:-1] + ("y" if s.csrf.endswith("x") else "x"))
        assert await sessions.get(token + "x") is None and await sessions.get("") is None
        clock.t += IDLE_S - 1
        assert await sessions.get(token) is s  # used: the idle time starts again
        clock.t += IDLE_S - 1
        assert await sessions.get(token) is s
        clock.t += IDLE_S + 1
        assert await sessions.get(token) is None  # idle too long
        token, s = await sessions.create("tech", "technician")
        for _ in range(int(MAX_AGE_S // (IDLE_S / 2)) + 1):
            clock.t += IDLE_S / 2
            await sessions.get(token)
        assert await sessions.get(token) is None  # used all along, but older than a shift

        # The account changes: a new password, another role, removed.
        for change in (lambda: add_user(passwd, "tech", "new-pw", "technician"),
                       lambda: add_user(passwd, "tech", "new-pw", "monitor"),
                       lambda: remove_user(passwd, "tech")):
            add_user(passwd, "tech", "pw", "technician")
            clock.t += 2
            token, s = await sessions.create("tech", "technician")
            other, _ = await sessions.create("mon", "monitor")
            clock.t += 2
            assert await sessions.get(token) is s
            change()
            clock.t += 2
            assert await sessions.get(token) is None
            assert await sessions.get(other) is not None  # only that account's sessions end
        assert await sessions.create("tech", "technician") is None  # removed meanwhile

        sessions.clear()
        first, _ = await sessions.create("mon", "monitor")
        for _ in range(20):
            clock.t += 0.001
            await sessions.create("mon", "monitor")
        assert len(sessions) == 20 and await sessions.get(first) is None  # the least recently used went

    asyncio.run(scenario())


def test_the_cookie_is_httponly_samesite_strict_and_secure_over_https():
    assert cookie_header("tok", secure=False) == "homepot_session=tok; Path=/; HttpOnly; SameSite=Strict"
    assert cookie_header("tok", secure=True).endswith("; Secure")


def test_summaries_carry_the_cursor_of_the_page_that_would_follow():
    conn = fresh_db()
    jobs.insert_job(conn, parse_job({"job_id": "a", "target": {"all": True}, "notification": {"title": "T"}}), "mqtt",
                     now=5.5)
    [summary] = q.jobs_page(conn, 5)["jobs"]
    assert summary["cursor"] == q.encode_job_cursor(5.5, "a") and summary["title"] == "T" and summary["source"] == "mqtt"
    assert q.decode_job_cursor(summary["cursor"]) == (5.5, "a")
    for bad in ("", "x~a", "nan~a", "1.0", "1.0~a b"):
        with pytest.raises(q.QueryError):
            q.decode_job_cursor(bad)
    assert json.dumps(summary)  # what the event stream sends


def test_a_device_whose_tags_repeat_one_registers_and_re_registers():
    """The tag triggers run inside the registry's upsert, whose conflict rule SQLite applies
    to them too: a repeated tag must not make the registration fail (it did with the page's
    old ``INSERT OR IGNORE`` triggers)."""
    conn = fresh_db()
    registry.upsert_device(conn, device("r", tags=["t", "t"]), "t")
    registry.upsert_device(conn, device("r", tags=["u", "u", "t"]), "t")
    registry.upsert_devices(conn, [(device("r", tags=["v", "v"]), "t")], time.time())
    assert tag_rows(conn) == {("v", "r")}


# ------------------------------------------------------------------ static files
def test_one_static_handler_serves_both_trees_with_one_mime_table(tmp_path: Path):
    """The page's files and the Web Push client's are answered by the same code: same type
    for the same suffix, nothing outside the directory, nothing with an unlisted suffix."""
    from gateway.http.errors import ApiError as Err
    from gateway.http.service import WEB_FILES
    from gateway.http.static import MIME_TYPES, StaticFiles
    from gateway.http.ui import UI_FILES

    page_js, web_js = UI_FILES.response("app.js"), WEB_FILES.response("sw.js", {"Service-Worker-Allowed": "/web/"})
    assert page_js.headers["Content-Type"] == web_js.headers["Content-Type"] == MIME_TYPES[".js"]
    assert page_js.headers["X-Content-Type-Options"] == web_js.headers["X-Content-Type-Options"] == "nosniff"
    assert web_js.headers["Service-Worker-Allowed"] == "/web/"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.js").write_text("1")
    (tmp_path / "secret.py").write_text("x")
    files = StaticFiles(tmp_path / "sub", "/s/", frozenset({".js"}))
    assert files.response("a.js").headers["Content-Type"].startswith("text/javascript")
    for bad in ("../secret.py", "../sub/a.js/..", "nope.js", "index.html", "/etc/passwd"):
        with pytest.raises(Err) as info:
            files.response(bad)
        assert info.value.status == 404 and info.value.message.startswith("no such file: /s/")
    with pytest.raises(ValueError):
        StaticFiles(tmp_path, "/x/", frozenset({".exe"}))
