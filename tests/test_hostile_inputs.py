"""Hostile input on every topic the daemon consumes and every HTTP route, against the real
daemon: each input is answered (an error or a status; an HTTP code, never a 5xx or a
hang), and a legitimate job sent right after it is processed within a second.

Hostile here means what Python's parsers and the models choke on: integers beyond the
4,300-digit conversion limit, nesting deep enough to exhaust the stack or to be carried
into a platform's request, invalid UTF-8, lone surrogates, NaN and overflowing floats,
each as the whole payload or as the value of one field of an otherwise valid message.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.http.acks import AckSigner, load_or_create_secret
from tests.pipeline.test_fuzz_mqtt import expected_answer
from tests.helpers import write_accounts
from tests.support import MqttProbe, bulk_register, free_port

P = "homepot/site-t"
BIG = "1" * 4400  # over sys.get_int_max_str_digits() (4300)
FRAGMENTS = [BIG, "-" + BIG, BIG + ".5", "1e999999", "NaN", "-Infinity", '"\\ud800"',
             "[" * 40 + "1" + "]" * 40, '{"a":' * 200 + "1" + "}" * 200, "[" * 5 + BIG + "]" * 5,
             '{"x":{"y":{"z":' + BIG + "}}}"]
RAW = [BIG.encode(), b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe\x00", b"", b"null", b"1e99999", b"NaN",
       b'"\\ud800"', ("[" * 30 + "]" * 30).encode()]
RULE = {"name": "freezer", "topic": "{prefix}/devices/+/telemetry/temp", "value": "celsius", "above": -15.0,
        "key": "{device_id}", "target": {"segment": "technicians"}, "title": "Freezer {device_id} at {value} C"}
USERS = {"tech": ("technician", "tech-pw"), "plc-1": ("device", "plc1-pw")}
MID = "00000000-0000-4000-8000-000000000001"


def templates(n: int) -> dict[str, str]:
    """One valid-looking message per kind, with a ``@H@`` where the hostile fragment goes."""
    return {
        "job": json.dumps({"job_id": f"hz-{n}", "target": {"devices": ["d0"]},
                           "notification": {"title": "t", "ttl": "@H@"}}),
        "job_anon": json.dumps({"target": {"all": "@H@"}, "notification": {"title": "t"}}),
        "job_options": json.dumps({"job_id": f"hz-o{n}", "target": {"devices": ["d0"]},
                                   "notification": {"title": "t"}, "options": {"apns": {"aps": "@H@"}}}),
        "ack": json.dumps({"message_id": "@H@", "status": "received"}),
        "ack_at": json.dumps({"message_id": MID, "status": "opened", "at": "@H@"}),
        "device": json.dumps({"device_id": "hz-dev", "channels": [{"platform": "simulation"}], "tags": "@H@"}),
        "alarm_ack": json.dumps({"by": "@H@", "note": "n"}),
        "telemetry": json.dumps({"celsius": "@H@"}),
    }


def body_of(kind: str, fragment: str | None, raw: bytes | None, n: int) -> bytes:
    if raw is not None:
        return raw
    assert fragment is not None
    return templates(n)[kind].replace('"@H@"', fragment).encode()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One daemon with everything that consumes input: the pipeline, an alarm rule, the
    HTTP API and an upstream link (to a plain Mosquitto standing in for the cloud)."""
    from tests.support import GatewayProcess, Mosquitto, base_config, write_config

    tmp = tmp_path_factory.mktemp("hostile")
    cloud = Mosquitto(tmp, free_port()).start()
    port, http_port = free_port(), free_port()
    data = base_config(tmp, port, http={"bind": f"127.0.0.1:{http_port}"}, rules=[RULE],
                       upstream={"url": f"mqtt://127.0.0.1:{cloud.port}", "allow_plaintext": True},
                       bridges={"simulation": {"latency_ms": 0}})
    cfg = write_config(tmp, data)
    write_accounts(tmp / "var" / "passwd", USERS)
    bulk_register(tmp / "var", [{"device_id": f"d{i}", "channels": [{"platform": "simulation"}]} for i in range(3)])
    gw = GatewayProcess(cfg, tmp).start()
    local = MqttProbe(port, [f"{P}/jobs/+/status", f"{P}/gateway/errors"])
    remote = MqttProbe(cloud.port)
    base = f"http://127.0.0.1:{http_port}"
    signer = AckSigner(load_or_create_secret(tmp / "var" / "ack_secret"), base)

    class Site:
        pass

    s = Site()
    s.gw, s.local, s.remote, s.base, s.signer, s.tmp = gw, local, remote, base, signer, tmp  # type: ignore[attr-defined]
    s.counter = itertools.count()  # type: ignore[attr-defined]
    s.expected_errors = Counter()  # type: ignore[attr-defined]
    s.expected_status = set()  # type: ignore[attr-defined]
    yield s
    local.close()
    remote.close()
    gw.kill()
    cloud.stop()


def legit_job_is_processed_within_a_second(s: Any, via: str) -> float:
    """Send a valid job (on the local broker, the cloud link or HTTP) and return how long
    it took until its status was published locally or the API stored it."""
    job_id = f"legit-{next(s.counter)}"
    body = json.dumps({"job_id": job_id, "target": {"devices": ["d1"]}, "notification": {"title": "after"}})
    t0 = time.monotonic()
    if via == "http":
        r = httpx.post(f"{s.base}/v1/jobs", content=body, auth=("tech", "tech-pw"), timeout=5)
        assert r.status_code == 202, r.text
        return time.monotonic() - t0
    (s.remote if via == "upstream" else s.local).publish(f"{P}/jobs", body)
    topic = f"{P}/jobs/{job_id}/status"
    s.local.wait_for(lambda msgs: any(t == topic for _, t, _, _ in msgs), timeout=10)
    arrived = min(at for at, t, _, _ in s.local.on(topic))
    return arrived - t0


FLOW_S = 1.0
TRIES = 3


def assert_flows(s: Any, via: str, send_hostile: Any, what: Any) -> None:
    """A valid job right after the hostile input is processed within FLOW_S.

    A hostile input that stalls the gateway does so every time it is sent; a shared, loaded
    test machine stalls now and then on its own. So a pair over the bar is sent again, up
    to TRIES times in all, and the input fails only if every try was over the bar, unless
    the same job *alone* (measured then, twice, the faster counts) also takes half the bar
    or more: then the bar is twice that. The stall this guards against (a message held and
    redelivered after a doubling reconnect pause) takes ten seconds and more."""
    times = []
    for _ in range(TRIES):
        send_hostile()
        times.append(legit_job_is_processed_within_a_second(s, via))
        if times[-1] < FLOW_S:
            return
    alone = min(legit_job_is_processed_within_a_second(s, via) for _ in range(2))
    assert alone >= FLOW_S / 2 and min(times) < 2 * alone, (what, via, times, f"alone {alone:.2f} s")


MQTT_TOPICS = {  # topic -> (template kind, where a legit job then goes)
    f"{P}/jobs": ["job", "job_anon", "job_options"],
    f"{P}/devices/hz-dev/register": ["device"],
    f"{P}/devices/d0/ack": ["ack", "ack_at"],
    f"{P}/alarms/freezer/d0/ack": ["alarm_ack"],
    f"{P}/devices/d0/telemetry/temp": ["telemetry"],
    "upstream:" + f"{P}/jobs": ["job", "job_anon", "job_options"],
    "upstream:" + f"{P}/devices/hz-dev/register": ["device"],
}


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(where=st.sampled_from(sorted(MQTT_TOPICS)), pick=st.integers(0, 2),
       fragment=st.sampled_from(FRAGMENTS), raw=st.none() | st.sampled_from(RAW))
@example(where=f"{P}/devices/d0/ack", pick=0, fragment=BIG, raw=None)  # the 4,400-digit ack of the report
@example(where=f"{P}/jobs", pick=0, fragment=BIG, raw=None)
@example(where=f"{P}/jobs", pick=0, fragment="NaN", raw=None)  # readable job_id: a rejected status
@example(where=f"upstream:{P}/jobs", pick=2, fragment="1e999999", raw=None)
@example(where=f"{P}/alarms/freezer/d0/ack", pick=0, fragment='"\\ud800"', raw=None)
def test_every_hostile_mqtt_message_is_answered_and_the_next_one_flows(site, where, pick, fragment, raw):
    s = site
    upstream = where.startswith("upstream:")
    topic = where.removeprefix("upstream:")
    kinds = MQTT_TOPICS[where]
    n = next(s.counter)
    body = body_of(kinds[pick % len(kinds)], fragment, raw, n)

    sends = []

    def send() -> None:
        (s.remote if upstream else s.local).publish(topic, body)
        sends.append(1)

    assert_flows(s, "upstream" if upstream else "local", send, (where, body[:80]))
    # What the contract says each send is answered with, collected and checked at the end.
    if "/alarms/" in topic:
        s.expected_errors[topic] += len(sends)  # a malformed ack, or an ack of an alarm not firing
    elif not topic.endswith("/telemetry/temp"):
        kind, job_id = expected_answer(topic, body)
        if kind == "error":
            s.expected_errors[topic] += len(sends)
        elif kind == "status" and job_id is not None:
            s.expected_status.add(job_id)


def test_every_hostile_mqtt_message_was_answered(site):
    s = site
    assert s.expected_errors and s.expected_status  # the hostile inputs reached both kinds of answer

    def answered(msgs: Any) -> bool:
        errors = Counter(json.loads(p)["topic"] for _, t, p, _ in msgs if t == f"{P}/gateway/errors")
        statuses = {t.split("/")[3] for _, t, p, _ in msgs if t.endswith("/status") and p}
        return all(errors[t] >= n for t, n in s.expected_errors.items()) and s.expected_status <= statuses

    s.local.wait_for(answered, timeout=30)
    log = s.gw.log()
    assert "message set aside: its handler failed" not in log and "Traceback" not in log, log[-3000:]  # every input was classified
    # ...and the daemon reports it so: nothing set aside on either MQTT link.
    snap = json.loads((s.tmp / "var" / "runtime.json").read_text())
    assert snap["set_aside"] == {"counts": {"broker": 0, "upstream": 0}, "recent": []}


HTTP = [("POST", "/v1/jobs"), ("PUT", "/v1/devices/hz-http"), ("POST", "/v1/acks/{mid}?sig={sig}"),
        ("OPTIONS", "/v1/acks/{h}"), ("POST", "/ui/api/jobs"), ("POST", "/ui/api/alarms/ack"), ("POST", "/ui/login"),
        ("POST", "/ui/logout"), ("GET", "/v1/jobs/{h}"), ("GET", "/v1/jobs/{h}/events"), ("GET", "/v1/devices/{h}"),
        ("DELETE", "/v1/devices/{h}"), ("GET", "/v1/jobs?limit={h}"), ("GET", "/v1/devices?limit={h}"),
        ("GET", "/ui/api/devices?prefix={h}"), ("GET", "/ui/api/jobs?before={h}"), ("GET", "/ui/api/jobs/{h}"),
        ("GET", "/ui/api/jobs/{h}/deliveries"), ("GET", "/ui/api/devices/{h}"), ("GET", "/ui/api/alarms?state={h}"),
        ("GET", "/ui/api/now"), ("GET", "/ui/api/session"), ("GET", "/ui/api/events"), ("GET", "/ui/static/{h}"),
        ("GET", "/"), ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/web/{h}"), ("GET", "/web/config.json")]


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(HTTP), kind=st.sampled_from(["job", "job_options", "device", "ack", "alarm_ack"]),
       fragment=st.sampled_from(FRAGMENTS), raw=st.none() | st.sampled_from(RAW))
@example(route=("POST", "/v1/jobs"), kind="job", fragment=BIG, raw=None)  # the report's 500
def test_every_hostile_http_request_is_answered_and_the_next_one_flows(site, route, kind, fragment, raw):
    s = site
    method, path = route
    body = body_of(kind, fragment, raw, next(s.counter))
    url = s.base + path.format(mid=MID, sig=s.signer.sign(MID), h=quote(fragment[:300], safe=""))

    def send() -> None:
        request_once(s, method, path, url, body)

    assert_flows(s, "http", send, (method, path))


def request_once(s: Any, method: str, path: str, url: str, body: bytes) -> None:
    """One request, answered with a code below 500 within the client's timeout (a hang fails)."""
    headers = {"Content-Type": "application/json", "Origin": s.base}
    with httpx.Client(timeout=10) as client:
        if path.startswith("/ui/api/"):
            login = client.post(f"{s.base}/ui/login", data={"username": "tech", "password": "tech-pw"})
            assert login.status_code in (200, 303), login.text
            headers["X-CSRF-Token"] = client.get(f"{s.base}/ui/api/session").json()["csrf"]
        auth = None if path.startswith("/ui/") else ("tech", "tech-pw")
        request = client.build_request(method, url, content=body, headers=headers)
        if auth:
            request.headers["Authorization"] = httpx.BasicAuth(*auth)._auth_header  # noqa: SLF001
        response = client.send(request, stream=True)  # an event stream never ends: its head answers
        try:
            assert response.status_code < 500, (method, path, response.status_code, response.read()[:300])
        finally:
            response.close()


def test_no_http_request_failed_inside_the_daemon(site):
    assert "http handler failed" not in site.gw.log()
    assert site.gw.proc.poll() is None


def test_ids_with_a_trailing_newline_or_dot_segments_are_refused_by_the_daemon(site):
    """`re.match` with `^...$` let "nl\\n" and "dev-z\\n" through: the job was stored (as
    rejected) and its status published on a topic ending in a newline."""
    s = site
    for job_id in ("nl\n", ".."):
        s.local.publish(f"{P}/jobs", json.dumps({"job_id": job_id, "target": {"all": True},
                                                  "notification": {"title": "t"}}))
    s.local.publish(f"{P}/devices/dev-z\n/register",
                    json.dumps({"device_id": "dev-z\n", "channels": [{"platform": "simulation"}]}))
    for device_id in ("dev-z\n", ".."):
        r = httpx.put(f"{s.base}/v1/devices/{quote(device_id, safe='')}", auth=("tech", "tech-pw"), timeout=10,
                      json={"device_id": device_id, "channels": [{"platform": "simulation"}]})
        assert r.status_code in (400, 404), (device_id, r.status_code, r.text)

    def refused(msgs: Any) -> bool:
        errors = [json.loads(p) for _, t, p, _ in msgs if t == f"{P}/gateway/errors"]
        about_jobs = [e for e in errors if e["topic"] == f"{P}/jobs" and "job_id" in e["error"]["message"]]
        return len(about_jobs) >= 2 and any(e["topic"] == f"{P}/devices/dev-z\n/register" for e in errors)

    s.local.wait_for(refused, timeout=10)
    assert not [t for _, t, _, _ in s.local.on("#") if "\n" in t.split("/")[3] and t.endswith("/status")]
    import sqlite3

    conn = sqlite3.connect(f"file:{s.tmp / 'var' / 'gateway.db'}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE job_id IN ('nl\n', '..')").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM devices WHERE device_id IN ('dev-z\n', '..')").fetchone()[0] == 0
    finally:
        conn.close()
