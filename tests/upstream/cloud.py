"""A real Mosquitto standing in for the cloud controller's broker (TLS, accounts, mTLS),
and an independent paho observer that sees what the gateway sends up."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import trustme

from tests.support import Mosquitto, base_config, free_port

PREFIX = "homepot/site-t"
GW_USER, GW_PASSWORD = "gw-site-t", "cl0ud-s3cret-pw"
OBSERVER_USER, OBSERVER_PASSWORD = "controller", "controller-pw"


@dataclass
class Cloud:
    """Mosquitto with a TLS listener, a password file and optionally required client certs.

    Its own directory keeps its persistence file (retained messages, persistent sessions)
    apart from any other broker's, and across ``stop()``/``start()`` on the same port.
    """

    workdir: Path
    require_certificate: bool = False
    port: int = field(default_factory=free_port)
    plain_port: int = field(default_factory=free_port)  # same accounts, no TLS (for fault proxies)
    mosquitto: Mosquitto | None = None
    deny: list[str] = field(default_factory=list)   # topics the gateway's account may not use (ACL)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_pem = self.workdir / "server.pem"
        server.private_key_and_cert_chain_pem.write_to_path(str(self.server_pem))
        self.ca_file = self.workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        client = self.ca.issue_cert(GW_USER)
        self.client_cert = self.workdir / "gw-cert.pem"
        self.client_key = self.workdir / "gw-key.pem"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self.passwd = self.workdir / "passwd"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(self.passwd), GW_USER, GW_PASSWORD], check=True)
        subprocess.run(["mosquitto_passwd", "-b", str(self.passwd), OBSERVER_USER, OBSERVER_PASSWORD], check=True)
        self.password_file = self.workdir / "gw.password"
        self.password_file.write_text(GW_PASSWORD + "\n")

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def conf(self) -> str:
        return (
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.ca_file}\ncertfile {self.server_pem}\nkeyfile {self.server_pem}\n"
            f"require_certificate {'true' if self.require_certificate else 'false'}\n"
            f"password_file {self.passwd}\nallow_anonymous false\n"
            "max_queued_messages 100000\nmax_inflight_messages 100\n"
            f"listener {self.plain_port} 127.0.0.1\n"
            + self._acl()
        )

    def _acl(self) -> str:
        """An ACL file when topics are denied: everything allowed to both accounts but those."""
        if not self.deny:
            return ""
        acl = self.workdir / "acl"
        acl.write_text(f"user {GW_USER}\n" + "".join(f"topic deny {t}\n" for t in self.deny)
                       + f"topic readwrite #\nuser {OBSERVER_USER}\ntopic readwrite #\n")
        return f"acl_file {acl}\n"

    def start(self) -> "Cloud":
        self.mosquitto = Mosquitto(self.workdir, self.port, extra_conf=self.conf()).start()
        return self

    def stop(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.stop()

    def plain_section(self, port: int, **overrides: Any) -> dict[str, Any]:
        """``[upstream]`` for a plaintext link to ``port`` (a fault proxy in front of
        :attr:`plain_port`): same account, so ``allow_plaintext`` must be set. The fault proxy
        reads 3.1.1 frames (a 5.0 PUBLISH has properties before its payload), so the link speaks
        3.1.1 unless told otherwise; tests/upstream/test_v5_link.py covers 5.0."""
        section: dict[str, Any] = {"url": f"mqtt://127.0.0.1:{port}", "username": GW_USER,
                                   "password_file": str(self.password_file), "allow_plaintext": True,
                                   "protocol": "3.1.1"}
        section.update(overrides)
        return section

    def upstream_section(self, **overrides: Any) -> dict[str, Any]:
        section: dict[str, Any] = {"url": self.url, "username": GW_USER, "password_file": str(self.password_file),
                                   "ca_file": str(self.ca_file)}
        if self.require_certificate:
            section.update(cert_file=str(self.client_cert), key_file=str(self.client_key))
        section.update(overrides)
        return section

    def config_data(self, tmp: Path, **upstream: Any) -> dict[str, Any]:
        """A full gateway config (the local part is never started by in-process tests)."""
        return base_config(tmp, free_port(), upstream=self.upstream_section(**upstream))

    # -------------------------------------------------------------- clients
    def paho_client(self, client_id: str = "", clean_session: bool = True) -> paho.Client:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        c.username_pw_set(OBSERVER_USER, OBSERVER_PASSWORD)
        if self.require_certificate:
            obs = self.ca.issue_cert("observer")
            cert, key = self.workdir / "obs-cert.pem", self.workdir / "obs-key.pem"
            obs.cert_chain_pems[0].write_to_path(str(cert))
            obs.private_key_pem.write_to_path(str(key))
            c.tls_set(ca_certs=str(self.ca_file), certfile=str(cert), keyfile=str(key))
        else:
            c.tls_set(ca_certs=str(self.ca_file))
        return c

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        c = self.paho_client()
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            info = c.publish(topic, payload, qos=qos, retain=retain)
            info.wait_for_publish(timeout=5)
            assert info.is_published(), f"publish to {topic} not confirmed"
        finally:
            c.disconnect()
            c.loop_stop()

    def retained_many(self, topic_filter: str, count: int, timeout: float = 5.0) -> dict[str, bytes]:
        """The retained messages under ``topic_filter`` as a new subscriber sees them (one
        subscription, so one client for many topics); waits for ``count`` of them."""
        with Observer(self, topic_filter, client_id="") as obs:
            got = obs.wait_for(lambda msgs: len({m.topic for m in msgs}) >= count, timeout=timeout)
            return {m.topic: m.payload for m in got}

    def retained(self, topic: str, timeout: float = 3.0) -> bytes | None:
        """The retained message on ``topic`` as a new subscriber sees it (None if none)."""
        with Observer(self, topic, client_id="") as obs:
            got = obs.wait_for(lambda msgs: bool(msgs), timeout=timeout, raise_on_timeout=False)
            return got[0].payload if got else None


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    at: float

    @property
    def id(self) -> str | None:
        """The ``id`` the gateway adds to every row it sends up (None if absent)."""
        try:
            body = json.loads(self.payload)
        except ValueError:
            return None
        return body.get("id") if isinstance(body, dict) else None

    @property
    def body(self) -> bytes:
        """The payload as the pipeline queued it: without the ``id`` the link adds."""
        try:
            obj = json.loads(self.payload)
        except ValueError:
            return self.payload
        if not isinstance(obj, dict) or "id" not in obj:
            return self.payload
        obj.pop("id")
        return json.dumps(obj).encode()


class Observer:
    """A paho subscriber on the cloud broker; with a client id it keeps a persistent
    session, so the broker queues what it misses while the broker restarts."""

    def __init__(self, cloud: Cloud, topic_filter: str = f"{PREFIX}/#", client_id: str = "observer"):
        self.cloud = cloud
        self.filter = topic_filter
        self.messages: list[Seen] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        persistent = bool(client_id)
        self.client = cloud.paho_client(client_id, clean_session=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.2)

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self.filter, qos=1)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))

    def __enter__(self) -> "Observer":
        self.client.connect("127.0.0.1", self.cloud.port)
        self.client.loop_start()
        assert self._subscribed.wait(5), "observer could not subscribe"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> list[Seen]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, predicate: Callable[[list[Seen]], bool], timeout: float = 10.0,
                 raise_on_timeout: bool = True) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.snapshot()
            if predicate(msgs):
                return msgs
            if time.monotonic() > deadline:
                if raise_on_timeout:
                    raise AssertionError(f"observer timed out; saw {len(msgs)}: {[m.topic for m in msgs][-20:]}")
                return msgs
            time.sleep(0.02)
