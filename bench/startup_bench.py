"""Start-up benchmark: process start → ``READY=1`` with a large store.

The data directory holds ``--devices`` registered devices (100,000), a finished
``--devices``-delivery job (every delivery acknowledged, as a site has after one fan-out)
and ``--retained`` retained messages (10,000) that were published to the embedded broker
before a clean stop. The daemon is then started ``--runs`` times; each time the clock runs
from ``Popen`` to the ``READY=1`` datagram on ``$NOTIFY_SOCKET`` (what systemd waits for).
The baseline is the same start with an empty data directory.

The project's modules are byte-compiled first (``compileall``), as an installed package
is (pip compiles at install; an editable install under ``PYTHONDONTWRITEBYTECODE=1``
would otherwise compile about 1,200 code objects at every start, ~0.6 s here).

    python -m bench.startup_bench [--devices 100000] [--retained 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon  # noqa: E402
from bench.mqttpub import publish_all  # noqa: E402
from bench.summary import row  # noqa: E402
from tests.support import bulk_register  # noqa: E402

GOAL_S = 1.5


def _wait_job(db: Path, job_id: str, timeout: float = 300) -> None:
    conn = sqlite3.connect(db)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if r and r[0] == "acknowledged":
                return
            time.sleep(0.1)
    finally:
        conn.close()
    raise TimeoutError(job_id)


def prepare(workdir: Path, devices: int, retained: int, job: bool) -> Daemon:
    daemon = Daemon(workdir, bridges={"simulation": {"latency_ms": 0, "ack": True}})
    if devices:
        bulk_register(workdir / "var", [{"device_id": f"dev-{i:06}", "channels": [{"platform": "simulation"}]}
                                        for i in range(devices)])
    daemon.start()
    try:
        if retained:
            prefix = f"{daemon.cfg['gateway']['topic_prefix']}/{daemon.cfg['gateway']['site_id']}"
            msgs = [(f"{prefix}/bench/retained/{i:05}", json.dumps({"v": i}).encode()) for i in range(retained)]
            asyncio.run(publish_all(daemon.port, msgs, "bench-retain", 500, retain=True))
        if devices and job:
            daemon.cli("send", "--title", "bench", "--all", "--yes", "--job-id", "startup-1")
            _wait_job(workdir / "var" / "gateway.db", "startup-1")
    finally:
        daemon.stop()
    return daemon


def time_starts(daemon: Daemon, runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (the process's own, steadier on a busy machine) to READY."""
    times, cpu = [], []
    for _ in range(runs):
        times.append(daemon.start())
        cpu.append(daemon.ready_cpu_s)
        daemon.stop()
    return times, cpu


def main() -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--retained", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-job", action="store_true", help="do not run a fan-out job before timing")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(ROOT / d) for d in ("gateway", "bridges", "devices"))],
                   check=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "full").mkdir()
        (Path(tmp) / "empty").mkdir()
        full = prepare(Path(tmp) / "full", args.devices, args.retained, not args.no_job)
        empty = prepare(Path(tmp) / "empty", 0, 0, False)
        loaded, loaded_cpu = time_starts(full, args.runs)
        bare, bare_cpu = time_starts(empty, args.runs)
    r = {"devices": args.devices, "retained": args.retained, "delivery_rows": 0 if args.no_job else args.devices,
         "ready_s": loaded, "ready_cpu_s": loaded_cpu, "empty_ready_s": bare, "empty_ready_cpu_s": bare_cpu}
    print(json.dumps(r, indent=2), flush=True)
    median, base = statistics.median(loaded), statistics.median(bare)
    return [row(f"start -> READY, {args.devices:,} devices + {args.retained:,} retained (median of {args.runs})",
                median, "s", baseline=base, goal=f"<= {GOAL_S} s", met=median <= GOAL_S),
            row("start -> READY: CPU used by the daemon (median; baseline: empty data dir)",
                statistics.median(loaded_cpu), "s", baseline=statistics.median(bare_cpu), goal="information")]


if __name__ == "__main__":
    main()
