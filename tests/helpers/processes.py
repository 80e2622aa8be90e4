"""Real processes for end-to-end tests: the daemon (``python -m gateway run``), Mosquitto,
an independent MQTT client, the CLI, and the systemd notify socket the daemon reports to.

The daemon's starter binds port 0 (the kernel picks a free port, so two tests never race
for one) and reads the ports it got from ``runtime.json``, which the daemon writes before
READY=1. A restart of the same :class:`GatewayProcess` keeps those ports when the test has
not rewritten the config, so clients that reconnect find it where it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

def require_tool(name: str) -> str:
    """The path of a command the tests drive. A missing tool fails the test (never a skip):
    `make test` installs the Makefile's DEBIAN_TEST_PACKAGES when it runs as root."""
    import pytest

    path = shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if Path(f"{d}/{name}").exists()), None)
    if path is None:
        pytest.fail(f"{name} is not installed: the tests need it; `make test` as root installs the Makefile's "
                    "DEBIAN_TEST_PACKAGES (mosquitto, mosquitto-clients, systemd, ...)", pytrace=False)
    return path


def free_port() -> int:
    """A port that was free a moment ago: only for a process that cannot bind port 0 and
    report it (Mosquitto), or a config that must name a port before anything starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


# ------------------------------------------------------------------ systemd notify
class NotifySocket:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path.unlink(missing_ok=True)  # a previous daemon's socket file in the same workdir
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def _recv(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return False
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))
        return True

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, fields in self.messages[seen:]:
                seen += 1
                if key in fields and (value is None or fields[key] == value):
                    return fields
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {key}={value} on the notify socket; got {self.messages}")
            self._recv(remaining)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._recv(remaining)

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ the daemon
@dataclass
class GatewayProcess:
    """``python -m gateway run`` as a real child process."""

    config: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None
    log_path: Path | None = None
    data: dict[str, Any] | None = None  # the config as written (gateway_factory), if known
    port: int = 0  # the broker's first listener, once started
    http_port: int | None = None
    ports: dict[str, Any] = field(default_factory=dict)  # runtime.json "ports" of the last start
    _starts: int = 0
    _written: str | None = None

    @classmethod
    def from_data(cls, workdir: Path, data: dict[str, Any], name: str = "config.toml",
                  env: dict[str, str] | None = None) -> "GatewayProcess":
        from tests.helpers.config import write_config

        path = write_config(workdir, data, name)
        gw = cls(path, workdir, env=dict(env or {}), data=data)
        gw._written = path.read_text()
        return gw

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> "GatewayProcess":
        self._starts += 1
        if self._starts > 1:
            self._pin_ports()
        sock_path = self.workdir / f"n{id(self) % 100000}-{self._starts}.sock"
        if self.notify:
            self.notify.close()
        self.notify = NotifySocket(sock_path)
        self.log_path = self.workdir / f"gateway-{self._starts}.log"
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("HOMEPOT_GATEWAY_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(self.config), "run"],
            cwd=self.workdir, env=env, stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "wb"),
        )
        if wait_ready:
            try:
                self.notify.wait_for("READY", "1", timeout=timeout)
            except TimeoutError:
                self.kill()
                raise AssertionError(f"gateway did not get ready; log:\n{self.log()}") from None
            self.read_ports()
        return self

    # ---------------------------------------------------------------- ports
    def runtime_dir(self) -> Path:
        with open(self.config, "rb") as f:
            data_dir = Path(tomllib.load(f).get("gateway", {}).get("data_dir", "./var"))
        return data_dir if data_dir.is_absolute() else self.workdir / data_dir

    def runtime(self) -> dict[str, Any]:
        return json.loads((self.runtime_dir() / "runtime.json").read_text())

    def read_ports(self) -> dict[str, Any]:
        """The ports of this start, from runtime.json (written before READY=1)."""
        self.ports = self.runtime().get("ports") or {}
        broker = self.ports.get("broker") or {}
        # A port the test set itself (gw.port = one listener's) is kept: it knows which it means.
        if broker and not self.port:
            self.port = next(iter(broker.values()))
        if not self.http_port:
            self.http_port = self.ports.get("http")
        return self.ports

    def _pin_ports(self) -> None:
        """Before a restart: rewrite our own config (if the test left it alone) with the
        ports the last start got, so a restarted daemon is where its clients left it."""
        if self.data is None or self._written is None or not self.ports:
            return
        if not self.config.exists() or self.config.read_text() != self._written:
            return
        from tests.helpers.config import write_config

        broker = self.ports.get("broker") or {}
        data = json.loads(json.dumps(self.data))
        for listener in data.get("broker", {}).get("listeners", []):
            if listener.get("bind", "").endswith(":0") and listener.get("name") in broker:
                listener["bind"] = f"{listener['bind'][:-2]}:{broker[listener['name']]}"
        url = data.get("broker", {}).get("url", "")
        if re.search(r":0/?$", url) and self.port:
            data["broker"]["url"] = re.sub(r":0/?$", f":{self.port}", url)
        http = data.get("http")
        if isinstance(http, dict) and str(http.get("bind", "")).endswith(":0") and self.http_port:
            http["bind"] = f"{http['bind'][:-2]}:{self.http_port}"
        write_config(self.config.parent, data, self.config.name)
        self.data = data
        self._written = self.config.read_text()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)


# ------------------------------------------------------------------ Mosquitto
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@dataclass
class Mosquitto:
    workdir: Path
    port: int
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Mosquitto":
        require_tool("mosquitto")
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        body = self.extra_conf or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        # As root Mosquitto drops to user "mosquitto", who cannot read pytest's 0700 tmp dirs.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(body + run_as + f"persistence true\npersistence_location {self.workdir}/\n")
        self.log_path = self.workdir / f"mosquitto-{self.port}.log"
        self.proc = subprocess.Popen([require_tool("mosquitto"), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "wb"))
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------ an independent MQTT client
class MqttProbe:
    """paho-mqtt client for tests: collects messages (with arrival time), publishes."""

    def __init__(self, port: int, topics: list[str] | None = None, host: str = "127.0.0.1",
                 username: str | None = None, password: str | None = None, client_id: str = ""):
        import threading

        import paho.mqtt.client as paho

        self.messages: list[tuple[float, str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        if username:
            self.client.username_pw_set(username, password)
        self._topics = topics or []
        self._subscribed = threading.Event()

        def on_connect(cl, userdata, flags, reason, props):  # noqa: ANN001
            if self._topics:
                cl.subscribe([(t, 1) for t in self._topics])
            else:
                self._subscribed.set()

        def on_subscribe(cl, userdata, mid, reasons, props):  # noqa: ANN001
            self._subscribed.set()

        def on_message(cl, userdata, msg):  # noqa: ANN001
            with self._lock:
                self.messages.append((time.monotonic(), msg.topic, msg.payload, bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("probe did not connect/subscribe")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def on(self, topic_filter: str) -> list[tuple[float, str, bytes, bool]]:
        import paho.mqtt.client as paho

        with self._lock:
            return [m for m in self.messages if paho.topic_matches_sub(topic_filter, m[1])]

    def wait_for(self, predicate, timeout: float = 10.0):  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                snapshot = list(self.messages)
            result = predicate(snapshot)
            if result:
                return result
            time.sleep(0.02)
        raise TimeoutError(f"condition not met; got {[(t, p[:200]) for _, t, p, _ in self.messages[-10:]]}")

    def close(self, timeout: float = 10.0) -> None:
        """What was published goes out first (as paho's ``loop_stop`` would wait for it),
        then DISCONNECT, which wakes the network thread at once (``loop_stop`` alone leaves
        it in its one-second select: a second per probe)."""
        deadline = time.monotonic() + timeout
        # paho-mqtt is pinned exactly: its queues of unsent packets and unacknowledged publishes.
        while (self.client.is_connected() and (self.client._out_packet or self.client._out_messages)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()


def cli(config: Path, *args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=config.parent, input=input)


