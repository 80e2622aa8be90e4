"""``GET /metrics`` follows the Prometheus conventions, checked by Prometheus' own linter
(``promtool check metrics``) on a live scrape of the real daemon with everything that exports
series: the embedded broker, the pipeline, a push bridge (FCM, against the strict fake) that
throttles once, the cloud link (Mosquitto over TLS) and a firing alarm, after some traffic.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.common import Pki
from tests.fakes.fcm import FakeFcm
from tests.fakes.thread import LoopThread
from tests.http.conftest import dumps, make_api_gateway, wait_until
from tests.support import MqttProbe, require_tool
from tests.upstream.cloud import Cloud

FCM_OK = "fcm-token-ok-" + "a" * 30
FCM_QUOTA = "fcm-token-quota-" + "b" * 30
RULE = {"name": "freezer-high", "topic": "{prefix}/devices/+/telemetry/temp", "above": -15.0,
        "key": "{device_id}", "target": {"segment": "techs"}, "title": "Freezer {device_id} at {value} C"}
QUIET_RULE = {"name": "door-open", "topic": "{prefix}/devices/+/telemetry/door", "equals": "open",
              "key": "{device_id}", "target": {"segment": "techs"}, "title": "Door {device_id}"}


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_live_scrape_passes_promtool_and_has_the_series_alerts_need(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    pki = Pki(tmp_path / "pki")
    loop = LoopThread()
    fcm = loop.start(FakeFcm(pki))
    cloud = Cloud(tmp_path / "cloud").start()
    (tmp_path / "sa.json").write_text(json.dumps(fcm.service_account()))
    extra = {"dispatch": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0},
             "bridges": {"simulation": {"enabled": True, "latency_ms": 0},
                         "fcm": {"enabled": True, "service_account_file": str(tmp_path / "sa.json"),
                                 "endpoint": fcm.endpoint, "ca_file": str(pki.ca_file)}},
             "upstream": cloud.upstream_section(), "rules": [RULE, QUIET_RULE]}
    api = make_api_gateway(tmp_path, extra)
    try:
        # Before any traffic: the series an alert reads exist, at 0.
        first = samples_of(api.client().get("/metrics").text)
        assert first[("homepot_queue_depth", (("app", ""), ("platform", "fcm"),))] == 0.0
        assert first[("homepot_deliveries", (("app", ""), ("platform", "fcm"), ("state", "queued")))] == 0.0
        assert first[("homepot_bridge_outcomes_total", (("app", ""), ("outcome", "throttled"), ("platform", "fcm")))] == 0.0
        assert first[("homepot_alarms_firing", (("rule", "freezer-high"),))] == 0.0
        assert first[("homepot_jobs", (("state", "dispatching"),))] == 0.0

        tech = api.client("tech")
        fcm.inject(FCM_QUOTA, "QUOTA_EXCEEDED", retry_after=1)
        for device_id, token in (("phone-ok", FCM_OK), ("phone-quota", FCM_QUOTA)):
            r = tech.put(f"/v1/devices/{device_id}", content=dumps(
                {"device_id": device_id, "channels": [{"platform": "fcm", "token": token}]}))
            assert r.status_code in (200, 201), r.text
        r = tech.post("/v1/jobs", content=dumps({"job_id": "m-1", "target": {"devices": ["phone-ok", "phone-quota"]},
                                                 "notification": {"title": "T", "body": "B"}}))
        assert r.status_code in (200, 201, 202), r.text
        wait_until(lambda: tech.get("/v1/jobs/m-1").json()["state"] == "completed", timeout=30)
        assert api.client().get("/v1/nope").status_code == 404
        probe = MqttProbe(api.port)
        probe.publish("homepot/site-t/devices/fz-1/telemetry/temp", "-3")
        probe.close()

        def scrape() -> str | None:
            text = api.client().get("/metrics").text
            return text if samples_of(text).get(("homepot_alarms_firing", (("rule", "freezer-high"),))) == 1.0 else None

        text = wait_until(scrape, timeout=20)
        (tmp_path / "scrape.txt").write_text(text)
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        s = samples_of(text)
        assert s[("homepot_bridge_outcomes_total", (("app", ""), ("outcome", "throttled"), ("platform", "fcm")))] == 1.0
        assert s[("homepot_bridge_outcomes_total", (("app", ""), ("outcome", "accepted"), ("platform", "fcm")))] == 2.0
        assert s[("homepot_bridge_outcomes_total", (("app", ""), ("outcome", "invalid_address"), ("platform", "fcm")))] == 0.0
        assert s[("homepot_alarms_firing", (("rule", "door-open"),))] == 0.0
        assert s[("homepot_queue_depth", (("app", ""), ("platform", "fcm"),))] == 0.0
        builds = [k for k in s if k[0] == "homepot_build_info"]
        assert len(builds) == 1 and s[builds[0]] == 1.0 and dict(builds[0][1])["version"]
        assert s[("homepot_http_request_duration_seconds_count", (("method", "POST"), ("route", "/v1/jobs")))] >= 1
        assert s[("homepot_upstream_connected", ())] == 1.0
        assert ("homepot_broker_received_bytes_total", ()) in s
    finally:
        api.close()
        api.gw.kill()
        cloud.stop()
        loop.run(fcm.stop())
        loop.stop()
