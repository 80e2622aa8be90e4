"""The Web Push service worker in a real browser (Debian's chromium, headless, over CDP).

The job goes through the real daemon and its Web Push bridge to the strict fake push
service, which decrypts it (RFC 8291) as a browser's push service would hand it over;
``ServiceWorker.deliverPushMessage`` then gives exactly that payload to the worker that the
gateway's page registered. The worker shows the notification and POSTs ``received`` to the
signed ack URL, and the delivery must become acknowledged with that ack.

What the browser does not let a test prove: ``opened``. A ``notificationclick`` needs a
click on a shown notification; headless chromium shows notifications to no one and CDP has
no command that clicks one (nor dispatches the event), so the click path is not exercised
here. Also not exercised: ``pushManager.subscribe()``; headless chromium refuses it
("permission denied") and has no push service, which is why the subscription is the fake's.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from playwright.async_api import async_playwright

from tests.fakes.common import Pki
from tests.fakes.thread import LoopThread
from tests.fakes.webpush import FakePushService
from tests.http.conftest import db_rows, make_api_gateway

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def push_service(tmp_path):
    pki = Pki(tmp_path / "pki")
    thread = LoopThread()
    fake = thread.start(FakePushService(pki))
    yield pki, fake
    thread.run(fake.stop())
    thread.stop()


async def test_service_worker_shows_the_push_and_acks_it_through_the_gateway(tmp_path, push_service):
    assert shutil.which("chromium") == CHROMIUM, "Debian's chromium is required (make test installs it)"
    pki, fake = push_service
    api = make_api_gateway(tmp_path, {"bridges": {"simulation": {"enabled": False}, "mqtt": {"enabled": False},
                                                  "webpush": {"enabled": True, "allow_private_endpoints": True,
                                                              "vapid_private_key_file": str(tmp_path / "var" / "vapid.pem"),
                                                              "ca_file": str(pki.ca_file)}}},
                           users={"tech": ("technician", "tech-pw"), "web-1": ("device", "web1-pw")})
    origin = api.base
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            context = await browser.new_context()
            await context.grant_permissions(["notifications"], origin=origin)
            page = await context.new_page()
            cdp = await context.new_cdp_session(page)
            registrations: dict[str, str] = {}
            cdp.on("ServiceWorker.workerRegistrationUpdated",
                   lambda ev: registrations.update({r["scopeURL"]: r["registrationId"] for r in ev["registrations"]}))
            await cdp.send("ServiceWorker.enable")
            await page.goto(f"{origin}/web/")
            await page.evaluate("navigator.serviceWorker.ready.then(() => true)")
            registration_id = registrations[f"{origin}/web/"]
            config = await page.evaluate("homepot.config()")
            assert config["vapid_public_key"] and len(config["vapid_public_key"]) == 87

            # The page's own code registers this browser's subscription as device web-1,
            # with web-1's account (device self-service).
            sub = fake.subscribe(app_server_key=config["vapid_public_key"])
            device = await page.evaluate("([s]) => homepot.register('web-1', s, 'web-1', 'web1-pw')", [sub])
            assert device["channels"][0]["subscription"]["endpoint"] == sub["endpoint"]

            async with httpx.AsyncClient(base_url=origin, auth=("tech", "tech-pw")) as tech:
                r = await tech.post("/v1/jobs", json={
                    "job_id": "browser-1", "target": {"devices": ["web-1"]},
                    "notification": {"title": "Freezer 3", "body": "Above -15 C", "data": {"url": f"{origin}/web/"}},
                    "options": {"webpush": {"notification": {"requireInteraction": True, "tag": "freezer-3"}}}})
                assert r.status_code == 202, r.text
                for _ in range(100):
                    if fake.accepted:
                        break
                    await asyncio.sleep(0.1)
                [pushed] = fake.accepted
                payload = pushed.decoded  # what the push service decrypted: the browser's view
                assert payload["job_id"] == "browser-1" and payload["ack_url"].startswith(f"{origin}/v1/acks/")

                await cdp.send("ServiceWorker.deliverPushMessage",
                               {"origin": origin, "registrationId": registration_id, "data": json.dumps(payload)})
                state = None
                for _ in range(100):
                    state = (await tech.get("/v1/jobs/browser-1")).json()
                    if state["state"] == "acknowledged":
                        break
                    await asyncio.sleep(0.1)
                assert state["state"] == "acknowledged", state

            shown = await page.evaluate("""navigator.serviceWorker.ready.then(r => r.getNotifications()).then(ns =>
                ns.map(n => ({title: n.title, body: n.body, data: n.data, tag: n.tag,
                              requireInteraction: n.requireInteraction})))""")
            await browser.close()
    finally:
        api.close()
    assert shown == [{"title": "Freezer 3", "body": "Above -15 C", "tag": "freezer-3", "requireInteraction": True,
                      "data": {"url": f"{origin}/web/", "message_id": payload["message_id"], "job_id": "browser-1",
                               "ack_url": payload["ack_url"]}}]
    acks = db_rows(api.data_dir, "SELECT message_id, device_id, status FROM acks")
    assert acks == [(payload["message_id"], "web-1", "received")]
    assert api.gw.stop() == 0
