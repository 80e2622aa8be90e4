from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MOSQUITTO, GatewayProcess, Mosquitto, base_config, free_port, write_config


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    """Start real daemons: ``gateway_factory(extra_config_dict) -> GatewayProcess``."""
    procs: list[GatewayProcess] = []

    def make(extra: dict | None = None, port: int | None = None, env: dict | None = None,
             start: bool = True) -> GatewayProcess:
        p = port or free_port()
        data = base_config(tmp_path, p, **(extra or {}))
        cfg = write_config(tmp_path, data, name=f"config-{len(procs)}.toml")
        gw = GatewayProcess(cfg, tmp_path, env=env or {})
        gw.port = p  # type: ignore[attr-defined]
        gw.data = data  # type: ignore[attr-defined]
        procs.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in procs:
        gw.kill()
        if gw.notify:
            gw.notify.close()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not MOSQUITTO:
        pytest.skip("mosquitto not installed (make test installs it as root)")
    m = Mosquitto(tmp_path, free_port()).start()
    yield m
    m.stop()


needs_mosquitto_clients = pytest.mark.skipif(
    not shutil.which("mosquitto_sub"), reason="mosquitto-clients not installed")
