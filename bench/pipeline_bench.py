"""Pipeline benchmark: one 100,000-device job through the simulation bridge (zero latency).

Measures, in one run on this machine:
- the daemon end to end: deliveries/s from `send` until every delivery is acknowledged,
  and the daemon's peak RSS (VmHWM);
- a baseline: a bare loop doing only the SQLite writes the pipeline needs for the same
  job (delivery rows inserted page by page, each marked sent, each ack stored and
  marked acknowledged), with the same pragmas and the same batch sizes;
and prints the ratio (how much our expansion, dispatch and bookkeeping cost over the
unavoidable writes).

    python -m bench.pipeline_bench [--devices 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import base_config, bulk_register, free_port, write_config  # noqa: E402


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_daemon(n: int, workdir: Path, profile: Path | None = None) -> dict:
    port = free_port()
    cfg = base_config(workdir, port, bridges={"simulation": {"latency_ms": 0, "ack": True}},
                      dispatch={"batch_size": 500, "max_in_flight": 500}, logging={"level": "warning"})
    cfg_path = write_config(workdir, cfg)
    devices = [{"device_id": f"dev-{i:06}", "channels": [{"platform": "simulation"}]} for i in range(n)]
    bulk_register(workdir / "var", devices)
    notify = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(cfg_path), "run"], cwd=workdir,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify)}, stderr=open(workdir / "gw.log", "wb"))
    sock.settimeout(30)
    while b"READY=1" not in sock.recv(4096):
        pass
    spy = None
    if profile is not None:
        from bench import profiling
        spy = profiling.start(proc.pid, profile)
        time.sleep(1.0)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gateway", "--config", str(cfg_path), "send", "--title", "bench", "--all",
                    "--job-id", "bench-1"], check=True, capture_output=True, cwd=workdir)
    conn = sqlite3.connect(workdir / "var" / "gateway.db")
    first_sent = None
    while True:
        row = conn.execute("SELECT state, sent + acknowledged, acknowledged FROM jobs WHERE job_id='bench-1'").fetchone()
        if row and row[1] and first_sent is None:
            first_sent = time.perf_counter() - t0
        if row and row[0] == "acknowledged":
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    rss = _peak_rss_mb(proc.pid)
    if spy is not None:
        from bench import profiling
        profiling.stop(spy)
        print(profiling.summary(profile), flush=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return {"seconds": elapsed, "deliveries_per_s": n / elapsed, "first_delivery_s": first_sent, "peak_rss_mb": rss}


def run_baseline(n: int, workdir: Path, page: int = 500, batch: int = 500) -> dict:
    """Only the writes: same schema, pragmas (WAL, synchronous=FULL) and batch sizes."""
    from gateway.pipeline import schema
    from gateway.storage import connect

    path = workdir / "baseline.db"
    conn = connect(path)
    conn.execute("BEGIN IMMEDIATE")
    schema.migrate(conn)
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl) VALUES ('b', 'accepted', 'x', '{}', '{}', '{}', 0, 0, 0, 0)")
    conn.execute("COMMIT")
    ids = [f"dev-{i:06}" for i in range(n)]
    t0 = time.perf_counter()
    messages: list[str] = []
    for start in range(0, n, page):
        chunk = ids[start:start + page]
        rows = [(str(uuid.uuid4()), "b", d, "queued", 0.0) for d in chunk]
        messages += [r[0] for r in rows]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at) VALUES (?,?,?,?,?)", rows)
        conn.execute("UPDATE jobs SET targets = targets + ?, queued = queued + ? WHERE job_id = 'b'", (len(rows), len(rows)))
        conn.execute("COMMIT")
    now = time.time()
    for start in range(0, n, batch):
        chunk = messages[start:start + batch]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE deliveries SET state='sent', attempts=1, sent_at=? WHERE message_id=?", [(now, m) for m in chunk])
        conn.execute("UPDATE jobs SET queued = queued - ?, sent = sent + ? WHERE job_id='b'", (len(chunk), len(chunk)))
        conn.execute("COMMIT")
    for start in range(0, n, batch):
        chunk = messages[start:start + batch]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO acks(message_id, device_id, status, at, received_at) VALUES (?, 'd', 'received', 'x', ?)",
                         [(m, now) for m in chunk])
        conn.executemany("UPDATE deliveries SET state='acknowledged', acked_at=?, latency_ms=1 WHERE message_id=?",
                         [(now, m) for m in chunk])
        conn.execute("UPDATE jobs SET sent = sent - ?, acknowledged = acknowledged + ? WHERE job_id='b'", (len(chunk), len(chunk)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "deliveries_per_s": n / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--profile", type=Path, help="sample the daemon with py-spy into this file (raw) and summarise")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "d").mkdir()
        (work / "b").mkdir()
        daemon = run_daemon(args.devices, work / "d", args.profile)
        baseline = run_baseline(args.devices, work / "b") if not args.no_baseline else {"seconds": float("nan")}
    result = {"devices": args.devices, "daemon": daemon, "baseline_sqlite_only": baseline,
              "ratio_daemon_time_over_baseline": daemon["seconds"] / baseline["seconds"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
