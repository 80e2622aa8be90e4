"""A reference MQTT device: plays a PLC or terminal against the gateway.

    python -m devices.agent --device-id plc-7 --url mqtt://127.0.0.1:1883 --prefix homepot/site-001

It subscribes to ``P/devices/<id>/notify`` (QoS 1) on a persistent session whose client
id is the device id, so messages sent while it is offline are delivered when it comes
back; acks each envelope on ``P/devices/<id>/ack``; prints each envelope as one JSON line
on stdout; reconnects with jittered backoff. ``--register`` publishes its Device object
(one mqtt channel) first. It is a device-side tool, not part of the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt

from gateway.config import MqttUrl


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.prefix = args.prefix
        self.device_id = args.device_id
        self.received = 0
        self.seen: set[str] = set()
        self.stop = asyncio.Event()

    def _client(self) -> aiomqtt.Client:
        url = MqttUrl(self.args.url)
        password = Path(self.args.password_file).read_text().strip() if self.args.password_file else None
        tls = None
        if url.tls:
            import ssl

            tls = ssl.create_default_context(cafile=self.args.ca_file)
        return aiomqtt.Client(url.host, url.port, identifier=self.device_id, clean_session=False,
                              username=self.args.username, password=password, tls_context=tls,
                              transport=url.transport, keepalive=self.args.keepalive)

    async def run(self) -> int:
        delay = 0.2
        while not self.stop.is_set():
            try:
                async with self._client() as client:
                    delay = 0.2
                    if self.args.register:
                        device = {"device_id": self.device_id, "channels": [{"platform": "mqtt"}]}
                        if self.args.segment:
                            device["segment"] = self.args.segment
                        await client.publish(f"{self.prefix}/devices/{self.device_id}/register",
                                             json.dumps(device), qos=1)
                    await client.subscribe(f"{self.prefix}/devices/{self.device_id}/notify", qos=1)
                    print(json.dumps({"event": "ready", "device_id": self.device_id}), flush=True)
                    if await self._loop(client):
                        return 0
            except aiomqtt.MqttError as exc:
                print(json.dumps({"event": "disconnected", "error": str(exc)}), file=sys.stderr, flush=True)
                try:
                    await asyncio.wait_for(self.stop.wait(), random.uniform(delay / 2, delay))
                except TimeoutError:
                    pass
                delay = min(delay * 2, 10.0)
        return 0

    async def _loop(self, client: aiomqtt.Client) -> bool:
        stop_wait = asyncio.ensure_future(self.stop.wait())
        messages = aiter(client.messages)
        try:
            while True:
                nxt = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({nxt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return True
                message = nxt.result()
                try:
                    envelope = json.loads(message.payload)
                    message_id = envelope["message_id"]
                except (ValueError, KeyError, TypeError):
                    print(json.dumps({"event": "bad_message"}), file=sys.stderr, flush=True)
                    continue
                duplicate = message_id in self.seen
                self.seen.add(message_id)
                print(json.dumps({"event": "notify", "duplicate": duplicate, "envelope": envelope}), flush=True)
                if not self.args.no_ack:
                    ack = {"message_id": message_id, "status": self.args.ack_status, "at": _now()}
                    await client.publish(f"{self.prefix}/devices/{self.device_id}/ack", json.dumps(ack), qos=1)
                if not duplicate:
                    self.received += 1
                if self.args.count and self.received >= self.args.count:
                    return True
        finally:
            stop_wait.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--device-id", required=True)
    p.add_argument("--url", default="mqtt://127.0.0.1:1883")
    p.add_argument("--prefix", default="homepot/site-001", help="<topic_prefix>/<site_id>")
    p.add_argument("--username")
    p.add_argument("--password-file")
    p.add_argument("--ca-file")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--register", action="store_true", help="publish this device's registration first")
    p.add_argument("--segment")
    p.add_argument("--ack-status", default="received",
                   choices=["received", "displayed", "opened", "dismissed", "failed"])
    p.add_argument("--no-ack", action="store_true")
    p.add_argument("--count", type=int, default=0, help="exit after N distinct messages")
    args = p.parse_args(argv)
    agent = Agent(args)

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop.set)
        return await agent.run()

    return asyncio.run(runner())


if __name__ == "__main__":
    raise SystemExit(main())
