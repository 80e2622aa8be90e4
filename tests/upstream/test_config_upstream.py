"""``[upstream]`` keys: plaintext refused unless allowed (issue 15.7), overflow, max_inflight."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.mqtt import ConnectionSettings
from gateway.upstream.connection import explain
from tests.support import base_config, cli, free_port, write_config


def config(tmp_path: Path, **upstream: Any):
    secret = tmp_path / "cloud.password"
    secret.write_text("s3cret\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    section = {"url": "mqtt://cloud.example.com:1883", "username": "gw"}
    section.update({k: (str(secret) if v == "SECRET" else str(ca) if v == "CA" else v) for k, v in upstream.items()})
    return base_config(tmp_path, free_port(), upstream=section)


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, environ={})
    return err.value.problems


def test_a_password_over_plain_mqtt_is_refused_naming_the_key(tmp_path: Path):
    assert problems(config(tmp_path, password_file="SECRET")) == [(
        "upstream.password_file",
        "a password over mqtt:// is sent in clear; use mqtts:// (or wss://) or set upstream.allow_plaintext = true")]
    # ws:// is as plain as mqtt://
    assert [k for k, _ in problems(config(tmp_path, url="ws://cloud.example.com:80", password_file="SECRET"))] == [
        "upstream.password_file"]


def test_allow_plaintext_accepts_it_and_tls_needs_nothing(tmp_path: Path):
    cfg, secrets = parse_config(config(tmp_path, password_file="SECRET", allow_plaintext=True), environ={})
    assert cfg.upstream is not None and cfg.upstream.allow_plaintext
    assert secrets.upstream.password is not None and secrets.upstream.password.get_secret_value() == "s3cret"
    tls = parse_config(config(tmp_path, url="mqtts://cloud.example.com:8883", password_file="SECRET",
                              ca_file="CA"), environ={}).config
    assert tls.upstream is not None and not tls.upstream.allow_plaintext
    # no secret over plaintext: nothing to refuse (e.g. a broker on the same host)
    parse_config(config(tmp_path), environ={})


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_tls_files_with_plain_mqtt_are_refused_even_with_allow_plaintext(tmp_path: Path, key: str):
    got = problems(config(tmp_path, allow_plaintext=True, **{key: "CA"}))
    assert got == [(f"upstream.{key}", "mqtt:// does not use TLS, so this file would be ignored; use mqtts:// "
                                       "(or wss://)")]


def test_overflow_and_max_inflight_are_validated(tmp_path: Path):
    cfg = parse_config(config(tmp_path), environ={}).config
    assert cfg.upstream is not None
    assert (cfg.upstream.overflow, cfg.upstream.max_inflight, cfg.upstream.allow_plaintext) == (
        "drop-oldest", 1000, False)
    assert [k for k, _ in problems(config(tmp_path, overflow="drop-newest"))] == ["upstream.overflow"]
    assert [k for k, _ in problems(config(tmp_path, max_inflight=0))] == ["upstream.max_inflight"]
    ok = parse_config(config(tmp_path, overflow="refuse-new", max_inflight=100), environ={}).config
    assert ok.upstream is not None and ok.upstream.overflow == "refuse-new"
    env = parse_config(config(tmp_path), environ={"HOMEPOT_UPSTREAM_OVERFLOW": "refuse-new"}).config
    assert env.upstream is not None and env.upstream.overflow == "refuse-new"


def test_check_config_prints_the_key_and_exits_2(tmp_path: Path):
    path = write_config(tmp_path, config(tmp_path, password_file="SECRET"))
    res = cli(path, "check-config")
    assert res.returncode == 2
    assert ("upstream.password_file: a password over mqtt:// is sent in clear; use mqtts:// (or wss://) or set "
            "upstream.allow_plaintext = true") in res.stderr + res.stdout
    assert "s3cret" not in res.stderr + res.stdout


def test_explain_tells_a_plaintext_port_from_a_certificate_problem():
    tls = ConnectionSettings(url="mqtts://cloud.example.com:8883", client_id="gw")
    wrong_version = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    text = explain(wrong_version, tls)
    assert text.startswith("the port in upstream.url does not speak TLS (it answered in plaintext")
    untrusted = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate")
    assert explain(untrusted, tls).startswith("cannot verify the cloud broker's certificate: it is not signed by a CA")
    expired = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired")
    assert explain(expired, tls).startswith("the cloud broker's certificate has expired")
    plain = ConnectionSettings(url="mqtt://cloud.example.com:8883", client_id="gw")
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert "or the port expects TLS: use mqtts://" in explain(reset, plain)
