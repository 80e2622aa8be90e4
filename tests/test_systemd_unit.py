"""The shipped unit: notify type, watchdog, hardening, and systemd's own verifier."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

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
    assert d["DynamicUser"] == ["yes"] and d["StateDirectory"] == ["homepot-gateway"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes"}.items():
        assert d[key] == [value], key
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "run" in d["ExecStart"][0] and "--config" in d["ExecStart"][0]
    # Stop budget: the daemon exits within 10 s; systemd must wait longer than that.
    assert int(d["TimeoutStopSec"][0].rstrip("s")) > 10


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path):
    exe = Path(sys.executable).with_name("homepot-gateway")
    if not exe.exists():
        pytest.skip("console script not installed")
    unit = tmp_path / "homepot-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/homepot-gateway/bin/homepot-gateway", str(exe)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "homepot-gateway.service" not in res.stderr, res.stderr
