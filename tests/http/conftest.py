"""Fixtures for the HTTP API tests: a real daemon with [http], accounts, an httpx client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.broker.passwords import add_user
from tests.support import GatewayProcess, base_config, free_port, write_config

P = "homepot/site-t"
PASSWORDS = {"tech": ("technician", "tech-pw"), "ctrl": ("controller", "ctrl-pw"), "mon": ("monitor", "mon-pw"),
             "root": ("admin", "root-pw"), "plc-1": ("device", "plc1-pw"), "web-1": ("device", "web1-pw")}


@dataclass
class ApiGateway:
    gw: GatewayProcess
    port: int
    http_port: int
    tmp: Path
    base: str
    verify: Any = True
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def client(self, user: str | None = None) -> httpx.Client:
        key = user or ""
        if key not in self.clients:
            auth = (user, PASSWORDS[user][1]) if user else None
            self.clients[key] = httpx.Client(base_url=self.base, auth=auth, timeout=30, verify=self.verify)
        return self.clients[key]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    @property
    def config(self) -> Path:
        return self.gw.config

    @property
    def data_dir(self) -> Path:
        return self.tmp / "var"


def make_api_gateway(tmp: Path, extra: dict[str, Any] | None = None, users: dict[str, tuple[str, str]] | None = None,
                     start: bool = True, scheme: str = "http") -> ApiGateway:
    for attempt in range(3):
        try:
            return _make_api_gateway(tmp, extra, users, start, scheme)
        except AssertionError as exc:
            # free_port() is check-then-use: on a shared machine another test may take the
            # port first. That is the rig's race, not the gateway's; pick new ports.
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _make_api_gateway(tmp: Path, extra: dict[str, Any] | None, users: dict[str, tuple[str, str]] | None,
                      start: bool, scheme: str) -> ApiGateway:
    port, http_port = free_port(), free_port()
    extra = dict(extra or {})
    http = {"bind": f"127.0.0.1:{http_port}", **extra.pop("http", {})}
    data = base_config(tmp, port, http=http, **extra)
    cfg = write_config(tmp, data)
    for name, (role, password) in (users if users is not None else PASSWORDS).items():
        add_user(tmp / "var" / "passwd", name, password, role)  # what `users add` does, without a process each
    gw = GatewayProcess(cfg, tmp)
    api = ApiGateway(gw, port, http_port, tmp, f"{scheme}://127.0.0.1:{http_port}")
    if start:
        gw.start()
    return api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiGateway]:
    """One daemon for a module: simulation (no acks) and mqtt bridges, every role's account."""
    tmp = tmp_path_factory.mktemp("api")
    a = make_api_gateway(tmp, {"bridges": {"simulation": {"latency_ms": 0, "ack": False}}})
    yield a
    a.close()
    a.gw.kill()
    if a.gw.notify:
        a.gw.notify.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def db_rows(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    from gateway.storage import connect

    conn = connect(data_dir / "gateway.db")
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def error_of(r: httpx.Response) -> dict[str, str]:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


def job(job_id: str | None = None, **notification: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"target": notification.pop("target", {"all": True}),
                           "notification": {"title": "T", "body": "B", **notification}}
    if job_id is not None:
        out["job_id"] = job_id
    return out


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()
