"""Alarm rules benchmark: telemetry messages per second through the broker, with no rule
on the telemetry and with 100 rules loaded, in one run on this machine.

    python -m bench.alarms_bench [--messages 10000]

Each scenario starts the real daemon (embedded broker, its own data dir) and publishes
``--messages`` telemetry messages (QoS 1, at most 64 unacknowledged, ~30-byte JSON
payloads like ``{"v": 21.5}``) from 50 sensors over 100 metrics. The time runs until the
gateway has evaluated every one of them: a marker message follows the telemetry on a topic
that only a marker rule watches, and since the gateway evaluates messages in arrival order,
the marker's AlarmState arriving means everything before it was evaluated. Scenarios:

- ``none``: only the marker rule; the gateway does not even subscribe to the telemetry,
  so this is the broker taking the messages in (the baseline);
- ``1 rule``: one rule on ``{prefix}/devices/+/telemetry/+``: every message is delivered to
  the gateway's client and evaluated once (the cost of receiving telemetry at all);
- ``100 rules, 1 match``: 100 rules, one per metric (``{prefix}/devices/+/telemetry/m<i>``):
  each message is delivered to the gateway's client and evaluated by one rule;
- ``100 rules, 100 matches``: 100 rules on ``{prefix}/devices/+/telemetry/#``: each message
  is evaluated by all of them.

Values stay below every threshold (alarms are rare), so this measures evaluation, not job
submission. Besides the rate it prints the daemon's CPU time per message (user + system),
and, to separate the rules from the transport, the engine alone in this process
(``Engine.on_message`` on the same messages, no broker, no I/O).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.broker_bench import Client  # noqa: E402
from gateway.broker.wire.codec import utf8 as encode_topic, varint as remaining_length  # noqa: E402
from tests.support import GatewayProcess, MqttProbe, base_config, free_port, write_config  # noqa: E402

P = "homepot/site-t"
WINDOW = 64
SENSORS = 50
METRICS = 100
MARKER = {"name": "bench-done", "topic": "{prefix}/bench/done/+", "value": "", "above": 0.0, "key": "{1}",
          "target": {"devices": ["sink"]}}


def scenario_rules(name: str) -> list[dict]:
    if name == "none":
        return [MARKER]
    if name == "1 rule":
        return [MARKER, {"name": "temp", "topic": "{prefix}/devices/+/telemetry/+", "value": "v", "above": 1e9,
                         "key": "{device_id}/{2}", "target": {"segment": "ops"}}]
    if name == "100 rules, 1 match":
        return [MARKER] + [{"name": f"m{i}", "topic": f"{{prefix}}/devices/+/telemetry/m{i}", "value": "v",
                            "above": 1e9 + i, "key": "{device_id}", "target": {"segment": "ops"}}
                           for i in range(100)]
    return [MARKER] + [{"name": f"all{i}", "topic": "{prefix}/devices/+/telemetry/#", "value": "v",
                        "above": 1e9 + i, "key": "{device_id}/{2}", "target": {"segment": "ops"}}
                       for i in range(100)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publish(client: Client, topic: str, pid: int, payload: bytes) -> None:
    body = encode_topic(topic) + struct.pack("!H", pid) + payload
    client.writer.write(b"\x32" + remaining_length(len(body)) + body)


async def send(port: int, messages: int, marker: str, probe: MqttProbe) -> tuple[float, float]:
    """Publish the telemetry then the marker; return (seconds until all PUBACKed,
    seconds until the marker's AlarmState arrived)."""
    client = Client(port, f"bench-pub-{marker}")
    await client.connect()
    assert client.acked is not None
    in_flight = 0
    start = time.perf_counter()
    for i in range(messages + 1):
        if in_flight >= WINDOW:
            await client.acked.get()
            in_flight -= 1
        in_flight += 1
        if i < messages:
            topic = f"{P}/devices/s{i % SENSORS:02}/telemetry/m{i % METRICS}"
            payload = json.dumps({"v": 20 + (i % 7) * 0.5}).encode()
        else:
            topic, payload = f"{P}/bench/done/{marker}", b"1"
        publish(client, topic, i % 65535 + 1, payload)
        if i % 64 == 63:
            await client.writer.drain()
    await client.writer.drain()
    while in_flight:
        await client.acked.get()
        in_flight -= 1
    acked = time.perf_counter() - start
    deadline = time.monotonic() + 600
    while not probe.on(f"{P}/alarms/bench-done/{marker}") and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    done = time.perf_counter() - start
    await client.close()
    return acked, done


def run_scenario(name: str, messages: int, workdir: Path) -> dict[str, float]:
    workdir.mkdir(parents=True)
    port = free_port()
    cfg = base_config(workdir, port, rules=scenario_rules(name), logging={"level": "warning"},
                      bridges={"simulation": {"latency_ms": 0}})
    gw = GatewayProcess(write_config(workdir, cfg), workdir).start()
    assert gw.proc is not None
    probe = MqttProbe(port, [f"{P}/alarms/bench-done/#"])
    try:
        asyncio.run(send(port, min(1000, messages), "warmup", probe))
        cpu0 = cpu_seconds(gw.proc.pid)
        acked, done = asyncio.run(send(port, messages, "run", probe))
        cpu = cpu_seconds(gw.proc.pid) - cpu0
    finally:
        probe.close()
        gw.stop()
    return {"messages": messages, "acked_s": acked, "evaluated_s": done, "msgs_per_s": messages / done,
            "cpu_us_per_msg": cpu / messages * 1e6}


def engine_only(name: str, messages: int) -> float:
    """CPU microseconds per message for the rule engine alone, after a warm-up pass."""
    from gateway.alarms.engine import Engine
    from gateway.alarms.rules import RuleSection, compile_rule

    engine = Engine([compile_rule(RuleSection.model_validate(r), P) for r in scenario_rules(name)])
    engine.load([], {}, 0.0, 0.0)
    msgs = [(f"{P}/devices/s{i % SENSORS:02}/telemetry/m{i % METRICS}", json.dumps({"v": 20 + (i % 7) * 0.5}).encode())
            for i in range(messages)]
    for topic, payload in msgs[:SENSORS * METRICS]:
        engine.on_message(engine.begin(0.0), topic, payload)
    batch = engine.begin(0.0)
    start = time.process_time()  # CPU time, like the daemon's figure (the machine may be busy)
    for topic, payload in msgs:
        engine.on_message(batch, topic, payload)
    assert batch.empty
    return (time.process_time() - start) / messages * 1e6


def main() -> list[dict]:
    from bench.summary import row

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10000)
    args = parser.parse_args()
    names = ["none", "1 rule", "100 rules, 1 match", "100 rules, 100 matches"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            results[name] = run_scenario(name, args.messages, Path(tmp) / f"s{i}")
    base = results["none"]["msgs_per_s"]
    print(f"{'scenario':<24}{'msgs/s':>10}{'vs none':>9}{'PUBACKed after s':>18}{'evaluated after s':>19}"
          f"{'daemon CPU us/msg':>19}{'engine alone CPU us/msg':>25}")
    rows = []
    for name, r in results.items():
        alone = engine_only(name, args.messages) if name != "none" else 0.0
        print(f"{name:<24}{r['msgs_per_s']:>10,.0f}{r['msgs_per_s'] / base:>8.2f}x{r['acked_s']:>18.2f}"
              f"{r['evaluated_s']:>19.2f}{r['cpu_us_per_msg']:>19.0f}{alone:>25.1f}")
        rows.append(row(f"alarms: telemetry evaluated, {name}, msgs/s (baseline: no rule)", r["msgs_per_s"], "/s",
                        baseline=base))
    return rows


if __name__ == "__main__":
    main()
