"""A strict fake of APNs' provider API (HTTP/2 only), token or certificate auth.

Checks what Apple checks: HTTP/2, ``POST /3/device/<hex>``, the ES256 provider JWT
(signature with the team's key, ``kid``, ``iss``, ``iat`` age ≤ 60 min → else
ExpiredProviderToken; a token replaced within 20 min → TooManyProviderTokenUpdates),
``apns-topic``, ``apns-push-type``/``apns-priority`` consistency, ``apns-expiration``,
``apns-collapse-id`` length, ``apns-id`` form, a JSON body with ``aps`` and ≤ 4096 bytes.
Answers with Apple's reasons; any reason can be injected per token.

Several apps (:meth:`FakeApns.add_app`): each has its own key (``kid``) and team (``iss``)
and topic; a device token may belong to one topic (``device_topics``). A JWT signed by
another app's key for this topic → 403 InvalidProviderToken; a topic not of the JWT's team →
400 TopicDisallowed; a device token of another topic → 400 DeviceTokenNotForTopic.
"""

from __future__ import annotations

import json
import re
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.fakes.common import Clock, Injection, Injections, Seen, Pki, json_response
from tests.fakes.server import FakeService, Request, Response, TlsHttpServer

PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm",
              "liveactivity", "pushtotalk", "widgets", "controls"}
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class FakeApns(FakeService):
    def __init__(self, pki: Pki, *, team_id: str = "TEAM123456", key_id: str = "KEY1234567",
                 topic: str = "com.example.app", cert_auth: bool = False):
        self.pki = pki
        self.team_id = team_id
        self.key_id = key_id
        self.topic = topic
        self.cert_auth = cert_auth
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_pem = self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        self.clock = Clock()
        self.injections = Injections()
        self.unregistered: dict[str, int] = {}  # token → unregistered-since (ms)
        self.seen: list[Seen] = []
        self.accepted: list[Seen] = []
        self.jwts_seen: list[str] = []  # distinct provider tokens, in order of first use
        self._jwt_switched_at: dict[str, float] = {}  # key id → when its provider token last changed
        self._verified: dict[str, dict[str, object]] = {}
        # key id → (key, team); topic → the key ids that may send to it; device token → its topic.
        self.keys: dict[str, tuple[ec.EllipticCurvePrivateKey, str]] = {key_id: (self.key, team_id)}
        self.topic_keys: dict[str, set[str]] = {topic: {key_id}}
        self.device_topics: dict[str, str] = {}
        self.accepted_by_topic: dict[str, list[Seen]] = {}
        self.server = TlsHttpServer(self.handle, pki.server_context(require_client_cert=cert_auth),
                                    protocols=("h2",))


    @property
    def endpoint(self) -> str:
        return self.origin

    def add_app(self, topic: str, key_id: str, team_id: str | None = None) -> str:
        """Another app (bundle id ``topic``) with its own ``.p8`` key; returns the key's PEM."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.keys[key_id] = (key, team_id or self.team_id)
        self.topic_keys.setdefault(topic, set()).add(key_id)
        return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()

    def inject(self, token: str, status: int, reason: str, retry_after: int | None = None,
               count: int = 1, timestamp: int | None = None) -> None:
        body: dict[str, object] = {"reason": reason}
        if timestamp is not None:
            body["timestamp"] = timestamp
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        self.injections.add(token, Injection(status, body, headers, count))

    def _error(self, req: Request, status: int, reason: str, **extra: object) -> Response:
        self.seen.append(Seen(req, status, reason))
        headers = {"apns-id": req.header("apns-id") or str(uuid.uuid4())}
        return json_response(status, {"reason": reason, **extra}, headers)

    def _check_jwt(self, req: Request, topic: str | None) -> tuple[int, str] | None:
        auth = req.header("authorization")
        if auth is None:
            return 403, "MissingProviderToken"
        if not auth.startswith("bearer "):
            return 403, "InvalidProviderToken"
        token = auth[len("bearer "):]
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if claims is None:
                return 403, "InvalidProviderToken"
            self._verified[token] = claims
        now = self.clock()
        if claims["iat"] > now + 60:
            return 403, "InvalidProviderToken"
        if now - claims["iat"] > 3600:
            return 403, "ExpiredProviderToken"
        kid = str(claims["kid"])
        if topic is not None and topic in self.topic_keys and kid not in self.topic_keys[topic]:
            if self.keys[kid][1] != next(self.keys[k][1] for k in self.topic_keys[topic]):
                return 400, "TopicDisallowed"  # the topic is not an app of this key's team
            return 403, "InvalidProviderToken"  # signed by a key that is not this app's
        if token not in self.jwts_seen:
            switched = self._jwt_switched_at.get(kid)
            if switched is not None and now - switched < 20 * 60:
                return 429, "TooManyProviderTokenUpdates"
            self.jwts_seen.append(token)
            self._jwt_switched_at[kid] = now
        return None

    def _verify(self, token: str) -> dict[str, object] | None:
        """Signature, ``kid``, ``alg``, ``iss`` and ``iat`` present; the result is cached per token
        (as APNs does: the signature of a reused token is not re-checked per request)."""
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != "ES256" or header.get("kid") not in self.keys:
                return None
            key, team = self.keys[header["kid"]]
            claims = jwt.decode(token, key.public_key(), algorithms=["ES256"],
                                options={"verify_exp": False, "verify_iat": False, "require": ["iss", "iat"]})
        except jwt.PyJWTError:
            return None
        if claims.get("iss") != team or not isinstance(claims.get("iat"), int):
            return None
        return {**claims, "kid": header["kid"]}

    async def handle(self, req: Request) -> Response:
        if req.http_version != "2":
            return self._error(req, 400, "BadPath")
        m = re.fullmatch(r"/3/device/([^/?]+)", req.path)
        if req.method != "POST":
            return self._error(req, 405, "MethodNotAllowed")
        if not m:
            return self._error(req, 404, "BadPath")
        token = m.group(1)
        if not self.cert_auth:
            problem = self._check_jwt(req, req.header("apns-topic"))
            if problem:
                return self._error(req, *problem)
        apns_id = req.header("apns-id")
        if apns_id is not None and not UUID_RE.match(apns_id):
            return self._error(req, 400, "BadMessageId")
        topic = req.header("apns-topic")
        if topic is None:
            return self._error(req, 400, "MissingTopic")
        if topic not in self.topic_keys:
            return self._error(req, 400, "TopicDisallowed")
        if self.device_topics.get(token, topic) != topic:
            return self._error(req, 400, "DeviceTokenNotForTopic")
        push_type = req.header("apns-push-type")
        if push_type not in PUSH_TYPES:
            return self._error(req, 400, "InvalidPushType")
        priority = req.header("apns-priority", "10")
        if priority not in ("10", "5", "1"):
            return self._error(req, 400, "BadPriority")
        if push_type == "background" and priority != "5":
            return self._error(req, 400, "BadPriority")
        expiration = req.header("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return self._error(req, 400, "BadExpirationDate")
        collapse = req.header("apns-collapse-id")
        if collapse is not None and len(collapse.encode()) > 64:
            return self._error(req, 400, "BadCollapseId")
        if not re.fullmatch(r"[0-9a-f]{64,200}", token):
            return self._error(req, 400, "BadDeviceToken")
        if not req.body:
            return self._error(req, 400, "PayloadEmpty")
        if len(req.body) > 4096:
            return self._error(req, 413, "PayloadTooLarge")
        try:
            payload = json.loads(req.body)
        except ValueError:
            return self._error(req, 400, "BadPayload")
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return self._error(req, 400, "BadPayload")
        if push_type == "alert" and "alert" not in payload["aps"]:
            return self._error(req, 400, "BadPayload")
        injected = self.injections.take(token)
        if injected is not None:
            self.seen.append(Seen(req, injected.status, "injected", payload))
            injected.headers.setdefault("apns-id", apns_id or str(uuid.uuid4()))
            return injected
        if token in self.unregistered:
            return self._error(req, 410, "Unregistered", timestamp=self.unregistered[token])
        seen = Seen(req, 200, "", payload)
        self.seen.append(seen)
        self.accepted.append(seen)
        self.accepted_by_topic.setdefault(topic, []).append(seen)
        return Response(200, b"", {"apns-id": apns_id or str(uuid.uuid4())})
