"""At the default level (info) registrations are logged once per commit, not once per
device (issue 11): a burst of 2,000 devices writes a handful of "devices registered"
lines whose counts add up to the burst, and a lone registration is still named."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

from bench.mqttpub import publish_all

P = "homepot/site-t"
N = 2000


def _events(text: str, name: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == name:
            out.append(rec)
    return out


def _wait_registered(db: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            if conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0] >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"{n} devices not registered in {timeout} s")


def test_a_burst_is_logged_per_commit_and_a_lone_registration_by_name(gateway_factory, tmp_path: Path):
    gw = gateway_factory()  # [logging] level = "info", JSON lines
    body = lambda i: json.dumps({"device_id": f"burst-{i:05}", "channels": [{"platform": "simulation"}]}).encode()
    burst = [(f"{P}/devices/burst-{i:05}/register", body(i)) for i in range(N)]
    asyncio.run(publish_all(gw.port, burst, "test-burst", window=500))
    _wait_registered(tmp_path / "var" / "gateway.db", N)
    asyncio.run(publish_all(gw.port, [(f"{P}/devices/lone-1/register",
                                       json.dumps({"device_id": "lone-1", "channels": [{"platform": "mqtt"}]}).encode())],
                            "test-lone"))
    _wait_registered(tmp_path / "var" / "gateway.db", N + 1)
    assert gw.stop() == 0
    log = gw.log()
    lines = _events(log, "devices registered")
    assert sum(r["count"] for r in lines) == N + 1, lines
    assert len(lines) < N // 20, f"{len(lines)} lines for {N} registrations"
    assert all(len(r["devices"]) == min(r["count"], 10) and r["more"] == r["count"] - len(r["devices"]) for r in lines)
    assert lines[-1]["count"] == 1 and lines[-1]["devices"] == ["lone-1 (mqtt)"] and lines[-1]["level"] == "info"
    assert not _events(log, "device registered")  # the per-device line is at debug
