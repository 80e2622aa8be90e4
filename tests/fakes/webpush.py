"""A strict fake push service (RFC 8030) with its own RFC 8291 decryption and RFC 8292 checks.

Subscriptions are made here like a browser makes them: a P-256 key pair and a 16-byte auth
secret per subscription, the private half kept by the fake. Every push must carry ``TTL``,
a valid ``Urgency``/``Topic`` if present, ``Content-Encoding: aes128gcm``, a body of one
record ≤ 4096 bytes that *decrypts* with the subscription's private key (implemented here
from the RFC, independently of the sender's library), and ``Authorization: vapid t=, k=``
whose ES256 JWT verifies with ``k`` and has ``aud`` = this origin, ``exp`` within 24 h and a
mailto:/https: ``sub``. A subscription may be bound to an application server key (403).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.fakes.common import Clock, Injection, Injections, Seen, Pki
from tests.fakes.server import FakeService, Request, Response, TlsHttpServer

TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Subscription:
    sub_id: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    app_server_key: str | None = None  # when set, pushes must be signed by this VAPID key


def decrypt_aes128gcm(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth_secret: bytes) -> bytes:
    """RFC 8291 §3–4 / RFC 8188: one record; raise ValueError on any deviation."""
    if len(body) < 21 + 65:
        raise ValueError("body shorter than the aes128gcm header")
    salt, rs, idlen = body[:16], struct.unpack("!I", body[16:20])[0], body[20]
    if idlen != 65:
        raise ValueError("keyid must be the sender's 65-byte public key")
    as_public_raw = body[21:21 + idlen]
    ciphertext = body[21 + idlen:]
    if rs < 18 or len(ciphertext) > rs:
        raise ValueError("more than one record")
    as_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public_raw)
    ua_public_raw = ua_private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    ecdh = ua_private.exchange(ec.ECDH(), as_public)
    ikm = HKDF(hashes.SHA256(), 32, salt=auth_secret,
               info=b"WebPush: info\x00" + ua_public_raw + as_public_raw).derive(ecdh)
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()  # HKDF-Extract
    cek = HKDFExpand(hashes.SHA256(), 16, b"Content-Encoding: aes128gcm\x00").derive(prk)
    nonce = HKDFExpand(hashes.SHA256(), 12, b"Content-Encoding: nonce\x00").derive(prk)
    padded = AESGCM(cek).decrypt(nonce, ciphertext, None)
    stripped = padded.rstrip(b"\x00")
    if not stripped or stripped[-1] != 2:
        raise ValueError("last record must end with the 0x02 delimiter")
    return stripped[:-1]


class FakePushService(FakeService):
    def __init__(self, pki: Pki, host: str = "127.0.0.1"):
        self.pki = pki
        self.clock = Clock()
        self.subs: dict[str, Subscription] = {}
        self.gone: set[str] = set()
        self.injections = Injections()
        self.seen: list[Seen] = []
        self.accepted: list[Seen] = []
        self.vapid_tokens: list[str] = []
        self.server = TlsHttpServer(self.handle, pki.server_context(), host=host, protocols=("h2", "http/1.1"))



    def subscribe(self, app_server_key: str | None = None, host: str | None = None) -> dict[str, Any]:
        """A browser's PushSubscription.toJSON() for a new subscription on this service."""
        sub_id = secrets.token_urlsafe(16)
        key = ec.generate_private_key(ec.SECP256R1())
        auth = secrets.token_bytes(16)
        self.subs[sub_id] = Subscription(sub_id, key, auth, app_server_key)
        origin = f"https://{host}:{self.server.port}" if host else self.origin
        raw = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return {"endpoint": f"{origin}/push/{sub_id}", "keys": {"p256dh": b64url(raw), "auth": b64url(auth)}}

    def inject(self, endpoint: str, status: int, retry_after: int | None = None, count: int = 1) -> None:
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        self.injections.add(endpoint.rsplit("/", 1)[-1], Injection(status, None, headers, count))

    def _answer(self, req: Request, status: int, reason: str) -> Response:
        self.seen.append(Seen(req, status, reason))
        return Response(status, reason.encode(), {"content-type": "text/plain"})

    def _check_vapid(self, req: Request, sub: Subscription) -> tuple[int, str] | None:
        auth = req.header("authorization") or ""
        m = re.fullmatch(r"vapid t=([A-Za-z0-9_\-.]+),\s*k=([A-Za-z0-9_\-]+)", auth)
        if not m:
            return 401, "missing or malformed vapid authorization"
        token, k = m.groups()
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(k))
            claims = jwt.decode(token, public, algorithms=["ES256"], audience=self.origin,
                                options={"verify_exp": False, "require": ["aud", "exp", "sub"]})
        except (ValueError, jwt.PyJWTError) as exc:
            return 401, f"vapid JWT rejected: {type(exc).__name__}"
        now = self.clock()
        if not isinstance(claims["exp"], int) or claims["exp"] <= now or claims["exp"] > now + 24 * 3600:
            return 401, "vapid exp must be in the future and at most 24 h ahead"
        if not str(claims["sub"]).startswith(("mailto:", "https:")):
            return 401, "vapid sub must be mailto: or https:"
        if sub.app_server_key is not None and k != sub.app_server_key:
            return 403, "subscription is bound to another application server key"
        if token not in self.vapid_tokens:
            self.vapid_tokens.append(token)
        return None

    async def handle(self, req: Request) -> Response:
        m = re.fullmatch(r"/push/([A-Za-z0-9_\-]+)", req.path)
        if req.method != "POST" or not m:
            return self._answer(req, 404, "not found")
        sub_id = m.group(1)
        if sub_id in self.gone:
            return self._answer(req, 410, "subscription expired")
        sub = self.subs.get(sub_id)
        if sub is None:
            return self._answer(req, 404, "no such subscription")
        ttl = req.header("ttl")
        if ttl is None or not ttl.isdigit():
            return self._answer(req, 400, "TTL header required")
        if req.header("urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return self._answer(req, 400, "bad Urgency")
        topic = req.header("topic")
        if topic is not None and not TOPIC_RE.fullmatch(topic):
            return self._answer(req, 400, "bad Topic")
        problem = self._check_vapid(req, sub)
        if problem:
            return self._answer(req, *problem)
        if len(req.body) > 4096:
            return self._answer(req, 413, "payload too large")
        if req.header("content-encoding") != "aes128gcm":
            return self._answer(req, 400, "Content-Encoding must be aes128gcm")
        try:
            plaintext = decrypt_aes128gcm(req.body, sub.private_key, sub.auth)
        except Exception as exc:  # any failure to decrypt is the sender's fault
            return self._answer(req, 400, f"cannot decrypt: {type(exc).__name__}")
        injected = self.injections.take(sub_id)
        if injected is not None:
            self.seen.append(Seen(req, injected.status, "injected", plaintext))
            return injected
        try:
            decoded: Any = json.loads(plaintext)
        except ValueError:
            decoded = plaintext
        seen = Seen(req, 201, "", decoded)
        self.seen.append(seen)
        self.accepted.append(seen)
        return Response(201, b"", {"location": f"{self.origin}/message/{secrets.token_hex(8)}"})
