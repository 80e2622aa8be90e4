"""Accounts (argon2 password file written by ``users add``), per-listener anonymous access,
and the role ACLs of contract §5 on publish, subscribe and delivery (retained included)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from gateway.broker.embedded import EmbeddedBroker, InternalCredentials
from tests.broker.helpers import PUBACK, PUBLISH, Paho, RawClient, broker_config, until
from tests.helpers import CliResult, cli_in_process, write_accounts
from tests.support import free_port, write_config

P = "homepot/site-t"


def cli(cfg: Path, *args: str, stdin: str | None = None) -> CliResult:
    """The command, in this process (what it writes to the account file is the point, not an
    interpreter start per call)."""
    return cli_in_process(cfg, *args, input=stdin)


def connack(port: int, username: str | None = None, password: str | None = None) -> int:
    """The CONNACK return code paho sees (MQTT 3.1.1)."""
    codes: list[int] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="")
    if username is not None:
        c.username_pw_set(username, password)
    c.on_connect = lambda cl, ud, flags, rc, props: codes.append(rc.value if hasattr(rc, "value") else rc)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()
    # paho 2 maps 3.1.1 return codes 4/5 to reason codes 134/135.
    return {134: 4, 135: 5}.get(codes[0], codes[0]) if codes else -1


@pytest.mark.slow
def test_users_from_the_cli_and_anonymous_per_listener(gateway_factory, tmp_path):
    closed_port = free_port()
    gw = gateway_factory({"broker": {"listeners": [
        {"name": "local", "type": "tcp", "bind": "127.0.0.1:0", "allow_anonymous": True,
         "anonymous_role": "monitor"},
        {"name": "lan", "type": "tcp", "bind": f"127.0.0.1:{closed_port}"},
    ]}}, start=False)
    # base_config's listener binds gw.port: put it back on the anonymous one.
    gw.data["broker"]["listeners"][0]["bind"] = f"127.0.0.1:{gw.port}"
    write_config(tmp_path, gw.data, name=gw.config.name)
    res = cli(gw.config, "users", "add", "tech-1", "--role", "technician", "--password-stdin", stdin="s3cret\n")
    assert res.returncode == 0, res.stderr
    gw.start()
    assert connack(closed_port, "tech-1", "s3cret") == 0
    assert connack(closed_port, "tech-1", "wrong") == 4      # bad password → 0x04
    assert connack(closed_port, "nobody", "s3cret") == 4
    assert connack(closed_port) == 5                         # anonymous not allowed here → 0x05
    assert connack(gw.port) == 0                             # ... but on the loopback listener
    # A user added while the daemon runs works at once; a removed one is refused.
    assert cli(gw.config, "users", "add", "dev-9", "--role", "device", "--password-stdin",
               stdin="pw9\n").returncode == 0
    assert connack(closed_port, "dev-9", "pw9") == 0
    assert cli(gw.config, "users", "remove", "tech-1").returncode == 0
    assert connack(closed_port, "tech-1", "s3cret") == 4
    assert "s3cret" not in gw.log() and "pw9" not in gw.log()  # secrets never logged
    assert gw.stop() == 0


async def test_role_acls_on_subscribe_publish_and_delivery(tmp_path):
    passwd = tmp_path / "var" / "passwd"
    write_accounts(passwd, {"pos-1": ("device", "pw"), "mon": ("monitor", "pw"), "aud": ("auditor", "pw")})
    port = free_port()
    cfg = broker_config(tmp_path, port, broker={
        # A role added in the config: everything under P, except the devices' notifications.
        "acl": {"auditor": {"subscribe": ["{prefix}/#"], "deny": ["{prefix}/devices/+/notify"]}},
        "listeners": [{"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
                       "anonymous_role": "anonymous"}]})
    b = EmbeddedBroker(cfg, InternalCredentials.generate())
    await b.start()
    try:
        admin = RawClient(port)
        assert await admin.connect("admin", username=b.internal.username, password=b.internal.password) == (False, 0)
        # Retained messages on topics some roles may not read.
        for topic in (f"{P}/devices/pos-1/notify", f"{P}/devices/pos-2/notify", f"{P}/gateway/status"):
            admin.publish(topic, topic.encode(), 1, retain=True)
            await admin.expect(PUBACK)

        dev = RawClient(port)
        assert await dev.connect("pos-1", username="pos-1", password="pw") == (False, 0)
        # {username} substitution: own subtree only; '#' and someone else's topics are 0x80.
        assert await dev.subscribe((f"{P}/devices/pos-1/#", 1), (f"{P}/devices/pos-2/#", 1), ("#", 0),
                                   (f"{P}/devices/+/notify", 1)) == [1, 0x80, 0x80, 0x80]
        got = await dev.expect(PUBLISH)
        assert (got.topic, got.retain) == (f"{P}/devices/pos-1/notify", True)
        assert await dev.read(timeout=0.3) is None  # pos-2's retained message is not for pos-1
        # Denied publish: acknowledged (no negative PUBACK in 3.1.1), dropped, counted.
        watcher = await Paho(port, "w", username="mon", password="pw").connect()
        await watcher.subscribe(f"{P}/#", 1)
        # The monitor reads every retained one but the devices' notifications (their ack URLs
        # are a capability to act, which a read-only role must not get).
        await until(lambda: len(watcher.messages) == 1)
        assert watcher.messages[0].topic == f"{P}/gateway/status"
        pid = dev.publish(f"{P}/jobs", b"{}", 1)
        assert (await dev.expect(PUBACK)).packet_id == pid
        pid = dev.publish(f"{P}/devices/pos-1/ack", b"ok", 1)
        assert (await dev.expect(PUBACK)).packet_id == pid
        await until(lambda: len(watcher.messages) == 2)
        await asyncio.sleep(0.2)
        assert watcher.messages[-1].topic == f"{P}/devices/pos-1/ack"
        assert b.metrics()["denied_publish"] == 1
        # The monitor may not publish at all.
        await watcher.publish(f"{P}/jobs", b"{}", 1)

        # A custom role with a deny filter: subscribing to the whole prefix is granted,
        # but denied topics are withheld, retained or live.
        aud = RawClient(port)
        await aud.connect("aud", username="aud", password="pw")
        assert await aud.subscribe((f"{P}/#", 1), (f"{P}/devices/pos-1/notify", 1)) == [1, 0x80]
        first = await aud.expect(PUBLISH)
        assert first.topic == f"{P}/gateway/status"
        admin.publish(f"{P}/devices/pos-1/notify", b"live", 1)
        await admin.expect(PUBACK)
        assert await aud.read(timeout=0.3) is None

        # Anonymous clients get the listener's role: here the default `anonymous`, i.e. nothing.
        anon = RawClient(port)
        assert await anon.connect("anon") == (False, 0)
        assert await anon.subscribe((f"{P}/#", 1)) == [0x80]
        m = b.metrics()
        assert m["denied_publish"] == 2 and m["denied_subscribe"] == 5 and m["denied_receive"] >= 3
        assert m["denied"] == m["denied_publish"] + m["denied_subscribe"] + m["denied_receive"]
        await watcher.stop()
        for c in (admin, dev, aud, anon):
            c.disconnect()
    finally:
        await b.stop()
