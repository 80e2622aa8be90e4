"""Rules as configured (errors name the rule and the key), job ids, value extraction, and
the state machine driven with explicit clocks against a real SQLite schema."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gateway.alarms import store
from gateway.alarms.engine import AlarmRow, Engine
from gateway.alarms.jobs import job_id_for
from gateway.alarms.rules import RuleSection, Template, compile_rule, key_from_level, key_level
from gateway.alarms.values import Unparseable, extract
from gateway.config import ConfigError, parse_config
from gateway import migrations
from gateway.pipeline.models import JOB_ID_RE
from gateway.storage import connect, transaction
from tests.helpers.fuzz import examples
from tests.support import base_config, bulk_register, cli, write_config

PREFIX = "homepot/site-t"
LISTENER = {"listeners": [{"name": "l", "bind": "127.0.0.1:1883"}]}


def freezer(**over) -> dict:
    rule = {"name": "freezer-high", "topic": "{prefix}/devices/+/telemetry/temp", "value": "celsius",
            "above": -15.0, "for_s": 60, "clear_at": -17.0, "key": "{device_id}",
            "target": {"segment": "technicians"}, "title": "Freezer {device_id} at {value} C",
            "body": "Above -15 C for a minute", "priority": "critical",
            "escalate": [{"after_s": 300, "target": {"segment": "shift-leads"}}]}
    rule.update(over)
    return {k: v for k, v in rule.items() if v is not None}


def problems(*rules: dict) -> list[str]:
    try:
        parse_config({"broker": LISTENER, "rules": list(rules)}, environ={})
    except ConfigError as exc:
        return exc.lines()
    return []


# ------------------------------------------------------------------ config
def test_the_contracts_example_rule_is_valid():
    cfg = parse_config({"broker": LISTENER, "rules": [freezer()]}, environ={}).config
    rule = compile_rule(cfg.rules[0], cfg.prefix)
    assert rule.topic_filter == "homepot/site-001/devices/+/telemetry/temp"
    assert rule.kind == "above" and rule.clear_at == -17.0 and rule.escalate[0].after_s == 300


@pytest.mark.parametrize("over, expected", [
    ({"above": "warm"}, "rules[freezer-high].above: Input should be a valid number"),
    ({"clear_at": -10.0}, "rules[freezer-high].clear_at: must be at or below above (-15)"),
    ({"below": -30.0}, "rules[freezer-high].below: give exactly one condition; above is already set"),
    ({"above": None, "clear_at": None}, "rules[freezer-high].above: give exactly one condition"),
    ({"above": None, "clear_at": None, "stale_s": 0}, "rules[freezer-high].stale_s: Input should be greater than 0"),
    ({"above": None, "equals": "open"}, "rules[freezer-high].clear_at: only applies to above or below"),
    ({"topic": "{prefix}/devices/+x/temp"}, "rules[freezer-high].topic: '+' must be a whole level"),
    ({"topic": "{prefix}/#/temp"}, "rules[freezer-high].topic: '#' must be a whole level and the last one"),
    ({"key": "{2}"}, "rules[freezer-high].key: {2}: the topic filter has only 1 wildcard(s)"),
    ({"key": "{value}"}, "rules[freezer-high].key: {value} is not allowed in the key"),
    ({"topic": "{prefix}/sensors/+"}, "rules[freezer-high].key: {device_id} needs a topic filter with a devices/<id>"),
    ({"title": "{temp}"}, "rules[freezer-high].title: unknown placeholder {temp}"),
    ({"body": "50 { 60"}, "rules[freezer-high].body: unmatched '{'"),
    ({"target": {"segment": "a", "all": True}}, "rules[freezer-high].target: exactly one of devices, segment, all or people"),
    ({"target": {"devices": ["ok", "not ok"]}}, "rules[freezer-high].target.devices[1]: String should match pattern"),
    ({"escalate": [{"after_s": 60, "target": {"segmnt": "x"}}]}, "rules[freezer-high].escalate[0].target.segmnt: unknown key"),
    ({"escalate": [{"after_s": -1, "target": {"all": True}}]}, "rules[freezer-high].escalate[0].after_s: Input should be greater than 0"),
    ({"for_s": -1}, "rules[freezer-high].for_s: Input should be greater than or equal to 0"),
    ({"priority": "urgent"}, "rules[freezer-high].priority: Input should be 'low', 'normal', 'high' or 'critical'"),
    ({"tll": 5}, "rules[freezer-high].tll: unknown key"),
    ({"name": "freezer/high"}, "rules[freezer/high].name: must match [A-Za-z0-9_-]{1,64}"),
    ({"value": "a..b"}, "rules[freezer-high].value: a dotted JSON field"),
])
def test_a_bad_rule_names_the_rule_and_the_key(over, expected):
    lines = problems(freezer(**over))
    assert any(line.startswith(expected) for line in lines), lines


def test_duplicate_rule_names_and_check_config_exit_2(tmp_path: Path):
    assert "rules[freezer-high].name: duplicate rule name" in problems(freezer(), freezer())
    cfg = write_config(tmp_path, base_config(tmp_path, 1883, rules=[freezer(clear_at=-12.0)]))
    res = cli(cfg, "check-config")
    assert res.returncode == 2
    assert res.stderr.startswith("rules[freezer-high].clear_at: must be at or below above (-15)")


def test_technicians_may_ack_alarms_by_default():
    cfg = parse_config({"broker": LISTENER}, environ={}).config
    for role in ("technician", "controller"):
        assert "{prefix}/alarms/+/+/ack" in cfg.broker.roles()[role].publish
    assert "{prefix}/alarms/+/+/ack" not in cfg.broker.roles()["device"].publish


# ------------------------------------------------------------------ ids, templates, keys
def test_job_ids_follow_the_contract_and_stay_within_64_characters():
    assert job_id_for("freezer-high", "fz-1", 1) == "alarm.freezer-high.fz-1.1"
    assert job_id_for("r", "homepot/site-1/devices/fz 1/temp", 12) == "alarm.r.homepot_site-1_devices_fz_1_temp.12"
    long_a = "homepot/site-001/devices/" + "x" * 80 + "/a"
    long_b = "homepot/site-001/devices/" + "x" * 80 + "/b"
    ids = {job_id_for("a" * 64, k, n) for k in (long_a, long_b) for n in (1, 2, 123456)}
    assert len(ids) == 6
    for job_id in ids:
        assert len(job_id) <= 64 and JOB_ID_RE.fullmatch(job_id)
    assert job_id_for("r", long_a, 7) == job_id_for("r", long_a, 7)
    assert job_id_for("r", long_a, 7).endswith(".7")


def test_templates_and_key_levels():
    t = Template("{{literal}} {device_id} at {value}")
    assert t.render({"device_id": "fz-1", "value": "-14"}) == "{literal} fz-1 at -14"
    assert t.fields == {"device_id", "value"}
    # A value is text, never a format string.
    assert Template("{value}").render({"value": "{0.__class__}"}) == "{0.__class__}"
    for key in ("fz-1", "homepot/site/devices/x/temp", "50%/x", ""):
        assert "/" not in key_level(key) and key_from_level(key_level(key)) == key


def test_key_templates_from_wildcards_and_device_id():
    section = RuleSection.model_validate({"name": "r", "topic": "{prefix}/devices/+/telemetry/#", "above": 1,
                                          "key": "{device_id}:{2}", "target": {"all": True}})
    rule = compile_rule(section, PREFIX)
    assert rule.key_for(f"{PREFIX}/devices/plc-7/telemetry/oven/2") == "plc-7:oven/2"
    default = compile_rule(RuleSection.model_validate({"name": "r", "topic": "x/+", "above": 1,
                                                       "target": {"all": True}}), PREFIX)
    assert default.key_for("x/y") == "x/y"


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("payload, path, numeric, expected", [
    (b"-14.5", (), True, -14.5), (b" 7 \n", (), True, 7), (b'{"celsius": -3}', ("celsius",), True, -3),
    (b'{"s": {"t": [1, "2.5"]}}', ("s", "t", "1"), True, 2.5), (b"open", (), False, "open"),
    (b'{"door": true}', ("door",), False, True),
])
def test_extract(payload, path, numeric, expected):
    assert extract(payload, path, numeric) == expected


@pytest.mark.parametrize("payload, path, numeric", [
    (b"NaN", (), True), (b"1e999", (), True), (b"1_000", (), True), (b"\xff", (), True),
    (b'{"celsius": NaN}', ("celsius",), True), (b'{"celsius": true}', ("celsius",), True),
    (b'{"c": 1}', ("celsius",), True), (b'{"celsius": null}', ("celsius",), True), (b"[1]", ("0", "x"), True),
    (b"[" * 100000, ("a",), True), (b'{"a": {}}', ("a",), False), (b"x" * 70000, (), False),
])
def test_extract_refuses_with_a_reason(payload, path, numeric):
    with pytest.raises(Unparseable) as info:
        extract(payload, path, numeric)
    assert info.value.reason


# ------------------------------------------------------------------ the state machine, with a clock
class Harness:
    """The engine and the real schema; every step commits like the service does."""

    def __init__(self, tmp_path: Path, *rules: dict):
        self.conn = connect(tmp_path / "gateway.db")
        transaction(self.conn, migrations.migrate)
        self.sections = [RuleSection.model_validate(r) for r in rules]
        self.engine = Engine([compile_rule(r, PREFIX) for r in self.sections])
        self.engine.load([], {}, 0.0, 0.0)

    def step(self, now: float, *messages: tuple[str, str], acks=()) -> list[str]:
        batch = self.engine.begin(now)
        for rule, key, episode, by in acks:
            self.engine.on_ack(batch, rule, key, episode, by)
        self.engine.on_timers(batch)
        for topic, payload in messages:
            self.engine.on_message(batch, f"{PREFIX}/{topic}", payload.encode())
        submitted = transaction(self.conn, lambda c: store.commit(c, batch))
        self.engine.merge(batch)
        return submitted

    def restart(self, now: float, downtime: float) -> None:
        rows, stats, _ = transaction(self.conn, store.load)
        self.engine = Engine([compile_rule(r, PREFIX) for r in self.sections])
        self.engine.load(rows, stats, now, downtime)

    def target(self, job_id: str) -> dict:
        row = self.conn.execute("SELECT target FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return json.loads(row[0])

    def row(self, rule: str, key: str) -> AlarmRow:
        return self.engine.rows[(rule, key)]


TEMP = {"name": "t", "topic": "{prefix}/devices/+/temp", "above": 10.0, "clear_at": 5.0, "key": "{device_id}",
        "target": {"segment": "a"}, "escalate": [{"after_s": 10, "target": {"segment": "b"}},
                                                 {"after_s": 20, "target": {"segment": "c"}}]}


def test_flapping_in_the_band_sends_nothing_and_pending_needs_the_condition_throughout(tmp_path: Path):
    h = Harness(tmp_path, {**TEMP, "for_s": 5.0})
    assert h.step(0, ("devices/d/temp", "11")) == []
    assert h.row("t", "d").state == "pending"
    assert h.step(1, ("devices/d/temp", "9")) == []  # condition gone before for_s: back to cleared
    assert h.row("t", "d").state == "cleared" and h.row("t", "d").fired_at is None
    h.step(2, ("devices/d/temp", "12"))
    assert h.step(6.9) == [] and h.step(7.0) == ["alarm.t.d.1"]
    for i, v in enumerate(("9", "11", "6", "10", "5.01")):
        assert h.step(8 + i, ("devices/d/temp", v)) == []
    assert h.row("t", "d").state == "firing"
    assert h.step(13, ("devices/d/temp", "5")) == ["alarm.t.d.2"]
    assert h.row("t", "d").state == "cleared"


def test_escalation_steps_missed_while_down_go_out_at_restart_and_acks_stop_them(tmp_path: Path):
    h = Harness(tmp_path, TEMP)
    bulk_register(tmp_path, [{"device_id": f"dev-{s}", "segment": s, "channels": [{"platform": "simulation"}]}
                             for s in "abc"])
    assert h.step(100, ("devices/d/temp", "11"), ("devices/e/temp", "11")) == ["alarm.t.d.1", "alarm.t.e.1"]
    assert h.step(105, acks=[("t", "e", None, "alice")]) == []
    assert h.row("t", "e").state == "acknowledged"
    h.restart(now=200, downtime=90)  # both steps of d are overdue; e was acknowledged
    assert h.step(200) == ["alarm.t.d.2", "alarm.t.d.3"]
    d = h.row("t", "d")
    assert d.escalation_step == 2 and d.due_at is None and d.jobs == ["alarm.t.d.1", "alarm.t.d.2", "alarm.t.d.3"]
    # Clearing reaches everyone notified: the three segments' devices, once each.
    assert h.step(201, ("devices/d/temp", "0")) == ["alarm.t.d.4"]
    assert h.target("alarm.t.d.4") == {"devices": ["dev-a", "dev-b", "dev-c"]}
    assert h.step(202, ("devices/d/temp", "50")) == ["alarm.t.d.5"]
    assert h.row("t", "d").episode == 2 and h.row("t", "d").jobs == ["alarm.t.d.5"]
    # An ack naming an earlier firing changes nothing.
    h.step(203, acks=[("t", "d", 1, "device:x")])
    assert h.row("t", "d").state == "firing"
    # This firing notified segment a only, and so does its clearing.
    assert h.step(204, ("devices/d/temp", "1")) == ["alarm.t.d.6"]
    assert h.target("alarm.t.d.6") == {"segment": "a"}


def test_stale_watch_counts_only_time_the_gateway_ran(tmp_path: Path):
    rule = {"name": "hb", "topic": "{prefix}/devices/+/hb", "stale_s": 30.0, "key": "{device_id}",
            "target": {"all": True}}
    h = Harness(tmp_path, rule)
    h.step(0, ("devices/s/hb", "x"))
    transaction(h.conn, lambda c: store.flush(c, [h.row("hb", "s")], {}, 10.0, []))
    h.restart(now=1000, downtime=990)  # down from t=10 to t=1000
    assert h.step(1019) == []
    assert h.step(1020) == ["alarm.hb.s.1"]
    row = h.row("hb", "s")
    assert row.state == "firing" and row.since == 1020


def test_counts_for_status_and_metrics(tmp_path: Path):
    h = Harness(tmp_path, TEMP)
    h.step(0, ("devices/a/temp", "11"), ("devices/b/temp", "11"), ("devices/c/temp", "junk"))
    h.step(1, acks=[("t", "b", None, "x")])
    transaction(h.conn, lambda c: store.flush(c, [], {"t": (h.engine.stats["t"].evaluated,
                                                           h.engine.stats["t"].unparseable)}, None, []))
    assert store.counts(h.conn) == {"pending": 0, "firing": 1, "acknowledged": 1, "cleared": 0,
                                    "evaluated": 2, "unparseable": 1}
    fresh = connect(tmp_path / "other.db")
    assert store.counts(fresh)["firing"] == 0


# ------------------------------------------------------------------ CLI refusals (no daemon needed)
def test_cli_ack_refuses_unknown_rules_and_alarms(tmp_path: Path, monkeypatch):
    from gateway.cli import app

    cfg = write_config(tmp_path, base_config(tmp_path, 1883, rules=[TEMP]))
    runner = CliRunner()
    res = runner.invoke(app, ["--config", str(cfg), "alarms", "ack", "nope", "d"])
    assert res.exit_code == 2 and "RULE: no rule 'nope'" in res.output
    res = runner.invoke(app, ["--config", str(cfg), "alarms", "ack", "t", "d"])
    assert res.exit_code == 1 and "KEY: no alarm 'd' of rule 't'" in res.output
    h = Harness(tmp_path / "var", TEMP)
    h.step(0, ("devices/d/temp", "11"))
    h.step(1, ("devices/d/temp", "0"))
    res = runner.invoke(app, ["--config", str(cfg), "alarms", "ack", "t", "d"])
    assert res.exit_code == 1 and "is cleared, not firing" in res.output
    res = runner.invoke(app, ["--config", str(cfg), "alarms", "list"])
    assert res.exit_code == 0 and res.output.startswith("t\td\tcleared\tvalue=0\t")


def test_a_batch_that_cannot_be_committed_changes_nothing_and_fires_once_later(tmp_path: Path):
    h = Harness(tmp_path, {**TEMP, "for_s": 5.0})
    h.step(0, ("devices/d/temp", "11"))
    readonly = connect(tmp_path / "gateway.db", readonly=True)
    batch = h.engine.begin(6.0)
    h.engine.on_timers(batch)
    assert [plan.kind for _, plan in batch.jobs] == ["fire"]
    with pytest.raises(sqlite3.OperationalError):
        transaction(readonly, lambda c: store.commit(c, batch))  # e.g. a full disk
    h.engine.discard(batch)
    row = h.row("t", "d")
    assert row.state == "pending" and row.jobs == [] and row.seq == 0
    assert h.engine.next_due() == 5.0  # the timer is back
    assert h.step(7.0) == ["alarm.t.d.1"]
    assert h.step(8.0) == [] and h.row("t", "d").state == "firing"
    rows, _, _ = transaction(h.conn, store.load)
    assert [(r.state, r.jobs) for r in rows] == [("firing", ["alarm.t.d.1"])]


@settings(max_examples=examples(500), deadline=None)
@given(payload=st.binary(max_size=200) | st.text(max_size=60).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "0"]),
                                                                                   inner, max_size=3),
                      max_leaves=10).map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from([(), ("a",), ("a", "b"), ("a", "0"), ("0",)]), numeric=st.booleans())
def test_extract_returns_a_value_of_the_right_kind_or_says_why(payload: bytes, path, numeric: bool):
    try:
        value = extract(payload, path, numeric)
    except Unparseable as exc:
        assert exc.reason
        return
    if numeric:
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        assert isinstance(value, (str, int, float, bool))
