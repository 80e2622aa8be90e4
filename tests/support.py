"""Test helpers: real processes (the daemon, Mosquitto), ports, configs, a notify socket."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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


# ------------------------------------------------------------------ TOML (tests only)
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for test configs: scalars, lists, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + to_toml(v, name + ".")
    for k, items in arrays:
        name = f"{prefix}{k}"
        for item in items:
            out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def base_config(tmp: Path, port: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "gateway": {"site_id": "site-t", "topic_prefix": "homepot", "data_dir": str(tmp / "var")},
        "broker": {
            "mode": "embedded",
            "url": f"mqtt://127.0.0.1:{port}",
            "listeners": [{"name": "local", "type": "tcp", "bind": f"127.0.0.1:{port}",
                           "allow_anonymous": True, "anonymous_role": "admin"}],
            "auth": {"password_file": str(tmp / "var" / "passwd")},
        },
        "bridges": {"simulation": {"enabled": True, "latency_ms": 0}, "mqtt": {"enabled": True}},
        "logging": {"level": "info", "format": "json"},
    }
    return deep_merge(cfg, extra)


def write_config(tmp: Path, data: dict[str, Any], name: str = "config.toml") -> Path:
    path = tmp / name
    path.write_text(to_toml(data))
    return path


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
    _starts: int = 0

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> "GatewayProcess":
        self._starts += 1
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
        return self

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

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def cli(config: Path, *args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=config.parent, input=input)


def bulk_register(data_dir: Path, devices: list[dict[str, Any]]) -> None:
    """Put many devices in the registry the way `devices add` does (same store code), in one transaction."""
    from devices.models import Device
    from gateway import migrations
    from gateway.pipeline import store
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    conn.execute("BEGIN IMMEDIATE")
    migrations.migrate(conn)
    for d in devices:
        store.upsert_device(conn, Device.model_validate(d), "test")
    conn.execute("COMMIT")
    conn.close()


def job_status_from_db(data_dir: Path, job_id: str) -> dict[str, Any] | None:
    from gateway.pipeline import store
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        return store.job_status(conn, job_id)
    finally:
        conn.close()


# ------------------------------------------------------------------ small and full disks
@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str, mode: str = "0755") -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "16m") mounted on ``mnt`` (created), unmounted (lazily, so a
    daemon still holding files cannot block it) whatever the test did. Needs root: CI is."""
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(filler: Path) -> Path:
    """Write ``filler`` until its filesystem says ENOSPC, down to the last 512-byte block;
    deleting the file gives the space back."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 512):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler
