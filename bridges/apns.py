"""APNs bridge: Apple's token-based (or certificate-based) HTTP/2 provider API.

One delivery is one ``POST /3/device/<token>`` on long-lived HTTP/2 connections
(:class:`bridges._http.PushClient`, HTTP/2 only: APNs speaks nothing else). Token auth
signs an ES256 provider JWT that must be *reused*: Apple rejects tokens older than 60
minutes (403 ExpiredProviderToken) and punishes re-minting more often than every 20
minutes (429 TooManyProviderTokenUpdates). So JWTs are cached per (team, key) for the
whole process and renewed after :data:`JWT_REUSE_S`; an ExpiredProviderToken answer renews
it once (only if nobody did meanwhile) and resends once
(:func:`bridges._auth.send_with_reauth`). Everything else is classified, never retried:
the pipeline owns retries and fallback.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
import structlog
from pydantic import SecretStr

from bridges import _http, _mapping, keys
from bridges._auth import Credential, send_with_reauth
from bridges.base import Bridge, BridgeConfigError, BridgeContext, Delivery, Outcome
from devices.models import ApnsChannel
from gateway.config import ApnsBridge
from gateway.secret_files import Problems, given, read_secret, require_file
from gateway.timeutil import iso_ts

log = structlog.get_logger(__name__)

HOSTS = {"production": "https://api.push.apple.com", "sandbox": "https://api.sandbox.push.apple.com"}
MAX_PAYLOAD = 4096
MAX_COLLAPSE_ID = 64
JWT_REUSE_S = 50 * 60  # inside Apple's 20–60 min window, with margin for clock skew
UNHEALTHY_RETRY_S = 60.0

# Apple's documented reasons, by what they mean for this delivery.
INVALID_ADDRESS = {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken"}
CONFIG_ERRORS = {"InvalidProviderToken", "MissingProviderToken", "BadCertificate",
                 "BadCertificateEnvironment", "TopicDisallowed", "BadTopic", "MissingTopic",
                 "Forbidden", "ExpiredProviderToken"}
TRANSIENT = {"TooManyRequests", "InternalServerError", "ServiceUnavailable", "Shutdown",
             "IdleTimeout", "TooManyProviderTokenUpdates"}

_now = time.time  # patched by tests to move the clock


@dataclass
class _Jwt:
    token: str
    issued_at: float


class _JwtCache:
    """Provider JWTs shared by every APNs bridge of the process, one per (team, key)."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], _Jwt] = {}
        # id(key) -> (key, fingerprint): the fingerprint is a public-key export and a
        # SHA-256, done once per key object rather than on every send (the key is held
        # here, so its id cannot be reused by another object while the entry lives).
        self._fingerprints: dict[int, tuple[Any, str]] = {}
        self.minted = 0  # how many JWTs were signed (observable by tests and the bench)

    def _fingerprint(self, key: Any) -> str:
        known = self._fingerprints.get(id(key))
        if known is not None and known[0] is key:
            return known[1]
        fp = _fingerprint(key)
        self._fingerprints[id(key)] = (key, fp)
        return fp

    def get(self, team_id: str, key_id: str, key: Any, *, stale: str | None = None) -> str:
        """The current JWT; a new one if it is older than the reuse window or is ``stale``.

        Keyed by team, key id and the key itself, so two configurations that share ids but
        not key material never hand each other a token the other cannot vouch for.
        Synchronous and lock-free on purpose: it never awaits, so on one event loop no two
        callers can mint concurrently.
        """
        slot = (team_id, key_id, self._fingerprint(key))
        now = _now()
        current = self._tokens.get(slot)
        if (current is not None and current.token != stale
                and now - current.issued_at < JWT_REUSE_S):
            return current.token  # fresh, or already replaced by another sender
        issued = int(now)
        token = jwt.encode({"iss": team_id, "iat": issued}, key, algorithm="ES256",
                           headers={"kid": key_id})
        self._tokens[slot] = _Jwt(token, issued)
        self.minted += 1
        log.info("apns provider token signed", team_id=team_id, key_id=key_id)
        return token

    def clear(self) -> None:
        self._tokens.clear()
        self._fingerprints.clear()
        self.minted = 0


JWTS = _JwtCache()


def _fingerprint(key: Any) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return hashlib.sha256(raw).hexdigest()


class ApnsBridgeImpl(Bridge):
    platform = "apns"

    def __init__(self, cfg: ApnsBridge, ctx: BridgeContext, secrets: ApnsSecrets | None, key: str = "bridges.apns"):
        self.cfg = cfg
        self.key = key  # the config section: bridges.apns, or bridges.apns.apps.<name> for an app
        self.secrets = secrets
        self.base = (cfg.endpoint or HOSTS[cfg.environment]).rstrip("/")
        self.cert_auth = cfg.cert_file is not None and str(cfg.cert_file) != ""
        self._key: Any = None
        self._client: _http.PushClient | None = None

    async def start(self) -> None:
        # The checks `check-config` makes too (bridges.keys).
        self._key = keys.apns_signing_key(self.cfg, self.secrets, self.key)
        keys.apns_tls(self.cfg, self.key)
        try:
            self._client = _http.PushClient(
                self.cfg.ca_file, http2_only=True,
                cert_file=self.cfg.cert_file if self.cert_auth else None,
                key_file=self.cfg.cert_key_file if self.cert_auth else None)
        except (OSError, ValueError) as exc:
            raise BridgeConfigError(f"{self.key}.cert_file: cannot load TLS material ({type(exc).__name__})") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ request building
    def build(self, d: Delivery) -> tuple[dict[str, str], bytes] | Outcome:
        """Headers and body for one delivery, or a ``failed`` Outcome if it cannot be sent."""
        n = d.notification
        opts = dict(d.options or {})
        extra_headers = opts.pop("headers", {}) or {}
        extra_aps = opts.pop("aps", {}) or {}
        if not isinstance(extra_headers, dict) or not isinstance(extra_aps, dict):
            return Outcome.failed("options.apns.headers and options.apns.aps must be objects")
        alert = bool(n.title or n.body)
        aps: dict[str, Any] = {}
        if alert:
            aps["alert"] = {k: v for k, v in (("title", n.title), ("body", n.body)) if v}
            if n.priority == "critical":
                aps["interruption-level"] = "time-sensitive"
        else:
            aps["content-available"] = 1
        aps.update(extra_aps)
        body: dict[str, Any] = {}
        for key, value in n.data.items():
            if key == "aps":
                return Outcome.failed("data key 'aps' is reserved by APNs")
            body[key] = value
        body.update(opts)  # remaining options are custom top-level keys
        body["aps"] = aps
        body.update(d.ids())  # message_id, job_id (and ack_url) always win
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if len(payload) > MAX_PAYLOAD:
            return Outcome.failed(f"PayloadTooLarge: {len(payload)} bytes > {MAX_PAYLOAD} (not sent)")
        push_type = "alert" if alert else "background"
        priority = _mapping.priority("apns", n.priority) if alert else "5"  # background pushes must use 5
        ttl = d.ttl_remaining
        headers = {
            "apns-topic": self.cfg.topic,
            "apns-push-type": push_type,
            "apns-priority": priority,
            "apns-expiration": "0" if ttl == 0 else str(int(d.expires_at.timestamp())),
            "apns-id": d.message_id,
            "content-type": "application/json",
        }
        if n.collapse_key:
            if len(n.collapse_key.encode()) > MAX_COLLAPSE_ID:
                return Outcome.failed(f"collapse_key over {MAX_COLLAPSE_ID} bytes (apns-collapse-id)")
            if _http.header_problem("apns-collapse-id", n.collapse_key):
                return Outcome.failed("collapse_key: CR, LF or NUL cannot be sent (apns-collapse-id)")
            headers["apns-collapse-id"] = n.collapse_key
        for name, value in extra_headers.items():
            lname = str(name).lower()
            if not lname.startswith("apns-") or lname == "apns-id":
                return Outcome.failed(f"options.apns.headers: {name!r} cannot be set")
            problem = _http.header_problem(lname, str(value))
            if problem is not None:
                return Outcome.failed(f"options.apns.headers: {problem}")
            headers[lname] = str(value)
        if headers["apns-push-type"] == "background":
            headers["apns-priority"] = "5"
        return headers, payload

    # ------------------------------------------------------------------ sending
    async def send(self, delivery: Delivery) -> Outcome:
        if self._client is None:
            raise RuntimeError("APNs bridge used before start()")
        if not isinstance(delivery.channel, ApnsChannel):
            return Outcome.failed("not an apns channel")
        built = self.build(delivery)
        if isinstance(built, Outcome):
            return built
        headers, payload = built
        url = f"{self.base}/3/device/{delivery.channel.token}"
        client = self._client

        async def credential(stale: str | None) -> Credential[str | None]:
            if self.cert_auth:
                return Credential(None)  # the TLS client certificate is the credential
            return Credential(JWTS.get(self.cfg.team_id, self.cfg.key_id, self._key, stale=stale))

        async def attempt(jwt_: Credential[str | None]) -> tuple[Outcome, bool]:
            sent = dict(headers)
            if jwt_.value is not None:
                sent["authorization"] = f"bearer {jwt_.value}"
            try:
                response = await client.post(url, sent, payload)
            except client.errors as exc:
                return _http.transport_outcome(exc), False
            outcome, reason = self.classify(response)
            return outcome, reason == "ExpiredProviderToken" and not self.cert_auth

        return await send_with_reauth(credential, attempt)

    def classify(self, r: _http.Answer) -> tuple[Outcome, str]:
        """Map one APNs answer to an Outcome (and return Apple's reason)."""
        if r.status_code == 200:
            return Outcome.accepted(status=200), ""
        body = _http.json_or_empty(r)
        reason = str(body.get("reason") or f"HTTP {r.status_code}")
        status = r.status_code
        if reason in INVALID_ADDRESS or status == 410:
            ts = body.get("timestamp")
            if isinstance(ts, (int, float)):
                since = iso_ts(ts / 1000)
                return Outcome.invalid_address(f"{reason} since {since}", status), reason
            return Outcome.invalid_address(reason, status), reason
        if reason in CONFIG_ERRORS:
            return Outcome.unhealthy(reason, UNHEALTHY_RETRY_S, status), reason
        if reason in TRANSIENT or status in (429, 500, 502, 503, 504):
            default = 60.0 if reason == "TooManyProviderTokenUpdates" else None
            return Outcome.retry(reason, _http.retry_after(r.headers, default), status), reason
        if status == 403:
            return Outcome.unhealthy(reason, UNHEALTHY_RETRY_S, status), reason
        return Outcome.failed(reason, status), reason


@dataclass(frozen=True)
class ApnsSecrets:
    """The ``.p8`` signing key of token auth (``None`` with certificate auth); never logged."""

    signing_key: SecretStr | None


def load_secrets(section: ApnsBridge, problems: Problems, key: str = "bridges.apns") -> ApnsSecrets | None:
    """Check the section (or an app's, named under ``key``) for one complete way to
    authenticate and read the signing key."""
    signing_key = None
    if not section.topic:
        problems.append((f"{key}.topic", "required (the app's bundle id)"))
    if given(section.cert_file):
        require_file(section.cert_file, f"{key}.cert_file", problems)
        if given(section.cert_key_file):
            require_file(section.cert_key_file, f"{key}.cert_key_file", problems)
    else:
        for attr in ("team_id", "key_id"):
            if not getattr(section, attr):
                problems.append((f"{key}.{attr}", "required for token auth (or set cert_file)"))
        require_file(section.key_file, f"{key}.key_file", problems)
        if section.key_file and section.key_file.is_file():
            secret = read_secret(section.key_file, f"{key}.key_file", problems)
            if secret is not None:
                if "PRIVATE KEY" not in secret:
                    problems.append((f"{key}.key_file", "not a PEM private key (.p8)"))
                else:
                    signing_key = SecretStr(secret)
    if given(section.ca_file) and key == "bridges.apns":  # the section's, checked once
        require_file(section.ca_file, "bridges.apns.ca_file", problems)
    return ApnsSecrets(signing_key=signing_key)


def build(section: ApnsBridge, ctx: BridgeContext, secrets: ApnsSecrets | None, key: str = "bridges.apns") -> Bridge:
    return ApnsBridgeImpl(section, ctx, secrets, key)
