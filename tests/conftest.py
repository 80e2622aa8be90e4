from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import GatewayProcess, Mosquitto, base_config, free_port, require_tool


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """CLI commands invoked in-process (typer's CliRunner) narrow the process umask, as they
    do in their own process (gateway/filemodes.py); the next test starts with the old one."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    """Start real daemons: ``gateway_factory(extra_config_dict) -> GatewayProcess``.

    Without ``port`` the broker listener binds port 0; ``gw.port`` (and ``gw.ports``,
    ``gw.http_port``) are read from the daemon's runtime.json once it is ready."""
    procs: list[GatewayProcess] = []

    def make(extra: dict | None = None, port: int | None = None, env: dict | None = None,
             start: bool = True) -> GatewayProcess:
        data = base_config(tmp_path, port or 0, **(extra or {}))
        gw = GatewayProcess.from_data(tmp_path, data, name=f"config-{len(procs)}.toml", env=env)
        gw.port = port or 0
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
    m = Mosquitto(tmp_path, free_port()).start()
    yield m
    m.stop()


@pytest.fixture
def mosquitto_clients() -> dict[str, str]:
    """mosquitto_pub/_sub paths; a missing one fails the test (make test installs them)."""
    return {name: require_tool(name) for name in ("mosquitto_pub", "mosquitto_sub")}


# Marks a test that runs mosquitto_pub/mosquitto_sub: it fails, never skips, without them.
needs_mosquitto_clients = pytest.mark.usefixtures("mosquitto_clients")
