"""APNs bridge against the strict HTTP/2 fake: requests, JWT reuse, every answer classified."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import structlog

from bridges import apns
from bridges.base import OutcomeKind
from tests.bridges.conftest import build_bridge, delivery
from tests.fakes.apns import FakeApns
from tests.fakes.common import Pki

TOKEN = "ab" * 32


async def make_bridge(tmp_path: Path, fake: FakeApns, pki: Pki, **overrides: object) -> apns.ApnsBridgeImpl:
    key_file = tmp_path / "AuthKey.p8"
    key_file.write_text(overrides.pop("key_pem", fake.key_pem))  # type: ignore[arg-type]
    section = {"enabled": True, "team_id": fake.team_id, "key_id": fake.key_id, "key_file": str(key_file),
               "topic": fake.topic, "endpoint": fake.endpoint, "ca_file": str(pki.ca_file), **overrides}
    bridge = build_bridge(apns, tmp_path, "apns", section)
    await bridge.start()
    return bridge  # type: ignore[return-value]


async def test_alert_is_accepted_with_every_header_apple_requires(tmp_path, fake_apns, pki):
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    d = delivery({"platform": "apns", "token": TOKEN}, priority="high", collapse_key="config",
                 data={"config_url": "https://x/y", "config_version": "2.1.0"}, ttl=600)
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED
    [seen] = fake_apns.accepted
    h = seen.request.headers
    assert seen.request.http_version == "2"
    assert h["apns-id"] == d.message_id
    assert h["apns-topic"] == "com.example.app"
    assert h["apns-push-type"] == "alert" and h["apns-priority"] == "10"
    assert h["apns-collapse-id"] == "config"
    assert abs(int(h["apns-expiration"]) - (time.time() + 600)) < 5
    body = seen.decoded
    assert body["aps"]["alert"] == {"title": "Config update", "body": "Version 2.1.0 is ready"}
    assert body["message_id"] == d.message_id and body["job_id"] == "job-1"
    assert body["config_url"] == "https://x/y"


async def test_data_only_job_is_a_background_push_with_priority_5(tmp_path, fake_apns, pki):
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}, title=None, body=None,
                                         priority="critical", ttl=0))
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED
    [seen] = fake_apns.accepted
    assert seen.request.headers["apns-push-type"] == "background"
    assert seen.request.headers["apns-priority"] == "5"
    assert seen.request.headers["apns-expiration"] == "0"
    assert seen.decoded["aps"] == {"content-available": 1}


async def test_fake_refuses_http1_like_apple(fake_apns, pki):
    ctx = __import__("ssl").create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(verify=ctx, http1=True, http2=False) as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(f"{fake_apns.endpoint}/3/device/{TOKEN}", content=b"{}")
    assert fake_apns.server.rejected_protocol == 1 and fake_apns.seen == []


async def test_one_jwt_is_reused_across_many_requests_and_renewed_after_50_minutes(tmp_path, fake_apns, pki, monkeypatch):
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    outcomes = await asyncio.gather(*(bridge.send(delivery({"platform": "apns", "token": TOKEN}))
                                      for _ in range(50)))
    assert all(o.kind is OutcomeKind.ACCEPTED for o in outcomes)
    assert apns.JWTS.minted == 1 and len(fake_apns.jwts_seen) == 1
    assert fake_apns.server.connections == 1  # one HTTP/2 connection carried all 50

    # 25 minutes later: still the same token (Apple punishes renewing more often than 20 min).
    monkeypatch.setattr(apns, "_now", lambda: time.time() + 25 * 60)
    fake_apns.clock.offset = 25 * 60
    assert (await bridge.send(delivery({"platform": "apns", "token": TOKEN}))).kind is OutcomeKind.ACCEPTED
    assert apns.JWTS.minted == 1
    # 51 minutes after signing: renewed before Apple's 60-minute limit.
    monkeypatch.setattr(apns, "_now", lambda: time.time() + 51 * 60)
    fake_apns.clock.offset = 51 * 60
    assert (await bridge.send(delivery({"platform": "apns", "token": TOKEN}))).kind is OutcomeKind.ACCEPTED
    assert apns.JWTS.minted == 2 and len(fake_apns.jwts_seen) == 2
    await bridge.close()


async def test_jwt_is_shared_by_two_bridges_with_the_same_key(tmp_path, fake_apns, pki):
    a = await make_bridge(tmp_path, fake_apns, pki)
    b = await make_bridge(tmp_path, fake_apns, pki)
    for bridge in (a, b):
        assert (await bridge.send(delivery({"platform": "apns", "token": TOKEN}))).kind is OutcomeKind.ACCEPTED
        await bridge.close()
    assert apns.JWTS.minted == 1


async def test_expired_provider_token_is_renewed_once_and_resent(tmp_path, fake_apns, pki, monkeypatch):
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    clock = iter([time.time() - 3700])  # the first token is signed 61+ minutes "ago"
    monkeypatch.setattr(apns, "_now", lambda: next(clock, time.time()))
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED
    assert [s.reason for s in fake_apns.seen] == ["ExpiredProviderToken", ""]
    assert apns.JWTS.minted == 2


async def test_a_key_apple_does_not_know_makes_the_bridge_unhealthy(tmp_path, fake_apns, pki):
    other = FakeApns(pki)  # another key with the same ids
    bridge = await make_bridge(tmp_path, fake_apns, pki, key_pem=other.key_pem)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY and outcome.reason == "InvalidProviderToken"
    assert outcome.retry_after and outcome.retry_after > 0


async def test_wrong_topic_makes_the_bridge_unhealthy(tmp_path, fake_apns, pki):
    bridge = await make_bridge(tmp_path, fake_apns, pki, topic="com.example.other")
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY and outcome.reason == "TopicDisallowed"


async def test_unregistered_410_is_an_invalid_address_with_its_timestamp(tmp_path, fake_apns, pki):
    fake_apns.unregistered[TOKEN] = 1_700_000_000_000
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.INVALID_ADDRESS and outcome.status == 410
    assert outcome.reason == "Unregistered since 2023-11-14T22:13:20.000Z"


@pytest.mark.parametrize("status,reason,kind", [
    (400, "BadDeviceToken", OutcomeKind.INVALID_ADDRESS),
    (400, "DeviceTokenNotForTopic", OutcomeKind.INVALID_ADDRESS),
    (410, "ExpiredToken", OutcomeKind.INVALID_ADDRESS),
    (429, "TooManyRequests", OutcomeKind.RETRY),
    (500, "InternalServerError", OutcomeKind.RETRY),
    (503, "ServiceUnavailable", OutcomeKind.RETRY),
    (503, "Shutdown", OutcomeKind.RETRY),
    (429, "TooManyProviderTokenUpdates", OutcomeKind.RETRY),
    (403, "InvalidProviderToken", OutcomeKind.UNHEALTHY),
    (403, "MissingProviderToken", OutcomeKind.UNHEALTHY),
    (403, "BadCertificate", OutcomeKind.UNHEALTHY),
    (403, "BadCertificateEnvironment", OutcomeKind.UNHEALTHY),
    (400, "TopicDisallowed", OutcomeKind.UNHEALTHY),
    (400, "BadTopic", OutcomeKind.UNHEALTHY),
    (400, "MissingTopic", OutcomeKind.UNHEALTHY),
    (400, "BadCollapseId", OutcomeKind.FAILED),
    (400, "BadExpirationDate", OutcomeKind.FAILED),
    (400, "PayloadEmpty", OutcomeKind.FAILED),
    (413, "PayloadTooLarge", OutcomeKind.FAILED),
    (405, "MethodNotAllowed", OutcomeKind.FAILED),
])
async def test_every_documented_reason_is_classified(tmp_path, fake_apns, pki, status, reason, kind):
    fake_apns.inject(TOKEN, status, reason, retry_after=7 if status in (429, 503) else None, count=2)
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is kind, outcome
    assert outcome.reason.startswith(reason) and outcome.status == status
    if status in (429, 503):
        assert outcome.retry_after == 7.0


async def test_payload_over_4kb_is_failed_before_sending(tmp_path, fake_apns, pki):
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}, data={"blob": "x" * 4100}))
    long_collapse = await bridge.send(delivery({"platform": "apns", "token": TOKEN}, collapse_key="c" * 65))
    await bridge.close()
    assert outcome.kind is OutcomeKind.FAILED and "PayloadTooLarge" in outcome.reason
    assert long_collapse.kind is OutcomeKind.FAILED and "64" in long_collapse.reason
    assert fake_apns.seen == []


async def test_options_add_aps_fields_and_headers_but_not_apns_id(tmp_path, fake_apns, pki):
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    ok = await bridge.send(delivery({"platform": "apns", "token": TOKEN},
                                    options={"aps": {"sound": "default", "badge": 3},
                                             "headers": {"apns-priority": "5"}}))
    bad = await bridge.send(delivery({"platform": "apns", "token": TOKEN}, options={"headers": {"apns-id": "x"}}))
    await bridge.close()
    assert ok.kind is OutcomeKind.ACCEPTED and bad.kind is OutcomeKind.FAILED
    [seen] = fake_apns.accepted
    assert seen.decoded["aps"]["sound"] == "default" and seen.decoded["aps"]["badge"] == 3
    assert seen.request.headers["apns-priority"] == "5"


async def test_certificate_auth_sends_no_jwt(tmp_path, pki):
    fake = await FakeApns(pki, cert_auth=True).start()
    try:
        section = {"enabled": True, "cert_file": str(pki.client_cert_file), "cert_key_file": str(pki.client_key_file),
                   "topic": fake.topic, "endpoint": fake.endpoint, "ca_file": str(pki.ca_file)}
        bridge = build_bridge(apns, tmp_path, "apns", section)
        await bridge.start()
        outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
        await bridge.close()
        assert outcome.kind is OutcomeKind.ACCEPTED
        assert "authorization" not in fake.accepted[0].request.headers
        assert apns.JWTS.minted == 0

        # Without the client certificate the TLS handshake fails: no answer, a transient outcome.
        section.pop("cert_key_file")
        section["cert_file"] = ""
        key_file = tmp_path / "k.p8"
        key_file.write_text(fake.key_pem)
        section.update(team_id=fake.team_id, key_id=fake.key_id, key_file=str(key_file))
        bridge = build_bridge(apns, tmp_path, "apns", section)
        await bridge.start()
        outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
        await bridge.close()
        assert outcome.kind is OutcomeKind.RETRY and outcome.reason.startswith("transport")
    finally:
        await fake.stop()


async def test_unreachable_endpoint_is_transient(tmp_path, fake_apns, pki):
    port = fake_apns.server.port
    await fake_apns.stop()
    bridge = await make_bridge(tmp_path, fake_apns, pki, endpoint=f"https://127.0.0.1:{port}")
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.RETRY


async def test_neither_key_nor_jwt_reaches_the_logs(tmp_path, fake_apns, pki):
    with structlog.testing.capture_logs() as logs:
        bridge = await make_bridge(tmp_path, fake_apns, pki)
        await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
        await bridge.close()
    text = json.dumps(logs, default=str)
    jwt_seen = fake_apns.jwts_seen[0]
    assert "apns provider token signed" in text
    assert jwt_seen not in text and jwt_seen.split(".")[2] not in text
    assert "PRIVATE KEY" not in text and fake_apns.key_pem.splitlines()[1] not in text


async def test_apns_never_falls_back_to_http1(tmp_path, fake_apns, fake_wns, pki):
    """An endpoint that speaks only HTTP/1.1 (the WNS fake) gets no push: APNs is HTTP/2 only."""
    bridge = await make_bridge(tmp_path, fake_apns, pki, endpoint=fake_wns.origin)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.RETRY and outcome.reason.startswith("transport"), outcome
    assert not [s for s in fake_wns.seen if s.request.path.startswith("/3/device/")]


async def test_an_endpoint_signed_by_another_ca_gets_no_push(tmp_path, fake_apns, pki):
    other = Pki(tmp_path / "other-ca")
    bridge = await make_bridge(tmp_path, fake_apns, pki, ca_file=str(other.ca_file))
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.RETRY and outcome.reason.startswith("transport"), outcome
    assert fake_apns.seen == []


async def test_the_system_trust_store_is_trusted_next_to_ca_file(tmp_path, fake_apns, pki, monkeypatch):
    """``ca_file`` adds a CA; it does not replace the system's (here: SSL_CERT_DIR holds the fake's CA)."""
    import subprocess

    system = tmp_path / "system-certs"
    system.mkdir()
    (system / "fake-ca.pem").write_bytes(pki.ca_file.read_bytes())
    subprocess.run(["openssl", "rehash", str(system)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_DIR", str(system))
    other = Pki(tmp_path / "other-ca")
    bridge = await make_bridge(tmp_path, fake_apns, pki, ca_file=str(other.ca_file))
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome


async def test_a_send_cancelled_mid_flight_leaves_the_bridge_usable(tmp_path, fake_apns, pki):
    """The pipeline cancels sends at shutdown: the request's handle is dropped, the next send works."""
    arrived, gate = asyncio.Event(), asyncio.Event()
    answer = fake_apns.server.handler

    async def held(req):  # the first request waits until the test lets it go
        arrived.set()
        await gate.wait()
        return await answer(req)

    fake_apns.server.handler = held
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    task = asyncio.create_task(bridge.send(delivery({"platform": "apns", "token": TOKEN})))
    await arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fake_apns.server.handler = answer
    gate.set()
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome


@pytest.mark.parametrize("options,collapse_key", [
    ({"headers": {"apns-foo": "a\r\nx-evil: b"}}, None),
    ({"headers": {"apns-foo": "a\nx-evil: b"}}, None),
    ({"headers": {"apns-foo": "a\x00b"}}, None),
    ({"headers": {"apns-a:b": "c"}}, None),
    ({}, "ab\r\nx-evil: 1"),
])
async def test_a_header_that_would_split_or_truncate_is_failed_and_not_sent(tmp_path, fake_apns, pki, options,
                                                                           collapse_key):
    """Job options reach the request's headers: CR/LF/NUL would inject or cut a header."""
    bridge = await make_bridge(tmp_path, fake_apns, pki)
    outcome = await bridge.send(delivery({"platform": "apns", "token": TOKEN}, options=options,
                                         collapse_key=collapse_key))
    await bridge.close()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert fake_apns.seen == []


async def test_the_push_client_itself_refuses_a_header_line_that_is_not_one_field(fake_apns, pki):
    from bridges import _http

    client = _http.PushClient(pki.ca_file, http2_only=True)
    try:
        with pytest.raises(_http.UnsafeHeader):
            await client.post(f"{fake_apns.endpoint}/3/device/{TOKEN}", {"apns-topic": "x\r\ny: z"}, b"{}")
    finally:
        await client.aclose()
    assert fake_apns.seen == [] and fake_apns.server.connections == 0
