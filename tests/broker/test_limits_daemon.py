"""``[broker.limits]`` and live account changes, against the real daemon (contract §4).

Each limit is hit by a hostile client while the daemon's RSS, ``/healthz`` and the other
clients' service (a technician's job reaching a device over MQTT) are checked; each hit is
counted in ``/metrics`` and logged once per client.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker.helpers import PUBACK, PUBLISH, RawClient, _rl, write_accounts
from tests.helpers import cli_in_process
from tests.support import GatewayProcess, base_config, bulk_register, free_port, write_config

P = "homepot/site-t"
ACCOUNTS = {"plc-1": "device", "plc-8": "device", "tech-1": "technician", "ctl-1": "controller",
            "mon-1": "monitor", "adm-1": "admin", "acct-a": "technician", "acct-b": "technician",
            "acct-c": "technician"}
LIMITS = {
    "max_sessions_per_account": 3,
    "technician": {"max_queued_bytes": 8192},
    "monitor": {"session_expiry_s": 2},
    "device": {"max_publish_rate": 20, "max_retained_per_principal": 3, "max_retained_bytes_per_principal": 2048},
    "anonymous": {"max_connections": 3},
}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One daemon: anonymous clients get role ``anonymous`` (no rights at all), the accounts
    above, device plc-8 on MQTT, the HTTP API for /healthz and /metrics."""
    tmp = tmp_path_factory.mktemp("limits")
    port, http_port = free_port(), free_port()
    data = base_config(tmp, port, broker={
        "listeners": [{"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": True,
                       "anonymous_role": "anonymous"}],
        "limits": LIMITS},
        http={"bind": f"127.0.0.1:{http_port}"}, dispatch={"ack_timeout_s": 0})
    write_accounts(tmp / "var" / "passwd", ACCOUNTS, password=None)  # password pw-NAME
    bulk_register(tmp / "var", [{"device_id": "plc-8", "channels": [{"platform": "mqtt"}]}])
    proc = GatewayProcess(write_config(tmp, data), tmp)
    proc.port, proc.http = port, f"http://127.0.0.1:{http_port}"  # type: ignore[attr-defined]
    proc.data_dir = tmp / "var"  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.kill()
    if proc.notify:
        proc.notify.close()


# ------------------------------------------------------------------ helpers
def _login(name: str, password: str | None = None) -> dict[str, str]:
    return {"username": name, "password": password or f"pw-{name}"}


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _health(gw: GatewayProcess) -> int:
    try:
        with urllib.request.urlopen(gw.http + "/healthz", timeout=5) as resp:  # type: ignore[attr-defined]
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _metrics(gw: GatewayProcess) -> dict[str, float]:
    with urllib.request.urlopen(gw.http + "/metrics", timeout=5) as resp:  # type: ignore[attr-defined]
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(homepot_broker_\w+?)(?:_total)? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def _until(predicate, timeout: float = 10.0, interval: float = 0.05):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


def _limit_lines(gw: GatewayProcess, limit: str, client_id: str | None = None) -> list[dict]:
    out = []
    for line in gw.log().splitlines():
        if "client hit a broker limit" not in line:
            continue
        rec = json.loads(line)
        if rec.get("limit") == limit and (client_id is None or rec.get("client_id") == client_id):
            out.append(rec)
    return out


def _db(gw: GatewayProcess, sql: str, *args: object) -> list[tuple]:
    conn = sqlite3.connect(gw.data_dir / "gateway.db")  # type: ignore[attr-defined]
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def _job_reaches_device(port: int, job_id: str) -> None:
    """The service the other clients must keep: a technician's job reaches plc-8 over MQTT."""
    device = RawClient(port)
    assert await device.connect(f"plc-8-{job_id}", **_login("plc-8")) == (False, 0)
    assert await device.subscribe((f"{P}/devices/plc-8/notify", 1)) == [1]
    tech = RawClient(port)
    assert await tech.connect(f"tech-{job_id}", **_login("tech-1")) == (False, 0)
    job = {"job_id": job_id, "target": {"devices": ["plc-8"]}, "notification": {"title": job_id, "body": "b"}}
    tech.publish(f"{P}/jobs", json.dumps(job).encode(), 1)
    await tech.expect(PUBACK)
    deadline = time.monotonic() + 20
    while True:
        pkt = await device.expect(PUBLISH, timeout=max(0.1, deadline - time.monotonic()))
        if job_id.encode() in pkt.payload:
            break
    tech.disconnect()
    device.disconnect()


async def _oversized(port: int, client_id: str, first: int, size: int, *, connect: bool = True,
                     login: dict[str, str] | None = None) -> int:
    """Send a fixed header announcing ``size`` bytes, then a trickle of body, until the broker
    closes the connection; the bytes of body it took (raises if it never closes)."""
    client = RawClient(port)
    if connect:
        assert await client.connect(client_id, **(login or {})) == (False, 0)
    else:
        await client.open()
    reader, writer = client.reader, client.writer
    assert reader is not None and writer is not None
    writer.write(bytes([first]) + _rl(size))
    sent = 0
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            try:
                if await asyncio.wait_for(reader.read(1), 0.02) == b"":
                    return sent
            except TimeoutError:
                pass
            writer.write(b"\0" * 16384)
            await writer.drain()
            sent += 16384
    except ConnectionError:
        return sent
    finally:
        writer.transport.abort()
    raise AssertionError(f"the broker kept reading a {size}-byte packet ({sent} body bytes taken)")


# ------------------------------------------------------------------ tests
async def test_oversized_packets_are_refused_from_the_fixed_header_with_rss_bounded(gw):
    """Six PUBLISHes announcing 200 MiB from a client with no rights, and CONNECTs announcing
    100 MiB before any login: each connection is closed after its fixed header, the daemon's
    RSS grows < 20 MB, /healthz stays 200, a job still reaches its device, and the limit is
    counted in /metrics and logged once for the client."""
    port = gw.port
    await _until(lambda: _health(gw) == 200, timeout=20)
    await _job_reaches_device(port, "warm-up")
    await _oversized(port, "warm", 0x30, 200 * MiB)   # the code path once before the baseline
    before = _metrics(gw).get("homepot_broker_limited_packet_size", 0)
    baseline = _rss_kb(gw.proc.pid)
    peak = baseline
    for _ in range(6):
        taken = await _oversized(port, "hostile", 0x30, 200 * MiB)
        assert taken < 8 * MiB, taken   # what the kernel's socket buffers hold, never the packet
        peak = max(peak, _rss_kb(gw.proc.pid))
        assert await asyncio.to_thread(_health, gw) == 200
    for _ in range(3):  # before CONNECT is authenticated, the CONNECT itself is capped
        await _oversized(port, "", 0x10, 100 * MiB, connect=False)
        peak = max(peak, _rss_kb(gw.proc.pid))
    # A technician's limit is the 1 MiB default; admin is not limited.
    await _oversized(port, "tech-big", 0x32, 2 * MiB, login=_login("tech-1"))
    admin = RawClient(port)
    assert await admin.connect("adm-big", **_login("adm-1")) == (False, 0)
    admin.publish(f"{P}/big/admin", b"x" * (2 * MiB), 1)
    await admin.expect(PUBACK, timeout=20)
    admin.disconnect()
    peak = max(peak, _rss_kb(gw.proc.pid))
    await _job_reaches_device(port, "during-limits")
    assert await asyncio.to_thread(_health, gw) == 200
    grown_mb = (peak - baseline) / 1024
    assert grown_mb < 20, f"RSS grew by {grown_mb:.1f} MB"
    after = _metrics(gw)["homepot_broker_limited_packet_size"]
    assert after - before == 6 + 3 + 1
    assert len(_limit_lines(gw, "packet_size", "hostile")) == 1   # once per client, not per packet


async def test_retained_quota_per_principal_keeps_the_gateways_own_status(gw):
    """A device may hold 3 retained topics and 2048 bytes: beyond, its retained messages are
    delivered live but not kept; the gateway's own retained status is still there."""
    port = gw.port
    device = RawClient(port)
    assert await device.connect("plc-1-ret", **_login("plc-1")) == (False, 0)
    watcher = RawClient(port)
    assert await watcher.connect("adm-watch", **_login("adm-1")) == (False, 0)
    assert await watcher.subscribe((f"{P}/devices/plc-1/telemetry/#", 1)) == [1]
    for n in range(5):
        device.publish(f"{P}/devices/plc-1/telemetry/t{n}", b"v", 1, retain=True)
        await device.expect(PUBACK)
    device.publish(f"{P}/devices/plc-1/telemetry/t0", b"x" * 3000, 1, retain=True)  # over the bytes
    await device.expect(PUBACK)
    live = set()
    while len(live) < 6:
        pkt = await watcher.expect(PUBLISH)
        live.add((pkt.topic, len(pkt.payload)))
        watcher.ack(PUBACK, pkt.packet_id)
    assert (f"{P}/devices/plc-1/telemetry/t4", 1) in live      # delivered live although not kept
    late = RawClient(port)
    assert await late.connect("adm-late", **_login("adm-1")) == (False, 0)
    await late.subscribe((f"{P}/devices/plc-1/telemetry/#", 1), (f"{P}/gateway/status", 1))
    got: dict[str, bytes] = {}
    while True:
        pkt = await late.read(timeout=2)
        if pkt is None:
            break
        if pkt.type == PUBLISH:
            got[pkt.topic] = pkt.payload
            late.ack(PUBACK, pkt.packet_id)
    # t0 was replaced by a message over the quota: the stale value is cleared, not kept.
    assert sorted(t.rsplit("/", 1)[1] for t in got if "telemetry" in t) == ["t1", "t2"]
    assert json.loads(got[f"{P}/gateway/status"])["state"] == "online"
    assert _metrics(gw)["homepot_broker_limited_retained"] >= 3
    assert len(_limit_lines(gw, "retained", "plc-1-ret")) == 1
    for c in (device, watcher, late):
        c.disconnect()


async def test_sessions_per_account_one_body_per_message_and_expiry(gw):
    """A controller leaves 5 persistent sessions behind: only 3 are kept (the oldest go); a
    QoS 1 message queued for them is stored once; with every session connected a fourth is
    refused (CONNACK 0x03). Monitor sessions expire 2 s after their connection ends."""
    port = gw.port
    evicted_before = _metrics(gw).get("homepot_broker_sessions_evicted", 0)
    for n in range(5):
        c = RawClient(port)
        assert await c.connect(f"ctl-s{n}", clean=False, **_login("ctl-1")) == (False, 0)
        assert await c.subscribe((f"{P}/fan/#", 1)) == [1]
        c.disconnect()
    await _until(lambda: sorted(r[0] for r in _db(gw, "SELECT client_id FROM broker_sessions "
                                                  "WHERE owner = 'user:ctl-1'")) == ["ctl-s2", "ctl-s3", "ctl-s4"])
    assert _metrics(gw)["homepot_broker_sessions_evicted"] - evicted_before == 2
    admin = RawClient(port)
    assert await admin.connect("adm-fan", **_login("adm-1")) == (False, 0)
    admin.publish(f"{P}/fan/x", b"B" * 10000, 1)
    await admin.expect(PUBACK)
    rows = _db(gw, "SELECT client_id, length(payload), body_id FROM broker_messages WHERE topic = ?", f"{P}/fan/x")
    assert len(rows) == 3 and all(r[1] == 0 for r in rows) and len({r[2] for r in rows}) == 1
    assert _db(gw, "SELECT length(payload) FROM broker_bodies WHERE id = ?", rows[0][2]) == [(10000,)]
    # All three connected: a fourth persistent session is refused, nothing evicted.
    held = []
    for n in (2, 3, 4):
        c = RawClient(port)
        assert (await c.connect(f"ctl-s{n}", clean=False, **_login("ctl-1")))[1] == 0
        held.append(c)
    extra = RawClient(port)
    assert await extra.connect("ctl-s9", clean=False, **_login("ctl-1")) == (False, 3)
    for c in held:  # each gets its queued message; acknowledged, the shared body goes
        pkt = await c.expect(PUBLISH)
        c.ack(PUBACK, pkt.packet_id)
    await _until(lambda: _db(gw, "SELECT count(*) FROM broker_bodies WHERE id = ?", rows[0][2]) == [(0,)])
    for c in held:
        c.disconnect()
    # Session expiry (3.1.1 CleanSession=0 too): monitor sessions go 2 s after they disconnect.
    mon = RawClient(port)
    assert await mon.connect("mon-exp", clean=False, **_login("mon-1")) == (False, 0)
    mon.disconnect()
    await _until(lambda: _db(gw, "SELECT client_id FROM broker_sessions WHERE client_id = 'mon-exp'"))
    await _until(lambda: not _db(gw, "SELECT client_id FROM broker_sessions WHERE client_id = 'mon-exp'"),
                 timeout=10)
    again = RawClient(port)
    assert await again.connect("mon-exp", clean=False, **_login("mon-1")) == (False, 0)  # session not present
    again.disconnect()
    assert _metrics(gw)["homepot_broker_sessions_expired"] >= 1
    admin.disconnect()


async def test_queued_bytes_bound_drops_oldest(gw):
    """A technician's offline session queues at most 8192 payload bytes: of ten 2 KB
    messages it gets the newest four."""
    port = gw.port
    tech = RawClient(port)
    assert await tech.connect("tech-q", clean=False, **_login("tech-1")) == (False, 0)
    assert await tech.subscribe((f"{P}/q/#", 1)) == [1]
    tech.disconnect()
    admin = RawClient(port)
    assert await admin.connect("adm-q", **_login("adm-1")) == (False, 0)
    for n in range(10):
        admin.publish(f"{P}/q/x", bytes([n]) * 2048, 1)
        await admin.expect(PUBACK)
    admin.disconnect()
    back = RawClient(port)
    assert await back.connect("tech-q", clean=False, **_login("tech-1")) == (True, 0)
    got = []
    while True:
        pkt = await back.read(timeout=1.5)
        if pkt is None:
            break
        if pkt.type == PUBLISH:
            got.append(pkt.payload[0])
            back.ack(PUBACK, pkt.packet_id)
    assert got == [6, 7, 8, 9]
    assert _metrics(gw)["homepot_broker_limited_queued_bytes"] >= 6
    back.disconnect()


async def test_publish_rate_slows_the_flooder_not_the_others(gw):
    """A device limited to 20 messages/s floods 80 QoS 1 messages: its PUBACKs come at its
    rate (none lost), while an admin's round trip through the broker stays fast."""
    port = gw.port
    device = RawClient(port)
    assert await device.connect("plc-1-rate", **_login("plc-1")) == (False, 0)
    echo = RawClient(port)
    assert await echo.connect("adm-echo", **_login("adm-1")) == (False, 0)
    assert await echo.subscribe((f"{P}/echo", 0)) == [0]
    start = time.monotonic()
    for n in range(80):
        device.publish(f"{P}/devices/plc-1/telemetry/rate", str(n).encode(), 1)
    round_trips = []
    for _ in range(5):
        t0 = time.monotonic()
        echo.publish(f"{P}/echo", b"ping", 0)
        await echo.expect(PUBLISH)
        round_trips.append(time.monotonic() - t0)
        await asyncio.sleep(0.1)
    for _ in range(80):
        await device.expect(PUBACK, timeout=10)
    elapsed = time.monotonic() - start
    assert elapsed >= 2.5, elapsed           # 80 at 20/s after a burst of 20: about 3 s
    assert max(round_trips) < 1.0, round_trips   # not held behind the flooder's pauses (3 s in all)
    assert _metrics(gw)["homepot_broker_limited_rate"] > 0
    assert len(_limit_lines(gw, "rate", "plc-1-rate")) == 1
    device.disconnect()
    echo.disconnect()


async def test_publish_rate_slows_a_v5_client_rather_than_disconnecting_it(gw):
    """Over ``max_publish_rate`` a 5.0 client is read more slowly, as a 3.1.1 one is (EMQX's
    limiter pauses the same way; Mosquitto has no publish rate limit): no DISCONNECT 0x96,
    every QoS 1 message acknowledged 0x00 (none lost), at the rate."""
    from tests.broker.v5 import DISCONNECT, RawClient5, ack_reason

    device = RawClient5(gw.port)
    assert await device.connect5("plc-1-rate5", **_login("plc-1")) == (False, 0)
    start = time.monotonic()
    for n in range(60):
        device.publish5(f"{P}/devices/plc-1/telemetry/rate5", str(n).encode(), 1)
    reasons = []
    for _ in range(60):
        pkt = await device.read(timeout=10)
        assert pkt is not None and pkt.type != DISCONNECT, pkt
        assert pkt.type == PUBACK
        reasons.append(ack_reason(pkt))
    assert reasons == [0] * 60
    assert time.monotonic() - start >= 1.5   # 60 at 20/s after a burst of 20: about 2 s
    device.disconnect5()


async def test_an_mqtt_delivery_carries_message_expiry_and_its_message_id_to_a_v5_device(gw):
    """The gateway's own client speaks 5.0 to the embedded broker, so an MQTT delivery carries
    the job's TTL left at send time as Message Expiry Interval (§3.3.2.3.3) and the delivery's
    ``message_id`` as a User Property (§3.3.2.3.7), as a paho 5.0 device sees them."""
    from tests.broker.v5 import Paho5

    device = await Paho5(gw.port, "plc-8-v5", username="plc-8", password="pw-plc-8").connect()
    try:
        assert device.connack is not None and device.connack[0] == 0
        assert await device.subscribe(f"{P}/devices/plc-8/notify", 1) == [1]
        tech = RawClient(gw.port)
        assert await tech.connect("tech-ttl", **_login("tech-1")) == (False, 0)
        job = {"job_id": "job-ttl", "target": {"devices": ["plc-8"]},
               "notification": {"title": "ttl", "body": "b", "ttl": 600}}
        tech.publish(f"{P}/jobs", json.dumps(job).encode(), 1)
        await tech.expect(PUBACK)
        tech.disconnect()
        deadline = time.monotonic() + 20
        while not any(b"job-ttl" in m.payload for m in device.messages):
            assert time.monotonic() < deadline, gw.log()[-6000:]
            await asyncio.sleep(0.05)
        got = next(m for m in device.messages if b"job-ttl" in m.payload)
        envelope = json.loads(got.payload)
        assert 590 <= got.props["MessageExpiryInterval"] <= 600
        assert ["message_id", envelope["message_id"]] in [list(p) for p in got.props["UserProperty"]]
    finally:
        await device.stop()


async def test_connections_per_role(gw):
    """Three anonymous clients at once, no more (CONNACK 0x03); accounts still get in."""
    port = gw.port
    held = []
    for n in range(3):
        c = RawClient(port)
        assert await c.connect(f"anon-{n}") == (False, 0)
        held.append(c)
    refused = RawClient(port)
    assert await refused.connect("anon-9") == (False, 3)
    tech = RawClient(port)
    assert await tech.connect("tech-conn", **_login("tech-1")) == (False, 0)
    assert _metrics(gw)["homepot_broker_limited_connections"] >= 1
    for c in (*held, tech):
        c.disconnect()


async def test_account_changes_reach_connected_clients(gw):
    """`users remove` closes the account's open connection; `users add` with a new role (same
    password) applies the new ACL to the open connection at once; a new password closes it.
    The commands run in this process (what they write to the account file is the point); the
    daemon's side is the real process."""
    port = gw.port
    cfg = gw.config
    # acct-a publishes jobs and reads notifications; then its account is removed.
    a = RawClient(port)
    assert await a.connect("acct-a-1", **_login("acct-a")) == (False, 0)
    assert await a.subscribe((f"{P}/#", 1)) == [1]
    removed = cli_in_process(cfg, "users", "remove", "acct-a")
    assert removed.returncode == 0, removed.stderr
    assert await a.closed(timeout=5)
    again = RawClient(port)
    assert (await again.connect("acct-a-2", **_login("acct-a")))[1] == 4

    # acct-b: technician -> monitor (same password): still connected, may no longer publish jobs.
    b = RawClient(port)
    assert await b.connect("acct-b-1", **_login("acct-b")) == (False, 0)
    job = {"job_id": "by-acct-b", "target": {"devices": ["plc-8"]}, "notification": {"title": "t", "body": "b"}}
    b.publish(f"{P}/jobs", json.dumps(job).encode(), 1)
    await b.expect(PUBACK)
    await _until(lambda: _db(gw, "SELECT job_id FROM jobs WHERE job_id = 'by-acct-b'"))
    denied = _metrics(gw).get("homepot_broker_denied_publish", 0)
    changed = cli_in_process(cfg, "users", "add", "acct-b", "--role", "monitor", "--password-stdin",
                             input="pw-acct-b\n")
    assert changed.returncode == 0, changed.stderr
    await _until(lambda: _metrics(gw).get("homepot_broker_accounts_updated", 0) >= 1)
    job["job_id"] = "by-monitor"
    b.publish(f"{P}/jobs", json.dumps(job).encode(), 1)
    await b.expect(PUBACK)      # 3.1.1: a denied publish is acknowledged and dropped
    await _until(lambda: _metrics(gw)["homepot_broker_denied_publish"] > denied)
    assert not _db(gw, "SELECT job_id FROM jobs WHERE job_id = 'by-monitor'")
    # ... and receives as a device now: nothing outside its own devices/acct-b/ subtree.
    assert await b.subscribe((f"{P}/recv/#", 1)) == [1]      # still a monitor: granted
    admin = RawClient(port)
    assert await admin.connect("adm-recv", **_login("adm-1")) == (False, 0)
    admin.publish(f"{P}/recv/x", b"as-monitor", 1)
    await admin.expect(PUBACK)
    assert (await b.expect(PUBLISH)).payload == b"as-monitor"
    changed = cli_in_process(cfg, "users", "add", "acct-b", "--role", "device", "--password-stdin",
                             input="pw-acct-b\n")
    assert changed.returncode == 0, changed.stderr
    await _until(lambda: _metrics(gw).get("homepot_broker_accounts_updated", 0) >= 2)
    withheld = _metrics(gw)["homepot_broker_denied_receive"]
    admin.publish(f"{P}/recv/x", b"as-device", 1)
    await admin.expect(PUBACK)
    await _until(lambda: _metrics(gw)["homepot_broker_denied_receive"] > withheld)
    assert await b.read(timeout=0.5) is None and not await b.closed(timeout=0.1)   # open, nothing delivered

    # acct-c: a new password closes its connection; the new password works.
    c = RawClient(port)
    assert await c.connect("acct-c-1", **_login("acct-c")) == (False, 0)
    changed = cli_in_process(cfg, "users", "add", "acct-c", "--role", "technician",
                             "--password-stdin", input="new-secret\n")
    assert changed.returncode == 0, changed.stderr
    assert await c.closed(timeout=5)
    c2 = RawClient(port)
    assert await c2.connect("acct-c-2", **_login("acct-c", "new-secret")) == (False, 0)
    for client in (b, admin, c2):
        client.disconnect()
    assert _metrics(gw)["homepot_broker_accounts_disconnected"] >= 2


async def test_shared_bodies_survive_kill_9(tmp_path: Path):
    """Messages queued for three persistent sessions are stored once each, PUBACKed only once
    on disk, and after ``kill -9`` every session still gets every one of them, in order; once
    all have acknowledged, no body is left."""
    port = free_port()
    data = base_config(tmp_path, port, broker={"listeners": [
        {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}", "allow_anonymous": False}]})
    write_accounts(tmp_path / "var" / "passwd", {"mon-1": "monitor", "adm-1": "admin"}, password=None)
    proc = GatewayProcess(write_config(tmp_path, data), tmp_path)
    proc.data_dir = tmp_path / "var"  # type: ignore[attr-defined]
    proc.start()
    try:
        for n in range(3):
            c = RawClient(port)
            assert await c.connect(f"mon-k{n}", clean=False, **_login("mon-1")) == (False, 0)
            assert await c.subscribe((f"{P}/k/#", 1)) == [1]
            c.disconnect()
        admin = RawClient(port)
        assert await admin.connect("adm-k", **_login("adm-1")) == (False, 0)
        for n in range(20):
            admin.publish(f"{P}/k/x", n.to_bytes(1, "big") * 1000, 1)
            await admin.expect(PUBACK)
        proc.kill()
        assert _db(proc, "SELECT count(*), sum(length(payload)) FROM broker_bodies") == [(20, 20000)]
        assert _db(proc, "SELECT count(*), sum(length(payload)) FROM broker_messages") == [(60, 0)]
        proc.start()
        for n in range(3):
            c = RawClient(port)
            assert await c.connect(f"mon-k{n}", clean=False, **_login("mon-1")) == (True, 0)
            got = []
            while len(got) < 20:
                pkt = await c.expect(PUBLISH, timeout=10)
                got.append(pkt.payload[0])
                assert pkt.payload == bytes([got[-1]]) * 1000
                c.ack(PUBACK, pkt.packet_id)
            assert got == list(range(20))
            c.disconnect()
        await _until(lambda: _db(proc, "SELECT count(*) FROM broker_bodies") == [(0,)])
    finally:
        proc.kill()
        if proc.notify:
            proc.notify.close()
