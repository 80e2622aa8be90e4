"""One health model behind GET /healthz, /metrics and `homepot-gateway status` (contract §3, §10)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from tests.http.conftest import db_rows, make_api_gateway, wait_until
from tests.helpers import cli_in_process
from tests.support import cli


def rsa_pem(path: Path) -> Path:
    """A readable private key that is not APNs' P-256: the bridge cannot start with it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def status(cfg: Path, *extra: str) -> tuple[int, str]:
    """``homepot-gateway status`` run in the test's process (tests/helpers/cli.py): it reads
    the daemon's runtime.json and pid from outside the daemon all the same."""
    r = cli_in_process(cfg, "status", *extra)
    return r.returncode, r.stdout + r.stderr


def test_status_without_http_healthy_then_unreachable(gateway_factory, tmp_path):
    gw = gateway_factory({"bridges": {"simulation": {"latency_ms": 0}}})
    # In this process: the commands close their database connections (the read-only check
    # below would find the daemon's -wal left behind by one kept open).
    assert cli_in_process(gw.config, "devices", "add", "s-1", "--platform", "simulation").returncode == 0
    assert cli_in_process(gw.config, "send", "--title", "x", "--device", "s-1", "--wait").returncode == 0
    wait_until(lambda: (tmp_path / "var" / "runtime.json").exists())
    code, out = status(gw.config, "--json")
    assert code == 0, out
    info = json.loads(out)
    assert info["status"] == "ok" and info["broker"]["client_connected"] is True
    assert info["broker"]["clients_connected"] >= 1 and info["broker"]["sessions"] >= 1
    assert info["deliveries"]["simulation"]["acknowledged"] == 1
    assert info["bridges"]["simulation"]["healthy"] is True and info["oldest_queued_age_s"] is None
    assert info["alarms_firing"] == []  # the alarms table exists, nothing fires
    code, text = status(gw.config)
    assert code == 0 and "OK" in text and "simulation" in text
    assert gw.stop() == 0
    code, out = status(gw.config, "--json")
    assert code == 2 and json.loads(out)["reason"].startswith("the daemon stopped")
    # Read only: no -wal/-shm (nor anything else) left by the CLI after the daemon stopped
    # (a process of its own here: what it leaves behind when it exits).
    before = sorted(p.name for p in (tmp_path / "var").iterdir())
    assert cli(gw.config, "status", timeout=60).returncode == 2
    assert sorted(p.name for p in (tmp_path / "var").iterdir()) == before
    assert not any(n.endswith(("-wal", "-shm")) for n in before)


def test_a_bridge_that_cannot_start_degrades_healthz_metrics_and_status(tmp_path):
    key = rsa_pem(tmp_path / "AuthKey.p8")
    api = make_api_gateway(tmp_path, {"bridges": {"apns": {"enabled": True, "team_id": "T", "key_id": "K",
                                                           "key_file": str(key), "topic": "com.example.app"}}},
                           users={})
    try:
        r = api.client().get("/healthz")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "degraded" and body["checks"]["bridges"]["ok"] is False
        assert "apns" in body["checks"]["bridges"]["detail"] and "P-256" in body["checks"]["bridges"]["detail"]
        assert body["checks"]["broker"]["ok"] is True
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(api.client().get("/metrics").text) for s in f.samples}
        assert samples[("homepot_healthy", ())] == 0.0
        assert samples[("homepot_bridge_healthy", (("app", ""), ("platform", "apns")))] == 0.0
        assert samples[("homepot_health_check", (("check", "bridges"),))] == 0.0
        wait_until(lambda: json.loads((api.data_dir / "runtime.json").read_text())["status"] == "degraded")
        code, out = status(api.config, "--json")
        assert code == 1, out
        assert json.loads(out)["bridges"]["apns"]["healthy"] is False
        # kill -9: no "stopped" snapshot, but the pid is gone: unreachable at once.
        api.gw.proc.send_signal(signal.SIGKILL)
        api.gw.proc.wait(10)
        code, out = status(api.config, "--json")
        assert code == 2 and "not running" in json.loads(out)["reason"]
    finally:
        api.close()
        api.gw.kill()


def test_status_of_a_stuck_daemon_is_unreachable(gateway_factory, tmp_path):
    gw = gateway_factory()
    wait_until(lambda: (tmp_path / "var" / "runtime.json").exists())
    os.kill(gw.proc.pid, signal.SIGSTOP)  # the loop stops: no new snapshot
    try:
        snap = tmp_path / "var" / "runtime.json"
        data = json.loads(snap.read_text())
        data["written_at"] -= 60  # as if a minute had passed without a snapshot
        snap.write_text(json.dumps(data))
        code, out = status(gw.config, "--json")
        assert code == 2 and "old" in json.loads(out)["reason"]
    finally:
        os.kill(gw.proc.pid, signal.SIGCONT)
    wait_until(lambda: status(gw.config)[0] == 0, timeout=15)
    assert db_rows(tmp_path / "var", "SELECT COUNT(*) FROM delivery_stats")[0][0] >= 0
    assert gw.stop() == 0


def test_a_firing_alarm_shows_in_status_and_metrics(tmp_path):
    from tests.support import MqttProbe

    rule = {"name": "freezer-high", "topic": "{prefix}/devices/+/telemetry/temp", "value": "", "above": -15.0,
            "key": "{device_id}", "target": {"segment": "techs"}, "title": "Freezer {device_id} at {value} C",
            "body": "too warm"}
    api = make_api_gateway(tmp_path, {"rules": [rule]}, users={})
    try:
        probe = MqttProbe(api.port)
        probe.publish("homepot/site-t/devices/fz-1/telemetry/temp", "-3")
        probe.close()

        def firing() -> list:
            return json.loads(status(api.config, "--json")[1])["alarms_firing"]

        alarms = wait_until(firing, timeout=20)
        assert [(a["rule"], a["key"]) for a in alarms] == [("freezer-high", "fz-1")] and alarms[0]["fired_at"]
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(api.client().get("/metrics").text) for s in f.samples}
        assert samples[("homepot_alarms_firing", (("rule", "freezer-high"),))] == 1.0
        code, text = status(api.config)
        assert "alarms firing: 1" in text and "freezer-high" in text
    finally:
        api.close()
    assert api.gw.stop() == 0
