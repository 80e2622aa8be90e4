"""A person's own page (/me) in a real browser: Debian's chromium, headless, over CDP, against
the real daemon with its Web Push bridge and the strict fake push service.

Anna (a ``user`` account, the person ``anna``) logs in on /me on a phone-sized screen,
subscribes this browser for Web Push through the page's own code (the service worker of
``devices/web/``, registered from /me, and ``PUT /v1/me/devices/<id>``), a job to her
reaches the browser as a push (``ServiceWorker.deliverPushMessage`` hands the worker
exactly what the push service decrypted), shows in her inbox, and "Open" acknowledges it:
the job's deliveries show the ``opened`` ack, made on her page (via ``me``), beside the
worker's ``received``.

As in tests/http/test_web_push_browser.py, headless chromium cannot run
``pushManager.subscribe()`` (no push service, "permission denied"), so the subscription is
the fake's; the page registers it exactly as its button does after subscribing.
"""

from __future__ import annotations

import json

import httpx
from playwright.async_api import async_playwright, expect

from tests.http.conftest import db_rows, make_api_gateway
from tests.helpers.browser import CHROMIUM, FLAGS, require_browser
from tests.http.test_web_push_browser import open_push_page, push_service, started, webpush_config  # noqa: F401 - fixtures
from tests.helpers import cli_in_process, until



async def test_a_person_subscribes_on_me_gets_the_push_and_opens_it_from_the_inbox(tmp_path, push_service, started):
    require_browser(CHROMIUM)
    pki, fake = push_service
    api = make_api_gateway(tmp_path, webpush_config(tmp_path, pki),
                           users={"tech": ("technician", "tech-pw"), "anna": ("user", "anna-pw")})
    started.append(api)  # killed at teardown if the test fails before it stops the daemon
    origin = api.base
    try:
        async with httpx.AsyncClient(base_url=origin, auth=("tech", "tech-pw"), timeout=30) as tech, \
                async_playwright() as pw:
            r = await tech.put("/v1/people/anna", json={"name": "Anna K.", "account": "anna", "timezone": "Europe/Berlin"})
            assert r.status_code == 201, r.text
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            opened = await open_push_page(browser, origin, viewport={"width": 390, "height": 844})
            opened.context.set_default_timeout(20_000)
            page, cdp, registrations = opened.page, opened.cdp, opened.registrations

            # Log in: /me shows the form, the form sends a user back to /me.
            await page.goto(f"{origin}/me")
            await page.get_by_label("User name").fill("anna")
            await page.get_by_label("Password").fill("anna-pw")
            await page.get_by_role("button", name="Log in").click()
            await page.wait_for_selector("body[data-ready=true]", state="attached")
            assert page.url == f"{origin}/me"
            await expect(page.locator("#who")).to_have_text("Anna K. (anna)")
            await expect(page.locator("#inbox-msg")).to_have_text("no notifications yet")

            # Subscribe this browser: the worker of devices/web/ (scope /web/), registered from
            # /me by the Web Push client's own code; the subscription goes through the page.
            await page.evaluate("homepot.registerWorker().then(() => true)")
            registration_id = await until(lambda: registrations.get(f"{origin}/web/"),
                                          timeout=30, what="the service worker's registration")
            config = await page.evaluate("homepot.config()")
            sub = fake.subscribe(app_server_key=config["vapid_public_key"])
            await page.locator("#s-device_id").fill("anna-browser")
            device = await page.evaluate("([s]) => homepotMe.registerBrowser('anna-browser', s)", [sub])
            assert device["owner"] == "anna" and device["channels"][0]["platform"] == "webpush"
            row = page.locator("#devices li[data-device=anna-browser]")
            await expect(row).to_contain_text("webpush")
            await expect(row).to_contain_text("this browser")
            person = (await tech.get("/v1/people/anna")).json()
            assert person["devices"] == ["anna-browser"]

            # A job to anna arrives as a push in this browser; the worker acks it received.
            r = await tech.post("/v1/jobs", json={"job_id": "me-1", "target": {"people": ["anna"]},
                                                  "notification": {"title": "Freezer 3", "body": "Above -15 C",
                                                                   "priority": "high"}})
            assert r.status_code == 202, r.text
            pushed = await until(lambda: [p.decoded for p in fake.accepted if p.decoded.get("job_id") == "me-1"],
                                 timeout=30, what="the push at the push service")
            payload = pushed[0]
            await cdp.send("ServiceWorker.deliverPushMessage",
                           {"origin": origin, "registrationId": registration_id, "data": json.dumps(payload)})
            await until(lambda: _acks(api, payload["message_id"], "received"), timeout=30, what="the worker's received ack")

            # The inbox shows it (Refresh: what the page does when it comes into view); Open acks it.
            await page.get_by_role("button", name="Refresh").click()
            item = page.locator(f"#inbox li[data-message='{payload['message_id']}']")
            await expect(item).to_contain_text("Freezer 3")
            await expect(item).to_contain_text("Above -15 C")
            await expect(item).to_contain_text("on anna-browser")
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"/me scrolls sideways on a phone ({width} px)"
            await page.screenshot(path=str(tmp_path / "me-inbox.png"), full_page=True)
            print(f"screenshot: {tmp_path / 'me-inbox.png'}")
            await item.get_by_role("button", name="Open Freezer 3").click()
            await expect(item).to_contain_text("opened")
            await expect(item.get_by_role("button")).to_have_count(0)

            # Preferences: a bad value is named next to its field, a good one is stored.
            await page.locator("#p-reach_after_s").fill("-5")
            await page.get_by_role("button", name="Save preferences").click()
            await expect(page.locator("#p-reach_after_s-error")).to_contain_text("reach_after_s")
            await expect(page.locator("#p-reach_after_s")).to_have_attribute("aria-invalid", "true")
            await page.locator("#p-reach_after_s").fill("90")
            await page.locator("#p-quiet_hours").fill("mon-fri 22:00-06:00")
            await page.get_by_role("button", name="Save preferences").click()
            await expect(page.locator("#p-ok")).to_have_text("saved")
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            await browser.close()
            person = (await tech.get("/v1/people/anna")).json()
            assert person["reach_after_s"] == 90
            assert person["quiet_hours"] == [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "22:00", "to": "06:00"}]
    finally:
        api.close()

    # What `jobs show` says (the command in this process, reading the daemon's database): the
    # delivery to anna-browser with both acks, opened on her page.
    shown = cli_in_process(api.config, "jobs", "show", "me-1", "--deliveries", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["state"] == "acknowledged" and status["counts"]["acknowledged"] == 1
    assert status["people"] == {"targets": 1, "reached": 1, "held": 0}
    [delivery] = status["deliveries"]
    assert delivery["device_id"] == "anna-browser"
    assert sorted(a["status"] for a in delivery["acks"]) == ["opened", "received"]
    acks = db_rows(api.data_dir, "SELECT device_id, status, via FROM acks ORDER BY id")
    assert acks == [("anna-browser", "received", "ack-url"), ("anna-browser", "opened", "me")]
    assert api.gw.stop() == 0


def _acks(api, message_id: str, status: str) -> bool:  # noqa: ANN001
    return bool(db_rows(api.data_dir, f"SELECT 1 FROM acks WHERE message_id = '{message_id}' AND status = '{status}'"))
