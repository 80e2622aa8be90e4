"""The reference agent tells its operator when its acks cannot count (issue 14.1).

MQTT 3.1.1 has no negative PUBACK: a broker drops a publish the client may not make and
acknowledges it anyway. The agent cannot see that, so it warns on what it can see: no
account (or another one) at start, and a message it already acked coming again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.helpers import cli_in_process, wait_until, write_accounts
from tests.support import MqttProbe


def start_agent(gw, *args: str, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:  # noqa: ANN001
    out, err = tmp_path / f"agent-{time.monotonic_ns()}.out", tmp_path / f"agent-{time.monotonic_ns()}.err"
    proc = subprocess.Popen([sys.executable, "-m", "devices.agent", "--url", f"mqtt://127.0.0.1:{gw.port}",
                             "--prefix", "homepot/site-t", *args], stdout=open(out, "wb"), stderr=open(err, "wb"))
    return proc, out, err


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_event(path: Path, name: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events(path) if e.get("event") == name]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {name!r} event in {path.read_text()}")


def test_anonymous_agent_warns_and_notices_a_redelivered_acked_message(gateway_factory, tmp_path: Path):
    # The shipped config's listener: anonymous local clients are technicians.
    gw = gateway_factory({"broker": {"listeners": [{"name": "local", "type": "tcp", "bind": "127.0.0.1:0",
                                                    "allow_anonymous": True, "anonymous_role": "technician"}]}},
                         start=False)
    write_accounts(tmp_path / "var" / "passwd", {"boss": ("admin", "boss-pw")})
    gw.start()
    agent, out, err = start_agent(gw, "--device-id", "plc-9", tmp_path=tmp_path)
    try:
        warning = wait_event(err, "warning")["message"]
        assert "without a username" in warning and "users add plc-9 --role device" in warning
        wait_event(out, "ready")
        # The gateway's mqtt bridge would resend a delivery it never saw acked; play that part
        # with the admin account: the same envelope twice.
        envelope = json.dumps({"message_id": str(uuid.uuid4()), "job_id": "j", "title": "t", "body": "b",
                               "data": {}, "priority": "normal", "sent_at": "2030-01-01T00:00:00Z",
                               "expires_at": "2030-01-01T01:00:00Z"})
        admin = MqttProbe(gw.port, username="boss", password="boss-pw")
        admin.publish("homepot/site-t/devices/plc-9/notify", envelope)
        admin.publish("homepot/site-t/devices/plc-9/notify", envelope)
        admin.close()
        hint = wait_event(err, "ack_not_recorded")
        assert json.loads(envelope)["message_id"] == hint["message_id"]
        assert "homepot/site-t/devices/plc-9/ack" in hint["hint"]
        assert [e["duplicate"] for e in events(out) if e["event"] == "notify"] == [False, True]
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    assert gw.stop() == 0


def test_agent_with_wrong_credentials_says_so_and_exits_2(gateway_factory, tmp_path: Path):
    gw = gateway_factory()
    secret = tmp_path / "plc.password"
    secret.write_text("right-one\n")
    write_accounts(tmp_path / "var" / "passwd", {"plc-3": ("device", "right-one")})  # the daemon reads it as it changes
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-it\n")
    agent, out, err = start_agent(gw, "--device-id", "plc-3", "--username", "plc-3", "--password-file", str(wrong),
                                  tmp_path=tmp_path)
    assert agent.wait(timeout=20) == 2
    assert "refused our credentials" in wait_event(err, "error")["message"]
    # With the right password: no warning, ready.
    agent, out, err = start_agent(gw, "--device-id", "plc-3", "--username", "plc-3", "--password-file", str(secret),
                                  "--count", "1", tmp_path=tmp_path)
    try:
        wait_event(out, "ready")
        assert not [e for e in events(err) if e["event"] == "warning"]
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    assert gw.stop() == 0


def test_agent_speaks_5_and_shows_message_expiry_and_the_message_id_property(gateway_factory, tmp_path: Path):
    """``--protocol 5``: the agent connects as 5.0 on a persistent session (a message sent
    while it is away still reaches it), acks what it gets (the gateway counts the ack), and its
    notify line shows the Message Expiry Interval (the job's TTL) and the message_id User Property."""
    gw = gateway_factory(start=False)
    secret = tmp_path / "plc.password"
    secret.write_text("plc-5-pw\n")
    write_accounts(tmp_path / "var" / "passwd", {"plc-5": ("device", "plc-5-pw"), "boss": ("admin", "boss-pw")})
    gw.start()
    login = ("--device-id", "plc-5", "--username", "plc-5", "--password-file", str(secret), "--protocol", "5")
    agent, out, err = start_agent(gw, *login, "--register", "--count", "1", tmp_path=tmp_path)
    try:
        wait_event(out, "ready")
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    deadline = time.monotonic() + 15
    while cli_in_process(gw.config, "devices", "show", "plc-5").returncode != 0:   # its registration, processed
        assert time.monotonic() < deadline, "the agent's registration never arrived"
        time.sleep(0.1)
    admin = MqttProbe(gw.port, username="boss", password="boss-pw")
    job = {"job_id": "job-v5", "target": {"devices": ["plc-5"]}, "notification": {"title": "t", "ttl": 900}}
    admin.publish("homepot/site-t/jobs", json.dumps(job))   # sent while the agent is away
    admin.close()
    agent, out, err = start_agent(gw, *login, "--count", "1", tmp_path=tmp_path)
    try:
        assert agent.wait(timeout=30) == 0, err.read_text()
    finally:
        if agent.poll() is None:
            agent.terminate()
    notify = wait_event(out, "notify")
    assert notify["envelope"]["job_id"] == "job-v5"
    assert 800 <= notify["message_expiry_s"] <= 900
    assert notify["user_properties"] == {"message_id": notify["envelope"]["message_id"]}
    assert not [e for e in events(err) if e["event"] == "warning"]
    assert gw.stop() == 0


def test_an_agent_whose_ack_waits_on_a_broker_that_went_away_reconnects_at_once(tmp_path: Path):
    """The broker goes away while the agent's ack waits for its PUBACK (a gateway killed
    with kill -9 mid-ack): the agent is back at once, not after the publish's 10 s timeout."""
    from tests.pipeline.hung_broker import HungBroker

    broker = HungBroker().start()  # it never PUBACKs: the ack waits until the connection ends
    out = tmp_path / "agent.out"
    proc = subprocess.Popen([sys.executable, "-m", "devices.agent", "--url", f"mqtt://127.0.0.1:{broker.port}",
                             "--prefix", "homepot/site-t", "--device-id", "plc-1"],
                            stdout=open(out, "wb"), stderr=open(tmp_path / "agent.err", "wb"))
    try:
        wait_event(out, "ready")
        envelope = {"message_id": str(uuid.uuid4()), "job_id": "j", "title": "t", "body": "b", "data": {},
                    "priority": "normal", "sent_at": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T01:00:00Z"}
        broker.send("homepot/site-t/devices/plc-1/notify", json.dumps(envelope).encode())
        wait_until(lambda: "homepot/site-t/devices/plc-1/ack" in broker.publishes, what="the agent's ack")
        broker.drop()
        dropped = time.monotonic()
        wait_until(lambda: broker.connects >= 2, timeout=20, what="the agent connected again")
        assert time.monotonic() - dropped < 3.0, round(time.monotonic() - dropped, 2)
    finally:
        proc.terminate()
        proc.wait(10)
        broker.stop()
