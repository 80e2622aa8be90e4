"""The HTTP API of contract §10 against the real daemon: credentials and roles, jobs, devices,
signed acks, events, errors. Independent receivers (an MQTT client, a separate SQLite
connection) check what the gateway did, not only what it answered."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http.conftest import P, ApiGateway, db_rows, dumps, error_of, job, make_api_gateway, wait_until
from tests.support import MqttProbe, job_status_from_db


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiGateway]:
    """One daemon for the module: simulation (no acks) and mqtt bridges, every role's account."""
    tmp = tmp_path_factory.mktemp("api")
    a = make_api_gateway(tmp, {"bridges": {"simulation": {"latency_ms": 0, "ack": False}}})
    yield a
    a.close()
    a.gw.kill()
    if a.gw.notify:
        a.gw.notify.close()


def test_health_and_the_index_pointer(api):
    r = api.client().get("/healthz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and set(body["checks"]) == {"loop", "database", "broker", "bridges"}
    assert error_of(api.client().get("/"))["code"] == "unauthorized"
    assert api.client("mon").get("/").json()["api"] == "/v1"
    assert api.client("plc-1").get("/").status_code == 403


def test_credentials_are_checked_and_roles_mean_what_they_mean_on_mqtt(api):
    anon = api.client().get("/v1/jobs")
    assert anon.status_code == 401 and anon.headers["www-authenticate"].startswith("Basic")
    wrong = httpx.get(f"{api.base}/v1/jobs", auth=("tech", "not-it"))
    assert wrong.status_code == 401 and error_of(wrong)["message"] == "wrong user name or password"
    unknown = httpx.get(f"{api.base}/v1/jobs", auth=("nobody", "x"))
    assert unknown.status_code == 401
    bearer = httpx.get(f"{api.base}/v1/jobs", headers={"Authorization": "Bearer abc"})
    assert bearer.status_code == 401 and "Basic" in error_of(bearer)["message"]
    garbage = httpx.get(f"{api.base}/v1/jobs", headers={"Authorization": "Basic !!!"})
    assert garbage.status_code == 401 and "base64" in error_of(garbage)["message"]
    # monitor reads, does not write; a device does neither; technician/controller/admin submit.
    assert api.client("mon").get("/v1/jobs").status_code == 200
    assert error_of(api.client("mon").post("/v1/jobs", content=dumps(job())))["code"] == "forbidden"
    assert api.client("plc-1").get("/v1/jobs").status_code == 403
    assert api.client("plc-1").post("/v1/jobs", content=dumps(job())).status_code == 403
    for user in ("tech", "ctrl", "root"):
        assert api.client(user).post("/v1/jobs", content=dumps(job(f"roles-{user}"))).status_code == 202
    assert api.client("mon").get("/v1/devices").status_code == 403


def test_a_job_is_committed_before_202_and_idempotent_by_job_id(api):
    r = api.client("tech").post("/v1/jobs", content=dumps(job("idem-1")))
    assert r.status_code == 202, r.text
    assert r.json()["job_id"] == "idem-1" and r.headers["location"] == "/v1/jobs/idem-1"
    # Another process's connection sees it the moment the answer is out.
    assert job_status_from_db(api.data_dir, "idem-1") is not None
    again = api.client("tech").post("/v1/jobs", content=dumps(job("idem-1", title="different")))
    assert again.status_code == 202 and again.json()["job_id"] == "idem-1"
    assert db_rows(api.data_dir, "SELECT COUNT(*) FROM jobs WHERE job_id = 'idem-1'") == [(1,)]
    generated = api.client("tech").post("/v1/jobs", content=dumps(job()))
    assert generated.status_code == 202 and re.fullmatch(r"[0-9a-f-]{36}", generated.json()["job_id"])
    legacy = {"job_id": "legacy-1", "name": "rollout", "target": {"all": True},
              "push_notification": {"config_url": "https://cfg/x", "version": "2.1.0"}}
    assert api.client("ctrl").post("/v1/jobs", content=dumps(legacy)).status_code == 202
    got = api.client("mon").get("/v1/jobs/legacy-1")
    assert got.status_code == 200 and got.json()["job_id"] == "legacy-1"
    listed = api.client("mon").get("/v1/jobs", params={"limit": 500}).json()
    assert {"idem-1", "legacy-1"} <= {j["job_id"] for j in listed}
    assert error_of(api.client("mon").get("/v1/jobs/nope-404"))["code"] == "not_found"
    assert error_of(api.client("mon").get("/v1/jobs", params={"limit": "x"}))["code"] == "bad_request"


def test_bad_jobs_get_the_mqtt_codes_and_messages(api):
    probe = MqttProbe(api.port, [f"{P}/jobs/+/status"])
    tech = api.client("tech")
    typo = tech.post("/v1/jobs", content=dumps({"job_id": "typo-1", "target": {"all": True},
                                                "notification": {"title": "x", "tll": 5}}))
    assert typo.status_code == 400
    assert error_of(typo) == {"code": "invalid_job", "message": "notification.tll: unknown field"}
    # The same rejection MQTT would publish, retained on the job's status topic.
    status = probe.wait_for(lambda ms: [json.loads(p) for _, t, p, _ in ms if t == f"{P}/jobs/typo-1/status"])[0]
    assert status["state"] == "rejected" and status["error"] == error_of(typo)
    probe.close()
    wrong_type = tech.post("/v1/jobs", content=dumps(job(data={"n": 5})))
    assert error_of(wrong_type)["code"] == "invalid_job" and "notification.data.n" in error_of(wrong_type)["message"]
    assert error_of(tech.post("/v1/jobs", content=b"{not json"))["code"] == "invalid_json"
    assert error_of(tech.post("/v1/jobs", content=b"[1, 2]"))["code"] == "invalid_json"
    assert error_of(tech.post("/v1/jobs", content=b""))["code"] == "invalid_json"
    big = tech.post("/v1/jobs", content=dumps(job(body="x" * 300_000)))
    assert big.status_code == 413 and error_of(big)["code"] == "too_large"
    # Stored as rejected (issue 14.5: `jobs show typo-1` explains it), never dispatched.
    assert db_rows(api.data_dir, "SELECT state, expanded FROM jobs WHERE job_id = 'typo-1'") == [("rejected", 1)]
    assert db_rows(api.data_dir, "SELECT COUNT(*) FROM deliveries WHERE job_id = 'typo-1'") == [(0,)]


def test_devices_crud_paging_and_device_self_service(api):
    tech, plc = api.client("tech"), api.client("plc-1")
    dev = {"device_id": "pos-1", "segment": "pos", "tags": ["floor-2"], "channels": [{"platform": "simulation"}]}
    created = tech.put("/v1/devices/pos-1", content=dumps(dev))
    assert created.status_code == 201, created.text
    assert created.json()["segment"] == "pos"
    assert tech.put("/v1/devices/pos-1", content=dumps(dev)).status_code == 200
    assert tech.get("/v1/devices/pos-1").json()["channels"] == [{"platform": "simulation"}]
    mismatch = tech.put("/v1/devices/pos-2", content=dumps(dev))
    assert error_of(mismatch)["code"] == "invalid_device" and "device_id" in error_of(mismatch)["message"]
    bad_channel = tech.put("/v1/devices/pos-3", content=dumps({"device_id": "pos-3", "channels": [
        {"platform": "webpush", "subscription": {"endpoint": "https://x"}}]}))
    assert error_of(bad_channel)["code"] == "invalid_device"
    assert "channels.0.webpush.subscription.keys: required" in error_of(bad_channel)["message"]
    assert error_of(tech.put("/v1/devices/bad%20id", content=dumps(dev)))["code"] == "invalid_device"
    # A device account manages its own registration, and nothing else.
    own = {"device_id": "plc-1", "channels": [{"platform": "mqtt"}]}
    assert plc.put("/v1/devices/plc-1", content=dumps(own)).status_code in (200, 201)
    assert plc.get("/v1/devices/plc-1").status_code == 200
    assert error_of(plc.put("/v1/devices/pos-1", content=dumps(dev)))["code"] == "forbidden"
    assert plc.get("/v1/devices/pos-1").status_code == 403 and plc.get("/v1/devices").status_code == 403
    # Paging through the registry.
    for i in range(5):
        tech.put(f"/v1/devices/page-{i}", content=dumps({"device_id": f"page-{i}", "channels": [{"platform": "mqtt"}]}))
    first = tech.get("/v1/devices", params={"limit": 2, "after": "page-"})
    assert [d["device_id"] for d in first.json()] == ["page-0", "page-1"]
    assert 'after=page-1' in first.headers["link"]
    assert tech.delete("/v1/devices/page-4").status_code == 204
    assert tech.get("/v1/devices/page-4").status_code == 404
    assert tech.delete("/v1/devices/page-4").status_code == 404


def test_an_mqtt_device_acks_through_its_signed_url(api):
    tech = api.client("tech")
    tech.put("/v1/devices/plc-1", content=dumps({"device_id": "plc-1", "channels": [{"platform": "mqtt"}]}))
    probe = MqttProbe(api.port, [f"{P}/devices/plc-1/notify"])
    r = tech.post("/v1/jobs", content=dumps(job("ack-1", target={"devices": ["plc-1"]})))
    assert r.status_code == 202
    envelope = probe.wait_for(lambda ms: [json.loads(p) for _, t, p, _ in ms if json.loads(p)["job_id"] == "ack-1"])[0]
    probe.close()
    mid, url = envelope["message_id"], envelope["ack_url"]
    assert re.fullmatch(rf"{re.escape(api.base)}/v1/acks/{mid}\?sig=[0-9a-f]{{64}}", url), url
    first = httpx.post(url, json={"status": "received"})
    assert first.status_code == 202, first.text
    assert first.json()["first"] is True and first.headers["access-control-allow-origin"] == "*"
    wait_until(lambda: api.client("mon").get("/v1/jobs/ack-1").json()["state"] == "acknowledged")
    second = httpx.post(url, json={"status": "opened", "at": "2030-01-01T00:00:00"})
    assert second.status_code == 202 and second.json()["first"] is False
    rows = db_rows(api.data_dir, "SELECT status, device_id FROM acks WHERE message_id = ? ORDER BY id", mid)
    assert rows == [("received", "plc-1"), ("opened", "plc-1")]
    # Forged and replayed-for-another-message signatures, an unknown message, a mismatch.
    forged = httpx.post(url[:-4] + "0000", json={"status": "received"})
    assert forged.status_code == 403 and error_of(forged)["code"] == "bad_signature"
    other = "00000000-0000-4000-8000-000000000000"
    replayed = httpx.post(f"{api.base}/v1/acks/{other}?{url.split('?')[1]}", json={"status": "received"})
    assert replayed.status_code == 403
    assert httpx.post(f"{api.base}/v1/acks/{mid}", json={"status": "received"}).status_code == 403
    secret = (api.data_dir / "ack_secret").read_bytes().strip()
    sig = hmac.new(secret, other.encode(), hashlib.sha256).hexdigest()
    unknown = httpx.post(f"{api.base}/v1/acks/{other}?sig={sig}", json={"status": "received"})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "not_found"
    assert error_of(httpx.post(url, json={"status": "read"}))["code"] == "invalid_ack"
    assert "message_id" in error_of(httpx.post(url, json={"status": "received", "message_id": other}))["message"]
    assert error_of(httpx.post(url, json={"status": "received", "extra": 1}))["message"] == "extra: unknown field"
    preflight = httpx.options(url, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    assert oct((api.data_dir / "ack_secret").stat().st_mode & 0o777) == "0o600"
    metrics = {s.name: s for f in text_string_to_metric_families(api.client().get("/metrics").text) for s in f.samples
               if s.name == "homepot_http_acks_total" and s.labels.get("result") == "bad_signature"}
    assert metrics["homepot_http_acks_total"].value >= 3
    assert secret.decode() not in api.gw.log()


def test_job_events_stream_until_final(api):
    tech = api.client("tech")
    tech.put("/v1/devices/ev-1", content=dumps({"device_id": "ev-1", "channels": [{"platform": "simulation"}]}))
    tech.post("/v1/jobs", content=dumps(job("ev-job", target={"devices": ["ev-1", "ev-missing"]})))
    events = []
    with api.client("mon").stream("GET", "/v1/jobs/ev-job/events", timeout=20) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():  # ends when the server closes the stream
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert events and all(n == "status" for n, _ in events)
    assert events[-1][1]["state"] == "completed"
    assert events[-1][1]["counts"] == {"targets": 2, "queued": 0, "sent": 1, "acknowledged": 0, "failed": 1,
                                       "expired": 0, "invalid_address": 0, "suppressed": 0}
    assert api.client("plc-1").get("/v1/jobs/ev-job/events").status_code == 403
    assert api.client("mon").get("/v1/jobs/nope/events").status_code == 404


def test_errors_for_unknown_routes_methods_and_bodies_are_json(api):
    r = api.client().get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = api.client("tech").patch("/v1/jobs")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    # A declared body over the limit is refused before a byte of it is read.
    with socket.create_connection(("127.0.0.1", api.http_port), timeout=10) as s:
        auth = base64.b64encode(b"tech:tech-pw").decode()
        s.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
                  f"Content-Length: 999999999\r\n\r\n".encode())
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and '"too_large"' in head
    assert api.client().get("/web/sw.js").headers["content-type"].startswith("text/javascript")
    assert api.client().get("/web/../gateway.db").status_code == 404


def test_metrics_are_prometheus_text_that_its_own_parser_reads(api):
    tech = api.client("tech")
    tech.put("/v1/devices/m-1", content=dumps({"device_id": "m-1", "channels": [{"platform": "simulation"}]}))
    tech.post("/v1/jobs", content=dumps(job("metrics-1", target={"devices": ["m-1"]})))
    wait_until(lambda: api.client("mon").get("/v1/jobs/metrics-1").json()["state"] == "completed")
    text = api.client().get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    for name in ("homepot_deliveries", "homepot_queue_depth", "homepot_ack_latency_seconds", "homepot_bridge_healthy",
                 "homepot_broker_clients_connected", "homepot_broker_messages_received", "homepot_http_requests",
                 "homepot_healthy", "homepot_devices", "homepot_jobs", "process_cpu_seconds",
                 "homepot_metrics_database_read_seconds"):
        assert name in families, (name, sorted(families))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    sent = db_rows(api.data_dir, "SELECT COUNT(*) FROM deliveries WHERE platform = 'simulation' AND state = 'sent'")[0][0]
    assert samples[("homepot_deliveries", (("app", ""), ("platform", "simulation"), ("state", "sent")))] == sent
    assert samples[("homepot_healthy", ())] == 1.0
    assert samples[("homepot_bridge_healthy", (("app", ""), ("platform", "simulation")))] == 1.0
    assert samples[("homepot_ack_latency_seconds_count", (("app", ""), ("platform", "mqtt")))] >= 1  # the http ack test's
    assert any(n == "homepot_http_requests_total" and dict(lb).get("route") == "/v1/jobs" for n, lb in samples)
    assert samples[("homepot_devices", ())] == db_rows(api.data_dir, "SELECT COUNT(*) FROM devices")[0][0]
    t0 = time.perf_counter()
    api.client().get("/metrics")
    assert time.perf_counter() - t0 < 2.0
