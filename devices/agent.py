"""A reference MQTT device: plays a PLC or terminal against the gateway.

    python -m devices.agent --device-id plc-7 --username plc-7 --password-file plc-7.password

It subscribes to ``P/devices/<id>/notify`` (QoS 1) on a persistent session whose client
id is the device id, so messages sent while it is offline are delivered when it comes
back; acks each envelope on ``P/devices/<id>/ack``; prints each envelope as one JSON line
on stdout; reconnects with jittered backoff. ``--register`` publishes its Device object
(one mqtt channel) first. It is a device-side tool, not part of the daemon.

Acks need a ``device`` account named like the device (contract §5: a device publishes
``P/devices/<its username>/ack``). MQTT 3.1.1 has no negative PUBACK, so a broker that
drops an ack it may not take still acknowledges it; the agent cannot see that directly.
It says what it can: a warning at start when it connects without that account, and a
warning when a message it already acked comes again (the gateway resends what it never
saw acked). A subscription the broker refuses is an error.

``--protocol 5`` speaks MQTT 5.0: the session is kept with a Session Expiry Interval that never
ends (what CleanSession=0 is in 3.1.1), and each ``notify`` line also shows what 5.0 carries
beside the envelope: the Message Expiry Interval left (the job's TTL) and the User Properties
(the gateway puts the delivery's ``message_id`` there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from pathlib import Path

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import mqtt_compat
from gateway.mqtt_url import MqttUrl
from gateway.timeutil import iso, utcnow


def _now() -> str:
    return iso(utcnow())


def _say(event: str, **fields: object) -> None:
    """A diagnostic for the person running the agent: one JSON line on stderr."""
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


class SubscriptionRefused(Exception):
    pass


# CONNACK 4/5 in MQTT 3.1.1; paho reports them as the 5.0 reason codes 134/135.
_REFUSED_CREDENTIALS = {4, 5, 134, 135}
SESSION_NEVER_EXPIRES = 0xFFFFFFFF


async def _publish_while_connected(client: aiomqtt.Client, topic: str, payload: str) -> None:
    """A QoS 1 publish that fails as soon as the connection is lost. aiomqtt's own wait for
    the PUBACK does not end with the connection but with its timeout (10 s), so an agent
    whose ack was in flight when the broker went away (a gateway killed and restarted) came
    back 10 s late and missed what was sent meanwhile for as long."""
    publish = asyncio.ensure_future(client.publish(topic, payload, qos=1))
    lost = client._disconnected  # checked by mqtt_compat: the future its message iterator also waits on
    await asyncio.wait({publish, lost}, return_when=asyncio.FIRST_COMPLETED)
    if not publish.done():
        publish.cancel()
        raise aiomqtt.MqttError("connection lost while an ack waited for its PUBACK")
    publish.result()


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.prefix = args.prefix
        self.device_id = args.device_id
        self.received = 0
        self.seen: set[str] = set()
        self.acked: set[str] = set()
        self.warned_redelivery = False
        self.stop = asyncio.Event()

    def account_warning(self) -> str | None:
        """Why this agent's acks will probably be dropped, judged from its own options."""
        ack_topic = f"{self.prefix}/devices/{self.device_id}/ack"
        if self.args.no_ack:
            return None
        if not self.args.username:
            return (f"connecting without a username: the broker gives anonymous clients the listener's "
                    f"anonymous_role, and by default only a `device` account named {self.device_id!r} may "
                    f"publish {ack_topic}; the broker acknowledges and drops acks it refuses (MQTT 3.1.1 has "
                    f"no negative PUBACK), so the gateway would never count them. Create the account "
                    f"(homepot-gateway users add {self.device_id} --role device --password-stdin) and pass "
                    f"--username {self.device_id} --password-file FILE.")
        if self.args.username != self.device_id:
            return (f"username {self.args.username!r} differs from the device id {self.device_id!r}: a `device` "
                    f"account may publish only {self.prefix}/devices/<its username>/ack, so acks on {ack_topic} "
                    f"are dropped unless that account's role allows them.")
        return None

    def _client(self) -> aiomqtt.Client:
        url = MqttUrl(self.args.url)
        password = Path(self.args.password_file).read_text().strip() if self.args.password_file else None
        tls = None
        if url.tls:
            import ssl

            tls = ssl.create_default_context(cafile=self.args.ca_file)
        if self.args.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_NEVER_EXPIRES   # a persistent session, as in 3.1.1
            session: dict[str, object] = {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": False,
                                          "properties": props}
        else:
            session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
        client = aiomqtt.Client(url.host, url.port, identifier=self.device_id,  # type: ignore[arg-type]
                                username=self.args.username, password=password, tls_context=tls,
                                transport=url.transport, keepalive=self.args.keepalive, **session)
        mqtt_compat.check(client)  # the private names this agent and the gateway reach (pinned aiomqtt)
        return client

    async def run(self) -> int:
        warning = self.account_warning()
        if warning:
            _say("warning", message=warning)
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
                    topic = f"{self.prefix}/devices/{self.device_id}/notify"
                    granted = await client.subscribe(topic, qos=1)
                    if any(getattr(code, "value", code) >= 0x80 for code in granted):
                        raise SubscriptionRefused(
                            f"the broker refused the subscription to {topic} (0x80): this client's role may not "
                            f"read it; connect with the device's own account (--username {self.device_id})")
                    print(json.dumps({"event": "ready", "device_id": self.device_id}), flush=True)
                    if await self._loop(client):
                        return 0
            except SubscriptionRefused as exc:
                _say("error", message=str(exc))
                return 2
            except aiomqtt.MqttError as exc:
                if isinstance(exc, MqttConnectError) and \
                        getattr(exc.rc, "value", exc.rc) in _REFUSED_CREDENTIALS:
                    _say("error", message=f"the broker refused our credentials ({exc}); check --username, "
                                          f"--password-file and the account (homepot-gateway users add)")
                    return 2
                _say("disconnected", error=str(exc))
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
                line: dict[str, object] = {"event": "notify", "duplicate": duplicate, "envelope": envelope}
                props = message.properties
                if props is not None:
                    line["message_expiry_s"] = getattr(props, "MessageExpiryInterval", None)
                    line["user_properties"] = dict(getattr(props, "UserProperty", []) or [])
                print(json.dumps(line), flush=True)
                if duplicate and message_id in self.acked and not self.warned_redelivery and not message.retain:
                    # Either our ack was lost in a crash, or the broker refuses our acks.
                    self.warned_redelivery = True
                    _say("ack_not_recorded", message_id=message_id,
                         hint=f"the gateway sent this message again after we acked it, so it did not record "
                              f"our ack; check that this client may publish {self.prefix}/devices/"
                              f"{self.device_id}/ack (a `device` account named {self.device_id!r}) and the "
                              f"gateway's log for a denied publish")
                if not self.args.no_ack:
                    ack = {"message_id": message_id, "status": self.args.ack_status, "at": _now()}
                    await _publish_while_connected(client, f"{self.prefix}/devices/{self.device_id}/ack",
                                                   json.dumps(ack))
                    self.acked.add(message_id)
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
    p.add_argument("--username", help="the device's broker account (a `device` role named like the device)")
    p.add_argument("--password-file", help="file holding that account's password (first line)")
    p.add_argument("--ca-file")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1", help="MQTT version (default 3.1.1)")
    p.add_argument("--register", action="store_true", help="publish this device's registration first")
    p.add_argument("--segment")
    p.add_argument("--ack-status", default="received",
                   choices=["received", "displayed", "opened", "dismissed", "failed"])
    p.add_argument("--no-ack", action="store_true")
    p.add_argument("--count", type=int, default=0, help="exit after N distinct messages")
    args = p.parse_args(argv)
    if args.password_file and not args.username:
        p.error("--password-file needs --username")
    if args.password_file:
        try:
            Path(args.password_file).read_text()
        except OSError as exc:
            p.error(f"--password-file: cannot read {args.password_file}: {exc.strerror}")
    agent = Agent(args)

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop.set)
        return await agent.run()

    return asyncio.run(runner())


if __name__ == "__main__":
    raise SystemExit(main())
