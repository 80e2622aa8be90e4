"""Upstream drain benchmark: buffered acks drained to a cloud broker at 0 ms and 100 ms RTT.

Measures, in one run on this machine, against the same proxy and the same Mosquitto:
- the real :class:`~gateway.upstream.link.UpstreamLink` draining N acks that were queued
  in its outbox while the cloud was away (one committed transaction each, as the
  pipeline does), from the moment the link is connected until the outbox is empty, i.e.
  every row PUBACKed by the cloud broker and deleted;
- through a delay proxy (each direction delayed by half the RTT, in a process of its own)
  at 0 ms and at 100 ms RTT;
- with the default window (``[upstream] max_inflight``) and with a window of 64, the
  publishes the drain kept in flight before the sliding window (it waited for a whole batch).
An independent subscriber (``mosquitto_sub``) checks that every ack arrived once and in order.

    python -m bench.upstream_bench [--acks 20000] [--rtt-ms 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Mosquitto, base_config, free_port  # noqa: E402

PREFIX = "homepot/site-b"


def _proxy_process(target_port: int, delay_s: float, port_q: Any, stop_ev: Any) -> None:
    from tests.upstream.proxy import MqttFaultProxy

    proxy = MqttFaultProxy(target_port, delay_s=delay_s, parse=False).start()
    port_q.put(proxy.port)
    stop_ev.wait()
    proxy.stop()


class Receiver:
    """``mosquitto_sub`` (C, so it costs the measured process nothing) on P/acks at QoS 1;
    line-buffered (``stdbuf``) so its SUBACK line is seen before the drain starts."""

    def __init__(self, port: int, expected: int):
        self.expected = expected
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", f"{PREFIX}/acks", "-q", "1",
             "-C", str(expected), "-d", "-i", f"bench-receiver-{time.monotonic_ns()}"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # -d: debug lines; wait for the SUBACK
            if "SUBACK" in line:
                return
        raise RuntimeError("mosquitto_sub did not subscribe")

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=120)
        seen = [json.loads(line)["n"] for line in out.splitlines() if line.startswith("{")]
        return {"received": len(seen), "in_order": seen == sorted(seen), "unique": len(set(seen))}


async def _drain(workdir: Path, proxy_port: int, acks: int, window: int) -> dict[str, Any]:
    from gateway.config import parse_config
    from gateway.logs import setup_logging
    from gateway.storage import Database
    from gateway.upstream import outbox
    from gateway.upstream.link import UpstreamLink

    class NoIntake:
        async def submit_job(self, payload: bytes, source: str) -> None: ...

        async def register_device(self, device_id: str, payload: bytes, source: str) -> None: ...

    data = base_config(workdir, free_port(), upstream={"url": f"mqtt://127.0.0.1:{proxy_port}",
                                                        "client_id": f"bench-{window}", "max_inflight": window})
    data["gateway"]["site_id"] = "site-b"
    cfg, secrets = parse_config(data, environ={})
    setup_logging("warning", "console")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database(cfg.db_path).open()
    for i in range(acks):  # one transaction per ack, as the pipeline commits them
        payload = json.dumps({"message_id": f"m-{i:07}", "status": "received", "at": "2026-01-01T00:00:00.000Z",
                              "device_id": f"dev-{i % 5000}", "job_id": "bench", "latency_ms": 12.5,
                              "n": i}).encode()
        await db.run(lambda conn, p=payload: outbox.Outbox().enqueue(conn, "ack", f"{PREFIX}/acks", p, False))
    link = UpstreamLink(cfg, db, NoIntake(), secrets=secrets.upstream, backoff_initial=0.05, backoff_max=0.5)
    stopping = asyncio.Event()
    task = asyncio.create_task(link.run(stopping))
    await link.client.up.wait()
    t0 = time.perf_counter()
    while True:
        m = link.metrics()
        if m.get("buffer_rows") == 0 and m["published"] >= acks:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    m = link.metrics()
    stopping.set()
    await task
    await db.close()
    return {"elapsed_s": elapsed, "acks_per_s": acks / elapsed, "forget_commits": m["forget_commits"],
            "resent": m["resent"]}


def run_case(mosq_port: int, acks: int, delay_s: float, window: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    port_q, stop_ev = ctx.Queue(), ctx.Event()
    proxy = ctx.Process(target=_proxy_process, args=(mosq_port, delay_s, port_q, stop_ev), daemon=True)
    proxy.start()
    proxy_port = port_q.get(timeout=10)
    receiver = Receiver(mosq_port, acks)
    try:
        with tempfile.TemporaryDirectory(prefix="upstream-bench-") as tmp:
            drained = asyncio.run(_drain(Path(tmp), proxy_port, acks, window))
        got = receiver.result()
    finally:
        stop_ev.set()
        proxy.join(5)
        if proxy.is_alive():
            proxy.kill()
        if receiver.proc.poll() is None:
            receiver.proc.kill()
    return {"rtt_ms": round(2 * delay_s * 1000), "window": window, "acks": acks, **drained, **got}


def main() -> list[dict]:
    from bench.summary import row

    parser = argparse.ArgumentParser()
    parser.add_argument("--acks", type=int, default=20000)
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--window", type=int, default=1000, help="the default [upstream] max_inflight")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upstream-bench-mosq-") as tmp:
        port = free_port()
        mosq = Mosquitto(Path(tmp), port, extra_conf=f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                         "max_inflight_messages 1000\nmax_queued_messages 1000000\n").start()
        results = []
        try:
            for window in (args.window, 64):
                for delay_ms in (0.0, args.rtt_ms / 2):
                    r = run_case(port, args.acks, delay_ms / 1000, window)
                    results.append(r)
                    print(f"rtt {r['rtt_ms']:>4} ms  window {window:>4}: {r['acks']} acks in {r['elapsed_s']:.2f} s"
                          f" = {r['acks_per_s']:,.0f} acks/s; received {r['received']} unique {r['unique']}"
                          f" in order {r['in_order']}; delete transactions {r['forget_commits']};"
                          f" resent {r['resent']}", flush=True)
        finally:
            mosq.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    out = []
    for r in results:
        ok = r["received"] == r["acks"] and r["unique"] == r["acks"] and r["in_order"]
        goal, met = "all received once, in order", ok
        if r["window"] == args.window and r["rtt_ms"] > 0:
            goal, met = ">= 2,000/s, all received once, in order", ok and r["acks_per_s"] >= 2000
        out.append(row(f"upstream drain, RTT {r['rtt_ms']} ms, window {r['window']}, acks/s", r["acks_per_s"], "/s",
                       goal=goal, met=met))
    return out


if __name__ == "__main__":
    main()
