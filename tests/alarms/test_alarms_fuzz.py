"""Hypothesis over telemetry payloads, through the running daemon: every payload is
either evaluated or counted as unparseable (exactly, per rule), junk never fires an
alarm, and the daemon keeps working."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.alarms.test_alarms_daemon import P, wait_state
from tests.support import MqttProbe, bulk_register

# By construction: a number needs a digit, so digit-free junk can never be one.
finite = st.integers(-10**12, 10**12) | st.floats(-1e100, 1e100, allow_nan=False)
good_json = st.builds(lambda c, extra: json.dumps({**extra, "celsius": c}), finite,
                      st.dictionaries(st.text(max_size=5).filter(lambda k: k != "celsius"), st.integers(), max_size=2))
good_bare = st.builds(lambda n, pad: f"{pad}{json.dumps(n)}{pad}", finite, st.sampled_from(["", " ", "\n", "\t "]))
no_digits = st.text(max_size=30).filter(lambda t: not any(c.isdigit() for c in t))
junk_scalar = st.none() | st.booleans() | no_digits | st.lists(finite, max_size=2) | st.dictionaries(no_digits, finite, max_size=2)
junk_json = st.one_of(st.dictionaries(no_digits.filter(lambda k: k != "celsius"), junk_scalar, max_size=3),
                      st.builds(lambda v: {"celsius": v}, junk_scalar)).map(json.dumps)
junk_bytes = st.binary(max_size=200).filter(lambda b: not any(0x30 <= c <= 0x39 for c in b))

RULES = [
    # Any number at all fires these: so an alarm on a junk topic would show a bug.
    {"name": "json-num", "topic": "{prefix}/fuzz/+", "value": "celsius", "above": -1e300, "key": "{1}",
     "target": {"devices": ["sink"]}},
    {"name": "bare-num", "topic": "{prefix}/fuzz/+", "below": 1e300, "key": "{1}", "target": {"devices": ["sink"]}},
]


def test_fuzzed_telemetry_is_evaluated_or_counted_and_never_crashes(gateway_factory, tmp_path: Path):
    gw = gateway_factory({"rules": RULES})
    bulk_register(tmp_path / "var", [{"device_id": "sink", "channels": [{"platform": "simulation"}]}])
    probe = MqttProbe(gw.port, [f"{P}/alarms/#"])
    sent = {"good_json": 0, "good_bare": 0, "junk": 0}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(kind=st.sampled_from(["good_json", "good_bare", "junk_json", "junk_bytes"]), n=st.integers(0, 3),
           data=st.data())
    def publish(kind: str, n: int, data) -> None:
        body = data.draw({"good_json": good_json, "good_bare": good_bare, "junk_json": junk_json,
                          "junk_bytes": junk_bytes}[kind])
        topic = f"{P}/fuzz/{kind.split('_')[0]}-{n}"
        probe.publish(topic, body)  # QoS 1: PUBACKed only once evaluated
        sent["junk" if kind.startswith("junk") else kind] += 1

    publish()
    assert min(sent.values()) > 10, sent
    assert gw.proc.poll() is None, gw.log()[-3000:]
    # Still working: a new sensor's reading fires both rules.
    probe.publish(f"{P}/fuzz/after", "21.5")
    assert wait_state(probe, "bare-num", "after", "firing")["value"] == 21.5
    probe.close()
    assert gw.stop(signal.SIGTERM) == 0  # the counters are flushed on the way out

    from gateway.alarms import store
    from gateway.storage import connect

    conn = connect(tmp_path / "var" / "gateway.db")
    stats = store.rule_stats(conn)
    assert stats["json-num"] == {"evaluated": sent["good_json"],
                                 "unparseable": sent["good_bare"] + sent["junk"] + 1}
    assert stats["bare-num"] == {"evaluated": sent["good_bare"] + 1,
                                 "unparseable": sent["good_json"] + sent["junk"]}
    alarms = store.list_states(conn)
    assert not [a for a in alarms if a["key"].startswith("junk-")], alarms
    assert {a["key"] for a in alarms if a["rule"] == "json-num"} <= {f"good-{i}" for i in range(4)}
    assert all(a["state"] == "firing" for a in alarms)
    log = gw.log()
    assert "Traceback" not in log and "handler failed" not in log and "alarm evaluation failed" not in log
    # Logged once per rule and topic, not once per payload.
    assert 1 <= log.count("telemetry not evaluated") <= 2 * 12
