"""Web Push bridge against the strict push service fake: encryption, VAPID, headers, SSRF, answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
import structlog

from bridges import webpush
from bridges.base import OutcomeKind
from gateway import vapid
from tests.bridges.conftest import bridge_config, context, delivery
from tests.fakes.common import Pki
from tests.fakes.webpush import FakePushService


async def make_bridge(tmp_path: Path, pki: Pki, resolver=None, **overrides: object) -> webpush.WebPushBridgeImpl:
    section = {"enabled": True, "vapid_private_key_file": str(tmp_path / "vapid.pem"),
               "subject": "mailto:ops@example.com", "allow_private_endpoints": True,
               "ca_file": str(pki.ca_file), **overrides}
    cfg = bridge_config(tmp_path, {"webpush": section}).config.bridges.webpush
    bridge = webpush.WebPushBridgeImpl(cfg, context(tmp_path), **({"resolver": resolver} if resolver else {}))
    await bridge.start()
    return bridge


def channel(sub: dict) -> dict:
    return {"platform": "webpush", "subscription": sub}


async def test_payload_decrypts_with_the_subscription_key_and_headers_are_set(tmp_path, fake_push, pki):
    bridge = await make_bridge(tmp_path, pki)
    d = delivery(channel(fake_push.subscribe()), priority="critical", ttl=300, collapse_key="config",
                 options={"notification": {"icon": "/i.png"}})
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED and outcome.status == 201
    [seen] = fake_push.accepted
    envelope = seen.decoded  # decrypted by the fake with the subscription's private key
    assert envelope["message_id"] == d.message_id and envelope["job_id"] == "job-1"
    assert envelope["title"] == "Config update" and envelope["data"] == {"config_version": "2.1.0"}
    assert envelope["notification"] == {"icon": "/i.png"}
    h = seen.request.headers
    assert h["content-encoding"] == "aes128gcm" and h["urgency"] == "high" and h["topic"] == "config"
    assert int(h["ttl"]) in (299, 300)
    token = h["authorization"].split("t=")[1].split(",")[0]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == fake_push.origin and claims["sub"] == "mailto:ops@example.com"
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    key = vapid.load_or_create(tmp_path / "vapid.pem")
    assert h["authorization"].endswith(f"k={vapid.public_key_b64(key)}")


async def test_vapid_jwt_is_cached_per_origin_and_renewed_near_expiry(tmp_path, pki, monkeypatch):
    a = await FakePushService(pki, host="127.0.0.1").start()
    b = await FakePushService(pki, host="localhost").start()
    try:
        bridge = await make_bridge(tmp_path, pki)
        for _ in range(3):
            for fake, host in ((a, None), (b, "localhost")):
                outcome = await bridge.send(delivery(channel(fake.subscribe(host=host))))
                assert outcome.kind is OutcomeKind.ACCEPTED, outcome
        assert bridge.vapid_signed == 2  # one per origin, not one per message
        assert len(a.vapid_tokens) == 1 and len(b.vapid_tokens) == 1
        assert jwt.decode(b.vapid_tokens[0], options={"verify_signature": False})["aud"] == b.origin
        monkeypatch.setattr(webpush, "_now", lambda: time.time() + 11.5 * 3600)
        assert (await bridge.send(delivery(channel(a.subscribe())))).kind is OutcomeKind.ACCEPTED
        assert bridge.vapid_signed == 3
        await bridge.close()
    finally:
        await a.stop()
        await b.stop()


async def test_subscription_bound_to_another_key_is_invalid(tmp_path, fake_push, pki):
    bridge = await make_bridge(tmp_path, pki)
    outcome = await bridge.send(delivery(channel(fake_push.subscribe(app_server_key="B" * 87))))
    await bridge.close()
    assert outcome.kind is OutcomeKind.INVALID_ADDRESS and outcome.status == 403


@pytest.mark.parametrize("status,retry_after,kind", [
    (404, None, OutcomeKind.INVALID_ADDRESS),
    (410, None, OutcomeKind.INVALID_ADDRESS),
    (429, 9, OutcomeKind.RETRY),
    (413, None, OutcomeKind.FAILED),
    (400, None, OutcomeKind.FAILED),
    (500, None, OutcomeKind.RETRY),
    (503, 4, OutcomeKind.RETRY),
    (401, None, OutcomeKind.UNHEALTHY),
])
async def test_every_answer_is_classified(tmp_path, fake_push, pki, status, retry_after, kind):
    bridge = await make_bridge(tmp_path, pki)
    sub = fake_push.subscribe()
    fake_push.inject(sub["endpoint"], status, retry_after)
    outcome = await bridge.send(delivery(channel(sub)))
    await bridge.close()
    assert outcome.kind is kind and outcome.status == status
    assert outcome.retry_after == (float(retry_after) if retry_after else (60.0 if kind is OutcomeKind.UNHEALTHY else None))


async def test_expired_subscription_is_invalid(tmp_path, fake_push, pki):
    bridge = await make_bridge(tmp_path, pki)
    sub = fake_push.subscribe()
    fake_push.gone.add(sub["endpoint"].rsplit("/", 1)[1])
    outcome = await bridge.send(delivery(channel(sub)))
    await bridge.close()
    assert outcome.kind is OutcomeKind.INVALID_ADDRESS and outcome.status == 410


async def test_private_and_plain_http_endpoints_are_refused_by_default(tmp_path, fake_push, pki):
    bridge = await make_bridge(tmp_path, pki, allow_private_endpoints=False)
    sub = fake_push.subscribe()
    refused = [
        await bridge.send(delivery(channel(sub))),  # https://127.0.0.1:port
        await bridge.send(delivery(channel(fake_push.subscribe(host="localhost")))),
        await bridge.send(delivery(channel({**sub, "endpoint": sub["endpoint"].replace("https", "http")}))),
        await bridge.send(delivery(channel({**sub, "endpoint": "https://10.0.0.7/push/x"}))),
        await bridge.send(delivery(channel({**sub, "endpoint": "https://[::ffff:127.0.0.1]/push/x"}))),
        await bridge.send(delivery(channel({**sub, "endpoint": "https://169.254.169.254/latest"}))),
    ]
    await bridge.close()
    assert all(o.kind is OutcomeKind.INVALID_ADDRESS for o in refused), refused
    assert fake_push.seen == []


async def test_public_name_resolving_to_private_address_is_refused_at_connect(tmp_path, fake_push, pki):
    async def resolver(host: str, port: int) -> list[str]:
        return ["10.1.2.3", "127.0.0.1"]

    bridge = await make_bridge(tmp_path, pki, resolver=resolver, allow_private_endpoints=False)
    sub = fake_push.subscribe()
    sub["endpoint"] = sub["endpoint"].replace("127.0.0.1", "push.example.com")
    outcome = await bridge.send(delivery(channel(sub)))
    await bridge.close()
    assert outcome.kind is OutcomeKind.INVALID_ADDRESS and "non-public" in outcome.reason


async def test_oversize_payload_is_failed_before_sending(tmp_path, fake_push, pki):
    bridge = await make_bridge(tmp_path, pki)
    outcome = await bridge.send(delivery(channel(fake_push.subscribe()), data={"blob": "x" * 4000}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.FAILED and fake_push.seen == []


async def test_long_collapse_key_becomes_a_valid_topic(tmp_path, fake_push, pki):
    bridge = await make_bridge(tmp_path, pki)
    outcome = await bridge.send(delivery(channel(fake_push.subscribe()), collapse_key="config update #7 (site 1)"))
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED
    topic = fake_push.accepted[0].request.headers["topic"]
    assert len(topic) == 32


async def test_fake_rejects_bad_vapid_and_missing_ttl(tmp_path, fake_push, pki):
    import httpx

    sub = fake_push.subscribe()
    ctx = __import__("ssl").create_default_context(cafile=str(pki.ca_file))
    key = vapid.load_or_create(tmp_path / "k.pem")
    wrong_aud = jwt.encode({"aud": "https://elsewhere.example", "exp": int(time.time()) + 600,
                            "sub": "mailto:a@b"}, key, algorithm="ES256")
    async with httpx.AsyncClient(verify=ctx) as client:
        r = await client.post(sub["endpoint"], content=b"x", headers={
            "ttl": "60", "content-encoding": "aes128gcm",
            "authorization": f"vapid t={wrong_aud}, k={vapid.public_key_b64(key)}"})
        assert r.status_code == 401
        r = await client.post(sub["endpoint"], content=b"x", headers={"content-encoding": "aes128gcm"})
        assert r.status_code == 400


async def test_vapid_key_never_reaches_the_logs(tmp_path, fake_push, pki):
    with structlog.testing.capture_logs() as logs:
        bridge = await make_bridge(tmp_path, pki)
        await bridge.send(delivery(channel(fake_push.subscribe())))
        await bridge.close()
    text = json.dumps(logs, default=str)
    pem = (tmp_path / "vapid.pem").read_text()
    assert pem.splitlines()[1] not in text
    assert fake_push.vapid_tokens[0] not in text
