"""HTTP API benchmark, through the real daemon.

1. **Acks per second, HTTP against MQTT, same run.** N MQTT devices get one job each way;
   their envelopes (with ``ack_url``) are collected by one subscriber. Then half are acked
   over MQTT (``P/devices/<id>/ack`` at QoS 1 from one client, as fast as it publishes)
   and half by POSTing the signed ack URLs (one HTTP/1.1 keep-alive client, 32 requests in
   flight). Rate = acks / (first send → last ack recorded in SQLite) — a 202 is only sent
   after the commit, so for HTTP the last 202 is that moment.
2. **/metrics scrape time with 100,000 devices** registered and a job to all of them
   delivered (100,000 delivery rows), against two baselines in the same run: ``/healthz``
   (the same HTTP path without SQLite) and the ``GROUP BY`` over ``deliveries`` that the
   kept ``delivery_stats`` replaces.
3. **What keeping the aggregates costs** the pipeline's writes: the same SQLite work without
   them, with the aggregates moved as the deliveries' one writer moves them and with the row triggers
   that kept them before issue 11 (their DDL is kept here for the comparison).

    python -m bench.http_bench [--acks 2000] [--devices 100000] [--scrapes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import MqttProbe, NotifySocket, base_config, bulk_register, free_port, write_config  # noqa: E402

P = "homepot/site-t"


def start_daemon(workdir: Path, extra: dict) -> tuple[subprocess.Popen[bytes], int, int]:
    port, http_port = free_port(), free_port()
    cfg = base_config(workdir, port, http={"bind": f"127.0.0.1:{http_port}"}, logging={"level": "warning"}, **extra)
    path = write_config(workdir, cfg)
    notify = NotifySocket(workdir / "notify.sock")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(path), "run"], cwd=workdir,
                            env={**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock")},
                            stderr=open(workdir / "gw.log", "wb"))
    notify.wait_for("READY", "1", timeout=120)
    notify.close()
    return proc, port, http_port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def acknowledged(db: Path, job_id: str) -> int:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT acknowledged FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row[0] if row else 0
    finally:
        conn.close()


def bench_acks(n: int, workdir: Path) -> dict:
    bulk_register(workdir / "var", [{"device_id": f"plc-{i:05}", "channels": [{"platform": "mqtt"}]}
                                    for i in range(2 * n)])
    proc, port, http_port = start_daemon(workdir, {"bridges": {"simulation": {"enabled": False}}})
    db = workdir / "var" / "gateway.db"
    base = f"http://127.0.0.1:{http_port}"
    try:
        probe = MqttProbe(port, [f"{P}/devices/+/notify"])
        http = httpx.Client(base_url=base)
        from gateway.broker.passwords import add_user

        add_user(workdir / "var" / "passwd", "tech", "tech-pw", "technician")
        mqtt_ids = [f"plc-{i:05}" for i in range(n)]
        http_ids = [f"plc-{i:05}" for i in range(n, 2 * n)]
        for job_id, targets in (("acks-mqtt", mqtt_ids), ("acks-http", http_ids)):
            r = http.post("/v1/jobs", auth=("tech", "tech-pw"), json={
                "job_id": job_id, "target": {"devices": targets}, "notification": {"title": "bench"}})
            assert r.status_code == 202, r.text
        envelopes = probe.wait_for(lambda ms: ms if len(ms) >= 2 * n else None, timeout=300)
        by_job: dict[str, list[tuple[str, dict]]] = {"acks-mqtt": [], "acks-http": []}
        for _, topic, payload, _ in envelopes:
            env = json.loads(payload)
            by_job[env["job_id"]].append((topic.split("/")[-2], env))

        # MQTT: one client publishing every ack at QoS 1, then wait until all are recorded.
        t0 = time.perf_counter()
        infos = [probe.client.publish(f"{P}/devices/{dev}/ack", json.dumps(
            {"message_id": env["message_id"], "status": "received", "at": "2030-01-01T00:00:00Z"}), qos=1)
            for dev, env in by_job["acks-mqtt"]]
        for info in infos:
            info.wait_for_publish(60)
        while acknowledged(db, "acks-mqtt") < n:
            time.sleep(0.01)
        mqtt_s = time.perf_counter() - t0

        # HTTP: POST the signed URLs, 32 at a time on keep-alive connections (aiohttp's client:
        # httpx's async client managed only ~60 requests/s here even against a bare server).
        async def post_all() -> float:
            import aiohttp

            sem = asyncio.Semaphore(32)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as client:
                async def one(url: str) -> None:
                    async with sem, client.post(url, json={"status": "received"}) as r:
                        assert r.status == 202, await r.text()
                t = time.perf_counter()
                await asyncio.gather(*(one(env["ack_url"]) for _, env in by_job["acks-http"]))
                return time.perf_counter() - t

        http_s = asyncio.run(post_all())
        assert acknowledged(db, "acks-http") == n
        probe.close()
        http.close()
    finally:
        stop(proc)
    return {"acks_each_way": n, "mqtt_acks_per_s": round(n / mqtt_s), "http_acks_per_s": round(n / http_s),
            "mqtt_s": round(mqtt_s, 2), "http_s": round(http_s, 2), "ratio_http_over_mqtt": round(mqtt_s / http_s, 2)}


def bench_scrape(n: int, scrapes: int, workdir: Path) -> dict:
    bulk_register(workdir / "var", [{"device_id": f"dev-{i:06}", "channels": [{"platform": "simulation"}]}
                                    for i in range(n)])
    proc, _, http_port = start_daemon(workdir, {"bridges": {"simulation": {"latency_ms": 0, "ack": True}}})
    base = f"http://127.0.0.1:{http_port}"
    db = workdir / "var" / "gateway.db"
    try:
        from gateway.broker.passwords import add_user

        add_user(workdir / "var" / "passwd", "tech", "tech-pw", "technician")
        with httpx.Client(base_url=base, timeout=120) as client:
            r = client.post("/v1/jobs", auth=("tech", "tech-pw"), json={
                "job_id": "scrape-1", "target": {"all": True}, "notification": {"title": "bench"}})
            assert r.status_code == 202
            while acknowledged(db, "scrape-1") < n:
                time.sleep(0.2)

            def timed(path: str) -> list[float]:
                out = []
                for _ in range(scrapes):
                    t = time.perf_counter()
                    resp = client.get(path)
                    out.append((time.perf_counter() - t) * 1000)
                    assert resp.status_code == 200
                return out

            metrics_ms = timed("/metrics")
            healthz_ms = timed("/healthz")
            size = len(client.get("/metrics").content)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        group_by_ms = []
        for _ in range(5):
            t = time.perf_counter()
            conn.execute("SELECT COALESCE(platform, ''), state, COUNT(*) FROM deliveries GROUP BY 1, 2").fetchall()
            group_by_ms.append((time.perf_counter() - t) * 1000)
        rows = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        conn.close()
    finally:
        stop(proc)

    def p(values: list[float], q: float) -> float:
        return round(sorted(values)[min(len(values) - 1, int(q * len(values)))], 1)

    return {"devices": n, "delivery_rows": rows, "metrics_bytes": size,
            "metrics_ms_p50": round(statistics.median(metrics_ms), 1), "metrics_ms_p95": p(metrics_ms, 0.95),
            "healthz_ms_p50": round(statistics.median(healthz_ms), 1),
            "group_by_baseline_ms_p50": round(statistics.median(group_by_ms), 1)}


# The row-level triggers gateway.stats used before issue 11 (platform key without ``route``,
# as this loop's rows have none), kept only to measure what tracking saves.
OLD_TRIGGERS = """
CREATE TRIGGER delivery_stats_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_stats(platform, state, n) VALUES (COALESCE(NEW.route, NEW.platform, ''), NEW.state, 1)
    ON CONFLICT(platform, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_stats_delete AFTER DELETE ON deliveries BEGIN
    UPDATE delivery_stats SET n = n - 1 WHERE platform = COALESCE(OLD.route, OLD.platform, '') AND state = OLD.state;
END;
CREATE TRIGGER delivery_stats_update AFTER UPDATE OF state, route, platform ON deliveries
WHEN OLD.state IS NOT NEW.state OR COALESCE(OLD.route, OLD.platform, '') IS NOT COALESCE(NEW.route, NEW.platform, '')
BEGIN
    UPDATE delivery_stats SET n = n - 1 WHERE platform = COALESCE(OLD.route, OLD.platform, '') AND state = OLD.state;
    INSERT INTO delivery_stats(platform, state, n) VALUES (COALESCE(NEW.route, NEW.platform, ''), NEW.state, 1)
    ON CONFLICT(platform, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER ack_latency_stats_update AFTER UPDATE OF state ON deliveries
WHEN NEW.state = 'acknowledged' AND OLD.state IS NOT 'acknowledged' AND NEW.latency_ms IS NOT NULL BEGIN
    INSERT INTO ack_latency_stats(platform, le, n, total_ms)
    VALUES (COALESCE(NEW.route, NEW.platform, ''), 250.0, 1, NEW.latency_ms)
    ON CONFLICT(platform, le) DO UPDATE SET n = n + 1, total_ms = total_ms + excluded.total_ms;
END;
"""


def bench_trigger_cost(n: int, workdir: Path) -> dict:
    """What keeping the delivery_stats/ack_latency_stats aggregates costs the pipeline's
    writes: the same SQLite work (insert n deliveries in pages of 500, mark them sent, then
    acknowledged with a latency; WAL, synchronous=FULL) without them, with
    the aggregates moved once per batch (as the deliveries' one writer does) and with the old row triggers
    (their latency bucket written as the constant 250: every latency in this loop is 120 ms)."""
    import contextlib
    import uuid

    from gateway import migrations, stats
    from gateway.storage import connect

    def run(mode: str, round_: int) -> float:
        path = workdir / f"t-{mode}-{round_}.db"
        conn = connect(path)
        conn.execute("BEGIN IMMEDIATE")
        migrations.migrate(conn)
        if mode == "triggers":
            for statement in OLD_TRIGGERS.strip().split("END;"):
                if statement.strip():
                    conn.execute(statement + "END;")
        conn.execute("INSERT INTO jobs(job_id, state, source, target, notification, options, created_at, "
                     "updated_at, expires_at, ttl) VALUES ('b', 'accepted', 'x', '{}', '{}', '{}', 0, 0, 0, 0)")
        conn.execute("COMMIT")

        @contextlib.contextmanager
        def tracked(counts: dict[tuple[str, str], int], latency: dict[tuple[str, float], list[float]]):
            # What the deliveries' one writer adds to a batch: the changes it knows, one upsert
            # per (platform, state) and per latency bucket (gateway.stats.apply_counts).
            yield
            if mode == "tracking":
                stats.apply_counts(conn, counts, latency)

        ids = [str(uuid.uuid4()) for _ in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, 500):
            chunk = ids[start:start + 500]
            conn.execute("BEGIN IMMEDIATE")
            with tracked({("", "queued"): len(chunk)}, {}):
                conn.executemany("INSERT INTO deliveries(message_id, job_id, device_id, state, next_at) "
                                 "VALUES (?, 'b', ?, 'queued', 0)", [(m, m) for m in chunk])
            conn.execute("COMMIT")
        for sql, old, new, acked in (
                ("UPDATE deliveries SET state = 'sent', platform = 'mqtt', attempts = 1, sent_at = 1 "
                 "WHERE message_id = ?", ("", "queued"), ("mqtt", "sent"), False),
                ("UPDATE deliveries SET state = 'acknowledged', acked_at = 2, latency_ms = 120 WHERE message_id = ?",
                 ("mqtt", "sent"), ("mqtt", "acknowledged"), True)):
            for start in range(0, n, 500):
                chunk = ids[start:start + 500]
                conn.execute("BEGIN IMMEDIATE")
                with tracked({old: -len(chunk), new: len(chunk)},
                             {("mqtt", stats.bucket_of(120.0)): [len(chunk), 120.0 * len(chunk)]} if acked else {}):
                    conn.executemany(sql, [(m,) for m in chunk])
                conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        if mode != "none":
            assert stats.delivery_counts(conn) == {("mqtt", "acknowledged"): n}, stats.delivery_counts(conn)
        conn.close()
        return elapsed

    # Alternating rounds, best of three each: the machine's other load is the noise.
    modes = ("none", "tracking", "triggers")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for round_ in range(3):
        for mode in modes:
            times[mode].append(run(mode, round_))
    best = {m: min(t) for m, t in times.items()}
    return {"deliveries": n, "without_aggregates_s": round(best["none"], 2),
            "with_tracking_s": round(best["tracking"], 2), "with_old_triggers_s": round(best["triggers"], 2),
            "tracking_overhead": f"{(best['tracking'] / best['none'] - 1) * 100:+.0f} %",
            "old_triggers_overhead": f"{(best['triggers'] / best['none'] - 1) * 100:+.0f} %"}


def main() -> list[dict]:
    from bench.summary import row

    ap = argparse.ArgumentParser()
    ap.add_argument("--acks", type=int, default=2000, help="acks each way (MQTT and HTTP)")
    ap.add_argument("--devices", type=int, default=100_000, help="devices for the /metrics scrape")
    ap.add_argument("--scrapes", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for sub in ("a", "s", "t"):
            (work / sub).mkdir()
        acks = bench_acks(args.acks, work / "a")
        scrape = bench_scrape(args.devices, args.scrapes, work / "s")
        triggers = bench_trigger_cost(args.devices, work / "t")
    print(json.dumps({"acks": acks, "metrics_scrape": scrape, "trigger_cost": triggers}, indent=2))
    return [row("HTTP acks (signed URLs), acks/s (baseline: MQTT acks)", acks["http_acks_per_s"], "/s",
                baseline=acks["mqtt_acks_per_s"]),
            row(f"/metrics scrape p50, {args.devices:,} devices and deliveries (baseline: /healthz)",
                scrape["metrics_ms_p50"], "ms", baseline=scrape["healthz_ms_p50"]),
            row("SQLite writes of a job with / without the delivery_stats aggregates (one writer's apply_counts)",
                triggers["with_tracking_s"], "s", baseline=triggers["without_aggregates_s"]),
            row("the same writes with the old row triggers (before issue 11) / without aggregates",
                triggers["with_old_triggers_s"], "s", baseline=triggers["without_aggregates_s"])]


if __name__ == "__main__":
    main()
