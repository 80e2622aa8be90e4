"""FCM bridge: Firebase Cloud Messaging HTTP v1, one message per request over HTTP/2
(:class:`bridges._http.PushClient`, libcurl).

Auth is an OAuth2 access token obtained with google-auth from the service-account file
(JWT-bearer grant posted to the file's ``token_uri``). google-auth's ``refresh()`` blocks,
so it runs in a worker thread, single-flight behind a lock, and *before* the token expires
(:data:`REFRESH_MARGIN_S`) so sends do not stall on it (the cache is :class:`bridges._auth.TokenCache`). The token
request goes through a small httpx-based google-auth transport so the same ``ca_file`` is
trusted there too. A 401 UNAUTHENTICATED refreshes once and resends once
(:func:`bridges._auth.send_with_reauth`); every other answer is classified for the pipeline.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from bridges import _http, _mapping, keys
from bridges._auth import AuthFailed, Credential, TokenCache, send_with_reauth
from bridges.base import Bridge, BridgeContext, Delivery, Outcome
from devices.models import FcmChannel
from gateway.config import FcmBridge
from gateway.secret_files import Problems, given, require_file

log = structlog.get_logger(__name__)

SCOPE = keys.FCM_SCOPE
REFRESH_MARGIN_S = 300  # refresh when less than 5 minutes are left
UNHEALTHY_RETRY_S = 60.0
QUOTA_DEFAULT_RETRY_S = 60.0
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
# What FCM says when the *token* (not the payload) is malformed; it uses INVALID_ARGUMENT
# for both, and only the message or a field violation on message.token tells them apart.
INVALID_TOKEN_MESSAGE = "not a valid fcm registration token"

_now = time.time  # patched by tests


class _HttpxAuthRequest:
    """google-auth's transport interface (``google.auth.transport.Request``) over httpx.

    Blocking, like google-auth expects; it only ever runs in a worker thread.
    """

    def __init__(self, ca_file: Any):
        self._client = httpx.Client(verify=_http.tls_context(ca_file), timeout=15.0, trust_env=False)

    def __call__(self, url: str, method: str = "GET", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float | None = None,
                 **kwargs: Any) -> Any:
        from google.auth import exceptions
        from google.auth.transport import Response

        try:
            r = self._client.request(method, url, content=body, headers=headers,
                                     timeout=timeout or 15.0)
        except httpx.HTTPError as exc:
            raise exceptions.TransportError(f"token request failed: {type(exc).__name__}") from None

        class _Resp(Response):
            status = r.status_code
            headers = dict(r.headers)
            data = r.content

        return _Resp()

    def close(self) -> None:
        self._client.close()


class FcmBridgeImpl(Bridge):
    platform = "fcm"

    def __init__(self, cfg: FcmBridge, ctx: BridgeContext, secrets: FcmSecrets | None, key: str = "bridges.fcm"):
        self.cfg = cfg
        self.key = key  # the config section: bridges.fcm, or bridges.fcm.apps.<name> for an app
        self.secrets = secrets
        self.project_id = secrets.project_id if secrets is not None else cfg.project_id
        self.url = f"{cfg.endpoint.rstrip('/')}/v1/projects/{self.project_id}/messages:send"
        self._creds: Any = None
        self._auth_request: _HttpxAuthRequest | None = None
        self._client: _http.PushClient | None = None
        self._tokens = TokenCache(self._refresh, REFRESH_MARGIN_S, lambda: _now())

    @property
    def refreshes(self) -> int:
        return self._tokens.fetches

    async def start(self) -> None:
        self._creds = keys.fcm_credentials(self.secrets, self.key)  # the check `check-config` makes too
        self._auth_request = _HttpxAuthRequest(self.cfg.ca_file)
        self._client = _http.PushClient(self.cfg.ca_file, http2_only=False)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._auth_request is not None:
            self._auth_request.close()
            self._auth_request = None

    # ------------------------------------------------------------------ OAuth token
    async def _access_token(self, stale: str | None = None) -> str:
        """A valid access token (refreshed off the loop when missing, expiring or ``stale``)."""
        return (await self._tokens.get(stale)).value

    async def _refresh(self) -> tuple[str, float]:
        from google.auth import exceptions

        try:
            await asyncio.to_thread(self._creds.refresh, self._auth_request)
        except exceptions.RefreshError as exc:
            # invalid_grant / invalid_client / bad key: the configuration is wrong.
            retryable = bool(getattr(exc, "retryable", False))
            reason = "oauth token refresh refused"
            raise AuthFailed(Outcome.retry(reason) if retryable else
                             Outcome.unhealthy(reason, UNHEALTHY_RETRY_S)) from None
        except exceptions.TransportError:
            raise AuthFailed(Outcome.retry("oauth token endpoint unreachable")) from None
        except (exceptions.GoogleAuthError, ValueError) as exc:
            raise AuthFailed(Outcome.unhealthy(
                f"oauth token refresh failed ({type(exc).__name__})", UNHEALTHY_RETRY_S)) from None
        expiry = self._creds.expiry
        if expiry is None:
            expires_at = _now() + 3600
        else:
            expires_at = expiry.replace(tzinfo=UTC).timestamp() if expiry.tzinfo is None else expiry.timestamp()
        log.info("fcm access token refreshed", section=self.key, project_id=self.project_id,
                 expires_at=datetime.fromtimestamp(expires_at, UTC).isoformat())
        return self._creds.token, expires_at

    # ------------------------------------------------------------------ request building
    def build(self, d: Delivery) -> dict[str, Any] | Outcome:
        """The ``{"message": ...}`` body: the job's notification, data and options.fcm merged."""
        assert isinstance(d.channel, FcmChannel)
        n = d.notification
        message: dict[str, Any] = {"token": d.channel.token}
        if n.title or n.body:
            message["notification"] = {k: v for k, v in (("title", n.title), ("body", n.body)) if v}
        message["data"] = {**n.data, **d.ids()}
        android: dict[str, Any] = {
            "priority": _mapping.priority("fcm", n.priority),
            "ttl": f"{d.ttl_remaining}s",
        }
        if n.collapse_key:
            android["collapse_key"] = n.collapse_key
        message["android"] = android
        options = d.options or {}
        for key in ("token", "topic", "condition"):
            if key in options:
                return Outcome.failed(f"options.fcm.{key}: the target is the device's token")
        merged = _deep_merge(message, copy.deepcopy(options))
        if not isinstance(merged.get("data"), dict):
            return Outcome.failed("options.fcm.data must be an object of strings")
        # The identifiers the device acks with (and its ack URL) always win over options.
        merged["data"].update(d.ids())
        return {"message": merged}

    # ------------------------------------------------------------------ sending
    async def send(self, delivery: Delivery) -> Outcome:
        if self._client is None:
            raise RuntimeError("FCM bridge used before start()")
        if not isinstance(delivery.channel, FcmChannel):
            return Outcome.failed("not an fcm channel")
        body = self.build(delivery)
        if isinstance(body, Outcome):
            return body
        client = self._client
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

        async def credential(stale: str | None) -> Credential[str]:
            return await self._tokens.get(stale)

        async def attempt(token: Credential[str]) -> tuple[Outcome, bool]:
            headers = {"authorization": f"Bearer {token.value}", "content-type": "application/json"}
            try:
                response = await client.post(self.url, headers, payload)
            except client.errors as exc:
                return _http.transport_outcome(exc), False
            outcome, code = self.classify(response)
            return outcome, code == "UNAUTHENTICATED"

        return await send_with_reauth(credential, attempt)

    def classify(self, r: _http.Answer) -> tuple[Outcome, str]:
        """Map one FCM answer (HTTP status + FcmError errorCode) to an Outcome."""
        status = r.status_code
        if status == 200:
            return Outcome.accepted(status=200), ""
        err = _http.json_or_empty(r).get("error")
        err = err if isinstance(err, dict) else {}
        details = err.get("details") if isinstance(err.get("details"), list) else []
        code = ""
        token_field = False
        for detail in details:
            if not isinstance(detail, dict):
                continue
            if detail.get("@type") == FCM_ERROR_TYPE and detail.get("errorCode"):
                code = str(detail["errorCode"])
            if detail.get("@type") == BAD_REQUEST_TYPE:
                for violation in detail.get("fieldViolations") or []:
                    if isinstance(violation, dict) and violation.get("field") == "message.token":
                        token_field = True
        if not code:
            code = str(err.get("status") or f"HTTP {status}")
        message = str(err.get("message") or "")
        reason = f"{code}: {message}"[:300] if message else code
        if code in ("UNREGISTERED", "SENDER_ID_MISMATCH"):
            return Outcome.invalid_address(reason, status), code
        if code == "INVALID_ARGUMENT":
            if token_field or INVALID_TOKEN_MESSAGE in message.lower():
                return Outcome.invalid_address(reason, status), code
            return Outcome.failed(reason, status), code
        if code == "QUOTA_EXCEEDED" or status == 429:
            return Outcome.retry(reason, _http.retry_after(r.headers, QUOTA_DEFAULT_RETRY_S), status), code
        if code in ("UNAVAILABLE", "INTERNAL") or status >= 500:
            return Outcome.retry(reason, _http.retry_after(r.headers), status), code
        if code in ("THIRD_PARTY_AUTH_ERROR", "PERMISSION_DENIED", "UNAUTHENTICATED") or status in (401, 403):
            return Outcome.unhealthy(reason, UNHEALTHY_RETRY_S, status), code
        if status == 404:
            # Not UNREGISTERED: the project or endpoint is wrong, which no device can fix.
            return Outcome.unhealthy(reason, UNHEALTHY_RETRY_S, status), code
        return Outcome.failed(reason, status), code


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class FcmSecrets:
    """The service account JSON and the project it sends for; never logged."""

    service_account_info: Mapping[str, Any] = field(repr=False)
    project_id: str


def load_secrets(section: FcmBridge, problems: Problems, key: str = "bridges.fcm") -> FcmSecrets | None:
    """Read the service account JSON and check it has what token minting needs; the project
    is ``project_id`` if set, else the account's. Problems are named under ``key`` (the
    section, or an app's ``bridges.fcm.apps.<name>``)."""
    require_file(section.service_account_file, f"{key}.service_account_file", problems)
    secrets = None
    if section.service_account_file and section.service_account_file.is_file():
        try:
            info = json.loads(section.service_account_file.read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
            for needed in ("client_email", "private_key", "token_uri"):
                if needed not in info:
                    raise ValueError(f"missing {needed!r}")
            project_id = section.project_id
            if not project_id:
                if "project_id" not in info:
                    raise ValueError(f"missing 'project_id' (or set {key}.project_id)")
                project_id = info["project_id"]
            secrets = FcmSecrets(service_account_info=types.MappingProxyType(info), project_id=project_id)
        except ValueError as exc:
            problems.append((f"{key}.service_account_file", f"not a service account JSON: {exc}"))
    if given(section.ca_file) and key == "bridges.fcm":  # the section's, checked once
        require_file(section.ca_file, "bridges.fcm.ca_file", problems)
    return secrets


def build(section: FcmBridge, ctx: BridgeContext, secrets: FcmSecrets | None, key: str = "bridges.fcm") -> Bridge:
    return FcmBridgeImpl(section, ctx, secrets, key)
