"""WNS bridge: Windows Push Notification Services, one POST to the device's channel URI.

The channel URI is supplied by the device, so it is only used when its host is under one of
the operator's ``allowed_hosts`` (default ``notify.windows.com``) and, at connect time,
resolves to a public address (:mod:`bridges.ssrf`). The access token comes from the live
(``login.live.com``) or Entra (``login.microsoftonline.com``) client-credentials flow —
they are not interchangeable — and is cached until shortly before it expires; a 401
fetches a new one once and resends once (re-authentication, not a retry).

What is sent: a toast built from title/body (XML escaped by ElementTree, never by string
concatenation) whose ``launch`` argument carries ``message_id``/``job_id``; a raw
notification (the §8 envelope as JSON) for data-only jobs; tile or badge via
``options.wns``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import httpx
import structlog

from bridges import _http, ssrf
from bridges.base import Bridge, BridgeConfigError, BridgeContext, Delivery, Outcome
from devices.models import WnsChannel
from gateway.config import WnsBridge

log = structlog.get_logger(__name__)

LIVE_TOKEN_URL = "https://login.live.com/accesstoken.srf"
ENTRA_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
LIVE_SCOPE = "notify.windows.com"
ENTRA_SCOPE = "https://wns.windows.com/.default"
MAX_BODY = 5000
MAX_TAG = 16
TOKEN_MARGIN_S = 300
UNHEALTHY_RETRY_S = 60.0
THROTTLE_DEFAULT_S = 60.0
TYPES = {"toast": "wns/toast", "tile": "wns/tile", "badge": "wns/badge", "raw": "wns/raw"}
OPTION_KEYS = {"type", "xml", "badge", "priority", "tag", "group", "launch"}
# critical/high → 1 (High), normal → 2 (Medium), low → 3 (Low); 4 only via options.
PRIORITY = {"critical": "1", "high": "1", "normal": "2", "low": "3"}

_now = time.time  # patched by tests


class _AuthFailed(Exception):
    def __init__(self, outcome: Outcome):
        super().__init__(outcome.reason)
        self.outcome = outcome


class WnsBridgeImpl(Bridge):
    platform = "wns"

    def __init__(self, cfg: WnsBridge, ctx: BridgeContext, resolver: ssrf.Resolver = ssrf.system_resolver):
        self.cfg = cfg
        if cfg.token_url:
            self.token_url = cfg.token_url
        elif cfg.auth == "entra":
            self.token_url = ENTRA_TOKEN_URL.format(tenant=cfg.tenant_id)
        else:
            self.token_url = LIVE_TOKEN_URL
        self.scope = ENTRA_SCOPE if cfg.auth == "entra" else LIVE_SCOPE
        # An operator who lists an IP literal or "localhost" in allowed_hosts has chosen a
        # private target on purpose (a test or on-premises relay); otherwise only public
        # addresses are dialled, whatever the allowed name resolves to.
        self.policy = ssrf.Policy(allow_private=any(_names_private(h) for h in cfg.allowed_hosts),
                                  allowed_hosts=tuple(cfg.allowed_hosts))
        self._resolver = resolver
        self._client: httpx.AsyncClient | None = None
        self._token_client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._expiry = 0.0
        self.token_fetches = 0

    async def start(self) -> None:
        if self.cfg.client_secret is None or not self.cfg.client_id:
            raise BridgeConfigError("bridges.wns.client_secret_file: no client secret loaded")
        ctx = _http.tls_context(self.cfg.ca_file)
        self._client = _http.async_client(transport=ssrf.GuardedTransport(
            self.policy, ctx, http1=True, http2=False, resolver=self._resolver))
        self._token_client = _http.async_client(self.cfg.ca_file)

    async def close(self) -> None:
        for client in (self._client, self._token_client):
            if client is not None:
                await client.aclose()
        self._client = self._token_client = None

    # ------------------------------------------------------------------ access token
    async def _access_token(self, stale: str | None = None) -> str:
        if self._token and self._token != stale and self._expiry - _now() > TOKEN_MARGIN_S:
            return self._token
        async with self._lock:
            if self._token and self._token != stale and self._expiry - _now() > TOKEN_MARGIN_S:
                return self._token
            assert self._token_client is not None and self.cfg.client_secret is not None
            form = {"grant_type": "client_credentials", "client_id": self.cfg.client_id,
                    "client_secret": self.cfg.client_secret.get_secret_value(), "scope": self.scope}
            try:
                r = await self._token_client.post(self.token_url, data=form)
            except httpx.HTTPError as exc:
                raise _AuthFailed(Outcome.retry(f"token endpoint: {type(exc).__name__}")) from None
            body = _http.json_or_empty(r)
            if r.status_code != 200 or not isinstance(body.get("access_token"), str):
                error = str(body.get("error") or f"HTTP {r.status_code}")
                if r.status_code >= 500 or r.status_code == 429:
                    raise _AuthFailed(Outcome.retry(f"token endpoint: {error}",
                                                    _http.retry_after(r.headers), r.status_code))
                raise _AuthFailed(Outcome.unhealthy(f"token request refused: {error}",
                                                    UNHEALTHY_RETRY_S, r.status_code))
            try:
                lifetime = float(body.get("expires_in", 86400))
            except (TypeError, ValueError):
                lifetime = 86400.0
            self._token = body["access_token"]
            self._expiry = _now() + lifetime
            self.token_fetches += 1
            log.info("wns access token obtained", auth=self.cfg.auth, expires_in=int(lifetime))
            return self._token

    # ------------------------------------------------------------------ request building
    def build(self, d: Delivery) -> tuple[dict[str, str], bytes] | Outcome:
        n = d.notification
        opts = d.options or {}
        unknown = sorted(set(opts) - OPTION_KEYS)
        if unknown:
            return Outcome.failed(f"options.wns.{unknown[0]}: unknown option")
        kind = str(opts.get("type") or ("toast" if (n.title or n.body) else "raw"))
        if kind not in TYPES:
            return Outcome.failed(f"options.wns.type: must be one of {', '.join(TYPES)}")
        content_type = "text/xml"
        if kind == "toast":
            launch = {"message_id": d.message_id, "job_id": d.job_id}
            extra_launch = opts.get("launch") or {}
            if not isinstance(extra_launch, dict):
                return Outcome.failed("options.wns.launch must be an object")
            args = urlencode({**{str(k): str(v) for k, v in extra_launch.items()}, **launch})
            toast = ET.Element("toast", {"launch": args})
            binding = ET.SubElement(ET.SubElement(toast, "visual"), "binding", {"template": "ToastGeneric"})
            for text in (n.title, n.body):
                if text:
                    ET.SubElement(binding, "text").text = text
            body = ET.tostring(toast, encoding="utf-8", xml_declaration=False)
        elif kind == "tile":
            xml = opts.get("xml")
            if not isinstance(xml, str):
                return Outcome.failed("options.wns.xml: a <tile> document is required for type tile")
            try:
                root = ET.fromstring(xml)
            except ET.ParseError:
                return Outcome.failed("options.wns.xml: not well-formed XML")
            if root.tag != "tile":
                return Outcome.failed("options.wns.xml: the root element must be <tile>")
            body = xml.encode()
        elif kind == "badge":
            value = opts.get("badge")
            if value is None or not str(value).strip():
                return Outcome.failed("options.wns.badge: a number or glyph is required for type badge")
            body = ET.tostring(ET.Element("badge", {"value": str(value)}), encoding="utf-8",
                               xml_declaration=False)
        else:
            content_type = "application/octet-stream"
            body = json.dumps(d.envelope(), separators=(",", ":"), ensure_ascii=False).encode()
        if len(body) > MAX_BODY:
            return Outcome.failed(f"payload {len(body)} bytes > {MAX_BODY} (not sent)")
        headers = {"x-wns-type": TYPES[kind], "content-type": content_type,
                   "x-wns-requestforstatus": "true"}
        priority = str(opts.get("priority") or PRIORITY.get(n.priority, "2"))
        if priority not in ("1", "2", "3", "4"):
            return Outcome.failed("options.wns.priority: must be 1..4")
        headers["x-wns-priority"] = priority
        ttl = d.ttl_remaining
        if ttl == 0:
            headers["x-wns-cache-policy"] = "no-cache"  # deliver now or never
        else:
            headers["x-wns-ttl"] = str(ttl)
        tag = opts.get("tag") or n.collapse_key
        if tag and kind in ("toast", "tile"):
            headers["x-wns-tag"] = _tag(str(tag))
        if opts.get("group") and kind == "toast":
            headers["x-wns-group"] = _tag(str(opts["group"]))
        return headers, body

    # ------------------------------------------------------------------ sending
    async def send(self, delivery: Delivery) -> Outcome:
        if self._client is None:
            raise RuntimeError("WNS bridge used before start()")
        if not isinstance(delivery.channel, WnsChannel):
            return Outcome.failed("not a wns channel")
        try:
            url = ssrf.check_url(delivery.channel.channel_uri, self.policy)
        except ssrf.AddressRefused as exc:
            return Outcome.invalid_address(f"channel URI refused: {exc.args[0]}")
        built = self.build(delivery)
        if isinstance(built, Outcome):
            return built
        headers, body = built
        token: str | None = None
        for attempt in (1, 2):
            try:
                token = await self._access_token(stale=token if attempt == 2 else None)
            except _AuthFailed as exc:
                return exc.outcome
            headers["authorization"] = f"Bearer {token}"
            try:
                r = await self._client.post(url, headers=headers, content=body)
            except httpx.HTTPError as exc:
                refused = ssrf.refusal(exc)
                if refused is not None:
                    return Outcome.invalid_address(f"channel URI refused: {refused.args[0]}")
                return _http.transport_outcome(exc)
            if r.status_code == 401 and attempt == 1:
                continue  # new access token, resend once
            return self.classify(r)
        return self.classify(r)

    def classify(self, r: httpx.Response) -> Outcome:
        status = r.status_code
        wns_status = (r.headers.get("x-wns-status") or r.headers.get("x-wns-notificationstatus") or "").lower()
        reason = f"HTTP {status}" + (f" {wns_status}" if wns_status else "")
        if status == 200:
            if wns_status == "channelthrottled":
                return Outcome.retry(reason, _http.retry_after(r.headers, THROTTLE_DEFAULT_S), status)
            if wns_status == "dropped":
                return Outcome.failed(reason, status)
            return Outcome.accepted(wns_status, status)
        if status in (404, 410):
            return Outcome.invalid_address(reason, status)
        if status == 406:
            return Outcome.retry(reason, _http.retry_after(r.headers, THROTTLE_DEFAULT_S), status)
        if status in (401, 403):
            return Outcome.unhealthy(reason, UNHEALTHY_RETRY_S, status)
        if status == 429 or status >= 500:
            return Outcome.retry(reason, _http.retry_after(r.headers), status)
        return Outcome.failed(reason, status)  # 400, 405, 413 and anything undocumented


def _tag(value: str) -> str:
    """X-WNS-Tag/Group allow 16 characters; longer keys are hashed, not cut (no collisions)."""
    if len(value) <= MAX_TAG:
        return value
    return hashlib.sha256(value.encode()).hexdigest()[:MAX_TAG]


def _names_private(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def build(section: WnsBridge, ctx: BridgeContext) -> Bridge:
    return WnsBridgeImpl(section, ctx)
