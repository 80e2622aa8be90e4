"""A person's own routes (``/v1/me*``, ``/me``) and the ``user`` role, in-process.

The application is the daemon's own (:meth:`HttpService.build_app`: every route, the
operator page, the login sessions) on a real database with real person-registry writes;
the pipeline's entry points are a strict fake that stores devices with the registry's own
functions and records acks (the real ack path is the browser test's,
tests/http/test_me_browser.py). Two persons, anna and ben, each with a ``user`` account:
every route is called as anna with ben's ids and must answer 403/404 with none of ben's data.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.broker.acl import ClientAcl
from gateway.config import parse_config
from gateway.http.acks import AckSigner
from gateway.http.pulse import Pulse
from gateway.http.service import HttpService
from gateway.people import store as people
from gateway.people.model import parse_person
from gateway.pipeline import acks, registry
from gateway.pipeline.models import AckVia, InputError, parse_device
from gateway.people.own import PREFERENCES, with_preferences
from gateway.storage import Database
from tests.helpers.fuzz import examples
from tests.helpers import write_accounts

P = "homepot/site-me"
ACCOUNTS = {"anna": ("user", "anna-pw"), "ben": ("user", "ben-pw"), "nobody": ("user", "nobody-pw"),
            "tech": ("technician", "tech-pw"), "mon": ("monitor", "mon-pw")}


class StrictIntake:
    """The pipeline's entry points: devices stored with the registry's own functions (what
    the recorder commits), acks recorded; anything else fails the test."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.ready = asyncio.Event()
        self.ready.set()
        self.acks: list[tuple[str, dict[str, Any], str, str]] = []
        self.registered: list[tuple[str, str]] = []

    async def submit_job(self, payload: bytes, source: str) -> str | None:
        raise AssertionError(f"unexpected submit_job from {source}")

    async def register_device(self, device_id: str, payload: bytes, source: str) -> bool:
        self.registered.append((device_id, source))
        if not payload:
            return await self.db.run(lambda c: registry.remove_device(c, device_id))
        device = parse_device(payload, device_id)
        await self.db.run(lambda c: registry.upsert_device(c, device, source))
        return True

    async def ack(self, device_id: str, payload: bytes, source: str, via: AckVia) -> acks.AckResult | None:
        body = json.loads(payload)
        self.acks.append((device_id, body, source, str(via)))
        return acks.AckResult(True, job_id="j", latency_ms=5.0, first=True)


class NoAlarms:
    async def acknowledge(self, rule: str, key: str, by: str, note: str | None, source: str) -> str:
        raise AssertionError("unexpected alarm ack")


class Health:
    latest = {"status": "ok", "checks": {}}

    def snapshot(self) -> dict[str, Any]:
        return self.latest


def _device(device_id: str, platform: str = "mqtt", owner: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"device_id": device_id, "channels": [{"platform": platform}]}
    if platform == "fcm":
        out["channels"] = [{"platform": "fcm", "token": f"secret-fcm-token-of-{device_id}-0123456789"}]
    if owner:
        out["owner"] = owner
    return out


def _seed(conn: Any) -> dict[str, list[str]]:
    """anna: anna-phone, anna-browser; ben: ben-phone; a shared kiosk in both lists. Jobs:
    30 to anna-phone (device target), 3 for anna through people (person_id), 5 to
    ben-phone, one for ben through the kiosk (person_id ben). Returns message_ids by owner."""
    for d in (_device("anna-phone", "fcm", "anna"), _device("anna-browser"), _device("ben-phone", "fcm", "ben"),
              _device("kiosk")):
        registry.upsert_device(conn, parse_device(json.dumps(d).encode()), "test")
    people.put(conn, parse_person({"person_id": "anna", "name": "Anna K.", "account": "anna",
                                   "devices": ["anna-phone", "anna-browser", "kiosk"], "timezone": "Europe/Berlin"}))
    people.put(conn, parse_person({"person_id": "ben", "account": "ben", "devices": ["ben-phone", "kiosk"],
                                   "quiet_hours": [{"days": ["sat", "sun"], "from": "00:00", "to": "10:00"}],
                                   "muted": {"segments": ["ben-secret-segment"], "rules": []}}))
    mids: dict[str, list[str]] = {"anna": [], "ben": []}
    t0 = time.time() - 10_000

    def job(n: int, job_id: str, device_id: str, person_id: str | None, owner: str, title: str) -> None:
        mid = str(uuid.uuid4())
        conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                     "expires_at, ttl) VALUES (?, 'completed', 'test', '{}', ?, '{}', ?, ?, ?, 3600)",
                     (job_id, json.dumps({"title": title, "body": f"body of {job_id}", "data": {"k": "v"},
                                          "priority": "high" if n % 2 else "normal", "ttl": 3600}),
                      t0 + n, t0 + n, t0 + n + 3600))
        conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route, person_id) "
                     "VALUES (?, ?, ?, 'sent', 0, 'mqtt', ?)", (mid, job_id, device_id, person_id))
        mids[owner].append(mid)

    for n in range(30):
        job(n, f"dev-{n:02}", "anna-phone", None, "anna", f"for anna {n}")
    # A job that reaches anna: her phone got it, her browser's turn is still to come. The
    # inbox shows it once, by the phone's delivery.
    job(50, "reach-1", "anna-phone", "anna", "anna", "reaching anna")
    conn.execute("UPDATE deliveries SET attempts = 1 WHERE job_id = 'reach-1'")
    conn.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route, person_id) "
                 "VALUES (?, 'reach-1', 'anna-browser', 'queued', ?, 'mqtt', 'anna')",
                 (str(uuid.uuid4()), time.time() + 600))
    for n in range(3):
        job(100 + n, f"ppl-{n}", "anna-browser", "anna", "anna", f"for anna by person {n}")
    for n in range(5):
        job(200 + n, f"ben-{n}", "ben-phone", None, "ben", f"ben's secret {n}")
    job(300, "ben-kiosk", "kiosk", "ben", "ben", "ben's secret on the shared kiosk")
    return mids


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The accounts' password file, hashed once at argon2's cheapest cost."""
    return write_accounts(tmp_path_factory.mktemp("accounts") / "passwd", ACCOUNTS).read_bytes()


@pytest.fixture
async def env(tmp_path: Path, passwords: bytes):
    passwd = tmp_path / "passwd"
    passwd.write_bytes(passwords)
    passwd.chmod(0o600)
    cfg = parse_config({"gateway": {"data_dir": str(tmp_path), "site_id": "site-me"}, "broker": {
        "listeners": [{"name": "l", "bind": "127.0.0.1:1"}], "auth": {"password_file": str(passwd)}},
        "http": {"bind": "127.0.0.1:0"}}, environ={}).config
    db = await Database(cfg.db_path).open()
    mids = await db.run(_seed)
    intake = StrictIntake(db)
    from gateway.people.service import PeopleWriter

    svc = HttpService(cfg, db, jobs=intake, health=Health(), signer=AckSigner(b"k" * 32, "http://gw"), changes=Pulse(),
                      started_at="2026-01-01T00:00:00.000Z", alarms=NoAlarms(), people=PeopleWriter(db))
    async with TestClient(TestServer(svc.build_app())) as client:
        yield client, intake, mids, db
    svc.metrics.close()
    await asyncio.to_thread(svc.reader.close)
    await asyncio.to_thread(svc.ui_reader.close)
    svc.auth.close()
    await db.close()


def basic(name: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{ACCOUNTS[name][1]}".encode()).decode()}


async def login(client: TestClient, name: str) -> str:
    """The login form; the session's CSRF token (GET /v1/me's X-CSRF-Token)."""
    r = await client.post("/ui/login", data={"username": name, "password": ACCOUNTS[name][1]}, allow_redirects=False)
    assert r.status == 303, await r.text()
    assert r.headers["Location"] == "/me"
    me = await client.get("/v1/me")
    assert me.status == 200
    return me.headers["X-CSRF-Token"]


def no_data_of_ben(text: str, sent: str = "") -> None:
    """None of ben's data in an answer (an id the request itself sent may be echoed)."""
    for part in sent.strip("/").split("/"):
        text = text.replace(f"'{part}'", "''") if part else text
    for secret in ("ben-phone", "ben's secret", "ben-secret-segment", "secret-fcm-token-of-ben", "10:00"):
        assert secret not in text, f"{secret!r} leaked: {text[:300]}"


# ------------------------------------------------------------------ the role
def test_user_role_has_no_mqtt_rights_by_default():
    cfg = parse_config({"broker": {"listeners": [{"name": "l", "bind": "127.0.0.1:1"}]}}, environ={}).config
    acl = ClientAcl(cfg.broker.roles()["user"], P, "anna")
    for topic in (f"{P}/jobs", f"{P}/devices/anna/ack", f"{P}/devices/anna/register", f"{P}/alarms/r/k/ack", "x"):
        assert not acl.may_publish(topic), topic
    for topic in (f"{P}/#", f"{P}/devices/anna/notify", f"{P}/jobs/+/status", "$SYS/#", "#"):
        assert not acl.may_subscribe(topic), topic


def test_users_add_makes_a_user_account(tmp_path: Path):
    from tests.helpers import base_config, cli_in_process, write_config

    cfg = write_config(tmp_path, base_config(tmp_path, 0))
    res = cli_in_process(cfg, "users", "add", "anna", "--role", "user", "--password-stdin", input="anna-pw\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("user anna (user) written")
    name, _, role = (tmp_path / "var" / "passwd").read_text().strip().split(":")
    assert (name, role) == ("anna", "user")


async def test_a_user_reaches_only_its_own_routes(env):
    client, intake, mids, _ = env
    anna = basic("anna")
    ben_mid = mids["ben"][0]
    refused = [("GET", "/"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/ben-0"), ("GET", "/v1/jobs/ben-0/events"),
               ("POST", "/v1/jobs"), ("GET", "/v1/devices"), ("GET", "/v1/devices/anna-phone"),
               ("PUT", "/v1/devices/anna-phone"), ("DELETE", "/v1/devices/anna-phone"),
               ("GET", "/v1/devices/ben-phone"), ("GET", "/v1/people"), ("GET", "/v1/people/ben"),
               ("GET", "/v1/people/anna"), ("PUT", "/v1/people/anna"), ("DELETE", "/v1/people/ben"),
               ("GET", "/ui/api/session"), ("GET", "/ui/api/now"), ("GET", "/ui/api/jobs"),
               ("GET", "/ui/api/jobs/ben-0"), ("GET", "/ui/api/jobs/ben-0/deliveries"), ("GET", "/ui/api/devices"),
               ("GET", "/ui/api/devices/ben-phone"), ("GET", "/ui/api/alarms"), ("GET", "/ui/api/people"),
               ("GET", "/ui/api/events")]
    for method, path in refused:
        r = await client.request(method, path, headers={**anna, "Accept": "application/json"},
                                 data=b'{"target":{"all":true},"notification":{"title":"x"}}'
                                 if method in ("POST", "PUT") else None)
        text = await r.text()
        assert r.status == 403, f"{method} {path}: {r.status} {text[:200]}"
        no_data_of_ben(text, path)
    assert intake.registered == [] and intake.acks == []
    r = await client.get("/v1/me", headers=anna)
    assert r.status == 200 and (await r.json())["person_id"] == "anna"
    assert "X-CSRF-Token" not in r.headers  # HTTP Basic has no session

    # Other roles have no person page; a user account that no person names has none either.
    for name, status in (("tech", 403), ("mon", 403), ("nobody", 404)):
        r = await client.get("/v1/me/inbox", headers=basic(name))
        assert r.status == status, (name, await r.text())
    r = await client.get("/v1/me")
    assert r.status == 401


async def test_login_sends_a_user_to_me_and_the_operator_routes_refuse_its_session(env):
    client, *_ = env
    html = {"Accept": "text/html"}
    r = await client.get("/me", headers=html)
    assert r.status == 200 and 'action="/ui/login"' in await r.text()  # no session: the login form
    await login(client, "anna")
    r = await client.get("/", headers=html, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/me"
    r = await client.get("/me", headers=html)
    assert r.status == 200 and "/ui/static/me.js" in await r.text()
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    for path in ("/ui/api/session", "/ui/api/jobs", "/ui/api/people", "/ui/api/events", "/v1/jobs"):
        r = await client.get(path)
        assert r.status in (401, 403), (path, r.status)
        no_data_of_ben(await r.text())
    # Log out (the page's button): the session ends, /me shows the form again.
    csrf = (await client.get("/v1/me")).headers["X-CSRF-Token"]
    r = await client.post("/ui/logout", headers={"X-CSRF-Token": csrf})
    assert r.status == 204
    assert (await client.get("/v1/me")).status == 401
    assert 'action="/ui/login"' in await (await client.get("/me", headers=html)).text()
    # An operator's session on /me is sent to the operator page.
    client.session.cookie_jar.clear()
    r = await client.post("/ui/login", data={"username": "tech", "password": "tech-pw"}, allow_redirects=False)
    assert r.headers["Location"] == "/"
    r = await client.get("/me", headers=html, allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/"


# ------------------------------------------------------------------ inbox
async def test_the_inbox_pages_newest_first_with_only_the_persons_notifications(env):
    client, _, mids, _ = env
    anna = basic("anna")
    seen: list[dict[str, Any]] = []
    before = None
    while True:
        r = await client.get("/v1/me/inbox", headers=anna, params={"limit": "7", **({"before": before} if before else {})})
        assert r.status == 200
        page = await r.json()
        no_data_of_ben(json.dumps(page))
        seen += page
        if len(page) < 7:
            assert "Link" not in r.headers
            break
        assert r.headers["Link"] == f'</v1/me/inbox?before={page[-1]["message_id"]}&limit=7>; rel="next"'
        before = page[-1]["message_id"]
    assert [i["message_id"] for i in seen] == list(reversed(mids["anna"]))  # each once, newest first
    first = seen[0]
    assert set(first) == {"message_id", "job_id", "title", "body", "data", "priority", "state", "opened",
                          "created_at", "device_id", "reason"}
    assert (first["job_id"], first["title"], first["device_id"], first["state"], first["opened"],
            first["data"], first["reason"]) == ("ppl-2", "for anna by person 2", "anna-browser", "sent", False,
                                                {"k": "v"}, None)
    [reach] = [i for i in seen if i["job_id"] == "reach-1"]  # once, by the delivery that got furthest
    assert (reach["device_id"], reach["state"]) == ("anna-phone", "sent")
    # Ben's message_id as a cursor: refused without a position in his inbox.
    r = await client.get("/v1/me/inbox", headers=anna, params={"before": mids["ben"][-1]})
    assert r.status == 400 and (await r.json())["error"]["message"] == "before: not a message_id of your inbox"
    for bad in ("0", "201", "x", "-1"):
        r = await client.get("/v1/me/inbox", headers=anna, params={"limit": bad})
        assert r.status == 400 and "limit" in (await r.json())["error"]["message"]
    # Ben sees his own, including the one for him on the kiosk they share; not anna's.
    r = await client.get("/v1/me/inbox", headers=basic("ben"), params={"limit": "200"})
    assert [i["message_id"] for i in await r.json()] == list(reversed(mids["ben"]))


async def test_open_acknowledges_the_persons_own_delivery_only(env):
    client, intake, mids, _ = env
    csrf = await login(client, "anna")
    mine = mids["anna"][-1]
    # Without the session's CSRF token, or from another origin: refused, nothing acked.
    r = await client.post(f"/v1/me/inbox/{mine}/open")
    assert r.status == 403 and (await r.json())["error"]["code"] == "csrf"
    r = await client.post(f"/v1/me/inbox/{mine}/open", headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert r.status == 403 and intake.acks == []
    for other in (mids["ben"][0], mids["ben"][-1], str(uuid.uuid4()), "x" * 80):
        r = await client.post(f"/v1/me/inbox/{other}/open", headers={"X-CSRF-Token": csrf})
        assert r.status == 404, await r.text()
        no_data_of_ben(await r.text(), other)
    assert intake.acks == []
    r = await client.post(f"/v1/me/inbox/{mine.upper()}/open", headers={"X-CSRF-Token": csrf})
    assert r.status == 202, await r.text()
    assert (await r.json())["message_id"] == mine
    [(device_id, body, source, via)] = intake.acks
    assert (device_id, body["message_id"], body["status"], via) == ("anna-browser", mine, "opened", "me")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["at"])


# ------------------------------------------------------------------ devices
async def test_devices_are_the_persons_own_and_another_persons_are_refused(env):
    client, intake, _, db = env
    csrf = await login(client, "anna")
    h = {"X-CSRF-Token": csrf}
    r = await client.get("/v1/me/devices")
    listed = await r.json()
    assert [d["device_id"] for d in listed] == ["anna-phone", "anna-browser", "kiosk"]
    assert "secret-fcm-token" not in json.dumps(listed)  # addresses shortened, as on the operator page

    sub = {"endpoint": "https://push.example.net/send/abc", "keys": {"p256dh": "B" * 87, "auth": "A" * 22}}
    r = await client.put("/v1/me/devices/anna-laptop", headers=h,
                         json={"channels": [{"platform": "webpush", "subscription": sub}]})
    assert r.status == 201, await r.text()
    assert (await r.json())["owner"] == "anna"
    person = (await (await client.get("/v1/me")).json())
    assert person["devices"] == ["anna-phone", "anna-browser", "kiosk", "anna-laptop"]
    stored = await db.run(lambda c: registry.get_device(c, "anna-laptop"))
    assert stored["owner"] == "anna" and stored["channels"][0]["subscription"]["endpoint"] == sub["endpoint"]
    r = await client.put("/v1/me/devices/anna-laptop", headers=h, json={"channels": [{"platform": "mqtt"}]})
    assert r.status == 200
    assert (await (await client.get("/v1/me")).json())["devices"][-1] == "anna-laptop"  # kept in its place

    # Ben's device: not writable, not removable, nothing of it read back.
    before = await db.run(lambda c: registry.get_device(c, "ben-phone"))
    intake.registered.clear()
    r = await client.put("/v1/me/devices/ben-phone", headers=h, json={"channels": [{"platform": "mqtt"}]})
    assert r.status == 403
    no_data_of_ben(await r.text(), "ben-phone")
    r = await client.delete("/v1/me/devices/ben-phone", headers=h)
    assert r.status == 404
    assert intake.registered == []
    assert await db.run(lambda c: registry.get_device(c, "ben-phone")) == before
    # Nor made ben's, nor given an owner other than anna.
    r = await client.put("/v1/me/devices/anna-tab", headers=h, json={"owner": "ben", "channels": [{"platform": "mqtt"}]})
    assert r.status == 400 and (await r.json())["fields"][0]["field"] == "owner"
    r = await client.put("/v1/me/devices/anna-tab", headers=h, json={"channels": [{"platform": "telepathy"}]})
    assert r.status == 400 and (await r.json())["fields"][0]["field"].startswith("channels.0")
    assert await db.run(lambda c: registry.get_device(c, "anna-tab")) is None

    # The shared kiosk (no owner, in both lists): not hers to change; her removal takes it
    # off her list only.
    r = await client.put("/v1/me/devices/kiosk", headers=h, json={"channels": [{"platform": "mqtt"}]})
    assert r.status == 403
    r = await client.delete("/v1/me/devices/kiosk", headers=h)
    assert r.status == 204
    assert await db.run(lambda c: registry.get_device(c, "kiosk")) is not None
    assert (await db.run(lambda c: people.get(c, "ben"))).devices == ["ben-phone", "kiosk"]
    # Her own laptop leaves the registry too.
    r = await client.delete("/v1/me/devices/anna-laptop", headers=h)
    assert r.status == 204
    assert await db.run(lambda c: registry.get_device(c, "anna-laptop")) is None
    assert (await (await client.get("/v1/me")).json())["devices"] == ["anna-phone", "anna-browser"]
    r = await client.put("/v1/me/devices/..", headers=h, json={"channels": [{"platform": "mqtt"}]})
    assert r.status in (400, 404)


# ------------------------------------------------------------------ preferences
async def test_preferences_are_stored_and_bad_ones_are_named_per_field(env):
    client, _, _, db = env
    csrf = await login(client, "anna")
    h = {"X-CSRF-Token": csrf}
    prefs = {"timezone": "America/New_York", "quiet_hours": [{"days": ["mon", "tue"], "from": "22:00", "to": "06:30"}],
             "bypass_priority": "high", "muted": {"segments": ["lobby"], "rules": ["door-open"]}, "reach_after_s": 60}
    r = await client.put("/v1/me/preferences", headers=h, json=prefs)
    assert r.status == 200, await r.text()
    stored = await db.run(lambda c: people.get(c, "anna"))
    assert (stored.timezone, stored.bypass_priority, stored.reach_after_s, stored.muted.rules) == (
        "America/New_York", "high", 60, ["door-open"])
    assert stored.quiet_hours[0].as_json() == {"days": ["mon", "tue"], "from": "22:00", "to": "06:30"}
    assert (stored.name, stored.account, stored.devices) == ("Anna K.", "anna", ["anna-phone", "anna-browser", "kiosk"])

    r = await client.put("/v1/me/preferences", headers=h, json={
        "timezone": "Mars/Olympus", "quiet_hours": [{"days": ["mon"], "from": "25:00", "to": "06:00"}],
        "reach_after_s": -1})
    assert r.status == 400
    body = await r.json()
    fields = {f["field"] for f in body["fields"]}
    assert fields == {"timezone", "quiet_hours.0.from", "reach_after_s"}, body
    assert body["error"]["code"] == "invalid_preferences"
    for obj, field in (({"account": "ben"}, "account"), ({"devices": ["ben-phone"]}, "devices"),
                       ({"person_id": "ben"}, "person_id"), ({"tll": 1}, "tll"), ({}, "preferences")):
        r = await client.put("/v1/me/preferences", headers=h, json=obj)
        assert r.status == 400 and (await r.json())["fields"][0]["field"] == field, obj
    assert await db.run(lambda c: people.get(c, "anna")) == stored  # nothing of that was stored
    assert (await db.run(lambda c: people.get(c, "ben"))).timezone == "UTC"

    r = await client.put("/v1/me/preferences", headers=h, json={"quiet_hours": None, "reach_after_s": None})
    assert r.status == 200
    assert (await r.json())["quiet_hours"] is None  # back to the site's default


PREF_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                        st.text(max_size=30), st.lists(st.text(max_size=8), max_size=3),
                        st.dictionaries(st.sampled_from(["days", "from", "to", "segments", "rules", "x"]),
                                        st.one_of(st.text(max_size=6), st.lists(st.sampled_from(
                                            ["mon", "sun", "xyz"]), max_size=3)), max_size=3))


@settings(max_examples=examples(300), deadline=None)
@given(prefs=st.dictionaries(st.sampled_from(["timezone", "quiet_hours", "bypass_priority", "muted", "reach_after_s",
                                              "account", "devices", "nonsense"]), PREF_VALUES, max_size=4))
def test_any_preference_input_gives_a_whole_valid_person_or_errors_naming_fields(prefs):
    """What PUT /v1/me/preferences applies (gateway.people.own.with_preferences): a Person
    that the model accepts again, with only preference fields changed; or InputError with
    each message starting with the field it names."""
    anna = parse_person({"person_id": "anna", "name": "Anna K.", "account": "anna", "devices": ["anna-phone"],
                         "timezone": "Europe/Berlin"})
    try:
        changed = with_preferences(anna, prefs)
    except InputError as err:
        assert err.code == "invalid_preferences"
        assert err.fields and all(f.field and f.message.startswith(f.field + ": ") for f in err.fields), err.fields
        return
    assert set(prefs) <= set(PREFERENCES)
    assert parse_person(changed.as_json()) == changed
    assert (changed.person_id, changed.name, changed.account, changed.devices) == (
        "anna", "Anna K.", "anna", ["anna-phone"])


# ------------------------------------------------------------------ the operator page's People tab
async def test_people_tab_lists_persons_with_devices_in_reach_order_and_defaults(env):
    client, *_ = env
    tech = basic("tech")
    r = await client.get("/ui/api/people", headers=tech)
    assert r.status == 200
    page = await r.json()
    assert (page["total"], page["next"]) == (2, None)
    anna, ben = page["people"]
    assert anna == {
        "person_id": "anna", "name": "Anna K.", "account": "anna",
        "devices": [{"device_id": "anna-phone", "platforms": ["fcm"], "missing": False},
                    {"device_id": "anna-browser", "platforms": ["mqtt"], "missing": False},
                    {"device_id": "kiosk", "platforms": ["mqtt"], "missing": False}],
        "timezone": "Europe/Berlin", "quiet_hours": [], "quiet_default": True, "bypass_priority": "critical",
        "muted": {"segments": [], "rules": []}, "reach_after_s": 120.0, "reach_default": True}
    assert (ben["quiet_hours"], ben["quiet_default"], ben["muted"]["segments"]) == (
        ["sat-sun 00:00-10:00"], False, ["ben-secret-segment"])
    r = await client.get("/ui/api/people", headers=tech, params={"limit": "1"})
    first = await r.json()
    assert [p["person_id"] for p in first["people"]] == ["anna"] and first["next"] == "anna"
    r = await client.get("/ui/api/people", headers=tech, params={"limit": "1", "after": "anna"})
    assert [p["person_id"] for p in (await r.json())["people"]] == ["ben"]
    r = await client.get("/ui/api/people", headers=tech, params={"q": "be"})
    assert [p["person_id"] for p in (await r.json())["people"]] == ["ben"]
    r = await client.get("/ui/api/people", headers=tech, params={"q": "b%"})
    assert r.status == 400 and "q:" in (await r.json())["error"]["message"]
    r = await client.get("/ui/api/people", headers=basic("mon"))
    assert r.status == 200  # a monitor sees every tab


def test_the_inbox_reads_only_the_persons_rows_through_indexes(tmp_path: Path):
    """However many deliveries the site has, an inbox page reads the person's own: by the
    person index and the device index, never a scan of ``deliveries`` or ``jobs``; the one
    sort is of those rows (the materialized "mine")."""
    from gateway import migrations
    from gateway.pipeline import deliveries
    from gateway.storage import connect, transaction

    conn = connect(tmp_path / "g.db")
    transaction(conn, migrations.migrate)
    seen: list[tuple[str, list[Any]]] = []
    real_execute = conn.execute

    class Recording:
        def execute(self, sql: str, args: Any = ()) -> Any:
            seen.append((sql, list(args)))
            return real_execute(sql, args)

    deliveries.person_page(Recording(), "anna", ("anna-phone", "anna-browser"), 20)  # type: ignore[arg-type]
    deliveries.person_page(Recording(), "anna", ("anna-phone",), 20, before="m")  # type: ignore[arg-type]
    deliveries.person_row(Recording(), "anna", ("anna-phone", "anna-browser"), "m")  # type: ignore[arg-type]
    assert len(seen) == 3
    for sql, values in seen:
        plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, values)]
        assert not [p for p in plan if p.startswith(("SCAN d", "SCAN j", "SCAN deliveries", "SCAN jobs"))], plan
        assert any("deliveries_by_person" in p or "sqlite_autoindex_deliveries" in p for p in plan), plan
    conn.close()


def test_an_alarm_opened_on_me_names_the_page_and_the_device(tmp_path: Path):
    """An ``opened`` ack stored with via ``me`` (what Open on /me makes) acknowledges the
    alarm of its job as ``me:<device_id>``, through the alarm tables' own trigger."""
    from gateway import migrations
    from gateway.storage import connect, transaction

    conn = connect(tmp_path / "g.db")
    transaction(conn, migrations.migrate)
    mid = str(uuid.uuid4())

    def seed(c: Any) -> None:
        c.execute("PRAGMA defer_foreign_keys = ON")
        c.execute("INSERT INTO alarm_jobs(job_id, rule, akey, episode, kind) VALUES ('alarm.door.a.1', 'door', 'a', 1, 'fire')")
        c.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                  "expires_at, ttl) VALUES ('alarm.door.a.1', 'completed', 'alarm', '{}', '{}', '{}', 0, 0, 9e9, 3600)")
        c.execute("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, person_id) "
                  "VALUES (?, 'alarm.door.a.1', 'anna-browser', 'sent', 0, 'anna')", (mid,))
        c.execute("INSERT INTO acks(message_id, device_id, status, at, via, received_at) "
                  "VALUES (?, 'anna-browser', 'opened', '2026-01-01T00:00:00.000Z', ?, 1.0)", (mid, str(AckVia.ME)))

    transaction(conn, seed)
    assert [tuple(r) for r in conn.execute("SELECT rule, akey, by, source FROM alarm_inbox")] == [
        ("door", "a", "me:anna-browser", "delivery")]
    conn.close()
