"""Pipeline benchmark: one 100,000-device job through the simulation bridge (zero latency).

Measures, in one run on this machine:
- the daemon end to end: deliveries/s from `send` until every delivery is acknowledged;
- memory: the daemon's RSS when idle after start (VmRSS), and its peak during the job
  (VmHWM, reset with ``/proc/<pid>/clear_refs`` just before `send`, so the figure is the
  job's, not a start-up spike's); the start-up peak (VmHWM before the reset) is shown too;
- ack latency: from a device's ack (its ``at``) to the ack's commit (``acks.received_at``,
  taken in the committing transaction), p50 and p99 over every ack of the job;
- a baseline: a bare loop doing only the SQLite writes the pipeline needs for the same
  job (delivery rows inserted page by page; each ack stored and its delivery marked sent
  and acknowledged in one update, as the daemon writes a send and its first ack that meet
  in one batch), with the daemon's schema (pipeline tables and indexes, and the
  ``gateway.stats`` aggregates moved once per batch as the store does), its writer's
  pragmas, its message_id layout and its batch sizes;
and the ratio of the two.

    python -m bench.pipeline_bench [--devices 100000] [--profile out.raw] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon import Daemon, cpu_s, peak_rss_mb, rss_mb  # noqa: E402
from bench.summary import row  # noqa: E402
from tests.support import bulk_register  # noqa: E402

GOAL_PER_S = 10_000
GOAL_IDLE_MB = 60.0
GOAL_PEAK_OVER_IDLE_MB = 64.0


def _ack_latencies_ms(db: Path, job_id: str) -> list[float]:
    from gateway.timeutil import parse_iso

    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT a.at, a.received_at FROM acks a JOIN deliveries d ON d.message_id = a.message_id "
                            "WHERE d.job_id = ?", (job_id,)).fetchall()
    finally:
        conn.close()
    return sorted(max(0.0, (received - parse_iso(at).timestamp()) * 1000) for at, received in rows)


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# What the fan-out runs with: the shipped dispatch defaults, nothing overridden (a test
# keeps it so); only the simulated fleet is made instantaneous.
DAEMON_CONFIG: dict = {"bridges": {"simulation": {"latency_ms": 0, "ack": True}}}


def run_daemon(n: int, workdir: Path, profile: Path | None = None, dispatch: dict | None = None) -> dict:
    extra = dict(DAEMON_CONFIG, dispatch=dispatch) if dispatch else dict(DAEMON_CONFIG)
    daemon = Daemon(workdir, **extra)
    bulk_register(workdir / "var", [{"device_id": f"dev-{i:06}", "channels": [{"platform": "simulation"}]}
                                    for i in range(n)])
    ready_s = daemon.start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    try:
        time.sleep(2.0)  # idle: start-up work done
        start_peak, idle = peak_rss_mb(pid), rss_mb(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM: the peak below is the job's
        spy = None
        if profile is not None:
            from bench import profiling
            spy = profiling.start(pid, profile)
            time.sleep(1.0)
        cpu0 = cpu_s(pid)
        t0 = time.perf_counter()
        daemon.cli("send", "--title", "bench", "--all", "--yes", "--job-id", "bench-1")
        conn = sqlite3.connect(workdir / "var" / "gateway.db")
        first_sent = None
        while True:
            r = conn.execute("SELECT state, sent + acknowledged FROM jobs WHERE job_id='bench-1'").fetchone()
            if r and r[1] and first_sent is None:
                first_sent = time.perf_counter() - t0
            if r and r[0] == "acknowledged":
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        cpu = cpu_s(pid) - cpu0
        conn.close()
        peak = peak_rss_mb(pid)
        if spy is not None:
            from bench import profiling
            profiling.stop(spy)
            print(profiling.summary(profile), flush=True)  # type: ignore[arg-type]
    finally:
        daemon.stop()
    lat = _ack_latencies_ms(workdir / "var" / "gateway.db", "bench-1")
    return {"seconds": elapsed, "deliveries_per_s": n / elapsed, "first_delivery_s": first_sent,
            "daemon_cpu_s": cpu, "cpu_us_per_delivery": cpu / n * 1e6,
            "ready_s": ready_s, "idle_rss_mb": idle, "startup_peak_mb": start_peak, "job_peak_rss_mb": peak,
            "acks": len(lat), "ack_to_commit_p50_ms": _pct(lat, 0.50), "ack_to_commit_p99_ms": _pct(lat, 0.99)}


def run_baseline(n: int, workdir: Path, page: int = 500, batch: int = 500) -> dict:
    """Only the writes the job needs, made as the daemon makes them: its schema (pipeline
    tables and indexes, the ``gateway.stats`` aggregates), its writer's pragmas (WAL,
    synchronous=FULL, ``storage.WRITER_PRAGMAS``), its message_id layout, its batch sizes.
    Per page: the delivery rows inserted (aggregates moved as written). Per batch of acks:
    the acks stored and each delivery moved to acknowledged with its send recorded in the
    same UPDATE (what ``acks.apply_batch`` writes when the send's result and the device's
    ack are in one recorder batch, as they are for a device that acks at once), the job's
    counts and the aggregates moved once. One transaction (one fsync) per page and per batch."""
    from gateway import migrations, stats
    from gateway.pipeline import deliveries
    from gateway.storage import WRITER_PRAGMAS, connect

    path = workdir / "baseline.db"
    conn = connect(path)
    for pragma in WRITER_PRAGMAS:
        conn.execute(pragma)
    conn.execute("BEGIN IMMEDIATE")
    migrations.migrate(conn)
    conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, updated_at, "
                 "expires_at, ttl) VALUES ('b', 'accepted', 'x', '{}', '{}', '{}', 0, 0, 0, 0)")
    conn.execute("COMMIT")
    ids = [f"dev-{i:06}" for i in range(n)]
    t0 = time.perf_counter()
    c0 = time.process_time()
    messages: list[tuple[str, str]] = []
    for start in range(0, n, page):
        chunk = ids[start:start + page]
        rows = [(deliveries.new_message_id(), "b", d, "queued", 0.0, "simulation") for d in chunk]
        messages += [(r[0], r[2]) for r in rows]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at, route) "
                         "VALUES (?,?,?,?,?,?)", rows)
        stats.apply_counts(conn, {("simulation", "queued"): len(rows)}, {})
        conn.execute("UPDATE jobs SET targets = targets + ?, queued = queued + ? WHERE job_id = 'b'", (len(rows), len(rows)))
        conn.execute("COMMIT")
    for start in range(0, n, batch):
        chunk = messages[start:start + batch]
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO acks(message_id, device_id, status, at, received_at) "
                         "VALUES (?, ?, 'received', '2026-01-01T00:00:00.000Z', ?)", [(m, d, now) for m, d in chunk])
        conn.executemany("UPDATE deliveries SET state = 'acknowledged', acked_at = ?, latency_ms = 1, resend_at = NULL, "
                         "last_error = NULL, platform = 'simulation', route = 'simulation', attempts = 1, sent_at = ? "
                         "WHERE message_id = ?", [(now, now, m) for m, _ in chunk])
        stats.apply_counts(conn, {("simulation", "queued"): -len(chunk), ("simulation", "acknowledged"): len(chunk)},
                           {("simulation", stats.bucket_of(1.0)): [len(chunk), float(len(chunk))]})
        conn.execute("INSERT INTO counters(name, value) VALUES ('acks_stored', ?) "
                     "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (len(chunk),))
        conn.execute("UPDATE jobs SET queued = queued - ?, acknowledged = acknowledged + ? WHERE job_id = 'b'",
                     (len(chunk), len(chunk)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    conn.close()
    return {"seconds": elapsed, "deliveries_per_s": n / elapsed, "cpu_us_per_delivery": cpu / n * 1e6}


def main() -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--profile", type=Path, help="sample the daemon with py-spy into this file (raw) and summarise")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--dispatch", action="append", default=[], metavar="KEY=INT",
                    help="override a [dispatch] key (A/B against other settings; the bench itself uses the defaults)")
    args = ap.parse_args()
    dispatch = {k: int(v) for k, v in (a.split("=", 1) for a in args.dispatch)}
    n = args.devices
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "d").mkdir()
        (work / "b").mkdir()
        d = run_daemon(n, work / "d", args.profile, dispatch)
        base = run_baseline(n, work / "b") if not args.no_baseline else None
    print(json.dumps({"devices": n, "dispatch": dispatch or "defaults", "load_avg": os.getloadavg(), "daemon": d, "baseline_sqlite_only": base}, indent=2), flush=True)
    rows = [
        row(f"fan-out {n:,} devices with acks, deliveries/s", d["deliveries_per_s"], "/s",
            baseline=base["deliveries_per_s"] if base else None, goal=f">= {GOAL_PER_S:,}/s",
            met=d["deliveries_per_s"] >= GOAL_PER_S),
        row("fan-out: daemon CPU per delivery (user+sys, all threads)", d["cpu_us_per_delivery"], "us",
            baseline=base["cpu_us_per_delivery"] if base else None, goal="information (steadier under load)"),
        row("fan-out: daemon idle RSS after start", d["idle_rss_mb"], "MB", goal=f"<= {GOAL_IDLE_MB:.0f} MB",
            met=d["idle_rss_mb"] <= GOAL_IDLE_MB),
        row(f"fan-out: peak RSS during the {n:,} job (VmHWM reset before it)", d["job_peak_rss_mb"], "MB",
            baseline=d["idle_rss_mb"], goal=f"<= idle + {GOAL_PEAK_OVER_IDLE_MB:.0f} MB",
            met=d["job_peak_rss_mb"] <= d["idle_rss_mb"] + GOAL_PEAK_OVER_IDLE_MB),
        row("daemon start-up peak RSS (VmHWM before the job; information)", d["startup_peak_mb"], "MB"),
        row("ack latency p50 under the fan-out (device ack -> committed)", d["ack_to_commit_p50_ms"], "ms",
            goal="measured", met=d["acks"] == n),
        row("ack latency p99 under the fan-out (device ack -> committed)", d["ack_to_commit_p99_ms"], "ms",
            goal="measured", met=d["acks"] == n),
    ]
    return rows


if __name__ == "__main__":
    main()
