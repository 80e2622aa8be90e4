"""WNS bridge: Windows Push Notification Services, one POST to the device's channel URI.

The channel URI is supplied by the device, so it is only used when its host is under one of
the operator's ``allowed_hosts`` (default ``notify.windows.com``) and, at connect time,
resolves to a public address (:mod:`bridges.ssrf`). The access token comes from the live
(``login.live.com``) or Entra (``login.microsoftonline.com``) client-credentials flow —
they are not interchangeable — and is cached until shortly before it expires
(:class:`bridges._auth.TokenCache`); a 401 fetches a new one once and resends once
(re-authentication, not a retry).

A 403 means "authenticated, but not for this channel URI": the channel was created by
another app than the one our credentials belong to. That is either this one channel's
fault (a device registered a URI of another app) or ours for every channel (the operator
configured the wrong package). :meth:`WnsBridgeImpl.forbidden` tells them apart from what
the bridge has seen (docs/push-platforms.md, "WNS 403").

What is sent: a toast built from title/body (XML escaped by ElementTree, never by string
concatenation) whose ``launch`` argument carries ``message_id``/``job_id``; a raw
notification (the §8 envelope as JSON) for data-only jobs; tile or badge via
``options.wns``.
"""

from __future__ import annotations

import ipaddress
import json
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
import structlog
from pydantic import SecretStr

from bridges import _http, _mapping, keys, ssrf
from bridges._auth import AuthFailed, Credential, TokenCache, send_with_reauth
from bridges.base import Bridge, BridgeContext, Delivery, Outcome
from devices.models import WnsChannel
from gateway.config import WnsBridge
from gateway.secret_files import Problems, given, read_secret, require_file

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

_now = time.time  # patched by tests


class WnsBridgeImpl(Bridge):
    platform = "wns"

    def __init__(self, cfg: WnsBridge, ctx: BridgeContext, secrets: WnsSecrets | None,
                 resolver: ssrf.Resolver = ssrf.system_resolver, key: str = "bridges.wns"):
        self.cfg = cfg
        self.key = key  # the config section: bridges.wns, or bridges.wns.apps.<name> for an app
        self.secrets = secrets
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
        self._tokens = TokenCache(self._fetch_token, TOKEN_MARGIN_S, lambda: _now())
        # 403 bookkeeping (see forbidden()): has WNS ever accepted one of our tokens, and
        # which channels refused a token fetched just for them while it had not.
        self.credentials_proven = False
        self._forbidden_unproven: set[str] = set()

    @property
    def token_fetches(self) -> int:
        return self._tokens.fetches

    async def start(self) -> None:
        keys.wns_secret(self.cfg, self.secrets, self.key)  # the check `check-config` makes too
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
        return (await self._tokens.get(stale)).value

    async def _fetch_token(self) -> tuple[str, float]:
        assert self._token_client is not None and self.secrets is not None
        form = {"grant_type": "client_credentials", "client_id": self.cfg.client_id,
                "client_secret": self.secrets.client_secret.get_secret_value(), "scope": self.scope}
        try:
            r = await self._token_client.post(self.token_url, data=form)
        except httpx.HTTPError as exc:
            raise AuthFailed(Outcome.retry(f"token endpoint: {type(exc).__name__}")) from None
        body = _http.json_or_empty(r)
        if r.status_code != 200 or not isinstance(body.get("access_token"), str):
            error = str(body.get("error") or f"HTTP {r.status_code}")
            if r.status_code >= 500 or r.status_code == 429:
                raise AuthFailed(Outcome.retry(f"token endpoint: {error}", _http.retry_after(r.headers), r.status_code))
            raise AuthFailed(Outcome.unhealthy(f"token request refused: {error}", UNHEALTHY_RETRY_S, r.status_code))
        try:
            lifetime = float(body.get("expires_in", 86400))
        except (TypeError, ValueError):
            lifetime = 86400.0
        log.info("wns access token obtained", section=self.key, auth=self.cfg.auth, expires_in=int(lifetime))
        return body["access_token"], _now() + lifetime

    # ------------------------------------------------------------------ request building
    def build(self, d: Delivery) -> tuple[dict[str, str], bytes] | Outcome:
        n = d.notification
        opts = d.options or {}
        unknown = _mapping.unknown_option("wns", opts, OPTION_KEYS)
        if unknown is not None:
            return unknown
        kind = str(opts.get("type") or ("toast" if (n.title or n.body) else "raw"))
        if kind not in TYPES:
            return Outcome.failed(f"options.wns.type: must be one of {', '.join(TYPES)}")
        content_type = "text/xml"
        if kind == "toast":
            launch = d.ids()  # message_id, job_id and ack_url: the app reads them on launch
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
        priority = str(opts.get("priority") or _mapping.priority("wns", n.priority))
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
            headers["x-wns-tag"] = _mapping.collapse_id(str(tag), MAX_TAG, "hex")
        if opts.get("group") and kind == "toast":
            headers["x-wns-group"] = _mapping.collapse_id(str(opts["group"]), MAX_TAG, "hex")
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
        client = self._client
        channel_uri = delivery.channel.channel_uri

        async def credential(stale: str | None) -> Credential[str]:
            return await self._tokens.get(stale)

        async def attempt(token: Credential[str]) -> tuple[Outcome, bool]:
            try:
                r = await client.post(url, headers={**headers, "authorization": f"Bearer {token.value}"},
                                      content=body)
            except httpx.HTTPError as exc:
                refused = ssrf.refusal(exc)
                if refused is not None:
                    return Outcome.invalid_address(f"channel URI refused: {refused.args[0]}"), False
                return _http.transport_outcome(exc), False
            if r.status_code == 401:
                return self.classify(r), True  # new access token, resend once
            if r.status_code == 403:
                return self.forbidden(r, channel_uri, token.fresh)
            outcome = self.classify(r)
            if r.status_code == 200:
                self._proven()
            return outcome, False

        return await send_with_reauth(credential, attempt)

    def _proven(self) -> None:
        if not self.credentials_proven:
            self.credentials_proven = True
            self._forbidden_unproven.clear()

    def forbidden(self, r: httpx.Response, channel_uri: str, fresh_token: bool) -> tuple[Outcome, bool]:
        """Decide a 403 (docs/push-platforms.md, "WNS 403"); returns (outcome, re-authenticate).

        1. WNS accepted one of our tokens before (for any channel): our credentials are good
           for our app, so this channel belongs to another app → invalid address (the device
           falls over to its next channel and must register a URI of ours).
        2. Not proven yet and the token came from the cache: get a fresh one, resend once.
        3. Not proven and the token is fresh: one such channel is retried later (with
           backoff, the bridge keeps sending to the others, whose success proves rule 1);
           a second, different channel refusing a fresh token means our credentials are
           wrong for every channel → unhealthy (paused, work kept).
        """
        status = r.status_code
        detail = (r.headers.get("x-wns-error-description") or "").strip()[:200]
        reason = "HTTP 403" + (f" {detail}" if detail else "")
        if self.credentials_proven:
            return Outcome.invalid_address(f"{reason} (channel belongs to another app)", status), False
        if not fresh_token:
            return Outcome.unhealthy(reason, UNHEALTHY_RETRY_S, status), True
        self._forbidden_unproven.add(channel_uri)
        if len(self._forbidden_unproven) >= 2:
            return Outcome.unhealthy(f"{reason} (refused for {len(self._forbidden_unproven)} channels; "
                                     f"check {self.key}.client_id)", UNHEALTHY_RETRY_S, status), False
        return Outcome.retry(f"{reason} (channel or credentials; not known yet)", status=status), False

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


def _names_private(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class WnsSecrets:
    """The client secret read from ``client_secret_file``; never logged."""

    client_secret: SecretStr


def load_secrets(section: WnsBridge, problems: Problems, key: str = "bridges.wns") -> WnsSecrets | None:
    """Check the section (or an app's, named under ``key``) for what token auth needs and
    read the client secret."""
    secrets = None
    if not section.client_id:
        problems.append((f"{key}.client_id", "required"))
    if not given(section.client_secret_file):
        problems.append((f"{key}.client_secret_file", "required"))
    else:
        assert section.client_secret_file is not None
        secret = read_secret(section.client_secret_file, f"{key}.client_secret_file", problems)
        if secret is not None:
            secrets = WnsSecrets(client_secret=SecretStr(secret))
    if section.auth == "entra" and not section.tenant_id and not section.token_url:
        problems.append((f"{key}.tenant_id", "required when auth = \"entra\""))
    if key == "bridges.wns":  # the section's own keys, checked once
        if not section.allowed_hosts:
            problems.append(("bridges.wns.allowed_hosts", "must name at least one host"))
        if given(section.ca_file):
            require_file(section.ca_file, "bridges.wns.ca_file", problems)
    return secrets


def build(section: WnsBridge, ctx: BridgeContext, secrets: WnsSecrets | None, key: str = "bridges.wns") -> Bridge:
    return WnsBridgeImpl(section, ctx, secrets, key=key)
