"""Hypothesis fuzzing of jobs, devices and acks sent over MQTT to the running daemon.

Whatever arrives, the daemon must stay up, keep answering, and still run a valid job
afterwards with exact counts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import MqttProbe, bulk_register, cli

P = "homepot/site-t"

json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)

job_like = st.fixed_dictionaries({}, optional={
    "job_id": st.text(max_size=70) | json_values,
    "target": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "devices": st.lists(st.text(max_size=10), max_size=3) | json_values,
        "segment": st.text(max_size=10) | json_values, "all": json_values})),
    "notification": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "title": json_values, "body": json_values, "data": st.dictionaries(st.text(max_size=5), json_values, max_size=3),
        "priority": st.sampled_from(["low", "normal", "high", "critical", "urgent"]) | json_values,
        "ttl": st.integers(-5, 10**9) | json_values, "collapse_key": json_values, "tll": json_values})),
    "options": json_values,
    "push_notification": json_values,
})
ack_like = st.fixed_dictionaries({}, optional={
    "message_id": st.uuids().map(str) | json_values, "status": st.sampled_from(["received", "opened", "bogus"]) | json_values,
    "at": st.sampled_from(["2030-01-01T00:00:00", "2030-01-01T00:00:00+05:30", "yesterday", ""]) | json_values,
    "error": json_values, "extra": json_values})
device_like = st.fixed_dictionaries({}, optional={
    "device_id": st.text(max_size=20) | json_values, "segment": json_values, "tags": json_values,
    "channels": st.lists(st.fixed_dictionaries({"platform": st.sampled_from(["fcm", "apns", "mqtt", "webpush", "x"])},
                                               optional={"token": json_values, "subscription": json_values}), max_size=3) | json_values})
raw_bytes = st.binary(max_size=300)


def test_fuzzed_mqtt_input_never_crashes_the_daemon(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0}}})
    bulk_register(tmp_path / "var", [{"device_id": f"d{i}", "channels": [{"platform": "simulation"}]} for i in range(5)])
    probe = MqttProbe(gw.port)
    topics = st.sampled_from([f"{P}/jobs", f"{P}/devices/d1/ack", f"{P}/devices/fz/register",
                              f"{P}/devices/d2/register", f"{P}/devices/../ack"])

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(topic=topics, body=st.one_of(job_like.map(json.dumps), ack_like.map(json.dumps),
                                        device_like.map(json.dumps), raw_bytes))
    def publish(topic: str, body) -> None:
        probe.client.publish(topic, body, qos=1)

    publish()
    time.sleep(1.0)
    assert gw.proc.poll() is None, gw.log()[-3000:]
    res = cli(gw.config, "send", "--title", "after the storm", "--device", "d0", "--device", "d3", "--wait", "--timeout", "30")
    assert res.returncode == 0, res.stderr + gw.log()[-2000:]
    assert "targets=2" in res.stderr
    assert "handler failed" not in gw.log()  # every input was classified, none escaped as a bug
    assert "Traceback" not in gw.log()
    probe.close()
    assert gw.stop() == 0


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(job_like.map(lambda o: json.dumps(o).encode()), ack_like.map(lambda o: json.dumps(o).encode()),
                      device_like.map(lambda o: json.dumps(o).encode()), raw_bytes))
def test_parsers_only_ever_raise_input_errors_that_name_a_field(body: bytes):
    from gateway.pipeline.models import InputError, decode_json_object, parse_ack, parse_device, parse_job

    for parse in (lambda b: parse_job(decode_json_object(b, 256 * 1024, "job")), parse_ack,
                  lambda b: parse_device(b, "fz")):
        try:
            parse(body)
        except InputError as err:
            assert err.code and err.message and ":" in err.message
