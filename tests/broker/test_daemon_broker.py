"""The embedded broker's promises through the real daemon (``python -m gateway run``), with
real accounts from the password file and independent clients (raw MQTT, paho, mosquitto_*):
sessions belong to their owner, denied publishes are explained in the log, and
``$SYS/broker/...`` is readable by monitors only (contract §5; issue 9.1, 9.2, 14.1, 12)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker.helpers import PUBACK, PUBLISH, RawClient, write_accounts
from tests.support import GatewayProcess, base_config, bulk_register, free_port, write_config

P = "homepot/site-t"
GATEWAY_ID = "homepot-gateway-site-t"
ACCOUNTS = {"plc-8": "device", "plc-9": "device", "tech-1": "technician", "mon-1": "monitor"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One daemon for this module: a loopback listener that lets anonymous clients in as
    technicians (as `make run` does), the accounts above, and device plc-8 on MQTT."""
    tmp = tmp_path_factory.mktemp("daemon-broker")
    port = free_port()
    data = base_config(tmp, port, broker={"listeners": [
        {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
         "anonymous_role": "technician"}]},
        # No application acks come from these raw clients: keep the pipeline's resends of
        # unacked deliveries out of the queues asserted on (a slow run passes the 60 s).
        dispatch={"ack_timeout_s": 0})
    write_accounts(tmp / "var" / "passwd", ACCOUNTS, password=None)  # password pw-NAME
    bulk_register(tmp / "var", [{"device_id": "plc-8", "channels": [{"platform": "mqtt"}]}])
    proc = GatewayProcess(write_config(tmp, data), tmp)
    proc.port = port  # type: ignore[attr-defined]
    proc.data_dir = tmp / "var"  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.kill()
    if proc.notify:
        proc.notify.close()


def _login(name: str) -> dict[str, str]:
    return {"username": name, "password": f"pw-{name}"}


def _sent_message_ids(data_dir: Path, job_ids: list[str]) -> dict[str, str]:
    conn = sqlite3.connect(data_dir / "gateway.db")
    try:
        marks = ",".join("?" * len(job_ids))
        return {job: mid for job, mid in conn.execute(
            f"SELECT job_id, message_id FROM deliveries WHERE state = 'sent' AND job_id IN ({marks})", job_ids)}
    finally:
        conn.close()


async def _send_jobs(port: int, job_ids: list[str]) -> None:
    tech = RawClient(port)
    assert await tech.connect("tech-jobs", **_login("tech-1")) == (False, 0)
    for job_id in job_ids:
        job = {"job_id": job_id, "target": {"devices": ["plc-8"]}, "notification": {"title": job_id, "body": "b"}}
        tech.publish(f"{P}/jobs", json.dumps(job).encode(), 1)
        await tech.expect(PUBACK)
    tech.disconnect()


async def _until_sent(data_dir: Path, job_ids: list[str], timeout: float = 15) -> dict[str, str]:
    """message_id per job once the mqtt bridge's publish was accepted by the broker."""
    deadline = time.monotonic() + timeout
    while True:
        sent = _sent_message_ids(data_dir, job_ids)
        if len(sent) == len(job_ids):
            return sent
        assert time.monotonic() < deadline, f"not all sent: {sent}"
        await asyncio.sleep(0.05)


async def test_a_session_cannot_be_taken_by_another_principal(gw):
    """plc-8's queued notifications reach plc-8 only: an anonymous loopback client and device
    plc-9 using client id plc-8 get 0x05 (CleanSession 0 or 1) and nothing else; the owner's
    live connection is not kicked; the gateway's client id is refused even to a technician."""
    port, data_dir = gw.port, gw.data_dir
    plc8 = RawClient(port)
    assert await plc8.connect("plc-8", clean=False, **_login("plc-8")) == (False, 0)
    assert await plc8.subscribe((f"{P}/devices/plc-8/notify", 1)) == [1]

    # While plc-8 is online, plc-9 tries its id: refused, and plc-8 stays connected.
    thief = RawClient(port)
    assert await thief.connect("plc-8", clean=False, **_login("plc-9")) == (False, 5)
    assert await thief.closed()
    await _send_jobs(port, ["own-live"])
    live = await plc8.expect(PUBLISH, timeout=15)
    assert json.loads(live.payload)["job_id"] == "own-live"
    plc8.ack(PUBACK, live.packet_id)
    plc8.disconnect()

    # plc-8 offline: three notifications wait in its session.
    jobs = ["own-1", "own-2", "own-3"]
    await _send_jobs(port, jobs)
    message_ids = await _until_sent(data_dir, jobs)

    for clean, name in ((False, "tech-1"), (True, "mon-1")):
        anon = RawClient(port)
        assert await anon.connect("plc-8", clean=clean) == (False, 5)
        assert await anon.read(timeout=5) is None        # closed: no PUBLISH of plc-8's queue
        plc9 = RawClient(port)
        assert await plc9.connect("plc-8", clean=clean, **_login("plc-9")) == (False, 5)
        assert await plc9.read(timeout=5) is None
        taker = RawClient(port)                          # a valid account, but the id is the gateway's
        assert await taker.connect(GATEWAY_ID, clean=clean, **_login(name)) == (False, 5)
        assert await taker.closed()
    anon = RawClient(port)                               # no credentials, the gateway's id
    assert await anon.connect(GATEWAY_ID, clean=False) == (False, 5)

    # The gateway's own client was not kicked: a new job still goes out.
    await _send_jobs(port, ["own-4"])
    message_ids.update(await _until_sent(data_dir, ["own-4"]))

    # The owner gets all of it, in order, from its stored session.
    plc8 = RawClient(port)
    assert await plc8.connect("plc-8", clean=False, **_login("plc-8")) == (True, 0)
    got = []
    for _ in range(4):
        pkt = await plc8.expect(PUBLISH, timeout=15)
        plc8.ack(PUBACK, pkt.packet_id)
        got.append(json.loads(pkt.payload))
    assert [(g["job_id"], g["message_id"]) for g in got] == [(j, message_ids[j]) for j in jobs + ["own-4"]]
    plc8.disconnect()
    refused = [line for line in gw.log().splitlines() if "mqtt connection refused: client id" in line]
    assert any('"client_id": "plc-8"' in line and "another principal" in line for line in refused)
    assert any(GATEWAY_ID in line and "reserved for the gateway" in line for line in refused)


async def test_a_denied_publish_is_explained_once_per_client_and_topic(gw):
    """A technician's mosquitto_pub to a device's ack topic: acknowledged (3.1.1 has no
    negative PUBACK) and dropped; one log line says who, which role, which topic and why,
    however many times it is repeated within a minute."""
    topic = f"{P}/devices/plc-8/ack"
    lines = "".join(json.dumps({"message_id": f"m-{i}", "status": "received"}) + "\n" for i in range(40))
    for _ in range(2):
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "-u", "tech-1", "-P", "pw-tech-1",
            "-i", "tech-1-console", "-t", topic, "-q", "1", "-l", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(lines.encode()), 20)
        assert proc.returncode == 0, err.decode()   # every publish was PUBACKed
    denied = [json.loads(line) for line in gw.log().splitlines() if "publish denied by ACL" in line]
    mine = [d for d in denied if d.get("client_id") == "tech-1-console"]
    assert len(mine) == 1, mine
    line = mine[0]
    assert (line["username"], line["role"], line["topic"]) == ("tech-1", "technician", topic)
    assert "no negative PUBACK" in line["event"] and "dropped" in line["event"]
    assert line["role_may_publish"] == [f"{P}/jobs", f"{P}/devices/+/register", f"{P}/alarms/+/+/ack"]
    assert line["level"] == "warning"


async def test_sys_topics_for_monitors_not_for_technicians_or_devices(gw):
    """`mosquitto_sub -t '$SYS/#'`: a monitor gets Mosquitto's names (retained, so at once);
    a technician or a device gets 0x80 (mosquitto_sub reports every subscription denied)."""
    expected = {f"$SYS/broker/{n}" for n in (
        "version", "uptime", "clients/connected", "clients/total", "messages/received", "messages/sent",
        "messages/dropped", "subscriptions/count", "retained messages/count")}
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(gw.port), "-u", "mon-1", "-P", "pw-mon-1", "-t", "$SYS/#",
        "-C", "9", "-W", "5", "-F", "%t|%r|%p", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    got = {topic: (retained, payload) for topic, retained, payload in
           (line.split("|", 2) for line in out.decode().splitlines())}
    assert set(got) == expected, (got, err)
    assert all(retained == "1" for retained, _ in got.values())
    assert got["$SYS/broker/version"][1].startswith("homepot-gateway ")
    assert got["$SYS/broker/uptime"][1].endswith(" seconds")
    assert all(payload.isdigit() for topic, (_, payload) in got.items() if topic not in (
        "$SYS/broker/version", "$SYS/broker/uptime"))
    for name in ("tech-1", "plc-9"):
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-h", "127.0.0.1", "-p", str(gw.port), "-u", name, "-P", f"pw-{name}",
            "-t", "$SYS/#", "-v", "-W", "5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert out == b"" and "All subscription requests were denied" in err.decode()
