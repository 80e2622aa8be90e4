"""A strict fake of FCM HTTP v1 and Google's OAuth2 token endpoint (one TLS server).

Token endpoint (``POST /token``): the JWT-bearer grant; the assertion must be RS256-signed
by the service account's key, ``iss`` = its email, ``aud`` = Google's token URL, the FCM
scope, ``exp - iat`` ≤ 3600 and not expired. Send endpoint
(``POST /v1/projects/<id>/messages:send``): a current bearer token this fake issued *for
that project's service account* (several projects, one per app: :meth:`FakeFcm.add_project`;
another project's token is refused with 403 PERMISSION_DENIED, as Google does), a
JSON ``{"message": ...}`` with exactly one target, string-only ``data``, known
notification/android fields, ``ttl`` as a duration, ≤ 4096 bytes of payload. Errors are
Google's shape with an FcmError ``errorCode``; any can be injected per token.
"""

from __future__ import annotations

import json
import re
import secrets
from functools import cache
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.fakes.common import Clock, Injection, Injections, Seen, Pki, json_response
from tests.fakes.server import FakeService, Request, Response, TlsHttpServer

GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
MESSAGE_KEYS = {"token", "topic", "condition", "name", "data", "notification", "android", "webpush",
                "apns", "fcm_options", "fcmOptions"}
NOTIFICATION_KEYS = {"title", "body", "image"}
ANDROID_KEYS = {"collapse_key", "collapseKey", "priority", "ttl", "restricted_package_name",
                "restrictedPackageName", "data", "notification", "fcm_options", "fcmOptions",
                "direct_boot_ok", "directBootOk"}
STATUS_OF = {"UNREGISTERED": (404, "NOT_FOUND"), "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED"),
             "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT"), "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED"),
             "UNAVAILABLE": (503, "UNAVAILABLE"), "INTERNAL": (500, "INTERNAL"),
             "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED"),
             "PERMISSION_DENIED": (403, "PERMISSION_DENIED"), "UNAUTHENTICATED": (401, "UNAUTHENTICATED")}


def fcm_error(error_code: str, message: str = "", details: list[dict[str, Any]] | None = None) -> tuple[int, dict[str, Any]]:
    status, grpc = STATUS_OF.get(error_code, (500, "INTERNAL"))
    body = {"error": {"code": status, "message": message or error_code, "status": grpc,
                      "details": details if details is not None else [{"@type": FCM_ERROR, "errorCode": error_code}]}}
    return status, body


@cache
def service_account_key(name: str) -> rsa.RSAPrivateKey:
    """The RSA key of the service account called ``name`` (its project, by default), made
    once per test process: a 2048-bit key takes ~90 ms of CPU to generate and every FCM test
    builds a fake. Distinct names give distinct keys."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeFcm(FakeService):
    def __init__(self, pki: Pki, project_id: str = "homepot-test", token_lifetime: int = 3599,
                 key_name: str | None = None):
        """``key_name`` picks the service account's key (:func:`service_account_key`; default
        the project id): a fake with another name stands for another account of the project."""
        self.pki = pki
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self.sa_key = service_account_key(key_name or project_id)
        self.client_email = f"gateway@{project_id}.iam.gserviceaccount.com"
        # client_email → (its key, its project): the accounts the token endpoint knows.
        self.accounts: dict[str, tuple[Any, str]] = {self.client_email: (self.sa_key, project_id)}
        self.token_projects: dict[str, str] = {}  # access token → the project its account belongs to
        self.accepted_by_project: dict[str, list[Seen]] = {}
        self.clock = Clock()
        self.injections = Injections()
        self.token_injections = Injections()
        self.unregistered: set[str] = set()
        self.tokens: dict[str, float] = {}  # access token → expiry
        self.token_requests = 0
        self.seen: list[Seen] = []
        self.accepted: list[Seen] = []
        self.server = TlsHttpServer(self.handle, pki.server_context(), protocols=("h2", "http/1.1"))


    @property
    def endpoint(self) -> str:
        return self.origin

    def service_account(self, project_id: str | None = None) -> dict[str, Any]:
        """The service account JSON of ``project_id`` (default: the first project)."""
        project_id = project_id or self.project_id
        email = next(e for e, (_, p) in self.accounts.items() if p == project_id)
        key = self.accounts[email][0]
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        return {"type": "service_account", "project_id": project_id, "private_key_id": "k1",
                "private_key": pem, "client_email": email, "client_id": "1",
                "token_uri": f"{self.endpoint}/token"}

    def add_project(self, project_id: str) -> dict[str, Any]:
        """Another Firebase project (another app) with its own service account; returns its JSON."""
        key = service_account_key(project_id)
        self.accounts[f"gateway@{project_id}.iam.gserviceaccount.com"] = (key, project_id)
        return self.service_account(project_id)

    def inject(self, token: str, error_code: str, retry_after: int | None = None, count: int = 1,
               message: str = "", details: list[dict[str, Any]] | None = None) -> None:
        status, body = fcm_error(error_code, message, details)
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        self.injections.add(token, Injection(status, body, headers, count))

    def expire_tokens(self) -> None:
        """Make every issued access token invalid (as after Google rotates them)."""
        self.tokens.clear()

    async def handle(self, req: Request) -> Response:
        if req.path == "/token":
            return self._token(req)
        m = re.fullmatch(r"/v1/projects/([^/]+)/messages:send", req.path)
        if not m or req.method != "POST":
            return self._err(req, 404, "NOT_FOUND", "not found")
        project = m.group(1)
        if project not in {p for _, p in self.accounts.values()}:
            return self._fcm(req, "PERMISSION_DENIED", "project mismatch")
        auth = req.header("authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if not token or self.tokens.get(token, 0) < self.clock():
            return self._err(req, 401, "UNAUTHENTICATED", "Request had invalid authentication credentials.",
                             [{"@type": FCM_ERROR, "errorCode": "UNAUTHENTICATED"}])
        if self.token_projects.get(token) != project:
            # Authenticated, but as another project's service account.
            return self._fcm(req, "PERMISSION_DENIED",
                             f"Permission 'cloudmessaging.messages.create' denied on resource '//cloudresourcemanager.googleapis.com/projects/{project}'")
        if not (req.header("content-type") or "").startswith("application/json"):
            return self._fcm(req, "INVALID_ARGUMENT", "content-type must be application/json")
        try:
            body = json.loads(req.body)
        except ValueError:
            return self._fcm(req, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        problem = self._validate(body)
        if problem:
            return self._fcm(req, "INVALID_ARGUMENT", problem)
        message = body["message"]
        target = message.get("token", "")
        injected = self.injections.take(target)
        if injected is not None:
            self.seen.append(Seen(req, injected.status, "injected", message))
            return injected
        if target in self.unregistered:
            return self._fcm(req, "UNREGISTERED", "Requested entity was not found.")
        seen = Seen(req, 200, "", message)
        self.seen.append(seen)
        self.accepted.append(seen)
        self.accepted_by_project.setdefault(project, []).append(seen)
        return json_response(200, {"name": f"projects/{project}/messages/{secrets.token_hex(8)}"})

    def _validate(self, body: Any) -> str | None:
        if not isinstance(body, dict) or set(body) - {"message", "validate_only"} or not isinstance(body.get("message"), dict):
            return "body must be {\"message\": {...}}"
        msg = body["message"]
        unknown = set(msg) - MESSAGE_KEYS
        if unknown:
            return f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} at 'message'"
        if sum(k in msg for k in ("token", "topic", "condition")) != 1:
            return "exactly one of token, topic, condition is required"
        data = msg.get("data", {})
        if not isinstance(data, dict) or any(not isinstance(v, str) for v in data.values()):
            return "Invalid value at 'message.data': data values must be strings"
        note = msg.get("notification", {})
        if not isinstance(note, dict) or set(note) - NOTIFICATION_KEYS or any(not isinstance(v, str) for v in note.values()):
            return "Invalid value at 'message.notification'"
        android = msg.get("android", {})
        if not isinstance(android, dict) or set(android) - ANDROID_KEYS:
            return "Invalid value at 'message.android'"
        if "priority" in android and str(android["priority"]).lower() not in ("normal", "high"):
            return "Invalid value at 'message.android.priority'"
        if "ttl" in android:
            ttl = android["ttl"]
            if not isinstance(ttl, str) or not re.fullmatch(r"\d+(\.\d{1,9})?s", ttl) or float(ttl[:-1]) > 2419200:
                return "Invalid value at 'message.android.ttl' (google.protobuf.Duration)"
        size = len(json.dumps({k: msg.get(k) for k in ("data", "notification") if k in msg}).encode())
        if size > 4096:
            return "Message is too big"
        if "token" in msg and (not isinstance(msg["token"], str) or not re.fullmatch(r"[A-Za-z0-9_:\-]{8,4096}", msg["token"])):
            return "The registration token is not a valid FCM registration token"
        return None

    def _fcm(self, req: Request, code: str, message: str) -> Response:
        status, body = fcm_error(code, message)
        self.seen.append(Seen(req, status, code))
        return json_response(status, body)

    def _err(self, req: Request, status: int, grpc: str, message: str, details: list[dict[str, Any]] | None = None) -> Response:
        self.seen.append(Seen(req, status, grpc))
        return json_response(status, {"error": {"code": status, "message": message, "status": grpc,
                                                "details": details or []}})

    def _token(self, req: Request) -> Response:
        self.token_requests += 1
        injected = self.token_injections.take("*")
        if injected is not None:
            return injected
        form = {k: v[0] for k, v in parse_qs(req.body.decode()).items()}
        if req.method != "POST" or form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return json_response(400, {"error": "unsupported_grant_type"})
        try:
            issuer = jwt.decode(form.get("assertion", ""), options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as exc:
            return json_response(400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"})
        if issuer not in self.accounts:
            return json_response(400, {"error": "invalid_grant", "error_description": "Invalid issuer"})
        account_key, project = self.accounts[issuer]
        try:
            claims = jwt.decode(form.get("assertion", ""), account_key.public_key(), algorithms=["RS256"],
                                audience=GOOGLE_TOKEN_AUD, options={"verify_exp": False, "verify_iat": False,
                                                                     "require": ["iss", "aud", "iat", "exp"]})
        except jwt.PyJWTError as exc:
            return json_response(400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"})
        now = self.clock()

        if SCOPE not in str(claims.get("scope", "")).split():
            return json_response(400, {"error": "invalid_scope"})
        if claims["exp"] - claims["iat"] > 3600 or claims["exp"] < now or claims["iat"] > now + 300:
            return json_response(400, {"error": "invalid_grant", "error_description": "Invalid JWT: Token must be a short-lived token"})
        token = "ya29." + secrets.token_urlsafe(24)
        self.tokens[token] = now + self.token_lifetime
        self.token_projects[token] = project
        return json_response(200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})
