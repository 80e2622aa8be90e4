"""The shipped unit: notify type, watchdog, hardening, and systemd's own verifier."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, require_tool

UNIT = ROOT / "systemd" / "homepot-gateway.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_unit_declares_notify_watchdog_restart_and_hardening():
    d = directives()
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["WatchdogSec"][0].rstrip("s")) > 0
    # A fixed system user (install.sh creates it) so the CLI run as root can become it.
    assert "DynamicUser" not in d
    assert d["User"] == ["homepot"] and d["Group"] == ["homepot"] and d["StateDirectory"] == ["homepot-gateway"]
    # SIGHUP reloads (gateway/daemon.py); the data dir comes from the config file, as the CLI's does.
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert not [e for e in d.get("Environment", []) if "DATA_DIR" in e]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes"}.items():
        assert d[key] == [value], key
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "run" in d["ExecStart"][0] and "--config" in d["ExecStart"][0]
    # Stop budget: the daemon exits within 10 s; systemd must wait longer than that.
    assert int(d["TimeoutStopSec"][0].rstrip("s")) > 10


def test_systemd_analyze_verify(tmp_path: Path):
    exe = Path(sys.executable).with_name("homepot-gateway")
    assert exe.exists(), f"{exe}: the console script is missing (make install-test installs it)"
    unit = tmp_path / "homepot-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/homepot-gateway/bin/homepot-gateway", str(exe)))
    res = subprocess.run([require_tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "homepot-gateway.service" not in res.stderr, res.stderr
