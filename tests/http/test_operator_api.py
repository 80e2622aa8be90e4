"""The operator page's login, session, CSRF and JSON routes with a plain HTTP client: what a
forged, stale or hostile request gets (the browser tests in test_operator_page.py show what
a user sees, against the real daemon).

These are the HTTP service's own behaviour, so the service is served in-process
(tests/helpers/http_app.py: the real HttpService and the pipeline's real intake on a test
database; the health snapshot is the real reporter's over a given broker and bridges). The
one test of an alarm ack reaching the alarm engine runs against the real daemon."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.broker.passwords import remove_user
from tests.helpers.fuzz import examples
from tests.helpers import write_accounts
from tests.helpers.http_app import ServedApi, serve_api
from tests.http.conftest import PASSWORDS, db_rows, error_of, wait_until

HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApi]:
    """One served HTTP service for the module, every role's account."""
    with serve_api(tmp_path_factory.mktemp("operator-api"), users=PASSWORDS) as served:
        yield served


def login(api: Any, user: str, password: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{api.base}/ui/login", data={"username": user, "password": password},
                      headers=headers, follow_redirects=False)


def session(api: Any, user: str, password: str) -> tuple[httpx.Client, str]:
    """A client holding a session cookie, and the session's CSRF token."""
    r = login(api, user, password)
    assert r.status_code == 303, r.text
    client = httpx.Client(base_url=api.base, cookies={"homepot_session": r.cookies["homepot_session"]}, timeout=30)
    csrf = client.get("/ui/api/session").json()["csrf"]
    return client, csrf


def test_root_is_the_login_form_or_the_page_for_a_browser_and_the_json_pointer_for_scripts(api):
    r = httpx.get(f"{api.base}/", headers=HTML)
    assert r.status_code == 200 and 'action="/ui/login"' in r.text and "set-cookie" not in r.headers
    assert "script-src 'self'" in r.headers["content-security-policy"] and r.headers["x-frame-options"] == "DENY"
    assert httpx.get(f"{api.base}/").status_code == 401  # a script without credentials: JSON, as before
    assert httpx.get(f"{api.base}/", auth=("mon", "mon-pw")).json()["api"] == "/v1"

    r = login(api, "tech", "tech-pw")
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert re.fullmatch(r"homepot_session=[A-Za-z0-9_-]{40,}; Path=/; HttpOnly; SameSite=Strict", cookie), cookie
    token = r.cookies["homepot_session"]
    page = httpx.get(f"{api.base}/", headers=HTML, cookies={"homepot_session": token})
    assert page.status_code == 200 and "/ui/static/app.js" in page.text
    assert token not in page.text and "tech-pw" not in page.text
    assert httpx.get(f"{api.base}/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    for bad in ("..%2Fui.py", "ui.py", "nope.js", "%2E%2E%2F%2E%2E%2Fconfig.py"):
        assert httpx.get(f"{api.base}/ui/static/{bad}").status_code == 404


def test_a_login_needs_the_right_password_a_role_that_may_see_and_this_origin(api):
    wrong = login(api, "tech", "nope")
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    assert "set-cookie" not in wrong.headers and "www-authenticate" not in wrong.headers  # no browser Basic dialog
    assert 'value="tech"' in wrong.text  # the name stays, the password does not
    device = login(api, "plc-1", "plc1-pw")
    assert device.status_code == 403 and "plc-1 (device) may not use the operator page" in device.text
    assert "set-cookie" not in device.headers
    assert login(api, "", "").status_code == 400
    for origin in ("https://evil.example", "null"):
        forged = login(api, "tech", "tech-pw", Origin=origin)
        assert forged.status_code == 403 and "set-cookie" not in forged.headers
    assert login(api, "tech", "tech-pw", Origin=api.base).status_code == 303
    hostile = login(api, '"><script>alert(1)</script>', "x")
    assert hostile.status_code == 401 and "<script>alert" not in hostile.text


def test_writes_need_the_session_its_csrf_token_and_this_origin(api):
    tech, csrf = session(api, "tech", "tech-pw")
    job = {"job_id": "ui-csrf-1", "target": {"all": True}, "notification": {"title": "x"}}
    assert error_of(tech.post("/ui/api/jobs", json=job))["code"] == "csrf"
    assert error_of(tech.post("/ui/api/jobs", json=job, headers={"X-CSRF-Token": csrf[:-1] + ("B" if csrf.endswith("A") else "A")}))["code"] == "csrf"
    assert error_of(tech.post("/ui/api/jobs", json=job, headers={"X-CSRF-Token": csrf,
                                                                 "Origin": "https://evil.example"}))["code"] == "csrf"
    assert error_of(tech.post("/ui/api/jobs", json=job, headers={"X-CSRF-Token": csrf,
                                                                 "Sec-Fetch-Site": "cross-site"}))["code"] == "csrf"
    other, other_csrf = session(api, "tech", "tech-pw")
    assert error_of(tech.post("/ui/api/jobs", json=job, headers={"X-CSRF-Token": other_csrf}))["code"] == "csrf"
    basic = httpx.post(f"{api.base}/ui/api/jobs", json=job, auth=("tech", "tech-pw"), headers={"X-CSRF-Token": csrf})
    assert basic.status_code == 401  # writes take the session only (a browser replays Basic cross-site)
    assert db_rows(api.data_dir, "SELECT COUNT(*) FROM jobs WHERE job_id = 'ui-csrf-1'") == [(0,)]

    mon, mon_csrf = session(api, "mon", "mon-pw")
    assert error_of(mon.post("/ui/api/jobs", json=job, headers={"X-CSRF-Token": mon_csrf}))["code"] == "forbidden"
    ok = tech.post("/ui/api/jobs", json=job, headers={"X-CSRF-Token": csrf, "Origin": api.base})
    assert ok.status_code == 202 and ok.json()["job_id"] == "ui-csrf-1"
    assert db_rows(api.data_dir, "SELECT source FROM jobs WHERE job_id = 'ui-csrf-1'") == [("http",)]
    for c in (tech, other, mon):
        c.close()


def test_job_errors_are_the_apis_split_per_field_and_unknown_devices_are_named(api):
    tech, csrf = session(api, "tech", "tech-pw")
    bad = {"target": {"devices": ["ok-1", "not ok"]}, "notification": {"ttl": "abc", "tll": 1}}
    page = tech.post("/ui/api/jobs", json=bad, headers={"X-CSRF-Token": csrf})
    v1 = httpx.post(f"{api.base}/v1/jobs", json=bad, auth=("tech", "tech-pw"))
    assert page.status_code == v1.status_code == 400
    assert page.json()["error"] == v1.json()["error"]
    assert [f["field"] for f in page.json()["fields"]] == ["target.devices.1", "notification.ttl", "notification.tll"]
    assert "; ".join(f["message"] for f in page.json()["fields"]) == v1.json()["error"]["message"]
    unknown = tech.post("/ui/api/jobs", headers={"X-CSRF-Token": csrf},
                        json={"job_id": "ui-ghost", "target": {"devices": ["ghost-1", "ghost-2"]}, "notification": {"title": "t"}})
    assert unknown.status_code == 400 and unknown.json()["fields"] == [
        {"field": "target.devices", "message": "target.devices: no registered device 'ghost-1', 'ghost-2'"}]
    assert db_rows(api.data_dir, "SELECT COUNT(*) FROM jobs WHERE job_id = 'ui-ghost'") == [(0,)]
    tech.close()


def test_reads_take_a_session_or_basic_and_a_role_that_may_see(api):
    for path in ("/ui/api/now", "/ui/api/jobs", "/ui/api/devices", "/ui/api/alarms", "/ui/api/session"):
        anon = httpx.get(f"{api.base}{path}")
        assert anon.status_code == 401 and "www-authenticate" not in anon.headers, path
        assert httpx.get(f"{api.base}{path}", auth=("plc-1", "plc1-pw")).status_code == 403, path
        assert httpx.get(f"{api.base}{path}", auth=("mon", "mon-pw")).status_code == 200, path
    now = httpx.get(f"{api.base}/ui/api/now", auth=("mon", "mon-pw")).json()
    assert now["gateway"]["mode"] == "embedded" and now["gateway"]["status"] == "ok"
    assert set(now["bridges"]) == {"simulation", "mqtt"} and now["broker"]["clients_connected"] >= 1
    assert now["queue"]["depth"] >= 0 and now["upstream"] is None and now["alarms"]["counts"]["firing"] == 0
    info = httpx.get(f"{api.base}/ui/api/session", auth=("mon", "mon-pw")).json()
    assert info == {"user": "mon", "role": "monitor", "site_id": "site-t", "csrf": None,
                    "may": {"send_jobs": False, "ack_alarms": False}, "rules": {}}
    assert httpx.get(f"{api.base}/ui/api/session", auth=("tech", "tech-pw")).json()["may"] == {
        "send_jobs": True, "ack_alarms": True}


def test_a_session_ends_at_logout_and_when_its_account_changes(api):
    passwd = api.data_dir / "passwd"
    write_accounts(passwd, {"tmp-tech": ("technician", "pw-1")})
    client, csrf = session(api, "tmp-tech", "pw-1")
    assert client.get("/ui/api/now").status_code == 200
    remove_user(passwd, "tmp-tech")
    wait_until(lambda: client.get("/ui/api/now").status_code == 401, timeout=5)
    write_accounts(passwd, {"tmp-tech": ("technician", "pw-1")})
    client, csrf = session(api, "tmp-tech", "pw-1")
    write_accounts(passwd, {"tmp-tech": ("technician", "pw-2")})  # a new password
    wait_until(lambda: client.get("/ui/api/now").status_code == 401, timeout=5)
    client, csrf = session(api, "tmp-tech", "pw-2")
    assert client.post("/ui/logout").status_code == 403  # even a logout needs the token
    out = client.post("/ui/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204 and "Max-Age=0" in out.headers["set-cookie"]
    assert client.get("/ui/api/now").status_code == 401
    client.close()


def test_the_event_stream_pushes_job_changes_and_ends_with_the_session(api):
    tech, csrf = session(api, "tech", "tech-pw")
    events: list[tuple[str, Any]] = []
    with tech.stream("GET", "/ui/api/events") as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        lines = stream.iter_lines()

        def next_event() -> tuple[str, Any]:
            name = None
            for line in lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name:
                    return name, json.loads(line[6:])
            raise AssertionError("stream ended")

        first = [next_event()[0], next_event()[0]]
        assert first == ["now", "alarms"]
        r = httpx.post(f"{api.base}/v1/jobs", auth=("ctrl", "ctrl-pw"), json={
            "job_id": "ui-stream-1", "target": {"all": True}, "notification": {"title": "streamed"}})
        assert r.status_code == 202
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            name, data = next_event()
            events.append((name, data))
            if name == "jobs" and any(j["job_id"] == "ui-stream-1" for j in data):
                break
        job = next(j for n, d in events if n == "jobs" for j in d if j["job_id"] == "ui-stream-1")
        assert job["title"] == "streamed" and job["source"] == "http"
        # Logging out elsewhere (same session) ends the stream with a logout event.
        assert tech.post("/ui/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
        deadline = time.monotonic() + 10
        name = ""
        while name != "logout" and time.monotonic() < deadline:
            name, _ = next_event()
        assert name == "logout"
    tech.close()


QUERY = st.dictionaries(st.sampled_from(["q", "segment", "tag", "after", "limit", "before", "state", "after_rule",
                                         "after_key"]),
                        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
                        max_size=4)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/ui/api/jobs", "/ui/api/devices", "/ui/api/alarms", "/ui/api/jobs/x/deliveries"]),
       query=QUERY)
def test_hostile_query_parameters_get_a_json_answer_never_a_crash(api, path, query):
    r = api.client("mon").get(path, params=query)
    assert r.status_code in (200, 400), (path, query, r.text)
    body = r.json()
    if r.status_code == 400:
        assert set(body["error"]) == {"code", "message"} and body["error"]["code"] == "bad_request"


def test_a_limit_in_unicode_digits_is_a_bad_request_not_a_crash(api):
    # "²".isdigit() is true and int("²") raises: found by the fuzz test above, in /v1 too.
    for path in ("/ui/api/jobs", "/v1/jobs"):
        r = api.client("tech").get(path, params={"limit": "²"})
        assert r.status_code == 400 and error_of(r)["code"] == "bad_request", (path, r.text)


def test_alarm_acks_are_checked_before_anything_is_written(api):
    tech, csrf = session(api, "tech", "tech-pw")
    h = {"X-CSRF-Token": csrf}
    assert error_of(tech.post("/ui/api/alarms/ack", headers=h, content=b"[1]"))["code"] == "invalid_json"
    assert error_of(tech.post("/ui/api/alarms/ack", headers=h, json={"rule": "r"}))["code"] == "invalid_alarm_ack"
    assert error_of(tech.post("/ui/api/alarms/ack", headers=h, json={"rule": "r", "key": "k", "by": "x"})) == {
        "code": "invalid_alarm_ack", "message": "by: unknown field"}  # the page says who: the session's user
    assert error_of(tech.post("/ui/api/alarms/ack", headers=h, json={"rule": "r", "key": "k"})) == {
        "code": "unknown_alarm", "message": "rule: no rule 'r' in the config"}
    assert db_rows(api.data_dir, "SELECT COUNT(*) FROM alarm_inbox") == [(0,)]
    tech.close()


def test_an_alarm_ack_from_the_page_is_applied_in_process_before_the_answer(tmp_path):
    """The page asks the alarm engine directly: the answer comes once the ack is committed,
    with the alarm acknowledged by the session's user, and nothing goes through the inbox
    that the CLI (another process) uses."""
    from tests.http.conftest import make_api_gateway
    from tests.support import MqttProbe

    rule = {"name": "freezer-high", "topic": "{prefix}/devices/+/telemetry/temp", "value": "", "above": -15.0,
            "key": "{device_id}", "target": {"segment": "techs"}, "escalate": [{"after_s": 600, "target": {"all": True}}]}
    api = make_api_gateway(tmp_path, {"rules": [rule]}, users={"tech": ("technician", "tech-pw")})
    try:
        probe = MqttProbe(api.port)
        probe.publish("homepot/site-t/devices/fz-1/telemetry/temp", "-3")
        probe.close()
        tech = httpx.Client(base_url=api.base, timeout=30)
        assert wait_until(lambda: tech.get("/ui/api/alarms", auth=("tech", "tech-pw")).json()["counts"]["firing"] == 1,
                          timeout=20)
        tech.close()
        from gateway.storage import connect

        conn = connect(api.data_dir / "gateway.db")  # a witness of any write to the inbox
        try:
            conn.execute("CREATE TABLE inbox_witness(n INTEGER)")
            conn.execute("CREATE TRIGGER inbox_witnessed AFTER INSERT ON alarm_inbox "
                         "BEGIN INSERT INTO inbox_witness VALUES (1); END")
        finally:
            conn.close()
        tech, csrf = session(api, "tech", "tech-pw")
        t0 = time.monotonic()
        r = tech.post("/ui/api/alarms/ack", headers={"X-CSRF-Token": csrf},
                      json={"rule": "freezer-high", "key": "fz-1", "note": "door shut"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["result"] == "acknowledged" and body["alarm"]["state"] == "acknowledged"
        assert body["alarm"]["acknowledged_by"] == "http:tech" and body["alarm"]["note"] == "door shut"
        assert time.monotonic() - t0 < 3
        assert db_rows(api.data_dir, "SELECT COUNT(*) FROM inbox_witness") == [(0,)]
        assert db_rows(api.data_dir, "SELECT state, acknowledged_by FROM alarms WHERE akey = 'fz-1'") == [
            ("acknowledged", "http:tech")]
        again = tech.post("/ui/api/alarms/ack", headers={"X-CSRF-Token": csrf}, json={"rule": "freezer-high", "key": "fz-1"})
        assert again.status_code == 200 and again.json()["result"] == "already"
        gone = tech.post("/ui/api/alarms/ack", headers={"X-CSRF-Token": csrf}, json={"rule": "freezer-high", "key": "fz-9"})
        assert error_of(gone) == {"code": "unknown_alarm", "message": "key: no alarm 'fz-9' of rule 'freezer-high'"}
        tech.close()
    finally:
        api.close()
    assert api.gw.stop() == 0
