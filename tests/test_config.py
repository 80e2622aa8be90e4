"""Configuration (contract §4): validation names the key, env overrides, secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config, parse_config
from tests.helpers import CliResult, cli_in_process
from tests.support import ROOT, to_toml


def problems(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return info.value.lines()


def test_repo_config_is_valid_and_embedded():
    cfg = load_config(ROOT / "config.toml", environ={}).config
    assert cfg.broker.mode == "embedded"
    assert cfg.broker.listeners[0].bind == "127.0.0.1:1883"
    assert cfg.broker.listeners[0].allow_anonymous is True
    assert cfg.bridges.simulation.enabled and cfg.bridges.mqtt.enabled
    assert not cfg.bridges.fcm.enabled
    assert cfg.prefix == "homepot/site-001"


def test_unknown_key_is_named():
    lines = problems({"dispatch": {"tll": 5}, "broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]}})
    assert lines == ["dispatch.tll: unknown key"]


def test_unknown_section_and_listener_key_named():
    lines = problems({"gatewy": {}, "broker": {"listeners": [{"name": "lan", "bind": "0.0.0.0:1883", "tpye": "tcp"}]}})
    assert "gatewy: unknown key" in lines
    assert "broker.listeners[lan].tpye: unknown key" in lines


def test_bad_values_name_their_keys():
    lines = problems({
        "gateway": {"site_id": "bad site!"},
        "broker": {"mode": "cluster", "listeners": [{"name": "x", "bind": "nope"}]},
        "dispatch": {"batch_size": 0},
    })
    joined = "\n".join(lines)
    assert "gateway.site_id: must match" in joined
    assert "broker.mode:" in joined
    assert "broker.listeners[x].bind: expected HOST:PORT" in joined
    assert "dispatch.batch_size:" in joined


def test_enabled_bridge_with_missing_file_names_key(tmp_path: Path):
    # Not a reason to refuse the whole daemon: that bridge starts unhealthy (its devices
    # fall over to their next channel); check-config reports it.
    _, secrets = parse_config({
        "broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]},
        "bridges": {"apns": {"enabled": True, "team_id": "T", "key_id": "K", "topic": "com.x",
                             "key_file": str(tmp_path / "missing.p8")}},
    }, {})
    assert secrets.bridge_faults == {"apns": f"bridges.apns.key_file: file not found: {tmp_path / 'missing.p8'}"}


def _check_config(tmp_path: Path, bridges: dict) -> CliResult:
    """``check-config`` in this process: the same entry point and guard, what it loads and
    says is the point, not an interpreter start."""
    data = {"gateway": {"data_dir": str(tmp_path / "var")},
            "broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]}, "bridges": bridges}
    path = tmp_path / "config.toml"
    path.write_text(to_toml(data))
    return cli_in_process(path, "check-config")


def test_check_config_loads_push_keys_as_the_bridges_do(tmp_path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    def pem(key) -> str:
        return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()

    (tmp_path / "rsa.p8").write_text(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    (tmp_path / "sa.json").write_text(json.dumps({
        "type": "service_account", "project_id": "p", "client_email": "a@p.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
        "private_key": "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"}))
    (tmp_path / "wns-secret").write_text("\n")
    (tmp_path / "vapid.pem").write_text(pem(ec.generate_private_key(ec.SECP384R1())))
    r = _check_config(tmp_path, {
        "apns": {"enabled": True, "team_id": "T", "key_id": "K", "topic": "com.x", "key_file": str(tmp_path / "rsa.p8")},
        "fcm": {"enabled": True, "service_account_file": str(tmp_path / "sa.json")},
        "wns": {"enabled": True, "client_id": "c", "client_secret_file": str(tmp_path / "wns-secret")},
        "webpush": {"enabled": True, "vapid_private_key_file": str(tmp_path / "vapid.pem")}})
    assert r.returncode != 0
    assert r.stderr.splitlines() == [
        "bridges.fcm.service_account_file: unusable service account (ValueError)",
        "bridges.apns.key_file: not a P-256 (ES256) key",
        "bridges.wns.client_secret_file: no client secret loaded",
        "bridges.webpush.vapid_private_key_file: unusable key (ValueError)"], r.stderr
    # Good keys pass; a VAPID key not made yet is created at start, not a problem.
    (tmp_path / "good.p8").write_text(pem(ec.generate_private_key(ec.SECP256R1())))
    r = _check_config(tmp_path, {
        "apns": {"enabled": True, "team_id": "T", "key_id": "K", "topic": "com.x", "key_file": str(tmp_path / "good.p8")},
        "webpush": {"enabled": True, "vapid_private_key_file": str(tmp_path / "var" / "vapid.pem")}})
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "var" / "vapid.pem").exists()


def test_tls_listener_needs_cert():
    lines = problems({"broker": {"listeners": [{"name": "sec", "type": "tls", "bind": "127.0.0.1:8883"}]}})
    assert lines == ["broker.listeners[sec]: a tls listener needs certfile and keyfile"]


def test_embedded_needs_a_listener():
    assert problems({}) == ["broker.listeners: embedded mode needs at least one listener"]


def test_env_overrides_are_typed_and_checked():
    base = {"broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]}}
    cfg = parse_config(dict(base), {"HOMEPOT_BRIDGES_SIMULATION_ENABLED": "false",
                                    "HOMEPOT_DISPATCH_MAX_IN_FLIGHT": "7",
                                    "HOMEPOT_GATEWAY_SITE_ID": "shop-9",
                                    "HOMEPOT_GATEWAY_CONFIG": "/ignored.toml"}).config
    assert cfg.bridges.simulation.enabled is False
    assert cfg.dispatch.max_in_flight == 7
    assert cfg.prefix == "homepot/shop-9"
    assert problems(dict(base), {"HOMEPOT_DISPATCH_MAX_INFLIGHT": "7"}) == [
        "HOMEPOT_DISPATCH_MAX_INFLIGHT: unknown configuration override (no such key)"]
    assert problems(dict(base), {"HOMEPOT_DISPATCH_MAX_IN_FLIGHT": "many"})[0].startswith("dispatch.max_in_flight:")


def test_secret_files_are_read_and_never_shown(tmp_path: Path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    loaded = parse_config({"broker": {"mode": "external", "url": "mqtt://127.0.0.1:1",
                                      "username": "gw", "password_file": str(secret)}}, {})
    cfg, secrets = loaded
    assert secrets.broker.password.get_secret_value() == "hunter2-very-secret"
    assert "hunter2" not in repr(loaded) and "hunter2" not in str(cfg.model_dump())
    assert "hunter2" not in cfg.model_dump_json()


def test_the_loaded_config_is_frozen_and_holds_no_secret(tmp_path: Path):
    """The file's schema is a value (a reload builds a new one); what its files hold is apart."""
    from pydantic import ValidationError

    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    cfg, secrets = parse_config({"broker": {"mode": "external", "url": "mqtt://127.0.0.1:1",
                                            "username": "gw", "password_file": str(secret)}}, {})
    with pytest.raises(ValidationError):
        cfg.logging.level = "debug"
    with pytest.raises(ValidationError):
        cfg.broker.username = "other"
    assert "password" not in type(cfg.broker).model_fields
    assert secrets.upstream.password is None and dict(secrets.bridges) == {"simulation": None, "mqtt": None}


def test_check_config_cli_exit_codes(tmp_path: Path, monkeypatch):
    good = tmp_path / "good.toml"
    good.write_text((ROOT / "config.toml").read_text())
    bad = tmp_path / "bad.toml"
    bad.write_text(to_toml({"broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]},
                            "dispatch": {"tll": 3}}))
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\n")
    for name in [n for n in os.environ if n.startswith("HOMEPOT_")]:  # no override from the caller's environment
        monkeypatch.delenv(name)
    ok = cli_in_process(good, "check-config")  # the entry point with its guard, in this process
    assert ok.returncode == 0, ok.stderr
    res = cli_in_process(bad, "check-config")
    assert res.returncode == 2
    assert res.stderr.strip() == "dispatch.tll: unknown key"
    assert "Traceback" not in res.stderr
    res = cli_in_process(broken, "check-config")
    assert res.returncode == 2 and "not valid TOML" in res.stderr and "Traceback" not in res.stderr
    res = cli_in_process(tmp_path / "nope.toml", "check-config")
    assert res.returncode == 2 and "config file not found" in res.stderr


def test_config_path_from_environment(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(to_toml({"broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]},
                             "gateway": {"site_id": "from-env"}}))
    res = subprocess.run([sys.executable, "-m", "gateway", "check-config"], capture_output=True, text=True,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOMEPOT_GATEWAY_CONFIG": str(path)})
    assert res.returncode == 0, res.stderr
    assert str(path) in res.stdout


# ------------------------------------------------------------------ env overrides typed from the schema
def test_env_overrides_follow_the_field_types():
    """Issue 9.12: a text field gets the raw string, numbers/booleans/lists are parsed."""
    base = {"broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]}}
    cfg = parse_config(dict(base), {
        "HOMEPOT_GATEWAY_SITE_ID": "1234",              # str field: the site "1234", not the integer
        "HOMEPOT_GATEWAY_TOPIC_PREFIX": "true",         # str field: the word "true"
        "HOMEPOT_GATEWAY_DATA_DIR": "/srv/gw 1",        # Path: as given, spaces included
        "HOMEPOT_BROKER_USERNAME": "007",               # leading zeros kept
        "HOMEPOT_LOGGING_FORMAT": "console",            # Literal of strings
        "HOMEPOT_BRIDGES_MQTT_QOS": "2",                # Literal[0, 1, 2]: a number
        "HOMEPOT_BRIDGES_SIMULATION_SEED": "42",        # int | None
        "HOMEPOT_BRIDGES_SIMULATION_FAIL_RATE": "0.25",
        "HOMEPOT_BRIDGES_FCM_ENABLED": "false",
        "HOMEPOT_BRIDGES_WNS_ALLOWED_HOSTS": '["notify.windows.com", "example.net"]',
        "HOMEPOT_BROKER_LISTENERS": '[{name = "env", bind = "127.0.0.1:2883", allow_anonymous = true}]',
        "HOMEPOT_BROKER_ACL": '{ops = {publish = ["#"]}}',
        "HOMEPOT_UPSTREAM_URL": "mqtts://cloud.example:8883",   # an optional section comes into being
    }).config
    assert cfg.gateway.site_id == "1234" and cfg.prefix == "true/1234"
    assert str(cfg.data_dir) == "/srv/gw 1"
    assert cfg.broker.username == "007"
    assert cfg.logging.format == "console"
    assert cfg.bridges.mqtt.qos == 2 and cfg.bridges.simulation.seed == 42
    assert cfg.bridges.simulation.fail_rate == 0.25 and cfg.bridges.fcm.enabled is False
    assert cfg.bridges.wns.allowed_hosts == ["notify.windows.com", "example.net"]
    assert [(li.name, li.bind, li.allow_anonymous) for li in cfg.broker.listeners] == [("env", "127.0.0.1:2883", True)]
    assert cfg.broker.roles()["ops"].publish == ["#"]
    assert cfg.upstream is not None and cfg.upstream.url == "mqtts://cloud.example:8883"


def test_env_overrides_that_name_no_key_or_break_a_type_are_errors():
    base = {"broker": {"listeners": [{"name": "a", "bind": "127.0.0.1:1"}]}}
    assert problems(dict(base), {"HOMEPOT_GATEWAY_SITEID": "x", "HOMEPOT_BROKER_ACL_TECHNICIAN_PUBLISH": "[]",
                                 "HOMEPOT_BROKER_LISTENERS_BIND": "127.0.0.1:5"}) == [
        "HOMEPOT_BROKER_ACL_TECHNICIAN_PUBLISH: unknown configuration override (no such key)",
        "HOMEPOT_BROKER_LISTENERS_BIND: unknown configuration override (no such key)",
        "HOMEPOT_GATEWAY_SITEID: unknown configuration override (no such key)"]
    lines = problems(dict(base), {"HOMEPOT_BRIDGES_MQTT_QOS": "high", "HOMEPOT_GATEWAY_SITE_ID": "a b"})
    assert any(line.startswith("bridges.mqtt.qos:") for line in lines), lines
    assert "gateway.site_id: must match [A-Za-z0-9_-]{1,64}" in lines


# ------------------------------------------------------------------ lookup order and the shadowed /etc file
def test_lookup_order_and_a_note_when_the_checkout_shadows_the_service(tmp_path: Path, monkeypatch):
    from gateway import config as config_mod

    etc = tmp_path / "etc" / "config.toml"
    etc.parent.mkdir()
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(config_mod, "DEFAULT_PATHS", (Path("config.toml"), etc))
    monkeypatch.delenv("HOMEPOT_GATEWAY_CONFIG", raising=False)
    assert config_mod.find_config_path(None) == Path("config.toml")     # nothing exists: the first
    etc.write_text("")
    assert config_mod.find_config_path(None) == etc and config_mod.shadow_note(None) is None
    (work / "config.toml").write_text("")
    assert config_mod.find_config_path(None) == Path("config.toml")     # the contract's order stays
    note = config_mod.shadow_note(None)
    assert note is not None and str(work / "config.toml") in note and f"--config {etc}" in note
    assert config_mod.shadow_note("x.toml") is None                     # chosen explicitly: no note
    monkeypatch.setenv("HOMEPOT_GATEWAY_CONFIG", str(etc))
    assert config_mod.find_config_path(None) == etc and config_mod.shadow_note(None) is None


def test_the_config_does_not_import_the_alarms_package():
    """``[[rules]]`` is validated from the neutral schema module; the dependency points from
    the alarms package to the configuration, never back."""
    import subprocess
    import sys

    code = ("import sys, gateway.config as c; c.parse_config({'broker': {'listeners': [{'name': 'l'}]}, "
            "'rules': []}, environ={}); "
            "print(sorted(m for m in sys.modules if m.startswith('gateway.alarms')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
