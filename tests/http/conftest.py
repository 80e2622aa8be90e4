"""Helpers for the HTTP API tests: a real daemon with [http], accounts, an httpx client (the
HTTP service served in-process is tests/helpers/http_app.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.broker.passwords import add_user
from tests.helpers import GatewayProcess, base_config, db_rows, wait_until, write_accounts  # noqa: F401 - re-exported

P = "homepot/site-t"
PASSWORDS = {"tech": ("technician", "tech-pw"), "ctrl": ("controller", "ctrl-pw"), "mon": ("monitor", "mon-pw"),
             "root": ("admin", "root-pw"), "plc-1": ("device", "plc1-pw"), "web-1": ("device", "web1-pw")}


@dataclass
class ApiGateway:
    """A daemon with [http]; its ports are the ones it bound (port 0, from runtime.json)."""

    gw: GatewayProcess
    tmp: Path
    scheme: str = "http"
    verify: Any = True
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.gw.port

    @property
    def http_port(self) -> int | None:
        return self.gw.http_port

    @property
    def base(self) -> str:
        assert self.gw.http_port, "the daemon has not started yet"
        return f"{self.scheme}://127.0.0.1:{self.gw.http_port}"

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
                     start: bool = True, scheme: str = "http", shipped_hashes: bool = False) -> ApiGateway:
    """The broker listener and the HTTP API bind port 0: no port can be taken by another
    test between choosing and binding it. Accounts are hashed at argon2's cheapest cost
    (:func:`tests.helpers.write_accounts`) unless ``shipped_hashes`` (a test of what the
    hashing costs)."""
    extra = dict(extra or {})
    http = {"bind": "127.0.0.1:0", **extra.pop("http", {})}
    data = base_config(tmp, 0, http=http, **extra)
    accounts = users if users is not None else PASSWORDS
    if shipped_hashes:
        for name, (role, password) in accounts.items():
            add_user(tmp / "var" / "passwd", name, password, role)  # what `users add` does, without a process each
    elif accounts:
        write_accounts(tmp / "var" / "passwd", accounts)
    gw = GatewayProcess.from_data(tmp, data)
    api = ApiGateway(gw, tmp, scheme)
    if start:
        gw.start()
    return api


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
