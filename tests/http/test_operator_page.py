"""The operator page (issue 13) in a real browser: Debian's chromium headless shell, driven over
the DevTools protocol by Playwright for Python, against the real daemon.

One daemon for the module: 1,000 simulated devices in segment ``fleet`` (the job whose
progress is watched), 2,000 in ``store`` with tags (server-side paging), two MQTT devices
(``tech-1`` gets alarm and form jobs, ``lead-1`` escalations), and an alarm rule that
escalates after 10 s. Independent receivers check what the gateway did: an MQTT client on
the devices' notify topics and the alarm state topics, and a separate SQLite connection.

Screenshots go to each test's temporary directory (``shot()`` prints their paths).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.helpers.browser import FLAGS, HEADLESS_SHELL, require_browser
from tests.http.conftest import P, ApiGateway, db_rows, make_api_gateway, wait_until
from tests.http.test_health_status import rsa_pem
from tests.support import MqttProbe, bulk_register, free_port

USERS = {"tech": ("technician", "tech-pw"), "mon": ("monitor", "mon-pw"), "plc-1": ("device", "plc1-pw")}
ESCALATE_AFTER_S = 10.0  # the time the test has to see door-a fire and acknowledge it, on a busy machine
DOOR_RULE = {"name": "door", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open", "key": "{device_id}",
             "target": {"devices": ["tech-1"]}, "title": "Door {device_id} is {value}",
             "escalate": [{"after_s": ESCALATE_AFTER_S, "target": {"devices": ["lead-1"]}}]}
# The longest texts the gateway lets in, none with a space to wrap at: the page must fit a
# phone's width with all of them on screen.
LONG_DEV = "xl-" + "0123456789abcdef" * 7 + "0123456789abc"  # 128, the longest device id
LONG_SEGMENT = "segment-" + "s" * 120  # 128, the longest segment
LONG_JOB = "long-job-" + "j" * 55  # 64, the longest job id
LONG_TITLE = "Title:" + "T" * 294  # 300
FAULT = "E" + "0123456789" * 20  # an alarm value of 201 characters
FAULT_RULE = {"name": "fault", "topic": "{prefix}/devices/+/telemetry/fault", "equals": FAULT, "key": "{device_id}",
              "target": {"devices": [LONG_DEV]}, "title": "Fault {device_id}: {value}"}


def _devices() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"device_id": f"fleet-{i:04}", "segment": "fleet", "channels": [{"platform": "simulation"}]}
                                 for i in range(1000)]
    out += [{"device_id": f"store-{i:04}", "segment": "store", "tags": [f"floor-{i % 3}"],
             "channels": [{"platform": "simulation"}]} for i in range(2000)]
    out[1000 + 7]["channels"] = [{"platform": "fcm", "token": "fcm-token-of-store-0007-0123456789"},
                                 {"platform": "simulation"}]
    out += [{"device_id": "tech-1", "segment": "techs", "channels": [{"platform": "mqtt"}]},
            {"device_id": "lead-1", "segment": "leads", "channels": [{"platform": "mqtt"}]},
            {"device_id": "gone-1", "segment": "odd", "channels": [{"platform": "fcm", "token": "fcm-token-of-gone-1-abcdef"}]},
            {"device_id": "nobridge-1", "segment": "odd", "channels": [{"platform": "apns", "token": "ab" * 32}]},
            {"device_id": LONG_DEV, "segment": LONG_SEGMENT, "tags": ["t" * 64],
             "channels": [{"platform": "simulation"}]},
            {"device_id": "mq-ack-1", "segment": "ackees", "channels": [{"platform": "mqtt"}]},
            {"device_id": "mq-ack-2", "segment": "ackees", "channels": [{"platform": "mqtt"}]},
            {"device_id": "win-1", "segment": "windows",
             "channels": [{"platform": "wns", "channel_uri": "https://localhost:9/w/?token=win-1"}]}]
    return out


# What a token endpoint answers when it refuses the client: the WNS bridge goes unhealthy
# with it as its reason, and the page shows that reason (300 characters, no space).
TOKEN_REFUSAL = ("invalid_client:AADSTS7000215:" + "the-client-secret-provided-is-not-valid." * 8)[:300]


class RefusingTokenEndpoint:
    """WNS's token endpoint refusing the client's credentials, as Microsoft's does: a 400
    with an ``error`` to the client-credentials form POSTed to it; 404 or 405 otherwise."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                if self.path != "/accesstoken.srf":
                    return self._answer(404, {"error": "not_found"})
                if (self.headers["Content-Type"] != "application/x-www-form-urlencoded"
                        or form.get("grant_type") != ["client_credentials"]):
                    return self._answer(400, {"error": "invalid_request"})
                return self._answer(400, {"error": TOKEN_REFUSAL})

            def do_GET(self) -> None:  # noqa: N802
                self._answer(405, {"error": "method"})

            def _answer(self, status: int, body: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/accesstoken.srf"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiGateway]:
    tmp = tmp_path_factory.mktemp("ui")
    # 1,000 deliveries at 100 in flight and 200 ms each: about 2 s, long enough to watch.
    # Degraded on purpose: the WNS bridge is refused its token (one device, win-1, uses it).
    refusing = RefusingTokenEndpoint()
    (tmp / "wns-secret").write_text("not-the-secret")
    wns = {"enabled": True, "client_id": "ms-app://s-1-15-2-1", "client_secret_file": str(tmp / "wns-secret"),
           "token_url": refusing.url, "allowed_hosts": ["localhost"]}
    a = make_api_gateway(tmp, {"bridges": {"simulation": {"latency_ms": 200}, "wns": wns},
                               "dispatch": {"max_in_flight": 100}, "rules": [DOOR_RULE, FAULT_RULE]},
                         users=USERS, start=False)
    bulk_register(tmp / "var", _devices())
    _mark_invalid(tmp / "var", "store-0007", "fcm|fcm-token-of-store-0007-0123456789", "Unregistered (FCM 404)")
    _mark_invalid(tmp / "var", "gone-1", "fcm|fcm-token-of-gone-1-abcdef", "Unregistered (FCM 404)")
    a.gw.start()
    r = a.client("tech").post("/v1/jobs", json={
        "job_id": "win-1", "target": {"devices": ["win-1"]}, "notification": {"title": "To Windows"}})
    assert r.status_code == 202, r.text
    yield a
    a.close()
    a.gw.kill()
    if a.gw.notify:
        a.gw.notify.close()
    refusing.close()


def _mark_invalid(data_dir: Path, device_id: str, key: str, reason: str) -> None:
    """What the pipeline records when a platform reports an address invalid (same store code)."""
    from gateway.pipeline import registry
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    conn.execute("BEGIN IMMEDIATE")
    registry.mark_invalid(conn, device_id, key, reason, time.time() - 3600)
    conn.execute("COMMIT")
    conn.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=require_browser(HEADLESS_SHELL), args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


def login(ctx: BrowserContext, gw: ApiGateway, user: str, password: str | None = None) -> Page:
    page = ctx.new_page()
    page.goto(gw.base + "/")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password or USERS[user][1])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("body[data-ready=true]", state="attached")
    return page


def shot(page: Page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


def jobs_in_db(gw: ApiGateway) -> set[str]:
    return {r[0] for r in db_rows(gw.data_dir, "SELECT job_id FROM jobs")}


# ------------------------------------------------------------------ login and roles
def test_login_refuses_wrong_passwords_and_devices_and_a_monitor_sees_but_cannot_act(gw, context, tmp_path):
    page = context.new_page()
    page.goto(gw.base + "/")
    page.get_by_label("User name").fill("tech")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("wrong user name or password")
    assert not context.cookies(), "no session for a wrong password"
    shot(page, tmp_path, "login-refused")
    page.get_by_label("User name").fill("plc-1")
    page.get_by_label("Password").fill("plc1-pw")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("plc-1 (device) may not use the operator page")
    assert not context.cookies()

    page = login(context, gw, "mon")
    expect(page.locator("#who")).to_have_text("mon (monitor)")
    [cookie] = context.cookies()
    assert cookie["name"] == "homepot_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "homepot_session" not in page.evaluate("document.cookie"), "scripts cannot read the session"
    assert cookie["value"] not in page.content() and cookie["value"] not in page.url
    # The monitor sees the gateway's state, and no control to act.
    expect(page.locator("#now-bridges [data-bridge=simulation]")).to_contain_text("healthy")
    page.get_by_role("tab", name="Jobs").click()
    expect(page.locator("#send")).to_be_hidden()
    # Nor may it act by hand, with its own session and CSRF token: the server refuses.
    answers = page.evaluate("""async () => {
        const s = await (await fetch('/ui/api/session')).json();
        const post = (path, body) => fetch(path, {method: 'POST', body: JSON.stringify(body),
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf}})
            .then(async r => [r.status, (await r.json()).error.code]);
        return [await post('/ui/api/jobs', {target: {all: true}, notification: {title: 'x'}}),
                await post('/ui/api/alarms/ack', {rule: 'door', key: 'door-z'})];
    }""")
    assert answers == [[403, "forbidden"], [403, "forbidden"]]

    # Keyboard: the tabs follow the arrow keys; every control has a label.
    page.locator("#tab-jobs").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-devices")).to_be_focused()
    expect(page.locator("#panel-devices")).to_be_visible()
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(el => !((el.labels && el.labels.length) || el.getAttribute('aria-label') || el.textContent.trim()))
        .map(el => el.id || el.outerHTML.slice(0, 80))""")
    assert unlabeled == []

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("User name")).to_be_visible()
    stale = httpx.get(f"{gw.base}/ui/api/now", cookies={"homepot_session": cookie["value"]})
    assert stale.status_code == 401, "the session ended with the logout"


# ------------------------------------------------------------------ jobs, live
def test_a_1000_device_job_progresses_live_to_completed_over_the_event_stream(gw, context, tmp_path):
    page = login(context, gw, "tech")
    requests: list[tuple[float, str]] = []
    page.on("request", lambda r: requests.append((time.monotonic(), r.url)))
    page.get_by_role("tab", name="Jobs").click()
    page.wait_for_selector("#jobs-list li")
    # Record every state of the job's row the page draws (rows are redrawn on each event).
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const row = document.querySelector('#jobs-list li[data-job-id="fleet-1"]');
            if (row) window.seen.push([row.dataset.state, Number(row.dataset.done)]);
        }).observe(document.querySelector('#jobs-list'), {childList: true, subtree: true});
    }""")
    list_reads_before = sum(1 for _, u in requests if "/ui/api/jobs?" in u)
    r = gw.client("tech").post("/v1/jobs", json={
        "job_id": "fleet-1", "target": {"segment": "fleet"}, "notification": {"title": "Config 2.1", "body": "ready"}})
    assert r.status_code == 202, r.text
    row = page.locator('#jobs-list li[data-job-id="fleet-1"]')
    expect(row).to_have_attribute("data-done", "1000", timeout=30_000)
    expect(row).to_have_attribute("data-state", re.compile(r"^(completed|acknowledged)$"))
    expect(row).to_contain_text("1,000/1,000 done")
    seen = page.evaluate("window.seen")
    partial = sorted({done for _, done in seen if 0 < done < 1000})
    assert len(partial) >= 2, f"progress was not drawn live: {seen}"
    # Live means pushed: one event stream, and no read of the job list since it was shown
    # (the new job and each of its changes came in events).
    list_reads = sum(1 for _, u in requests if "/ui/api/jobs?" in u) - list_reads_before
    assert list_reads == 0, [u for _, u in requests]
    assert sum(1 for _, u in requests if u.endswith("/ui/api/events")) <= 1
    # The gateway's own record agrees with the page.
    assert db_rows(gw.data_dir, "SELECT targets, queued FROM jobs WHERE job_id = 'fleet-1'") == [(1000, 0)]

    # The job's deliveries, 50 a page, with their outcomes.
    row.get_by_role("button", name="Show job fleet-1").click()
    detail = page.locator("#job-detail")
    expect(detail.get_by_role("heading", name="Job fleet-1")).to_be_visible()
    expect(detail.locator("#deliv-table tbody tr")).to_have_count(50)
    expect(detail.locator("#deliv-table tbody tr").first).to_have_attribute("data-device", "fleet-0000")
    detail.get_by_role("button", name="Next").click()
    expect(detail.locator("#deliv-table tbody tr").first).to_have_attribute("data-device", "fleet-0050")
    expect(detail).to_contain_text("Ack latency")
    shot(page, tmp_path, "job-detail")
    page.get_by_role("tab", name="Now").click()
    expect(page.locator("#now-latency")).to_contain_text("simulation")
    shot(page, tmp_path, "now", full_page=False)
    phone = context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    phone.goto(gw.base + "/")
    phone.wait_for_selector("body[data-ready=true]", state="attached")
    expect(phone.locator('#now-jobs li[data-job-id="fleet-1"]')).to_be_visible()
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the phone layout scrolls sideways ({width} px)"
    shot(phone, tmp_path, "now-phone")
    # Every tab fits the phone's width (wide tables scroll inside their own box).
    for tab in ("Jobs", "Devices", "Alarms"):
        phone.get_by_role("tab", name=tab).click()
        expect(phone.locator(f"#panel-{tab.lower()}")).to_be_visible()
        if tab == "Jobs":
            phone.locator("#send > summary").click()
            expect(phone.get_by_label("Title", exact=True)).to_be_visible()
        if tab == "Devices":
            expect(phone.locator("#dev-table tbody tr")).to_have_count(50)
        shot(phone, tmp_path, f"{tab.lower()}-phone", full_page=False)
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the {tab} tab scrolls sideways on a phone ({width} px)"


# ------------------------------------------------------------------ the send form
def test_a_job_sent_from_the_form_reaches_the_device_and_bad_fields_are_named(gw, context, tmp_path):
    probe = MqttProbe(gw.port, [f"{P}/devices/tech-1/notify"])
    page = login(context, gw, "tech")
    page.get_by_role("tab", name="Jobs").click()
    page.locator("#send > summary").click()
    page.get_by_label("Title", exact=True).fill("Shift change")
    page.get_by_label("Device ids (comma or space separated)").fill("tech-1")
    page.get_by_text("More: job id, TTL, collapse key, data").click()
    page.get_by_label("TTL (seconds)").fill("-5")
    page.get_by_label("Job id (optional)").fill("form-1")
    before = jobs_in_db(gw)
    page.get_by_role("button", name="Send job").click()
    ttl_error = page.locator("#f-ttl-error")
    expect(ttl_error).to_be_visible()
    # The same message the API gives for the same job, next to the field it names.
    api = gw.client("tech").post("/v1/jobs", json={
        "job_id": "form-1", "target": {"devices": ["tech-1"]},
        "notification": {"title": "Shift change", "priority": "normal", "ttl": -5}})
    assert api.status_code == 400
    assert ttl_error.inner_text() == api.json()["error"]["message"]
    assert ttl_error.inner_text().startswith("notification.ttl: ")
    expect(page.get_by_label("TTL (seconds)")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("TTL (seconds)")).to_be_focused()
    shot(page, tmp_path, "form-ttl-error")

    page.get_by_label("TTL (seconds)").fill("600")
    page.get_by_label("Device ids (comma or space separated)").fill("tech-1, ghost-9")
    page.get_by_role("button", name="Send job").click()
    expect(page.locator("#f-devices-error")).to_have_text("target.devices: no registered device 'ghost-9'")
    expect(ttl_error).to_be_hidden()
    assert jobs_in_db(gw) - before <= {"form-1"}, "a job naming an unknown device was not dispatched"
    assert db_rows(gw.data_dir, "SELECT state FROM jobs WHERE job_id = 'form-1'") in ([], [("rejected",)])

    page.get_by_label("Device ids (comma or space separated)").fill("tech-1")
    page.get_by_role("button", name="Send job").click()
    # The page shows the 202's JobStatus: the dispatcher may already have taken the job.
    expect(page.locator("#f-ok")).to_have_text(re.compile(r"^Job form-1 (accepted|dispatching|completed)\.$"))
    expect(page.locator("#job-detail")).to_contain_text("Shift change")
    # The device got it (an independent MQTT client on its notify topic).
    msgs = probe.wait_for(lambda m: [json.loads(p) for t, _, p, _ in probe.on(f"{P}/devices/tech-1/notify")
                                     if json.loads(p)["job_id"] == "form-1"], timeout=15)
    assert msgs[0]["title"] == "Shift change"
    expect(page.locator('#jobs-list li[data-job-id="form-1"]')).to_be_visible()
    probe.close()


# ------------------------------------------------------------------ alarms
def test_acknowledging_a_firing_alarm_on_the_page_stops_its_escalation(gw, context, browser, tmp_path):
    probe = MqttProbe(gw.port, [f"{P}/alarms/#", f"{P}/devices/lead-1/notify"])
    page = login(context, gw, "tech")
    page.get_by_role("tab", name="Alarms").click()
    probe.publish(f"{P}/devices/door-a/telemetry/door", "open")
    row = page.locator('#alarm-table tr[data-alarm="door/door-a"]')
    expect(row).to_have_attribute("data-state", "firing")  # appears by itself (event stream)
    expect(row).to_contain_text("step 0 of 1")
    expect(page.locator("#alarm-badge")).to_have_text("1")
    # The barrier for "door-a never escalates": door-b fires now, after door-a, with the same
    # escalation delay, so its escalation is due after door-a's would have been. Fired
    # before the ack instead of after it, its escalation comes that much sooner.
    probe.publish(f"{P}/devices/door-b/telemetry/door", "open")

    shot(page, tmp_path, "alarm-firing", full_page=False)
    page.get_by_role("button", name="Acknowledge alarm door door-a").click()
    expect(page.locator("#alarm-msg")).to_have_text("door door-a acknowledged by http:tech: escalation stopped.")
    expect(row).to_have_count(0)
    page.get_by_label("Show alarms that are").select_option("acknowledged")
    acked = page.locator('#alarm-table tr[data-alarm="door/door-a"]')
    expect(acked).to_contain_text("tech")
    expect(acked.locator(".escalation")).to_have_text("step 0 of 1, stopped")
    state = probe.wait_for(lambda m: [json.loads(p) for _, _, p, _ in probe.on(f"{P}/alarms/door/door-a")
                                      if p and json.loads(p)["state"] == "acknowledged"])
    assert state[-1]["acknowledged_by"] == "http:tech"  # the channel and the logged-in account

    # Once door-b's escalation has gone out, door-a's (due earlier) would have gone out
    # before it.
    probe.wait_for(lambda m: [p for _, _, p, _ in probe.on(f"{P}/devices/lead-1/notify")
                              if json.loads(p)["job_id"] == "alarm.door.door-b.2"], timeout=ESCALATE_AFTER_S + 15)
    assert not [p for _, _, p, _ in probe.on(f"{P}/devices/lead-1/notify") if "door-a" in json.loads(p)["job_id"]]
    assert db_rows(gw.data_dir, "SELECT job_id FROM jobs WHERE job_id LIKE 'alarm.door.door-a.%'") == [
        ("alarm.door.door-a.1",)]
    page.get_by_label("Show alarms that are").select_option("firing")
    expect(page.locator('#alarm-table tr[data-alarm="door/door-b"] .escalation')).to_contain_text("step 1 of 1")
    # On a phone the alarm and its Acknowledge button are on screen, not off to the right.
    phone = context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    phone.goto(gw.base + "/")
    phone.wait_for_selector("body[data-ready=true]", state="attached")
    phone.get_by_role("tab", name="Alarms").click()
    phone_row = phone.locator('#alarm-table tr[data-alarm="door/door-b"]')
    expect(phone_row).to_contain_text("step 1 of 1")
    shot(phone, tmp_path, "alarm-firing-phone", full_page=False)
    expect(phone.get_by_role("button", name="Acknowledge alarm door door-b")).to_be_in_viewport(ratio=1)
    expect(phone_row.locator(".escalation")).to_be_in_viewport(ratio=1)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    phone.close()
    # A monitor sees the firing alarm and no button to acknowledge it.
    monitor = browser.new_context()
    mon_page = login(monitor, gw, "mon")
    mon_page.get_by_role("tab", name="Alarms").click()
    expect(mon_page.locator('#alarm-table tr[data-alarm="door/door-b"]')).to_be_visible()
    expect(mon_page.get_by_role("button", name="Acknowledge alarm door door-b")).to_have_count(0)
    monitor.close()
    probe.close()


# ------------------------------------------------------------------ devices, paged on the server
def test_devices_are_searched_and_paged_on_the_server(gw, context, tmp_path):
    page = login(context, gw, "tech")
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r) if "/ui/api/devices?" in r.url else None)
    page.get_by_role("tab", name="Devices").click()
    rows = page.locator("#dev-table tbody tr")
    expect(page.locator("#dev-total")).to_have_text("3,008 devices match")
    expect(rows).to_have_count(50)
    expect(rows.first).to_have_attribute("data-device", "fleet-0000")
    page.locator("#panel-devices").get_by_role("button", name="Next").click()
    expect(rows.first).to_have_attribute("data-device", "fleet-0050")
    expect(page.locator("#dev-page")).to_have_text("51–100 of 3,008")
    page.locator("#panel-devices").get_by_role("button", name="Previous").click()
    expect(rows.first).to_have_attribute("data-device", "fleet-0000")

    panel = page.locator("#panel-devices")
    panel.get_by_label("Tag", exact=True).fill("floor-1")
    panel.get_by_label("Segment", exact=True).fill("store")
    panel.get_by_label("Device id starts with").fill("store-01")
    panel.get_by_role("button", name="Search").click()
    # store-0100..store-0199 with i % 3 == 1: 100, 103, ..., 199 = 34 of them.
    expect(page.locator("#dev-total")).to_have_text("34 devices match")
    expect(rows).to_have_count(34)
    expect(rows.first).to_have_attribute("data-device", "store-0100")

    panel.get_by_label("Tag", exact=True).fill("")
    panel.get_by_label("Segment", exact=True).fill("")
    panel.get_by_label("Device id starts with").fill("store-0007")
    panel.get_by_role("button", name="Search").click()
    device = page.locator('#dev-table tr[data-device="store-0007"]')
    channels = device.locator(".channels li")
    expect(channels).to_have_count(2)
    expect(channels.nth(0)).to_contain_text("fcm")
    expect(channels.nth(0)).to_contain_text("invalid")
    expect(channels.nth(0)).to_contain_text("Unregistered (FCM 404)")
    expect(channels.nth(1)).to_contain_text("simulation")
    assert "fcm-token-of-store-0007-0123456789" not in page.content(), "addresses are shown shortened"
    device.get_by_role("button", name="Show device store-0007").click()
    expect(page.locator("#device-detail")).to_contain_text("Channels, in order")
    shot(page, tmp_path, "devices")

    pages = [(r.url, r.json()) for r in responses]
    assert pages and all(len(body["devices"]) <= 50 and "limit=50" in url for url, body in pages)
    assert sum(len(body["devices"]) for _, body in pages) < 300, "the page never loads the fleet"


def test_a_search_keeps_its_result_when_the_tabs_first_load_answers_after_it(gw, context):
    """A list shows the answer to the newest request made of it: the Devices tab's first
    load (the whole fleet), answered only after the search typed meanwhile was drawn, does
    not put the fleet back under the search field."""
    page = login(context, gw, "tech")
    held: list[Any] = []

    def hold_the_first(route: Any) -> None:
        if not held:
            held.append(route)
        else:
            route.continue_()

    page.route("**/ui/api/devices?*", hold_the_first)
    page.get_by_role("tab", name="Devices").click()
    while not held:
        page.wait_for_timeout(20)  # lets Playwright dispatch the route
    assert "q=" not in held[0].request.url, held[0].request.url
    panel = page.locator("#panel-devices")
    panel.get_by_label("Device id starts with").fill("fleet-0003")
    panel.get_by_role("button", name="Search").click()
    expect(panel.locator("#dev-total")).to_have_text("1 device matches")
    with page.expect_response(lambda r: r.request == held[0].request) as late:
        held[0].continue_()
    late.value.finished()
    page.evaluate("() => new Promise((r) => setTimeout(r, 300))")  # its handler has run by now
    expect(panel.locator("#dev-total")).to_have_text("1 device matches")
    expect(page.locator("#dev-table tbody tr")).to_have_count(1)
    page.unroute("**/ui/api/devices?*")


# ------------------------------------------------------------------ the Now tab under load
def test_the_now_tab_shows_the_oldest_queued_delivery_and_the_cloud_backlog(browser, tmp_path):
    """A slow bridge keeps deliveries queued and an unreachable cloud broker lets the
    outbox grow: the Now tab shows both ages, the backlog's messages and bytes, and why the
    link is down, as the API's own numbers say. An APNs bridge whose key is RSA (APNs wants
    P-256) is unhealthy: the Now tab names it and says why."""
    apns = {"enabled": True, "team_id": "T", "key_id": "K", "key_file": str(rsa_pem(tmp_path / "AuthKey.p8")),
            "topic": "com.example.app"}
    a = make_api_gateway(tmp_path, {"bridges": {"simulation": {"latency_ms": 30_000}, "apns": apns},
                                    "dispatch": {"max_in_flight": 1},
                                    "upstream": {"url": f"mqtt://127.0.0.1:{free_port()}"}}, users=USERS, start=False)
    bulk_register(tmp_path / "var", [{"device_id": f"slow-{i}", "segment": "slow", "channels": [{"platform": "simulation"}]}
                                     for i in range(10)])
    a.gw.start()
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    try:
        r = a.client("tech").post("/v1/jobs", json={
            "job_id": "slow-1", "target": {"segment": "slow"}, "notification": {"title": "Slow"}})
        assert r.status_code == 202, r.text

        def now() -> dict[str, Any] | None:
            body = a.client("mon").get("/ui/api/now").json()
            u, q = body["upstream"], body["queue"]
            ok = (u and u["buffer_rows"] and (u["buffer_oldest_age_s"] or 0) >= 2 and (q["oldest_age_s"] or 0) >= 2)
            return body if ok else None

        body = wait_until(now, timeout=20, interval=0.3)
        assert body["upstream"]["connected"] is False and body["upstream"]["buffer_bytes"] > 0
        assert body["queue"]["depth"] >= 8 and body["queue"]["by_platform"]["simulation"] == body["queue"]["depth"]

        page = login(ctx, a, "mon")
        queue = page.locator("#now-queue")
        expect(queue.locator("[data-testid=queue-depth]")).to_have_text(re.compile(r"^\d+$"))
        assert int(queue.locator("[data-testid=queue-depth]").inner_text()) >= 8
        expect(queue).to_contain_text(re.compile(r"Oldest queued\s*\d+ s"))
        upstream = page.locator("#now-upstream")
        expect(upstream).to_contain_text("not connected")
        expect(upstream).to_contain_text(re.compile(r"Backlog\s*[1-9][\d,]* messages, [\d.]+ k?B"))
        expect(upstream).to_contain_text(re.compile(r"Oldest waiting\s*\d+ s"))
        apns_row = page.locator("#now-bridges [data-bridge=apns]")
        expect(apns_row).to_contain_text("unhealthy")
        expect(apns_row.locator(".reason")).to_contain_text("P-256")
        expect(page.locator("#now-bridges [data-bridge=simulation]")).to_contain_text("healthy")
        expect(page.locator("#now-gateway")).to_contain_text(re.compile(r"Failing\s*bridges: apns: .*P-256"))
        shot(page, tmp_path, "now-backlog", full_page=False)
    finally:
        ctx.close()
        a.close()
        a.gw.kill()
        if a.gw.notify:
            a.gw.notify.close()


# ------------------------------------------------------------------ a job's problems
def test_a_jobs_failed_and_invalid_address_deliveries_are_shown_with_their_reasons(gw, context, tmp_path):
    page = login(context, gw, "mon")
    r = gw.client("tech").post("/v1/jobs", json={
        "job_id": "odd-1", "target": {"devices": ["gone-1", "nobridge-1", "fleet-0001"]},
        "notification": {"title": "Odd ones"}})
    assert r.status_code == 202, r.text
    wait_until(lambda: db_rows(gw.data_dir, "SELECT state FROM jobs WHERE job_id = 'odd-1'")[0][0]
               in ("completed", "acknowledged"), timeout=20)
    rows = {d: (st, reason) for d, st, reason in db_rows(
        gw.data_dir, "SELECT device_id, state, last_error FROM deliveries WHERE job_id = 'odd-1'")}
    assert rows["gone-1"][0] == "invalid_address" and rows["nobridge-1"][0] == "failed", rows
    page.get_by_role("tab", name="Jobs").click()
    row = page.locator('#jobs-list li[data-job-id="odd-1"]')
    expect(row).to_contain_text("1 failed · 1 invalid address")
    row.get_by_role("button", name="Show job odd-1").click()
    detail = page.locator("#job-detail")
    expect(detail.get_by_role("heading", name="Job odd-1")).to_be_visible()
    # A finished job with problems opens on them: the failed and invalid-address devices,
    # each with the reason the gateway recorded.
    expect(detail.get_by_label("Show")).to_have_value("problems")
    shown = detail.locator("#deliv-table tbody tr")
    expect(shown).to_have_count(2)
    for device, (state, reason) in (("gone-1", rows["gone-1"]), ("nobridge-1", rows["nobridge-1"])):
        tr = detail.locator(f'#deliv-table tr[data-device="{device}"]')
        expect(tr).to_contain_text(state)
        expect(tr).to_contain_text(reason)
    shot(page, tmp_path, "job-problems")
    detail.get_by_label("Show").select_option("")
    expect(shown).to_have_count(3)
    expect(detail.locator('#deliv-table tr[data-device="fleet-0001"]')).to_contain_text("simulation")


# ------------------------------------------------------------------ ages, ack latency
def test_ages_keep_counting_with_no_new_event(gw, context):
    """"3 s ago" drawn once would say so forever while nothing about its row changes."""
    r = gw.client("tech").post("/v1/jobs", json={
        "job_id": "tick-1", "target": {"devices": ["fleet-0003"]}, "notification": {"title": "Tick"}})
    assert r.status_code == 202, r.text
    wait_until(lambda: db_rows(gw.data_dir, "SELECT state FROM jobs WHERE job_id = 'tick-1'") == [("acknowledged",)],
               timeout=20)
    page = login(context, gw, "mon")
    # A device's row is drawn once per search, never by an event: the same element must count on.
    page.get_by_role("tab", name="Devices").click()
    panel = page.locator("#panel-devices")
    panel.get_by_label("Device id starts with").fill("fleet-0003")
    panel.get_by_role("button", name="Search").click()
    expect(panel.locator("#dev-total")).to_have_text("1 device matches")  # the search's draw, not the tab's
    last_ack = page.locator('#dev-table tr[data-device="fleet-0003"] > td:nth-child(6)')
    expect(last_ack).to_have_text(re.compile(r"^\d+ s ago$"))
    last_ack.evaluate("el => { el.dataset.probe = 'drawn once'; }")
    first = last_ack.inner_text()
    expect(last_ack).not_to_have_text(first, timeout=5_000)
    expect(last_ack).to_have_text(re.compile(r"^\d+ s ago$"))
    assert last_ack.get_attribute("data-probe") == "drawn once", "the row was redrawn: that proves nothing"
    # The job's row counts on too (a finished job gets no more events).
    page.get_by_role("tab", name="Jobs").click()
    created = page.locator('#jobs-list li[data-job-id="tick-1"] .jobhead .muted')
    expect(created).to_have_text(re.compile(r"^http · \d+ s ago$"))
    first = created.inner_text()
    expect(created).not_to_have_text(first, timeout=5_000)


ACK_LATENCY_TRUTH = """() => {
    // "Ack latency" must never count fewer acks than the acknowledged rows shown under it.
    window.lies = [];
    const check = () => {
        const detail = document.querySelector('#job-detail');
        if (!detail || detail.hidden) return;
        const dt = [...detail.querySelectorAll('dt')].find(d => d.textContent === 'Ack latency');
        if (!dt) return;
        const text = dt.nextElementSibling.textContent;
        const said = text === 'no acks yet' ? 0 : parseInt(text.replace(/,/g, ''), 10);
        const shown = detail.querySelectorAll('#deliv-table tbody .badge.d-acknowledged').length;
        if (said < shown) window.lies.push([text, shown]);
    };
    new MutationObserver(check).observe(document.body, {childList: true, subtree: true, characterData: true,
                                                        attributes: true, attributeFilter: ['hidden']});
}"""


def test_a_jobs_ack_latency_never_says_no_acks_above_acknowledged_rows(gw, context, tmp_path):
    """Acks that come while the detail is open, and acks that land between the detail's read
    and its rows' read, are both counted in "Ack latency"."""
    probe = MqttProbe(gw.port, [f"{P}/devices/+/notify"])
    r = gw.client("tech").post("/v1/jobs", json={
        "job_id": "acks-1", "target": {"devices": ["mq-ack-1", "mq-ack-2"]}, "notification": {"title": "Ack me"}})
    assert r.status_code == 202, r.text
    urls = probe.wait_for(lambda m: (lambda got: got if len(got) == 2 else None)(
        {t.split("/")[-2]: json.loads(p)["ack_url"] for _, t, p, _ in m
         if t.endswith("/notify") and json.loads(p)["job_id"] == "acks-1"}), timeout=20)
    probe.close()
    page = login(context, gw, "mon")
    page.evaluate(ACK_LATENCY_TRUTH)
    page.get_by_role("tab", name="Jobs").click()
    page.get_by_role("button", name="Show job acks-1").click()
    detail = page.locator("#job-detail")
    latency = detail.locator("dt:text-is('Ack latency') + dd")
    expect(detail.locator("#deliv-table tbody tr")).to_have_count(2)
    expect(detail.locator('#deliv-table tr[data-device="mq-ack-1"] .badge')).to_have_text("sent")
    expect(latency).to_have_text("no acks yet")

    # An ack while the detail is open: the row and the latency change together.
    assert gw.client().post(urls["mq-ack-1"], json={"status": "received"}).status_code == 202
    expect(detail.locator('#deliv-table tr[data-device="mq-ack-1"] .badge')).to_have_text("acknowledged")
    expect(latency).to_contain_text(re.compile(r"^1 ack · mean \d"))
    shot(page, tmp_path, "job-acked-while-open")

    # Reopened, with the second ack landing between the detail's read and its rows' read.
    detail.get_by_role("button", name="Close job details").click()

    def ack_first(route: Any) -> None:
        assert gw.client().post(urls["mq-ack-2"], json={"status": "received"}).status_code == 202
        wait_until(lambda: db_rows(gw.data_dir, "SELECT state FROM deliveries WHERE job_id = 'acks-1' AND "
                                   "device_id = 'mq-ack-2'") == [("acknowledged",)], timeout=10)
        route.continue_()

    page.route("**/ui/api/jobs/acks-1/deliveries*", ack_first)
    page.get_by_role("button", name="Show job acks-1").click()
    expect(detail.locator("#deliv-table tbody .badge.d-acknowledged")).to_have_count(2)
    expect(latency).to_contain_text(re.compile(r"^2 acks · mean \d"))
    page.unroute("**/ui/api/jobs/acks-1/deliveries*")
    assert page.evaluate("window.lies") == []


# ------------------------------------------------------------------ phones, degraded
def overflow(page: Page) -> int:
    """How far the page scrolls sideways (0: it does not)."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_no_tab_scrolls_sideways_on_a_phone_in_the_degraded_state_with_details_open(gw, browser, tmp_path):
    """The longest ids, a 300-character title, a bridge failing with a reason of over 300
    characters without a space, a long alarm: at 390 px every tab, each with its details
    open, fits the screen."""
    r = gw.client("tech").post("/v1/jobs", json={
        "job_id": LONG_JOB, "target": {"devices": [LONG_DEV]},
        "notification": {"title": LONG_TITLE, "body": LONG_TITLE}})
    assert r.status_code == 202, r.text
    probe = MqttProbe(gw.port)
    probe.publish(f"{P}/devices/{LONG_DEV}/telemetry/fault", FAULT)
    ctx = browser.new_context(viewport={"width": 390, "height": 844})
    ctx.set_default_timeout(20_000)
    try:
        body = wait_until(lambda: (lambda b: b if not b["bridges"]["wns"]["healthy"] else None)(
            gw.client("mon").get("/ui/api/now").json()), timeout=20)
        assert TOKEN_REFUSAL in body["bridges"]["wns"]["reason"] and len(TOKEN_REFUSAL) == 300, body["bridges"]
        wait_until(lambda: db_rows(gw.data_dir, f"SELECT state FROM jobs WHERE job_id = '{LONG_JOB}'")
                   in ([("completed",)], [("acknowledged",)]), timeout=20)
        page = login(ctx, gw, "tech")

        # Now: the failing check in the header and on the Gateway card, the bridge's reason,
        # the long job in the latest jobs, the firing alarm.
        expect(page.locator("#health")).to_contain_text(TOKEN_REFUSAL)
        expect(page.locator("#now-gateway")).to_contain_text(TOKEN_REFUSAL)
        expect(page.locator("#now-bridges [data-bridge=wns] .reason")).to_contain_text(TOKEN_REFUSAL)
        expect(page.locator(f'#now-jobs li[data-job-id="{LONG_JOB}"]')).to_contain_text(LONG_TITLE)
        expect(page.locator("#now-alarms")).to_contain_text(FAULT)
        shot(page, tmp_path, "now-degraded-phone")
        sideways = {"Now": overflow(page)}

        # Jobs: the send form open with a long field error, and the long job's detail.
        page.get_by_role("tab", name="Jobs").click()
        page.locator("#send > summary").click()
        page.get_by_label("Title", exact=True).fill(LONG_TITLE)
        page.get_by_label("Device ids (comma or space separated)").fill("ghost-" + "g" * 122)
        page.get_by_role("button", name="Send job").click()
        expect(page.locator("#f-devices-error")).to_contain_text("no registered device")
        page.get_by_role("button", name=f"Show job {LONG_JOB}").click()
        detail = page.locator("#job-detail")
        expect(detail.get_by_role("heading", name=f"Job {LONG_JOB}")).to_be_in_viewport()
        expect(detail.locator(f'#deliv-table tr[data-device="{LONG_DEV}"]')).to_be_visible()
        shot(page, tmp_path, "jobs-degraded-phone")
        sideways["Jobs"] = overflow(page)

        # Devices: the long device (its id, segment, tag) and its detail.
        page.get_by_role("tab", name="Devices").click()
        panel = page.locator("#panel-devices")
        panel.get_by_label("Device id starts with").fill("xl-")
        panel.get_by_role("button", name="Search").click()
        page.get_by_role("button", name=f"Show device {LONG_DEV}").click()
        expect(page.get_by_role("heading", name=f"Device {LONG_DEV}")).to_be_in_viewport()
        expect(page.locator("#device-detail")).to_contain_text(LONG_JOB)
        shot(page, tmp_path, "devices-degraded-phone")
        sideways["Devices"] = overflow(page)

        # Alarms: the fault alarm (its 128-character key and 201-character value).
        page.get_by_role("tab", name="Alarms").click()
        row = page.locator(f'#alarm-table tr[data-alarm="fault/{LONG_DEV}"]')
        expect(row).to_contain_text(FAULT)
        row.scroll_into_view_if_needed()
        expect(page.get_by_role("button", name=f"Acknowledge alarm fault {LONG_DEV}")).to_be_in_viewport(ratio=1)
        shot(page, tmp_path, "alarms-degraded-phone")
        sideways["Alarms"] = overflow(page)
        assert sideways == {"Now": 0, "Jobs": 0, "Devices": 0, "Alarms": 0}, f"px scrolled sideways per tab: {sideways}"
    finally:
        ctx.close()
        probe.publish(f"{P}/devices/{LONG_DEV}/telemetry/fault", "ok")  # clears it: other tests count firing alarms
        wait_until(lambda: db_rows(gw.data_dir, "SELECT state FROM alarms WHERE rule = 'fault'") in ([("cleared",)], []),
                   timeout=20)
        probe.close()


# ------------------------------------------------------------------ details where they are asked for
def test_details_open_under_the_clicked_row_and_a_link_scrolls_to_its_detail(gw, browser, tmp_path):
    for i in range(21):  # one more than a page: pos-00 is on the second page
        r = gw.client("tech").post("/v1/jobs", json={
            "job_id": f"pos-{i:02}", "target": {"devices": ["fleet-0002"]}, "notification": {"title": f"Pos {i}"}})
        assert r.status_code == 202, r.text
    ctx = browser.new_context(viewport={"width": 390, "height": 844})
    ctx.set_default_timeout(20_000)
    try:
        page = login(ctx, gw, "mon")
        page.get_by_role("tab", name="Jobs").click()
        row = page.locator('#jobs-list li[data-job-id="pos-10"]')
        row.scroll_into_view_if_needed()
        row.get_by_role("button", name="Show job pos-10").click()
        heading = page.get_by_role("heading", name="Job pos-10")
        expect(heading).to_be_in_viewport()
        expect(row).to_be_in_viewport()  # the page did not jump away from where the operator clicked
        assert row.evaluate("r => r.nextElementSibling.contains(document.querySelector('#job-detail'))"), \
            "the detail opens right under its row"
        shot(page, tmp_path, "job-detail-at-row-phone", full_page=False)

        page.get_by_role("tab", name="Devices").click()
        device = page.locator('#dev-table tr[data-device="fleet-0030"]')
        device.scroll_into_view_if_needed()
        device.get_by_role("button", name="Show device fleet-0030").click()
        expect(page.get_by_role("heading", name="Device fleet-0030")).to_be_in_viewport()
        expect(device.get_by_role("button", name="Show device fleet-0030")).to_be_in_viewport()
        assert device.evaluate("r => r.nextElementSibling.contains(document.querySelector('#device-detail'))")
        assert overflow(page) == 0
        shot(page, tmp_path, "device-detail-at-row-phone", full_page=False)

        # Opened by URL: the detail is scrolled into view, under its row when the row is shown,
        # above the list when it is not.
        for fragment, heading_name, row_selector in (
                ("#job=pos-03", "Job pos-03", '#jobs-list li[data-job-id="pos-03"]'),
                ("#job=pos-00", "Job pos-00", None),
                ("#device=fleet-0040", "Device fleet-0040", '#dev-table tr[data-device="fleet-0040"]')):
            linked = ctx.new_page()
            linked.goto(gw.base + "/" + fragment)
            linked.wait_for_selector("body[data-ready=true]", state="attached")
            expect(linked.get_by_role("heading", name=heading_name)).to_be_in_viewport()
            section = "#job-detail" if fragment.startswith("#job") else "#device-detail"
            if row_selector:
                assert linked.locator(row_selector).evaluate(
                    f"r => r.nextElementSibling.contains(document.querySelector('{section}'))"), fragment
            else:
                assert linked.locator(section).evaluate("s => s.parentElement.id") == "job-detail-home"
            shot(linked, tmp_path, f"linked-{fragment[1:].replace('=', '-')}", full_page=False)
            linked.close()
    finally:
        ctx.close()


# ------------------------------------------------------------------ people
def test_the_people_tab_shows_devices_in_reach_order_quiet_hours_and_mutes_on_a_phone(gw, context, tmp_path):
    r = gw.client("tech").put("/v1/people/lead", json={
        "name": "Shift lead", "devices": ["lead-1", "tech-1", "ghost-9"], "timezone": "Europe/Berlin",
        "quiet_hours": [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "22:00", "to": "06:00"}],
        "bypass_priority": "high", "muted": {"segments": ["store"], "rules": ["door"]}, "reach_after_s": 90})
    assert r.status_code in (200, 201), r.text
    page = login(context, gw, "tech")
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_role("tab", name="People").click()
    row = page.locator("#people-table tr[data-person=lead]")
    expect(row).to_contain_text("Shift lead")
    reach = row.locator("ol.channels li")
    expect(reach).to_have_text(["lead-1 mqtt", "tech-1 mqtt", "ghost-9 not registered"])
    expect(row).to_contain_text("next device after 90 s")
    expect(row).to_contain_text("Europe/Berlin")
    expect(row).to_contain_text("mon-fri 22:00-06:00")
    expect(row).to_contain_text("through them from high")
    expect(row).to_contain_text("segments: store; rules: door")
    assert page.url.endswith("#people") or page.evaluate("location.hash") in ("", "#people")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the People tab scrolls sideways on a phone ({width} px)"
    shot(page, tmp_path, "people-phone")
