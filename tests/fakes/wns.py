"""A strict fake of WNS: the live and Entra token endpoints and the channel endpoint.

Token endpoints check the client-credentials form (id, secret, the scope of *that* flow);
a token from the other flow is refused at send time (they are not interchangeable). The
channel endpoint is HTTP/1.1 only and checks ``Content-Length``, the bearer token,
``X-WNS-Type`` against ``Content-Type``, well-formed XML whose root matches the type, the
optional headers' ranges and the 5000-byte limit; answers carry ``X-WNS-Status``.

Several apps (:meth:`FakeWns.add_client`): a token is issued to one client, a channel
belongs to one client (``new_channel(client_id=...)``), and a token of another client is
refused with 403, as WNS refuses a cloud service not authorized for the channel URI.
"""

from __future__ import annotations

import secrets
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

from tests.fakes.common import Clock, Injection, Injections, Seen, Pki, json_response
from tests.fakes.server import FakeService, Request, Response, TlsHttpServer

LIVE_SCOPE = "notify.windows.com"
ENTRA_SCOPE = "https://wns.windows.com/.default"
TYPES = {"wns/toast": ("text/xml", "toast"), "wns/tile": ("text/xml", "tile"),
         "wns/badge": ("text/xml", "badge"), "wns/raw": ("application/octet-stream", None)}


class FakeWns(FakeService):
    def __init__(self, pki: Pki, *, flow: str = "live", client_id: str = "ms-app://s-1-15-2-1",
                 client_secret: str = "wns-secret-value", tenant: str = "tenant-1", token_lifetime: int = 86400):
        self.pki = pki
        self.flow = flow  # which flow's tokens the channel endpoint accepts
        self.client_id = client_id
        self.client_secret = client_secret
        self.tenant = tenant
        self.token_lifetime = token_lifetime
        self.clock = Clock()
        self.tokens: dict[str, tuple[str, float]] = {}  # token → (flow, expiry)
        self.clients: dict[str, str] = {client_id: client_secret}  # client id → its secret
        self.token_clients: dict[str, str] = {}  # token → the client it was issued to
        self.channel_clients: dict[str, str] = {}  # channel id → the client (app) it belongs to
        self.accepted_by_client: dict[str, list[Seen]] = {}
        self.token_requests = 0
        self.token_forms: list[dict[str, str]] = []
        self.channels: set[str] = set()  # valid channel ids (the `token` query parameter)
        self.expired_channels: set[str] = set()
        self.injections = Injections()
        self.seen: list[Seen] = []
        self.accepted: list[Seen] = []
        self.server = TlsHttpServer(self.handle, pki.server_context(), protocols=("http/1.1",))


    def token_url(self, flow: str | None = None) -> str:
        flow = flow or self.flow
        if flow == "live":
            return f"{self.server.origin}/accesstoken.srf"
        return f"{self.server.origin}/{self.tenant}/oauth2/v2.0/token"

    def add_client(self, client_id: str, client_secret: str) -> None:
        """Another app with its own client credentials."""
        self.clients[client_id] = client_secret

    def new_channel(self, host: str = "localhost", client_id: str | None = None) -> str:
        channel = secrets.token_urlsafe(12)
        self.channels.add(channel)
        self.channel_clients[channel] = client_id or self.client_id
        return f"https://{host}:{self.server.port}/w/?token={channel}"

    def inject(self, channel_uri: str, status: int, headers: dict[str, str] | None = None, count: int = 1) -> None:
        self.injections.add(_channel_id(channel_uri), Injection(status, None, headers or {}, count))

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    async def handle(self, req: Request) -> Response:
        path = urlsplit(req.path).path
        if path == "/accesstoken.srf":
            return self._token(req, "live")
        if path == f"/{self.tenant}/oauth2/v2.0/token":
            return self._token(req, "entra")
        if path == "/w/":
            return self._notify(req)
        return self._answer(req, 404, "not found")

    def _token(self, req: Request, flow: str) -> Response:
        self.token_requests += 1
        form = {k: v[0] for k, v in parse_qs(req.body.decode()).items()}
        self.token_forms.append({k: v for k, v in form.items() if k != "client_secret"})
        if (req.header("content-type") or "").split(";")[0] != "application/x-www-form-urlencoded":
            return json_response(400, {"error": "invalid_request"})
        if form.get("grant_type") != "client_credentials":
            return json_response(400, {"error": "unsupported_grant_type"})
        if form.get("client_id") not in self.clients or form.get("client_secret") != self.clients[form["client_id"]]:
            return json_response(400 if flow == "live" else 401, {"error": "invalid_client"})
        expected_scope = LIVE_SCOPE if flow == "live" else ENTRA_SCOPE
        if form.get("scope") != expected_scope:
            return json_response(400, {"error": "invalid_scope"})
        token = secrets.token_urlsafe(24)
        self.tokens[token] = (flow, self.clock() + self.token_lifetime)
        self.token_clients[token] = form["client_id"]
        return json_response(200, {"access_token": token, "token_type": "bearer",
                                   "expires_in": self.token_lifetime})

    def _answer(self, req: Request, status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
        self.seen.append(Seen(req, status, reason))
        return Response(status, b"", {"x-wns-debug-trace": "fake", **(headers or {})})

    def _notify(self, req: Request) -> Response:
        if req.http_version != "1.1":
            return self._answer(req, 400, "HTTP/1.1 only")
        if req.method != "POST":
            return self._answer(req, 405, "method")
        if not req.has_content_length:
            return self._answer(req, 411, "Content-Length required")
        auth = req.header("authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        issued = self.tokens.get(token)
        if issued is None or issued[1] < self.clock() or issued[0] != self.flow:
            return self._answer(req, 401, "bad token", {"www-authenticate": 'Bearer error="invalid_token"'})
        wns_type = req.header("x-wns-type")
        if wns_type not in TYPES:
            return self._answer(req, 400, "X-WNS-Type")
        content_type, root = TYPES[wns_type]
        if (req.header("content-type") or "").split(";")[0].strip() != content_type:
            return self._answer(req, 400, "Content-Type")
        if len(req.body) > 5000:
            return self._answer(req, 413, "too large")
        decoded: object = req.body
        if root is not None:
            try:
                element = ET.fromstring(req.body)
            except ET.ParseError:
                return self._answer(req, 400, "XML not well-formed")
            if element.tag != root:
                return self._answer(req, 400, "XML root")
            decoded = element
        ttl = req.header("x-wns-ttl")
        if ttl is not None and not ttl.isdigit():
            return self._answer(req, 400, "X-WNS-TTL")
        if req.header("x-wns-priority", "1") not in ("1", "2", "3", "4"):
            return self._answer(req, 400, "X-WNS-Priority")
        if req.header("x-wns-cache-policy", "cache") not in ("cache", "no-cache"):
            return self._answer(req, 400, "X-WNS-Cache-Policy")
        if req.header("x-wns-requestforstatus", "false") not in ("true", "false"):
            return self._answer(req, 400, "X-WNS-RequestForStatus")
        for name in ("x-wns-tag", "x-wns-group"):
            value = req.header(name)
            if value is not None and (len(value) > 16 or wns_type in ("wns/badge", "wns/raw")):
                return self._answer(req, 400, name)
        channel = _channel_id(req.path)
        injected = self.injections.take(channel)
        if injected is not None:
            self.seen.append(Seen(req, injected.status, "injected", decoded))
            return injected
        if channel in self.expired_channels:
            return self._answer(req, 410, "channel expired")
        if channel not in self.channels:
            return self._answer(req, 404, "unknown channel")
        owner = self.channel_clients.get(channel, self.client_id)
        if self.token_clients.get(token) != owner:
            return self._answer(req, 403, "token of another app", {"x-wns-error-description": "Forbidden"})
        seen = Seen(req, 200, "", decoded)
        self.seen.append(seen)
        self.accepted.append(seen)
        self.accepted_by_client.setdefault(owner, []).append(seen)
        headers = {"x-wns-msg-id": secrets.token_hex(8), "x-wns-debug-trace": "fake"}
        if req.header("x-wns-requestforstatus") == "true":
            headers["x-wns-status"] = "received"
            headers["x-wns-deviceconnectionstatus"] = "connected"
        return Response(200, b"", headers)


def _channel_id(uri: str) -> str:
    query = parse_qs(urlsplit(uri).query)
    return query.get("token", [""])[0]
