"""What a hostile client costs the other clients of the embedded broker, on the shipped defaults.

    python -m bench.hostile_bench [--messages 4000] [--repeats 3] [--json out.json]

The broker runs in its own process with the shipped ``[broker]`` and ``[broker.limits]``
defaults (one TCP listener, accounts in a password file, no anonymous access). A legitimate
technician (role ``technician``, no publish rate limit by default) publishes ``--messages`` QoS 1
messages (64 bytes, at most 16 unacknowledged) to ``P/devices/legit/register`` that a monitor
(role ``monitor``) receives; the rate is deliveries ÷ (last
delivery − first send). It is measured alone and while one hostile client, in its own
process, does one of:

- ``oversized``: a device account that connects, announces a 2 MiB PUBLISH to a topic it may
  not publish to (``P/jobs``) and sends its bytes, is disconnected, and starts again;
- ``denied flood``: a device account that sends QoS 0 PUBLISHes to ``P/jobs`` as fast as
  its socket takes them (256 KiB per write);
- ``slow reader``: a monitor account subscribed to the same messages that never reads its
  socket.

Runs alternate (alone, hostile, alone, hostile, ...) ``--repeats`` times per kind and the
medians are compared in the same run: the goal is that the hostile client costs the
legitimate ones at most 10 % of their throughput (≥ 0.9×). The broker's CPU per legitimate
delivery is given too, and the hostile side's own work (how many bytes or connections it got
through), so a hostile client that did nothing is not mistaken for a cheap one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.broker_bench import BrokerProc, Client, cpu_seconds, free_port, wait_port
from bench.summary import row
from gateway.broker.wire.codec import utf8, varint

PASSWORD = "bench-password-1"
ACCOUNTS = {"legit": "technician", "watch": "monitor", "hostile": "device", "lurker": "monitor"}
KINDS = ("oversized", "denied flood", "slow reader")

BROKER = """
import asyncio, sys
from gateway.config import parse_config
from gateway.broker.embedded import EmbeddedBroker, InternalCredentials
from gateway.logs import setup_logging
setup_logging("info", "json")   # as the daemon logs on the shipped defaults ([logging])
async def main():
    port, data = int(sys.argv[1]), sys.argv[2]
    cfg = parse_config({"gateway": {"data_dir": data},
        "broker": {"listeners": [{"name": "lan", "bind": f"127.0.0.1:{port}"}],
                   "auth": {"password_file": data + "/passwd"}}}, environ={}).config
    async with EmbeddedBroker(cfg, InternalCredentials.generate()):
        await asyncio.Event().wait()
asyncio.run(main())
"""


def prefix() -> str:
    from gateway.config import parse_config
    cfg = parse_config({"gateway": {"data_dir": "/nonexistent"},
                        "broker": {"listeners": [{"name": "l", "bind": "127.0.0.1:1"}]}}, environ={}).config
    return f"{cfg.gateway.topic_prefix}/{cfg.gateway.site_id}"


def start_broker(workdir: Path) -> BrokerProc:
    from gateway.broker.passwords import add_user
    data = workdir / "gateway"
    data.mkdir()
    for name, role in ACCOUNTS.items():
        add_user(data / "passwd", name, PASSWORD, role)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(BROKER), str(port), str(data)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return BrokerProc("gateway", port, proc)


# ------------------------------------------------------------------ the hostile process
def _connect_packet(client_id: str, username: str) -> bytes:
    var = utf8("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
    payload = utf8(client_id) + utf8(username) + utf8(PASSWORD)
    return b"\x10" + varint(len(var) + len(payload)) + var + payload


def _connected(port: int, client_id: str, username: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(_connect_packet(client_id, username))
    ack = sock.recv(4)
    if len(ack) < 4 or ack[3] != 0:
        raise RuntimeError(f"hostile CONNECT refused: {ack!r}")
    return sock


def hostile(kind: str, port: int, topic_prefix: str, stop_file: Path, report: Path) -> None:
    """Run one hostile client until ``stop_file`` exists; write what it got through to ``report``.
    ``report`` gets ``{}`` as soon as the client is at work (its first CONNECT accepted)."""
    denied = utf8(f"{topic_prefix}/jobs")
    done = {"connections": 0, "bytes": 0, "refused": 0}
    if kind == "oversized":
        size = 2 * 1024 * 1024
        head = b"\x30" + varint(len(denied) + size) + denied
        chunk = b"x" * 65536
        while not stop_file.exists():
            try:
                sock = _connected(port, "hostile", "hostile")
            except (OSError, RuntimeError):
                done["refused"] += 1
                continue
            done["connections"] += 1
            if done["connections"] == 1:
                report.write_text("{}")
            try:
                sock.sendall(head)
                sent = len(head)
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
                    done["bytes"] += len(chunk)
            except OSError:
                pass   # disconnected after the fixed header, as it should be
            finally:
                sock.close()
    elif kind == "denied flood":
        packet = b"\x30" + varint(len(denied) + 64) + denied + b"x" * 64
        burst = packet * (262144 // len(packet))
        sock = _connected(port, "hostile", "hostile")
        done["connections"] = 1
        report.write_text("{}")
        sock.settimeout(0.2)   # a paused reader blocks the send: look at the stop file meanwhile
        view, pos = memoryview(burst), 0
        try:
            while not stop_file.exists():
                try:
                    sent = sock.send(view[pos:])
                except TimeoutError:
                    continue
                done["bytes"] += sent
                pos = (pos + sent) % len(burst)
        except OSError:
            pass
    elif kind == "slow reader":
        sock = _connected(port, "lurker", "lurker")
        done["connections"] = 1
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        filt = utf8(f"{topic_prefix}/devices/+/register")
        body = struct.pack("!H", 1) + filt + b"\x01"
        sock.sendall(b"\x82" + varint(len(body)) + body)
        report.write_text("{}")
        while not stop_file.exists():   # never reads: the broker's writes to it back up
            time.sleep(0.05)
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(done))
    tmp.replace(report)


# ------------------------------------------------------------------ the legitimate clients
async def legit_run(pid: int, port: int, topic_prefix: str, messages: int) -> dict[str, float]:
    watch = Client(port, "watch", username="watch", password=PASSWORD,
                   topic=f"{topic_prefix}/devices/+/register")
    await watch.connect()
    await watch.subscribe(1)
    pub = Client(port, "legit", username="legit", password=PASSWORD,
                 topic=f"{topic_prefix}/devices/legit/register")
    await pub.connect()
    await asyncio.sleep(0.1)
    filler = b"x" * 56
    cpu0 = cpu_seconds(pid)
    start = time.perf_counter_ns()
    in_flight = 0
    for i in range(messages):
        if in_flight >= 16:
            assert pub.acked is not None
            await asyncio.wait_for(pub.acked.get(), 30)
            in_flight -= 1
        in_flight += 1
        pub.publish(i % 65535 + 1, 1, struct.pack("!q", time.perf_counter_ns()) + filler)
        if i % 64 == 63:
            await pub.writer.drain()
    deadline = time.monotonic() + 60
    while watch.received < messages and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    end = watch.last_rx or time.perf_counter_ns()
    cpu = cpu_seconds(pid) - cpu0
    got = watch.received
    for c in (watch, pub):
        await c.close()
    await asyncio.sleep(0.05)
    return {"delivered": got, "expected": messages,
            "msgs_per_s": got / ((end - start) / 1e9) if got and end > start else 0.0,
            "cpu_us_per_msg": 1e6 * cpu / max(got, 1)}


def run_with(kind: str | None, broker: BrokerProc, topic_prefix: str, messages: int,
             tmp: Path) -> dict[str, Any]:
    if kind is None:
        return asyncio.run(legit_run(broker.proc.pid, broker.port, topic_prefix, messages))
    stop, report = tmp / "stop", tmp / "report.json"
    stop.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.hostile_bench", "--hostile", kind,
                             "--port", str(broker.port), "--prefix", topic_prefix, "--stop-file", str(stop),
                             "--report", str(report)], env=env)
    try:
        # The hostile client is at work before the legitimate ones start: its first CONNECT (a
        # full password check) was accepted, then a second more. A fixed second alone let the
        # first check of a slow start overlap the measured run.
        deadline = time.monotonic() + 60
        while not report.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)
        if proc.poll() is not None or not report.exists():
            raise RuntimeError(f"hostile client ({kind}) not at work: exit status {proc.poll()}")
        result = asyncio.run(legit_run(broker.proc.pid, broker.port, topic_prefix, messages))
    finally:
        stop.touch()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result["hostile"] = json.loads(report.read_text()) if report.exists() else {}
    result["broker_rss_kb"] = _rss_kb(broker.proc.pid)
    return result


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = sorted(r[key] if r["delivered"] == r["expected"] else 0.0 for r in runs) if key == "msgs_per_s" \
        else sorted(r[key] for r in runs)
    return values[len(values) // 2]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=4000, help="legitimate QoS 1 messages per run")
    parser.add_argument("--repeats", type=int, default=3, help="alternated pairs (alone, hostile) per kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--hostile", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--stop-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hostile:
        hostile(args.hostile, args.port, args.prefix, args.stop_file, args.report)
        return []
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    topic_prefix = prefix()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(Path(tmp))
        try:
            for kind in kinds:
                alone: list[dict[str, Any]] = []
                hostile_runs: list[dict[str, Any]] = []
                for _ in range(args.repeats):
                    alone.append(run_with(None, broker, topic_prefix, args.messages, Path(tmp)))
                    hostile_runs.append(run_with(kind, broker, topic_prefix, args.messages, Path(tmp)))
                results[kind] = {"alone": alone, "hostile": hostile_runs}
                base, with_h = _median(alone, "msgs_per_s"), _median(hostile_runs, "msgs_per_s")
                print(f"{kind}: alone {[round(r['msgs_per_s']) for r in alone]} msg/s "
                      f"({_median(alone, 'cpu_us_per_msg'):.0f} us broker CPU/msg), with the hostile client "
                      f"{[round(r['msgs_per_s']) for r in hostile_runs]} msg/s "
                      f"({_median(hostile_runs, 'cpu_us_per_msg'):.0f} us), ratio {with_h / max(base, 1e-9):.2f}x; "
                      f"hostile side: {[r['hostile'] for r in hostile_runs]}; broker RSS "
                      f"{max(r['broker_rss_kb'] for r in hostile_runs) / 1024:.0f} MiB", flush=True)
        finally:
            broker.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    rows = []
    for kind, res in results.items():
        base, with_h = _median(res["alone"], "msgs_per_s"), _median(res["hostile"], "msgs_per_s")
        rows.append(row(f"broker: legitimate QoS 1 msg/s beside a hostile client ({kind}) vs alone, shipped defaults",
                        round(with_h), "msg/s", baseline=round(base), goal=">= 0.9x alone",
                        met=base > 0 and with_h / base >= 0.9))
    return rows


if __name__ == "__main__":
    main()
