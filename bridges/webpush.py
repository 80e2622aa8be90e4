"""Web Push bridge (RFC 8030 delivery, RFC 8291 encryption, RFC 8292 VAPID).

The payload is the §8 envelope as JSON, encrypted ``aes128gcm`` for the subscription with
pywebpush's encoder (``WebPusher(...).encode``), and POSTed with httpx — pywebpush's own
``webpush()`` uses blocking ``requests`` and mutates the VAPID claims it is given. The VAPID
JWT is ours: ES256 with the key from ``vapid-keys``, ``aud`` = the endpoint's origin,
cached per origin until an hour before it expires (a push service sees the same token for
hours instead of one per message, and we sign once per origin, not once per delivery).

The endpoint is device-supplied: https only, and the connection is made only to public
addresses unless ``allow_private_endpoints`` (see :mod:`bridges.ssrf`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import structlog

from bridges import _http, _mapping, keys, ssrf
from bridges.base import Bridge, BridgeContext, Delivery, Outcome
from devices.models import WebPushChannel
from gateway import vapid
from gateway.config import WebpushBridge
from gateway.secret_files import Problems, given, require_file

log = structlog.get_logger(__name__)

MAX_BODY = 4096
VAPID_LIFETIME_S = 12 * 3600  # RFC 8292: at most 24 h
VAPID_RENEW_BEFORE_S = 3600
UNHEALTHY_RETRY_S = 60.0
TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
URGENCIES = {"very-low", "low", "normal", "high"}
OPTION_KEYS = {"urgency", "topic", "notification"}

_now = time.time  # patched by tests


@dataclass
class _VapidToken:
    token: str
    expires: float


class WebPushBridgeImpl(Bridge):
    platform = "webpush"

    def __init__(self, cfg: WebpushBridge, ctx: BridgeContext, resolver: ssrf.Resolver = ssrf.system_resolver,
                 key: str = "bridges.webpush"):
        self.cfg = cfg
        self.key = key  # the config section: bridges.webpush, or bridges.webpush.apps.<name> for an app
        self.policy = ssrf.Policy(allow_private=cfg.allow_private_endpoints)
        self._resolver = resolver
        self._key: Any = None
        self._public_b64 = ""
        self._vapid: dict[str, _VapidToken] = {}
        self._client: httpx.AsyncClient | None = None
        self.vapid_signed = 0

    async def start(self) -> None:
        self._key = keys.vapid_key(self.cfg, key=self.key)  # the check `check-config` makes too
        self._public_b64 = vapid.public_key_b64(self._key)
        self._client = _http.async_client(transport=ssrf.GuardedTransport(
            self.policy, _http.tls_context(self.cfg.ca_file), http1=True, http2=True,
            resolver=self._resolver))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _vapid_header(self, endpoint: str) -> str:
        """``vapid t=<JWT>, k=<public key>`` with the JWT cached per origin."""
        aud = ssrf.origin(endpoint)
        now = _now()
        cached = self._vapid.get(aud)
        if cached is None or cached.expires - now < VAPID_RENEW_BEFORE_S:
            expires = int(now) + VAPID_LIFETIME_S
            # A fresh claims dict per origin: never shared between endpoints.
            token = jwt.encode({"aud": aud, "exp": expires, "sub": self.cfg.subject},
                               self._key, algorithm="ES256", headers={"typ": "JWT"})
            cached = self._vapid[aud] = _VapidToken(token, expires)
            self.vapid_signed += 1
        return f"vapid t={cached.token}, k={self._public_b64}"

    def build(self, d: Delivery) -> tuple[dict[str, str], bytes] | Outcome:
        opts = d.options or {}
        unknown = _mapping.unknown_option("webpush", opts, OPTION_KEYS)
        if unknown is not None:
            return unknown
        envelope = d.envelope()  # carries ack_url when the HTTP API is on
        if opts.get("notification") is not None:
            if not isinstance(opts["notification"], dict):
                return Outcome.failed("options.webpush.notification must be an object")
            envelope["notification"] = opts["notification"]  # showNotification() options
        plaintext = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
        assert isinstance(d.channel, WebPushChannel)
        sub = d.channel.subscription
        from pywebpush import WebPusher, WebPushException

        try:
            pusher = WebPusher({"endpoint": sub.endpoint,
                                "keys": {"p256dh": sub.keys.p256dh, "auth": sub.keys.auth}})
            body = bytes(pusher.encode(plaintext, content_encoding="aes128gcm")["body"])
        except (WebPushException, ValueError, TypeError) as exc:
            # The subscription's keys are not a P-256 point / 16-byte secret: unusable address.
            return Outcome.invalid_address(f"subscription keys unusable ({type(exc).__name__})")
        if len(body) > MAX_BODY:
            return Outcome.failed(f"encrypted payload {len(body)} bytes > {MAX_BODY} (not sent)")
        urgency = str(opts.get("urgency") or _mapping.priority("webpush", d.notification.priority))
        if urgency not in URGENCIES:
            return Outcome.failed("options.webpush.urgency: very-low | low | normal | high")
        headers = {"ttl": str(d.ttl_remaining), "urgency": urgency,
                   "content-encoding": "aes128gcm", "content-type": "application/octet-stream"}
        topic = opts.get("topic") or d.notification.collapse_key
        if topic:
            headers["topic"] = _mapping.collapse_id(str(topic), 32, "base64url", TOPIC_RE)
        return headers, body

    async def send(self, delivery: Delivery) -> Outcome:
        if self._client is None:
            raise RuntimeError("Web Push bridge used before start()")
        if not isinstance(delivery.channel, WebPushChannel):
            return Outcome.failed("not a webpush channel")
        endpoint = delivery.channel.subscription.endpoint
        try:
            url = ssrf.check_url(endpoint, self.policy)
        except ssrf.AddressRefused as exc:
            return Outcome.invalid_address(f"endpoint refused: {exc.args[0]}")
        built = self.build(delivery)
        if isinstance(built, Outcome):
            return built
        headers, body = built
        headers["authorization"] = self._vapid_header(endpoint)
        try:
            r = await self._client.post(url, headers=headers, content=body)
        except httpx.HTTPError as exc:
            refused = ssrf.refusal(exc)
            if refused is not None:
                return Outcome.invalid_address(f"endpoint refused: {refused.args[0]}")
            return _http.transport_outcome(exc)
        return self.classify(r)

    def classify(self, r: httpx.Response) -> Outcome:
        status = r.status_code
        reason = f"HTTP {status}"
        if status in (200, 201, 202):
            return Outcome.accepted(status=status)
        if status in (404, 410):
            return Outcome.invalid_address(reason, status)
        if status == 403:
            # RFC 8292 §4.2: the subscription is bound to another application server key.
            # That is this subscription's defect, not the bridge's: pausing every Web Push
            # delivery for one stale subscription would be worse than dropping it.
            return Outcome.invalid_address(f"{reason} (subscription bound to another VAPID key)", status)
        if status == 401:
            return Outcome.unhealthy(f"{reason} (VAPID authorization refused)", UNHEALTHY_RETRY_S, status)
        if status == 429 or status >= 500:
            return Outcome.retry(reason, _http.retry_after(r.headers), status)
        return Outcome.failed(reason, status)  # 400, 413 and anything undocumented


def load_secrets(section: WebpushBridge, problems: Problems, key: str = "bridges.webpush") -> None:
    """Check the VAPID key file (the section's, or an app's named under ``key``); it is read
    (or created) when the bridge starts.

    The key may be created by ``homepot-gateway vapid-keys``; a missing one is created at
    start (like that command), a bad one is an error now.
    """
    path = section.vapid_private_key_file
    if path.exists() and "PRIVATE KEY" not in path.read_text(encoding="utf-8", errors="replace"):
        problems.append((f"{key}.vapid_private_key_file", "not a PEM private key"))
    if given(section.ca_file) and key == "bridges.webpush":  # the section's, checked once
        require_file(section.ca_file, "bridges.webpush.ca_file", problems)
    return None


def build(section: WebpushBridge, ctx: BridgeContext, secrets: None = None, key: str = "bridges.webpush") -> Bridge:
    return WebPushBridgeImpl(section, ctx, key=key)
