"""The benchmarks measure what a default install runs: the shipped dispatch settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench.pipeline_bench import DAEMON_CONFIG
from bridges.mqtt import MqttDeviceBridge
from bridges.simulation import SimulatedFleet
from bridges.webpush import WebPushBridgeImpl
from gateway.config import DispatchSection, parse_config
from tests.support import ROOT, base_config

FAN_OUT_KEYS = ("batch_size", "max_in_flight")


def test_the_fan_out_bench_runs_the_shipped_dispatch_defaults(tmp_path: Path):
    assert "dispatch" not in DAEMON_CONFIG
    bench_cfg = parse_config(base_config(tmp_path, 1883, **DAEMON_CONFIG), {}).config
    shipped = parse_config(tomllib.loads((ROOT / "config.toml").read_text()), {}).config
    defaults = DispatchSection()
    for key in FAN_OUT_KEYS:
        assert getattr(bench_cfg.dispatch, key) == getattr(shipped.dispatch, key) == getattr(defaults, key), key


def test_no_bench_overrides_the_fan_out_settings():
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text()
        for key in FAN_OUT_KEYS:
            assert f'"{key}":' not in text, f"{path.name} sets dispatch.{key}"


def test_no_bench_overrides_the_broker_limits():
    """The broker and hostile-client benches measure what a site runs: the shipped
    `[broker.limits]`, per role included."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text()
        for key in ('"limits":', "max_publish_rate", "max_packet_size", "max_sessions_per_account", "max_queued_bytes"):
            assert key not in text, f"{path.name} sets broker.limits ({key})"


def test_the_defaults_reach_the_goal_settings_and_push_platforms_stay_modest():
    # What bench/README.md measured the >= 10,000 deliveries/s goal with.
    assert DispatchSection().batch_size == 500
    assert DispatchSection().max_in_flight is None  # each bridge's own default
    assert SimulatedFleet.default_max_in_flight == MqttDeviceBridge.default_max_in_flight == 500
    assert WebPushBridgeImpl.default_max_in_flight == 200
