"""Who is online: a PLC whose agent runs shows as connected (since when) in the API's Device
view, ``devices show/list``, ``status`` and ``/metrics``; killed, it shows as not connected
with the time it was last seen — instead of looking like a slow PLC.

The agent and the daemon are real processes; the CLI reads the daemon's runtime.json and
database from the test's process (tests/helpers/cli.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
from playwright.sync_api import Browser, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from tests.http.conftest import dumps, make_api_gateway, wait_until
from tests.helpers.browser import FLAGS, HEADLESS_SHELL, require_browser
from tests.helpers import cli_in_process as cli
from tests.support import require_tool


def connected_in_segment(api, segment: str) -> float | None:
    for f in text_string_to_metric_families(api.client().get("/metrics").text):
        for s in f.samples:
            if s.name == "homepot_devices_connected" and s.labels.get("segment") == segment:
                return s.value
    return None


def page_online(browser: Browser, api) -> dict[str, str]:
    """The operator page's Devices tab, in chromium (a new context: a fresh login): the
    "Connected" cell's badge per device."""
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        page.goto(api.base + "/")
        page.get_by_label("User name").fill("tech")
        page.get_by_label("Password").fill("tech-pw")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_selector("body[data-ready=true]", state="attached")
        # The bridges' counters say since when they count (the gateway's start).
        expect(page.locator("#now-bridges thead")).to_contain_text("Sent since ")
        page.get_by_role("tab", name="Devices").click()
        rows = page.locator("#dev-table tbody tr[data-device]")
        expect(rows).to_have_count(2)
        return {rows.nth(i).get_attribute("data-device"): rows.nth(i).locator("td.online .badge").inner_text()
                for i in range(2)}
    finally:
        ctx.close()


@pytest.mark.slow
def test_an_agent_connecting_and_killed_shows_in_api_cli_status_and_metrics(tmp_path):
    api = make_api_gateway(tmp_path)
    agent = None
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=require_browser(HEADLESS_SHELL), args=FLAGS)
        tech = api.client("tech")
        for device_id in ("plc-1", "plc-8"):
            r = tech.put(f"/v1/devices/{device_id}", content=dumps(
                {"device_id": device_id, "segment": "plcs", "channels": [{"platform": "mqtt"}]}))
            assert r.status_code in (200, 201), r.text
        never = tech.get("/v1/devices/plc-8").json()["presence"]
        assert never == {"connected": False, "since": None, "last_seen": None}

        agent = subprocess.Popen([require_tool("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(api.port),
                                  "-u", "plc-1", "-P", "plc1-pw", "-i", "plc-1-agent", "-q", "1",
                                  "-t", "homepot/site-t/devices/plc-1/notify"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        up = wait_until(lambda: (p := tech.get("/v1/devices/plc-1").json()["presence"])["connected"] and p, timeout=15)
        assert up["since"] and up["last_seen"], up
        assert tech.get("/v1/devices/plc-8").json()["presence"]["connected"] is False
        listed = {d["device_id"]: d["presence"] for d in tech.get("/v1/devices").json()}
        assert listed["plc-1"]["connected"] is True and listed["plc-8"]["connected"] is False
        assert connected_in_segment(api, "plcs") == 1.0
        assert page_online(browser, api) == {"plc-1": "connected", "plc-8": "not connected"}

        def cli_presence() -> dict:
            r = cli(api.config, "devices", "show", "plc-1", "--json")
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)["presence"]

        assert wait_until(lambda: cli_presence()["connected"], timeout=15)  # runtime.json: every 2 s
        r = cli(api.config, "devices", "show", "plc-1")
        assert re.search(r"^presence:\s+connected since ", r.stdout, re.M), r.stdout
        r = cli(api.config, "status", "--json")
        assert json.loads(r.stdout)["broker"]["devices_connected"] == 1, r.stdout

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        down = wait_until(lambda: (p := tech.get("/v1/devices/plc-1").json()["presence"])["connected"] is False and p,
                          timeout=15)
        assert down["last_seen"] and down["last_seen"] >= up["since"], down
        assert connected_in_segment(api, "plcs") == 0.0
        assert page_online(browser, api) == {"plc-1": "not connected", "plc-8": "not connected"}
        wait_until(lambda: cli_presence()["connected"] is False, timeout=15)
        r = cli(api.config, "devices", "list")
        lines = r.stdout.splitlines()
        assert lines[0].split()[-1] == "CONNECTED", r.stdout
        assert [ln.split()[-1] for ln in lines if ln.split()[:1] == ["plc-1"]] == ["no"], r.stdout
        r = cli(api.config, "devices", "show", "plc-1")
        assert re.search(r"^presence:\s+not connected \(last seen ", r.stdout, re.M), r.stdout
        r = cli(api.config, "status", "--json")
        assert json.loads(r.stdout)["broker"]["devices_connected"] == 0
    finally:
        pw.stop()
        if agent is not None and agent.poll() is None:
            agent.kill()
        api.close()
        api.gw.kill()
