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
An independent subscriber (another process) checks that every ack arrived once and in order.

    python -m bench.upstream_bench [--acks 20000] [--rtt-ms 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import threading
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


def _receiver_process(port: int, expected: int, ready_ev: Any, result_q: Any) -> None:
    """Subscribe P/acks at QoS 1; report count, order and the arrival span."""
    import paho.mqtt.client as paho

    seen: list[int] = []
    times: list[float] = []
    done = threading.Event()

    def on_connect(c: paho.Client, *_: Any) -> None:
        c.subscribe(f"{PREFIX}/acks", qos=1)

    def on_subscribe(*_: Any) -> None:
        ready_ev.set()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        seen.append(json.loads(msg.payload)["n"])
        times.append(time.perf_counter())
        if len(seen) >= expected:
            done.set()

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-receiver", clean_session=True)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(600)
    c.disconnect()
    c.loop_stop()
    result_q.put({"received": len(seen), "in_order": seen == sorted(seen),
                  "unique": len(set(seen)), "span_s": (times[-1] - times[0]) if times else None})


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
    cfg = parse_config(data, environ={})
    setup_logging("warning", "console")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    db = await Database(cfg.db_path).open()
    for i in range(acks):  # one transaction per ack, as the pipeline commits them
        payload = json.dumps({"message_id": f"m-{i:07}", "status": "received", "at": "2026-01-01T00:00:00.000Z",
                              "device_id": f"dev-{i % 5000}", "job_id": "bench", "latency_ms": 12.5,
                              "n": i}).encode()
        await db.run(lambda conn, p=payload: outbox.enqueue(conn, "ack", f"{PREFIX}/acks", p, False))
    link = UpstreamLink(cfg, db, NoIntake(), backoff_initial=0.05, backoff_max=0.5)
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
    ready_ev, result_q = ctx.Event(), ctx.Queue()
    receiver = ctx.Process(target=_receiver_process, args=(mosq_port, acks, ready_ev, result_q), daemon=True)
    receiver.start()
    assert ready_ev.wait(10), "receiver did not subscribe"
    try:
        with tempfile.TemporaryDirectory(prefix="upstream-bench-") as tmp:
            drained = asyncio.run(_drain(Path(tmp), proxy_port, acks, window))
        got = result_q.get(timeout=120)
    finally:
        stop_ev.set()
        proxy.join(5)
        receiver.join(5)
        for p in (proxy, receiver):
            if p.is_alive():
                p.kill()
    return {"rtt_ms": round(2 * delay_s * 1000), "window": window, "acks": acks, **drained, **got}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--acks", type=int, default=20000)
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--window", type=int, default=500, help="the default [upstream] max_inflight")
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


if __name__ == "__main__":
    main()
