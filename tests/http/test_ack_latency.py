"""Ack latency is counted from the send: a simulated fleet whose devices take 200 ms to
receive a notification (and ack with the time they received it) reads about 200 ms in
``jobs show``, ``/metrics`` and the operator page's API, not 0 ms."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.http.conftest import ApiGateway, db_rows, make_api_gateway, wait_until
from tests.support import bulk_register, cli

LATENCY_MS = 200
DEVICES = 20
# The device stamps its ack when the simulated 200 ms are over; the send started before
# that, so the true latency is a little over 200 ms (the event loop's lag on a busy box).
LOW, HIGH = LATENCY_MS - 5, LATENCY_MS + 400


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[ApiGateway]:
    a = make_api_gateway(tmp_path, {"bridges": {"simulation": {"latency_ms": LATENCY_MS, "ack": True}}},
                         start=False)
    bulk_register(tmp_path / "var", [{"device_id": f"plc-{i:02}", "channels": [{"platform": "simulation"}]}
                                     for i in range(DEVICES)])
    a.gw.start()
    yield a
    a.close()
    a.gw.kill()
    if a.gw.notify:
        a.gw.notify.close()


def test_ack_latency_of_a_200_ms_fleet_reads_200_ms_everywhere(gw: ApiGateway):
    tech = gw.client("tech")
    r = tech.post("/v1/jobs", json={"job_id": "lat-1", "target": {"all": True}, "notification": {"title": "t"}})
    assert r.status_code == 202, r.text
    wait_until(lambda: gw.client("mon").get("/v1/jobs/lat-1").json()["state"] == "acknowledged", timeout=30)

    # The stored times: the send is before its ack.
    for sent_at, acked_at in db_rows(gw.data_dir, "SELECT sent_at, acked_at FROM deliveries WHERE job_id = 'lat-1'"):
        assert sent_at < acked_at, (sent_at, acked_at)

    # jobs show: every device's latency, as JSON and as text.
    shown = cli(gw.config, "jobs", "show", "lat-1", "--deliveries", "--json")
    assert shown.returncode == 0, shown.stderr
    latencies = [d["latency_ms"] for d in json.loads(shown.stdout)["deliveries"]]
    assert len(latencies) == DEVICES and all(LOW <= v <= HIGH for v in latencies), latencies
    text = cli(gw.config, "jobs", "show", "lat-1", "--deliveries")
    assert text.returncode == 0, text.stderr
    shown_ms = [int(m) for m in re.findall(r"latency=(\d+)ms", text.stdout)]
    assert len(shown_ms) == DEVICES and all(LOW <= v <= HIGH for v in shown_ms), text.stdout

    # /metrics: the histogram's sum over its count.
    families = {f.name: f for f in text_string_to_metric_families(gw.client().get("/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for s in families["homepot_ack_latency_seconds"].samples}
    count = samples[("homepot_ack_latency_seconds_count", (("app", ""), ("platform", "simulation"),))]
    total = samples[("homepot_ack_latency_seconds_sum", (("app", ""), ("platform", "simulation"),))]
    assert count == DEVICES and LOW / 1000 <= total / count <= HIGH / 1000, (count, total)
    below = samples[("homepot_ack_latency_seconds_bucket", (("app", ""), ("le", "0.1"), ("platform", "simulation")))]
    assert below == 0, samples  # none in the fast buckets

    # The operator page's API: the job's latency summary and its deliveries.
    job = gw.client("mon").get("/ui/api/jobs/lat-1").json()
    latency = job["latency"]
    assert latency["count"] == DEVICES, latency
    for key in ("mean_ms", "p50_ms", "p95_ms", "max_ms"):
        assert LOW <= latency[key] <= HIGH, (key, latency)
    rows = gw.client("mon").get("/ui/api/jobs/lat-1/deliveries").json()["deliveries"]
    assert len(rows) == DEVICES and all(LOW <= d["latency_ms"] <= HIGH for d in rows), rows
