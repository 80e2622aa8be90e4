"""Pieces every platform fake shares: a test CA, error injection, a clock, received requests."""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.fakes.server import Request, Response


class Pki:
    """A private CA with a loopback server certificate and a client certificate (APNs cert auth)."""

    def __init__(self, directory: Path):
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        self.client_cert = self.ca.issue_cert("com.example.app")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "test-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.client_cert_file = directory / "client-cert.pem"
        self.client_key_file = directory / "client-key.pem"
        self.client_cert.cert_chain_pems[0].write_to_path(str(self.client_cert_file))
        self.client_cert.private_key_pem.write_to_path(str(self.client_key_file))

    def server_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_cert.configure_cert(ctx)
        if require_client_cert:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass
class Injection:
    """Answer the next ``count`` matching requests with this instead of the normal answer."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    count: int = 1

    def response(self) -> Response:
        data = json.dumps(self.body).encode() if self.body is not None else b""
        headers = dict(self.headers)
        if self.body is not None:
            headers.setdefault("content-type", "application/json")
        return Response(self.status, data, headers)


class Injections:
    """Per-address (or ``"*"``) queues of injected answers."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[Injection]] = {}

    def add(self, key: str, injection: Injection) -> None:
        self._by_key.setdefault(key, []).append(injection)

    def take(self, key: str) -> Response | None:
        for k in (key, "*"):
            queue = self._by_key.get(k)
            if queue:
                inj = queue[0]
                inj.count -= 1
                if inj.count <= 0:
                    queue.pop(0)
                return inj.response()
        return None


class Clock:
    """The fake's idea of now; tests move it to simulate an hour passing."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Seen:
    """One request as the fake received it, and what it answered."""

    request: Request
    status: int
    reason: str = ""
    decoded: Any = None  # the parsed/decrypted body when the fake could read it


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})})
