"""The daemon as a real process: readiness, systemd notify, signals, status, errors."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import trustme

from tests.conftest import needs_mosquitto_clients
from tests.support import free_port


def retained(port: int, topic: str, timeout: float = 5.0, **auth) -> bytes | None:
    """Read the retained message on ``topic`` with an independent client (paho)."""
    got: list[bytes] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    if auth:
        c.username_pw_set(auth["username"], auth["password"])
    c.on_connect = lambda cl, *_: cl.subscribe(topic, 1)
    c.on_message = lambda cl, ud, msg: got.append(msg.payload)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + timeout
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    c.disconnect()  # first: it wakes the network thread, which loop_stop() then joins at once
    c.loop_stop()
    return got[0] if got else None


def test_ready_status_and_clean_sigterm(gateway_factory):
    gw = gateway_factory()
    ready = gw.notify.messages[-1][1]
    assert ready["READY"] == "1" and "running" in ready["STATUS"]
    status = json.loads(retained(gw.port, "homepot/site-t/gateway/status"))
    assert status["state"] == "online" and status["version"] and status["started_at"].endswith("Z")

    t0 = time.monotonic()
    assert gw.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    gw.notify.wait_for("STOPPING", "1", timeout=1)
    assert "Traceback" not in gw.log()
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    assert any(line["event"] == "gateway ready" for line in lines)  # JSON logs by default


def test_sigint_stops_cleanly_and_offline_status_survives_restart(gateway_factory, tmp_path):
    gw = gateway_factory()
    assert gw.stop(signal.SIGINT) == 0
    assert "Traceback" not in gw.log()
    # Same port, new broker process: the gateway announces itself online again.
    gw.start()
    status = json.loads(retained(gw.port, "homepot/site-t/gateway/status"))
    assert status["state"] == "online"
    assert gw.stop() == 0


def test_watchdog_pings_at_half_the_interval(gateway_factory):
    gw = gateway_factory(start=False)
    gw.env["WATCHDOG_USEC"] = str(1_000_000)  # 1 s → ping every 0.5 s
    gw.start()
    gw.notify.drain(2.2)
    pings = [t for t, fields in gw.notify.messages if fields.get("WATCHDOG") == "1"]
    assert 3 <= len(pings) <= 7, pings
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert all(0.3 < g < 0.8 for g in gaps), gaps
    assert gw.stop() == 0


def test_watchdog_for_another_pid_is_ignored(gateway_factory):
    gw = gateway_factory(start=False)
    gw.env.update({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    gw.start()
    gw.notify.drain(1.0)
    assert not [f for _, f in gw.notify.messages if "WATCHDOG" in f]
    assert gw.stop() == 0


def test_port_in_use_is_one_line_and_exit_2(gateway_factory):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        gw = gateway_factory(port=port, start=False)
        gw.start(wait_ready=False)
        assert gw.wait(timeout=20) == 2
        log = gw.log()
        assert "Traceback" not in log
        assert "address already in use" in log
    finally:
        busy.close()


def test_bad_certificate_is_one_line_and_exit_2(gateway_factory, tmp_path: Path):
    cert = tmp_path / "bad.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----\n")
    port, tls_port = free_port(), free_port()
    gw = gateway_factory(port=port, start=False, extra={"broker": {
        "url": f"mqtt://127.0.0.1:{port}",
        "listeners": [
            {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True, "anonymous_role": "admin"},
            {"name": "secure", "type": "tls", "bind": f"127.0.0.1:{tls_port}", "certfile": str(cert), "keyfile": str(cert)},
        ]}})
    gw.start(wait_ready=False)
    assert gw.wait(timeout=20) == 2
    log = gw.log()
    assert "Traceback" not in log
    assert "broker.listeners[secure]: cannot load certificate" in log


def test_tls_listener_serves_with_a_real_certificate(gateway_factory, tmp_path: Path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, cafile = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(certfile))
    server.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    port, tls_port = free_port(), free_port()
    gw = gateway_factory(port=port, extra={"broker": {
        "url": f"mqtt://127.0.0.1:{port}",
        "listeners": [
            {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True, "anonymous_role": "admin"},
            {"name": "secure", "type": "tls", "bind": f"127.0.0.1:{tls_port}", "certfile": str(certfile),
             "keyfile": str(keyfile), "allow_anonymous": True, "anonymous_role": "admin"},
        ]}})
    got = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.tls_set(ca_certs=str(cafile))
    c.on_connect = lambda cl, *_: cl.subscribe("homepot/site-t/gateway/status", 1)
    c.on_message = lambda cl, ud, m: got.append(m.payload)
    c.connect("127.0.0.1", tls_port)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    c.disconnect()  # first: it wakes the network thread, which loop_stop() then joins at once
    c.loop_stop()
    assert got and json.loads(got[0])["state"] == "online"
    assert gw.stop() == 0


@needs_mosquitto_clients
def test_mosquitto_clients_work_without_credentials_on_the_default_config(gateway_factory):
    """The shipped config.toml's listener: anonymous on loopback as a technician."""
    gw = gateway_factory(extra={"broker": {"listeners": [
        {"name": "local", "type": "tcp", "bind": "127.0.0.1:0", "allow_anonymous": True, "anonymous_role": "technician"}]}},
        start=False)
    # bind to the chosen port (the fixture picked it)
    gw.data["broker"]["listeners"][0]["bind"] = f"127.0.0.1:{gw.port}"
    from tests.support import write_config
    write_config(gw.config.parent, gw.data, gw.config.name)
    gw.start()
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(gw.port), "-t", "homepot/site-t/#",
                            "-C", "2", "-W", "10", "-v"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "-t",
                          "homepot/site-t/devices/x/register", "-m", "", "-q", "1"], capture_output=True, text=True)
    assert pub.returncode == 0, pub.stderr
    out, _ = sub.communicate(timeout=15)
    assert "homepot/site-t/gateway/status" in out
    assert gw.stop() == 0


def test_external_mode_against_real_mosquitto(gateway_factory, mosquitto):
    gw = gateway_factory(port=mosquitto.port, extra={"broker": {
        "mode": "external", "url": f"mqtt://127.0.0.1:{mosquitto.port}", "listeners": []}})
    status = json.loads(retained(mosquitto.port, "homepot/site-t/gateway/status"))
    assert status["state"] == "online"
    assert gw.stop() == 0
    assert json.loads(retained(mosquitto.port, "homepot/site-t/gateway/status"))["state"] == "offline"


def test_external_mode_with_credentials(gateway_factory, tmp_path: Path):
    from tests.support import Mosquitto, require_tool

    pwfile = tmp_path / "mosq.passwd"
    subprocess.run([require_tool("mosquitto_passwd"), "-c", "-b", str(pwfile), "gw", "s3cret-pass"], check=True)
    port = free_port()
    m = Mosquitto(tmp_path, port, extra_conf=f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pwfile}\n").start()
    try:
        secret = tmp_path / "gw.pw"
        secret.write_text("s3cret-pass\n")
        gw = gateway_factory(port=port, extra={"broker": {
            "mode": "external", "url": f"mqtt://127.0.0.1:{port}", "listeners": [],
            "username": "gw", "password_file": str(secret)}})
        status = json.loads(retained(port, "homepot/site-t/gateway/status", username="gw", password="s3cret-pass"))
        assert status["state"] == "online"
        assert gw.stop() == 0
        assert "s3cret-pass" not in gw.log()
    finally:
        m.stop()


def test_external_broker_down_at_start_then_up(gateway_factory, tmp_path: Path):
    """External mode does not crash-loop when the broker is late: READY=1 follows the first
    failed attempt (not a fixed wait), the client retries with the configured backoff
    (broker.reconnect_initial_s/_max_s) and connects once the broker is up."""
    from tests.support import Mosquitto

    port = free_port()
    gw = gateway_factory(port=port, extra={"broker": {
        "mode": "external", "url": f"mqtt://127.0.0.1:{port}", "listeners": [],
        "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2}})
    assert "external broker unreachable; retrying in the background" in gw.log()  # down at start
    m = Mosquitto(tmp_path, port).start()
    try:
        deadline = time.monotonic() + 20
        status = None
        while status is None and time.monotonic() < deadline:
            status = retained(port, "homepot/site-t/gateway/status", timeout=1)
        assert status and json.loads(status)["state"] == "online"
        assert gw.stop() == 0
        assert "Traceback" not in gw.log()
    finally:
        m.stop()


def test_port_zero_listeners_are_reported_in_runtime_json_before_ready(gateway_factory, tmp_path):
    """Binding port 0 lets the kernel pick (no race between choosing a port and binding it);
    runtime.json names each port the daemon got, owner-only, by the time READY=1 is sent."""
    gw = gateway_factory({"broker": {"listeners": [
        {"name": "local", "type": "tcp", "bind": "127.0.0.1:0", "allow_anonymous": True, "anonymous_role": "admin"},
        {"name": "shop", "type": "tcp", "bind": "127.0.0.1:0", "allow_anonymous": True, "anonymous_role": "monitor"}]},
        "http": {"bind": "127.0.0.1:0"}}, start=False)
    gw.start(wait_ready=False)
    gw.notify.wait_for("READY", "1", timeout=30)
    runtime = tmp_path / "var" / "runtime.json"
    assert runtime.stat().st_mode & 0o777 == 0o600  # present, and private, at READY=1
    ports = json.loads(runtime.read_text())["ports"]
    assert set(ports["broker"]) == {"local", "shop"}
    local, shop, http = ports["broker"]["local"], ports["broker"]["shop"], ports["http"]
    assert 0 not in (local, shop, http) and len({local, shop, http}) == 3
    # The gateway's own client found its listener (the url said port 0): it announced itself.
    assert json.loads(retained(local, "homepot/site-t/gateway/status"))["state"] == "online"
    assert json.loads(retained(shop, "homepot/site-t/gateway/status"))["state"] == "online"
    import httpx

    assert httpx.get(f"http://127.0.0.1:{http}/healthz", timeout=30).status_code in (200, 503)
    gw.read_ports()
    assert (gw.port, gw.http_port) == (local, http)
    assert gw.stop() == 0
