"""The Web Push service worker in a real browser (Debian's chromium, headless, over CDP: the
headless shell of the page tests shows no notifications).

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
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, CDPSession, Page, async_playwright

from tests.fakes.common import Pki
from tests.fakes.thread import LoopThread
from tests.fakes.webpush import FakePushService
from tests.helpers.browser import CHROMIUM, FLAGS, require_browser
from tests.http.conftest import db_rows, make_api_gateway
from tests.support import fill_disk, mounted_tmpfs



@dataclass
class PushPage:
    """A page in a context allowed to show notifications, with Chrome's DevTools session and
    the service-worker registrations it reports (scope URL → registration id; the id is what
    ``ServiceWorker.deliverPushMessage`` takes, as a push service's delivery would)."""

    context: BrowserContext
    page: Page
    cdp: CDPSession
    registrations: dict[str, str]


async def open_push_page(browser: Browser, origin: str, **context_options: Any) -> PushPage:
    context = await browser.new_context(**context_options)
    await context.grant_permissions(["notifications"], origin=origin)
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    registrations: dict[str, str] = {}
    cdp.on("ServiceWorker.workerRegistrationUpdated",
           lambda ev: registrations.update({r["scopeURL"]: r["registrationId"] for r in ev["registrations"]}))
    await cdp.send("ServiceWorker.enable")
    return PushPage(context, page, cdp, registrations)


# The tests and the module's browser share one event loop (Playwright's objects belong to it).
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> Browser:
    """One Chromium (and Playwright driver) for the module; each test opens a context of its
    own: a fresh profile, with its own service worker registrations, IndexedDB and
    notification permission."""
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=require_browser(CHROMIUM), args=FLAGS)
        yield b
        await b.close()


@pytest.fixture
def push_service(tmp_path):
    pki = Pki(tmp_path / "pki")
    thread = LoopThread()
    fake = thread.start(FakePushService(pki))
    yield pki, fake
    thread.run(fake.stop())
    thread.stop()


async def test_service_worker_shows_the_push_and_acks_it_through_the_gateway(tmp_path, push_service, started,
                                                                            browser):
    pki, fake = push_service
    api = webpush_gateway(tmp_path, pki, started)
    origin = api.base
    try:
        opened = await open_push_page(browser, origin)
        try:
            page, cdp, registrations = opened.page, opened.cdp, opened.registrations
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
        finally:
            await opened.context.close()
    finally:
        api.close()
    assert shown == [{"title": "Freezer 3", "body": "Above -15 C", "tag": "freezer-3", "requireInteraction": True,
                      "data": {"url": f"{origin}/web/", "message_id": payload["message_id"], "job_id": "browser-1",
                               "ack_url": payload["ack_url"]}}]
    acks = db_rows(api.data_dir, "SELECT message_id, device_id, status FROM acks")
    assert acks == [(payload["message_id"], "web-1", "received")]
    assert api.gw.stop() == 0


# ------------------------------------------------------------------ acks the gateway could not take at once
PENDING_ACKS = """() => new Promise((resolve, reject) => {
    const req = indexedDB.open('homepot-acks');
    req.onerror = () => reject(req.error);
    req.onsuccess = () => {
        const db = req.result;
        if (!db.objectStoreNames.contains('acks')) { db.close(); resolve([]); return; }
        const get = db.transaction('acks').objectStore('acks').getAll();
        get.onsuccess = () => { db.close(); resolve(get.result); };
        get.onerror = () => { db.close(); reject(get.error); };
    };
})"""


class ChromiumPage:
    """A context of the module's Chromium with the gateway's page open, its worker
    registered, device web-1 subscribed."""

    def __init__(self, api, fake, browser):
        self.api, self.fake, self.browser = api, fake, browser
        self.origin = api.base

    async def __aenter__(self) -> "ChromiumPage":
        opened = await open_push_page(self.browser, self.origin)
        self.context, self.page, self.cdp, registrations = opened.context, opened.page, opened.cdp, opened.registrations
        await self.page.goto(f"{self.origin}/web/")
        await self.page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        self.registration_id = registrations[f"{self.origin}/web/"]
        config = await self.page.evaluate("homepot.config()")
        sub = self.fake.subscribe(app_server_key=config["vapid_public_key"])
        await self.page.evaluate("([s]) => homepot.register('web-1', s, 'web-1', 'web1-pw')", [sub])
        return self

    async def __aexit__(self, *exc) -> None:
        await self.context.close()

    async def pushed(self, tech: httpx.AsyncClient, job_id: str) -> dict:
        """Send a job to web-1; the payload the push service got for it (decrypted)."""
        r = await tech.post("/v1/jobs", json={"job_id": job_id, "target": {"devices": ["web-1"]},
                                              "notification": {"title": job_id}})
        assert r.status_code == 202, r.text
        for _ in range(200):
            for p in self.fake.accepted:
                if p.decoded.get("job_id") == job_id:
                    return p.decoded
            await asyncio.sleep(0.05)
        raise AssertionError(f"{job_id} never reached the push service")

    async def deliver(self, payload: dict) -> None:
        await self.cdp.send("ServiceWorker.deliverPushMessage", {"origin": self.origin,
                                                                 "registrationId": self.registration_id,
                                                                 "data": json.dumps(payload)})

    async def pending(self) -> list[dict]:
        return await self.page.evaluate(PENDING_ACKS)

    async def wait_pending(self, predicate, timeout: float = 30) -> list[dict]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            recs = await self.pending()
            if predicate(recs):
                return recs
            assert asyncio.get_running_loop().time() < deadline, f"unsent acks never became as expected: {recs}"
            await asyncio.sleep(0.1)


def webpush_config(tmp_path, pki) -> dict:  # noqa: ANN001
    """A gateway that delivers only through Web Push, to the fake push service of ``pki``."""
    return {"bridges": {"simulation": {"enabled": False}, "mqtt": {"enabled": False},
                        "webpush": {"enabled": True, "allow_private_endpoints": True,
                                    "vapid_private_key_file": str(tmp_path / "var" / "vapid.pem"),
                                    "ca_file": str(pki.ca_file)}}}


@pytest.fixture
def started(push_service):
    """Daemons a test started; killed before the fake push service stops (a failed test's
    daemon would hold a connection to it)."""
    apis: list = []
    yield apis
    for api in apis:
        api.gw.kill()


def webpush_gateway(tmp_path, pki, started):
    api = make_api_gateway(tmp_path, webpush_config(tmp_path, pki),
                           users={"tech": ("technician", "tech-pw"), "web-1": ("device", "web1-pw")})
    started.append(api)
    return api


async def wait_acknowledged(tech: httpx.AsyncClient, job_id: str, timeout: float) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    state: dict = {}
    while asyncio.get_running_loop().time() < deadline:
        try:
            state = (await tech.get(f"/v1/jobs/{job_id}")).json()
        except httpx.HTTPError:
            state = {}
        if state.get("state") == "acknowledged":
            return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"{job_id} not acknowledged: {state}")


@pytest.mark.slow
async def test_ack_refused_with_503_on_a_full_disk_arrives_when_there_is_room(tmp_path, push_service, started, browser):
    """The gateway answers 503 + Retry-After while its disk is full: the worker keeps the ack
    (IndexedDB), waits as asked, and the delivery is acknowledged once the disk has room."""
    pki, fake = push_service
    with mounted_tmpfs(tmp_path / "var", "24m") as var:
        api = webpush_gateway(tmp_path, pki, started)
        try:
            async with ChromiumPage(api, fake, browser) as b, \
                    httpx.AsyncClient(base_url=api.base, auth=("tech", "tech-pw"), timeout=30) as tech:
                payload = await b.pushed(tech, "full-1")
                filler = fill_disk(var / "filler")
                await b.deliver(payload)
                # Refused (503) for longer than the old worker's three tries in ~6 s.
                recs = await b.wait_pending(lambda rs: rs and rs[0].get("lastStatus") == 503 and rs[0]["tries"] >= 3)
                assert json.loads(recs[0]["body"])["status"] == "received"
                assert recs[0]["nextAt"] - recs[0]["lastAt"] >= 5000  # the gateway's Retry-After: 5
                assert (await tech.get("/v1/jobs/full-1")).json()["state"] != "acknowledged"
                filler.unlink()
                await wait_acknowledged(tech, "full-1", timeout=60)
                await b.wait_pending(lambda rs: rs == [], timeout=10)
        finally:
            api.close()
        acks = db_rows(api.data_dir, "SELECT device_id, status FROM acks")
        assert acks == [("web-1", "received")]
        assert "http request not stored" in api.gw.log()  # the gateway did refuse it
        assert api.gw.stop() == 0


async def test_ack_sent_while_the_gateway_restarts_arrives_after_it_is_back(tmp_path, push_service, started, browser):
    pki, fake = push_service
    api = webpush_gateway(tmp_path, pki, started)
    try:
        async with ChromiumPage(api, fake, browser) as b, \
                httpx.AsyncClient(base_url=api.base, auth=("tech", "tech-pw"), timeout=30) as tech:
            payload = await b.pushed(tech, "restart-1")
            assert api.gw.stop() == 0  # connections are refused until it is back
            await b.deliver(payload)
            await b.wait_pending(lambda rs: rs and rs[0]["tries"] >= 3 and rs[0].get("lastStatus", 0) is None)
            api.gw.start()
            await wait_acknowledged(tech, "restart-1", timeout=60)
            await b.wait_pending(lambda rs: rs == [], timeout=10)
    finally:
        api.close()
    assert db_rows(api.data_dir, "SELECT device_id, status FROM acks") == [("web-1", "received")]
    assert api.gw.stop() == 0


async def test_page_load_sends_acks_left_unsent(tmp_path, push_service, started, browser):
    """An ack left in the worker's store (its event ran out of time) goes out when a page of
    the app loads, without a new push."""
    pki, fake = push_service
    api = webpush_gateway(tmp_path, pki, started)
    try:
        async with ChromiumPage(api, fake, browser) as b, \
                httpx.AsyncClient(base_url=api.base, auth=("tech", "tech-pw"), timeout=30) as tech:
            payload = await b.pushed(tech, "left-1")
            # What the worker leaves behind when the browser stops its event: a stored ack, due.
            await b.page.evaluate("""([url]) => new Promise((resolve, reject) => {
                const req = indexedDB.open('homepot-acks', 1);
                req.onupgradeneeded = () => req.result.createObjectStore('acks', {keyPath: 'id', autoIncrement: true});
                req.onsuccess = () => {
                    const tx = req.result.transaction('acks', 'readwrite');
                    tx.objectStore('acks').put({url, body: JSON.stringify({status: 'opened'}), created: Date.now(),
                                                tries: 5, nextAt: 0, lastStatus: 503});
                    tx.oncomplete = () => { req.result.close(); resolve(true); };
                    tx.onerror = () => reject(tx.error);
                };
            })""", [payload["ack_url"]])
            assert (await tech.get("/v1/jobs/left-1")).json()["state"] != "acknowledged"
            await b.page.reload()
            await wait_acknowledged(tech, "left-1", timeout=30)
            await b.wait_pending(lambda rs: rs == [], timeout=10)
    finally:
        api.close()
    assert db_rows(api.data_dir, "SELECT device_id, status FROM acks") == [("web-1", "opened")]
    assert api.gw.stop() == 0
