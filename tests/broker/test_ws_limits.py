"""The websocket listener bounds a frame by the packet size its sender may send, before the
frame is buffered: ``websockets`` reads a frame whole, so the reader's fixed-header check alone
came after a 32 MiB frame sat in the daemon's memory (twice)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.broker.helpers import _rl, _s, write_accounts
from tests.support import GatewayProcess, base_config, write_config

MiB = 1024 * 1024
P = "homepot/site-t"


@pytest.fixture
def gw(tmp_path: Path):
    data = base_config(tmp_path, 0, broker={
        "listeners": [{"name": "local", "type": "tcp", "bind": "127.0.0.1:0", "allow_anonymous": True,
                       "anonymous_role": "admin"},
                      {"name": "web", "type": "ws", "bind": "127.0.0.1:0", "allow_anonymous": True,
                       "anonymous_role": "anonymous"}]},
        http={"bind": "127.0.0.1:0"})
    write_accounts(tmp_path / "var" / "passwd", {"adm-1": "admin"})
    proc = GatewayProcess(write_config(tmp_path, data), tmp_path)
    proc.start()
    yield proc
    proc.kill()
    if proc.notify:
        proc.notify.close()


def _connect(client_id: str, username: str | None = None, password: str | None = None) -> bytes:
    flags = 0x02 | (0xC0 if username else 0)
    payload = _s(client_id) + (_s(username) + _s(password or "") if username else b"")
    var = _s("MQTT") + bytes([4, flags]) + b"\x00\x3c"
    return b"\x10" + _rl(len(var) + len(payload)) + var + payload


def _publish(topic: str, size: int, qos: int = 0) -> bytes:
    body = _s(topic) + (b"\x00\x01" if qos else b"") + b"x" * size
    return bytes([0x30 | (qos << 1)]) + _rl(len(body)) + body


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


def _limited_packet_size(gw: GatewayProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r"^homepot_broker_limited_packet_size(?:_total)? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _refused(url: str, frames: list[bytes]) -> int | None:
    """Send ``frames`` (the last one oversized) and return the close code the broker ended with."""
    ws = await ws_connect(url, subprotocols=["mqtt"], max_size=None, compression=None)  # type: ignore[list-item]
    for frame in frames[:-1]:
        await ws.send(frame)
        if frame[0] == 0x10:
            assert (await asyncio.wait_for(ws.recv(), 10))[:4] == b"\x20\x02\x00\x00"   # CONNACK accepted
    try:
        await ws.send(frames[-1])
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed:
        pass
    # The broker closed it; the client's transport is gone already (closing it again fails).
    return ws.close_code


async def test_an_oversized_websocket_frame_is_refused_before_it_is_buffered(gw: GatewayProcess):
    url = f"ws://127.0.0.1:{gw.ports['broker']['web']}"
    pid = gw.proc.pid
    # Warm up the code path (and the allocator) once before the baseline.
    assert await _refused(url, [_connect("warm"), _publish(f"{P}/x", 1 * MiB)]) == 1009
    baseline = _vm(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")   # reset VmHWM: the peak from here on
    # An anonymous client may send 64 KiB packets: a 32 MiB PUBLISH in one frame is refused
    # from the frame header, after CONNECT ...
    assert await _refused(url, [_connect("big-after"), _publish(f"{P}/x", 32 * MiB)]) == 1009
    # ... and before it: a CONNECT is bounded for everyone.
    assert await _refused(url, [_connect("big-before") + b"\0" * (32 * MiB)]) == 1009
    grown_mb = (_vm(pid, "VmHWM") - baseline) / 1024
    assert grown_mb < 12, f"the daemon's peak RSS grew by {grown_mb:.1f} MB for 32 MiB frames"
    await asyncio.sleep(0.2)
    assert _limited_packet_size(gw) == 3

    # The cap follows the sender's role: an admin (no max_packet_size) still sends a 2 MiB
    # message in one frame.
    async with ws_connect(url, subprotocols=["mqtt"], max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(_connect("adm-ws", "adm-1", "pw"))
        assert (await asyncio.wait_for(ws.recv(), 10))[:4] == b"\x20\x02\x00\x00"
        await ws.send(_publish(f"{P}/big", 2 * MiB, qos=1))
        ack = await asyncio.wait_for(ws.recv(), 20)
        assert ack == b"\x40\x02\x00\x01"


async def test_a_websocket_client_over_its_rate_is_not_buffered(tmp_path: Path):
    """A websocket client over its publish rate is read more slowly, like a TCP one: its frames
    wait in websockets' bounded queue and in TCP, not in the daemon. (The pump fed every frame
    into the reader while the connection was paused, so the daemon's memory grew with whatever
    the client sent.)"""
    data = base_config(tmp_path, 0, broker={
        "listeners": [{"name": "local", "type": "tcp", "bind": "127.0.0.1:0", "allow_anonymous": True,
                       "anonymous_role": "admin"},
                      {"name": "web", "type": "ws", "bind": "127.0.0.1:0", "allow_anonymous": True,
                       "anonymous_role": "anonymous"}],
        "limits": {"anonymous": {"max_publish_rate": 5}}},
        http={"bind": "127.0.0.1:0"})
    proc = GatewayProcess(write_config(tmp_path, data), tmp_path)
    proc.start()
    try:
        url = f"ws://127.0.0.1:{proc.ports['broker']['web']}"
        pid = proc.proc.pid
        baseline = _vm(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        ws = await ws_connect(url, subprotocols=["mqtt"], max_size=None, compression=None)  # type: ignore[list-item]
        await ws.send(_connect("fast"))
        assert (await asyncio.wait_for(ws.recv(), 10))[:4] == b"\x20\x02\x00\x00"
        frame = _publish(f"{P}/x", 60_000)     # under the 64 KiB packet limit, denied, over the rate
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await ws.send(frame)
                sent += len(frame)

        task = asyncio.create_task(flood())
        await asyncio.sleep(4)
        task.cancel()
        grown_mb = (_vm(pid, "VmHWM") - baseline) / 1024
        assert sent < 40 * MiB, f"the client sent {sent / MiB:.0f} MiB: it was not pushed back"
        assert grown_mb < 12, f"the daemon's peak RSS grew by {grown_mb:.1f} MB ({sent / MiB:.0f} MiB sent)"
        ws.transport.abort()
    finally:
        proc.kill()
        if proc.notify:
            proc.notify.close()
