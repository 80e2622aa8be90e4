"""An ERROR line in the daemon's log means an operator must act. A day of ordinary use — the
operator page opened and closed in chromium while its event stream runs, API calls, a job's
event stream dropped by its client, a wrong password, an unknown route, a job and its acks —
leaves no error-level line (nor any traceback) in the log of the real daemon.
"""

from __future__ import annotations

import base64
import json
import socket
import struct

from playwright.sync_api import sync_playwright

from tests.http.conftest import dumps, job, make_api_gateway, wait_until
from tests.helpers.browser import FLAGS, HEADLESS_SHELL, require_browser

USERS = {"tech": ("technician", "tech-pw"), "mon": ("monitor", "mon-pw")}


def drop_stream(port: int, path: str, user: str, password: str) -> bytes:
    """Open an event stream, read its first bytes, then reset the connection (SO_LINGER 0),
    as a client killed mid-stream does."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nAccept: text/event-stream\r\n\r\n"
              .encode())
    got = b""
    while b"\n\n" not in got.split(b"\r\n\r\n", 1)[-1] or b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    return got


def closed_streams(api, route: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(api.client().get("/metrics").text)
               for s in f.samples if s.name == "homepot_http_requests_total"
               and s.labels.get("route") == route and s.labels.get("code") == "499")


def test_ordinary_use_logs_no_error_line(tmp_path):
    api = make_api_gateway(tmp_path, {"bridges": {"simulation": {"latency_ms": 50}}}, users=USERS)
    try:
        tech = api.client("tech")
        tech.put("/v1/devices/sim-1", content=dumps({"device_id": "sim-1", "channels": [{"platform": "simulation"}]}))
        assert tech.post("/v1/jobs", content=dumps(job("e-1", target={"devices": ["sim-1"]}))).status_code in (200, 202)
        wait_until(lambda: tech.get("/v1/jobs/e-1").json()["state"] in ("completed", "acknowledged"), timeout=20)
        head = drop_stream(api.http_port, "/v1/jobs/e-1/events", "tech", "tech-pw")
        assert b" 200 " in head.split(b"\r\n", 1)[0], head[:200]
        head = drop_stream(api.http_port, "/ui/api/events", "tech", "tech-pw")
        assert b" 200 " in head.split(b"\r\n", 1)[0], head[:200]
        assert api.client().get("/v1/no-such-route").status_code == 404
        import httpx

        assert httpx.get(api.base + "/v1/jobs", auth=("tech", "wrong"), timeout=10).status_code == 401
        assert api.client().post("/v1/acks/not-a-message?sig=x", content=b"{}").status_code in (400, 403, 404)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=require_browser(HEADLESS_SHELL), args=FLAGS)
            for _ in range(2):  # opened and closed while its event stream runs, twice
                ctx = browser.new_context(viewport={"width": 1280, "height": 900})
                ctx.set_default_timeout(20_000)
                page = ctx.new_page()
                page.goto(api.base + "/")
                page.get_by_label("User name").fill("tech")
                page.get_by_label("Password").fill("wrong-pw")
                page.get_by_role("button", name="Log in").click()
                page.get_by_label("Password").fill("tech-pw")
                page.get_by_role("button", name="Log in").click()
                page.wait_for_selector("body[data-ready=true]", state="attached")
                tech.post("/v1/jobs", content=dumps(job(target={"devices": ["sim-1"]})))  # live traffic on the stream
                page.wait_for_timeout(300)
                ctx.close()
            browser.close()
        # The daemon notices the closed pages at its next write (a keepalive at the latest).
        wait_until(lambda: closed_streams(api, "/ui/api/events") >= 3, timeout=60)
    finally:
        api.close()
    assert api.gw.stop() == 0
    lines = [json.loads(line) for line in api.gw.log().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line.get("level") in ("error", "critical")]
    assert errors == [], errors
    assert "Traceback" not in api.gw.log()
