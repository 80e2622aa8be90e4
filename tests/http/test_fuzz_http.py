"""Hypothesis over every route of the HTTP API, against the real daemon: whatever the method,
path, credentials and body, every request gets an answer, never a 5xx, errors are JSON
naming a code, a 202 job is really stored, and the daemon stays healthy."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.conftest import PASSWORDS, make_api_gateway

ALLOWED = {200, 201, 202, 204, 400, 401, 403, 404, 405, 408, 413}
ROUTES = ["/healthz", "/metrics", "/", "/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/events", "/v1/devices", "/v1/people", "/v1/people/{id}",
          "/v1/devices/{id}", "/v1/acks/{id}?sig={sig}", "/web/{id}", "/{id}", "/v1/{id}/{id}"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
job_like = st.fixed_dictionaries(
    {"target": st.sampled_from([{"all": True}, {"devices": ["fz-1"]}, {"segment": "s"}, {"all": False}, {}]),
     "notification": st.dictionaries(st.sampled_from(["title", "body", "data", "priority", "ttl", "tll", "collapse_key"]),
                                     json_values, max_size=4)},
    optional={"job_id": st.text(max_size=70), "options": json_values})
device_like = st.fixed_dictionaries(
    {"device_id": st.sampled_from(["fz-1", "fz-2", "", "a b"]),
     "channels": st.lists(st.dictionaries(st.sampled_from(["platform", "token", "channel_uri", "subscription"]),
                                          json_values | st.sampled_from(["mqtt", "fcm", "webpush", "wns"]), max_size=3),
                          max_size=3)})
bodies = st.one_of(st.none(), st.binary(max_size=600), json_values.map(lambda v: json.dumps(v).encode()),
                   job_like.map(lambda v: json.dumps(v).encode()), device_like.map(lambda v: json.dumps(v).encode()),
                   st.just(b"{" * 5000))
ids = st.one_of(st.sampled_from(["fz-1", "fz-job", "00000000-0000-4000-8000-000000000000", "sw.js", "index.html"]),
                st.text(min_size=1, max_size=40))
auths = st.one_of(st.none(), st.sampled_from(["tech", "mon", "plc-1"]), st.just(("tech", "wrong")),
                  st.from_regex(r"[!-~]{1,30}", fullmatch=True).map(lambda t: f"Basic {t}"))


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory):
    a = make_api_gateway(tmp_path_factory.mktemp("fuzz"), {"bridges": {"simulation": {"latency_ms": 0}}},
                         users={k: PASSWORDS[k] for k in ("tech", "mon", "plc-1")})
    yield a
    a.close()
    a.gw.kill()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       route=st.sampled_from(ROUTES), ident=ids, sig=st.text(max_size=70), auth=auths, body=bodies,
       content_type=st.sampled_from([None, "application/json", "text/plain", "multipart/form-data; boundary=x"]))
def test_every_request_is_answered_without_a_server_error(fuzz_api, method, route, ident, sig, auth, body, content_type):
    url = fuzz_api.base + route.replace("{id}", quote(ident, safe="")).replace("{sig}", quote(sig, safe=""))
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    basic = None
    if isinstance(auth, str) and auth.startswith("Basic "):
        headers["Authorization"] = auth
    elif isinstance(auth, str):
        basic = (auth, PASSWORDS[auth][1])
    elif isinstance(auth, tuple):
        basic = auth
    with httpx.Client(timeout=15) as client:
        request = client.build_request(method, url, content=body, headers=headers)
        if basic:
            request.headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
        response = client.send(request, stream=True)  # an event stream would never end: read the head only
        try:
            assert response.status_code in ALLOWED, (method, url, response.status_code)
            if response.status_code >= 400 and method != "HEAD":
                raw = response.read()
                assert raw.startswith(b"{"), (method, url, response.status_code, raw[:200])
                error = json.loads(raw)["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
            if method == "POST" and route == "/v1/jobs" and response.status_code == 202:
                job_id = json.loads(response.read())["job_id"]
                check = client.get(f"{fuzz_api.base}/v1/jobs/{quote(job_id, safe='')}", auth=("mon", PASSWORDS["mon"][1]))
                assert check.status_code == 200
        finally:
            response.close()


def test_the_daemon_is_healthy_after_the_fuzzing(fuzz_api):
    assert fuzz_api.gw.proc.poll() is None
    assert httpx.get(f"{fuzz_api.base}/healthz").json()["status"] == "ok"
    assert "http handler failed" not in fuzz_api.gw.log()
    assert fuzz_api.gw.stop() == 0
