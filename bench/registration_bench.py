"""Registration benchmark: devices registering over MQTT through the real daemon.

``clients`` connections each publish their share of ``P/devices/<id>/register`` (QoS 1,
a Device JSON, at most ``window`` unacknowledged per connection). The broker PUBACKs a
registration once it is stored for the gateway's persistent session; the gateway's client
acks it to the broker only after the registry commit. The rate is devices ÷ (first
publish → every device in the registry, polled in SQLite). There is no bulk HTTP path in the API (contract v2 has ``PUT /v1/devices/<id>`` one at
a time), so only MQTT is measured here.

    python -m bench.registration_bench [--devices 20000] [--clients 4] [--window 500] [--log-level warning]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon, cpu_s  # noqa: E402
from bench.mqttpub import publish_all  # noqa: E402
from bench.summary import row  # noqa: E402

GOAL = 5000.0


def run(n: int, clients: int, window: int, workdir: Path, profile: Path | None = None,
        log_level: str = "warning") -> dict:
    daemon = Daemon(workdir, bridges={"simulation": {"latency_ms": 0}}, logging={"level": log_level})
    daemon.start()
    spy = None
    if profile is not None:
        from bench import profiling
        assert daemon.proc is not None
        spy = profiling.start(daemon.proc.pid, profile)
        time.sleep(1.0)
    try:
        prefix = f"{daemon.cfg['gateway']['topic_prefix']}/{daemon.cfg['gateway']['site_id']}"
        shares: list[list[tuple[str, bytes]]] = [[] for _ in range(clients)]
        for i in range(n):
            device_id = f"reg-{i:06}"
            body = json.dumps({"device_id": device_id, "segment": "bench",
                               "channels": [{"platform": "simulation"}]}).encode()
            shares[i % clients].append((f"{prefix}/devices/{device_id}/register", body))

        async def go() -> tuple[float, float]:
            t0 = time.perf_counter()
            ends = await asyncio.gather(*(publish_all(daemon.port, share, f"bench-reg-{c}", window)
                                          for c, share in enumerate(shares)))
            return t0, max(ends)

        assert daemon.proc is not None
        cpu0 = cpu_s(daemon.proc.pid)
        t0, t_puback = asyncio.run(go())
        # The broker PUBACKs once the message is stored for the gateway's persistent session;
        # the gateway's client acks it to the broker only after the registry commit. The
        # clock stops when every device is in the registry.
        conn = sqlite3.connect(workdir / "var" / "gateway.db")
        deadline = time.perf_counter() + 300
        while True:
            stored = conn.execute("SELECT COUNT(*) FROM devices WHERE device_id LIKE 'reg-%'").fetchone()[0]
            t1 = time.perf_counter()
            if stored >= n or t1 > deadline:
                break
            time.sleep(0.02)
        cpu = cpu_s(daemon.proc.pid) - cpu0
        conn.close()
        if spy is not None:
            from bench import profiling
            profiling.stop(spy)
            print(profiling.summary(profile), flush=True)  # type: ignore[arg-type]
    finally:
        daemon.stop()
    elapsed = t1 - t0
    return {"devices": n, "seconds": elapsed, "per_s": n / elapsed, "stored": stored,
            "pubacks_per_s": n / (t_puback - t0), "cpu_us_per_device": cpu / n * 1e6}


def main() -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--profile", type=Path, help="sample the daemon with py-spy into this file and summarise")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"],
                    help="the daemon's [logging] level (info is the shipped default; warning keeps the "
                         "figure comparable with earlier runs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.devices, args.clients, args.window, Path(tmp), args.profile, args.log_level)
    print(json.dumps(r, indent=2), flush=True)
    ok = r["stored"] == args.devices
    return [row(f"registration over MQTT, {args.devices:,} devices, devices/s", r["per_s"], "/s",
                goal=f">= {GOAL:,.0f}/s, all stored", met=ok and r["per_s"] >= GOAL),
            row("registration: daemon CPU per device (user+sys, all threads)", r["cpu_us_per_device"], "us",
                goal="information (steadier under load)"),
            row("registration: devices in the registry after the last PUBACK", r["stored"], "devices",
                goal=f"= {args.devices:,}", met=ok)]


if __name__ == "__main__":
    main()
