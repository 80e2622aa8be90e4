"""Hypothesis fuzzing of jobs, devices and acks sent over MQTT to the running daemon.

Whatever arrives, the daemon must answer every input as the contract says (a status for
a job with a readable job_id, an error on ``P/gateway/errors`` for other bad input, a
counted refusal for an ack nobody was sent), stay up, and still run a valid job
afterwards with exact counts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import cli_in_process as cli  # the operator's commands, in this process: no interpreter start each
from tests.helpers.fuzz import examples
from tests.support import MqttProbe, bulk_register

P = "homepot/site-t"

json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)

job_like = st.fixed_dictionaries({}, optional={
    "job_id": st.sampled_from(["fz-1", "fz-2", "fz.3"]) | st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
              | st.text(max_size=70) | json_values,
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
ack_like = ack_like | st.fixed_dictionaries(
    {"message_id": st.uuids().map(str), "status": st.sampled_from(["received", "opened", "failed"])},
    optional={"at": st.sampled_from(["2030-01-01T00:00:00", "2030-01-01T00:00:00Z"]), "error": st.text(max_size=20)})
device_like = st.fixed_dictionaries({}, optional={
    "device_id": st.text(max_size=20) | json_values, "segment": json_values, "tags": json_values,
    "channels": st.lists(st.fixed_dictionaries({"platform": st.sampled_from(["fcm", "apns", "mqtt", "webpush", "x"])},
                                               optional={"token": json_values, "subscription": json_values}), max_size=3) | json_values})
raw_bytes = st.binary(max_size=300)


def expected_answer(topic: str, body: bytes) -> tuple[str, str | None]:
    """What the contract says the gateway answers to one input, by the parsers' verdict:
    ("status", job_id) for a job with a readable job_id, ("status", None) for a valid job
    without one, ("error", None) for input answered on P/gateway/errors, ("ack", None) for a
    well-formed ack (stored or refused and counted), ("device", None) for a registration or
    removal that is stored."""
    from gateway.ids import is_id
    from gateway.pipeline.models import (
        DEVICE_ID_RE,
        MAX_JOB_BYTES,
        InputError,
        decode_json_object,
        parse_ack,
        parse_device,
        parse_job,
        readable_job_id,
    )

    if topic == f"{P}/jobs":
        try:
            obj = decode_json_object(body, MAX_JOB_BYTES, "job")
        except InputError:
            return "error", None
        job_id = readable_job_id(obj)
        if job_id is not None:
            return "status", job_id
        try:
            parse_job(obj)
        except InputError:
            return "error", None
        return "status", None
    device_id = topic.split("/")[3]
    if topic.endswith("/ack"):
        try:
            parse_ack(body)
        except InputError:
            return "error", None
        return "ack", None
    if not is_id(DEVICE_ID_RE, device_id):  # the topic's id: the whole pattern, and not "." or ".."
        return "error", None
    if not body:
        return "device", None
    try:
        parse_device(body, device_id)
    except InputError:
        return "error", None
    return "device", None


def test_every_fuzzed_mqtt_input_is_answered_and_the_daemon_keeps_working(gateway_factory, tmp_path: Path):
    """Each job with a readable job_id gets a status on its topic; every other bad input an
    error on P/gateway/errors naming its topic (exactly one each); every well-formed ack is
    stored or refused and counted. Then a valid job still runs with exact counts."""
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0}}})
    bulk_register(tmp_path / "var", [{"device_id": f"d{i}", "channels": [{"platform": "simulation"}]} for i in range(5)])
    probe = MqttProbe(gw.port, [f"{P}/jobs/+/status", f"{P}/gateway/errors"])
    topics = st.sampled_from([f"{P}/jobs", f"{P}/devices/d1/ack", f"{P}/devices/fz/register",
                              f"{P}/devices/d2/register", f"{P}/devices/../ack", f"{P}/devices/../register"])
    sent: list[tuple[str, bytes]] = []
    infos = []

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(topic=topics, body=st.one_of(job_like.map(json.dumps), ack_like.map(json.dumps),
                                        device_like.map(json.dumps), raw_bytes))
    # One of each kind of answer, whatever the generator draws:
    @example(topic=f"{P}/jobs", body=json.dumps({"job_id": "fz-ex", "target": {"all": True},
                                                 "notification": {"tll": 1}}))
    @example(topic=f"{P}/jobs", body=b"{not json")
    @example(topic=f"{P}/devices/d1/ack", body=json.dumps({"message_id": "00000000-0000-0000-0000-000000000000",
                                                            "status": "received"}))
    @example(topic=f"{P}/devices/fz/register",
             body=json.dumps({"device_id": "fz", "channels": [{"platform": "simulation"}]}))
    def publish(topic: str, body) -> None:
        payload = body.encode() if isinstance(body, str) else body
        sent.append((topic, payload))
        infos.append(probe.client.publish(topic, payload, qos=1))

    publish()
    for info in infos:
        info.wait_for_publish(10)
        assert info.is_published()
    expected = [expected_answer(t, b) for t, b in sent]
    errors_per_topic = Counter(t for (t, _), (kind, _) in zip(sent, expected) if kind == "error")
    job_ids = {job_id for kind, job_id in expected if kind == "status" and job_id is not None}
    anonymous_jobs = sum(1 for kind, job_id in expected if kind == "status" and job_id is None)
    well_formed_acks = sum(1 for kind, _ in expected if kind == "ack")
    assert errors_per_topic and job_ids and well_formed_acks  # the fuzz reached every branch

    def answered(msgs) -> bool:  # noqa: ANN001
        errors = Counter(json.loads(p)["topic"] for _, t, p, _ in msgs if t == f"{P}/gateway/errors")
        status_ids = {json.loads(p)["job_id"] for _, t, p, _ in msgs if t.endswith("/status") and p}
        return (all(errors[t] >= n for t, n in errors_per_topic.items()) and job_ids <= status_ids
                and len(status_ids - job_ids) >= anonymous_jobs)

    probe.wait_for(answered, timeout=60)
    msgs = probe.on("#")
    errors = [json.loads(p) for _, t, p, _ in msgs if t == f"{P}/gateway/errors"]
    assert Counter(e["topic"] for e in errors) == errors_per_topic  # exactly one answer each
    assert all(e["error"]["code"] and ":" in e["error"]["message"] for e in errors)
    from gateway.pipeline import jobs
    from gateway.storage import connect

    deadline = time.monotonic() + 30
    while True:
        conn = connect(tmp_path / "var" / "gateway.db")
        counts = jobs.counters(conn)
        conn.close()
        if counts.get("acks_refused", 0) + counts.get("acks_stored", 0) >= well_formed_acks:
            break
        assert time.monotonic() < deadline, (counts, well_formed_acks)
        time.sleep(0.1)
    assert counts.get("acks_refused", 0) + counts.get("acks_stored", 0) == well_formed_acks
    assert gw.proc.poll() is None, gw.log()[-3000:]
    res = cli(gw.config, "send", "--title", "after the storm", "--device", "d0", "--device", "d3", "--wait", "--timeout", "30")
    assert res.returncode == 0, res.stderr + gw.log()[-2000:]
    assert "targets=2" in res.stderr
    assert "handler failed" not in gw.log()  # every input was classified, none escaped as a bug
    assert "Traceback" not in gw.log()
    probe.close()
    assert gw.stop() == 0


@settings(max_examples=examples(400), deadline=None)
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
