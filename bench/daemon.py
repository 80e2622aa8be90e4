"""Start the real daemon for a benchmark and wait for READY (systemd notify socket)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support import base_config, free_port, write_config


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM:")


def rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS:")


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


class Daemon:
    """``python -m gateway run`` in ``workdir`` with ``base_config`` + ``extra``."""

    def __init__(self, workdir: Path, **extra: Any):
        self.workdir = workdir
        self.port = free_port()
        extra.setdefault("logging", {"level": "warning"})
        self.cfg = base_config(workdir, self.port, **extra)
        self.cfg_path = write_config(workdir, self.cfg)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_cpu_s = float("nan")  # CPU the process had used when READY arrived

    def start(self, timeout: float = 60.0) -> float:
        """Start; returns seconds from process start to READY=1."""
        notify = self.workdir / "notify.sock"
        notify.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify))
        sock.settimeout(timeout)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(self.cfg_path), "run"],
                                     cwd=self.workdir, env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                     stderr=open(self.workdir / "gw.log", "ab"))
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            elapsed = time.perf_counter() - t0
            self.ready_cpu_s = cpu_s(self.proc.pid)
        finally:
            sock.close()
        return elapsed

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "gateway", "--config", str(self.cfg_path), *args],
                              check=True, capture_output=True, cwd=self.workdir)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
