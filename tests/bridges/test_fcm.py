"""FCM bridge against the strict fake: OAuth via google-auth, message shape, every errorCode."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import structlog

from bridges import fcm
from bridges.base import OutcomeKind
from tests.bridges.conftest import build_bridge, delivery, write_json
from tests.fakes.common import Injection, Pki
from tests.fakes.fcm import FakeFcm

TOKEN = "fcm-token-" + "a" * 40


async def make_bridge(tmp_path: Path, fake: FakeFcm, pki: Pki, **overrides: object) -> fcm.FcmBridgeImpl:
    sa = write_json(tmp_path / "sa.json", overrides.pop("service_account", fake.service_account()))
    section = {"enabled": True, "service_account_file": str(sa), "endpoint": fake.endpoint,
               "ca_file": str(pki.ca_file), **overrides}
    bridge = build_bridge(fcm, tmp_path, "fcm", section)
    await bridge.start()
    return bridge  # type: ignore[return-value]


async def test_message_carries_notification_data_ids_and_android_fields(tmp_path, fake_fcm, pki):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    d = delivery({"platform": "fcm", "token": TOKEN}, priority="critical", ttl=900, collapse_key="config",
                 options={"android": {"restricted_package_name": "com.example.pos"},
                          "data": {"extra": "1"}})
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome
    [seen] = fake_fcm.accepted
    msg = seen.decoded
    assert seen.request.http_version == "2"
    assert msg["token"] == TOKEN
    assert msg["notification"] == {"title": "Config update", "body": "Version 2.1.0 is ready"}
    assert msg["data"] == {"config_version": "2.1.0", "extra": "1", "message_id": d.message_id, "job_id": "job-1"}
    assert msg["android"]["priority"] == "high" and msg["android"]["collapse_key"] == "config"
    assert msg["android"]["restricted_package_name"] == "com.example.pos"
    assert 895 <= int(msg["android"]["ttl"][:-1]) <= 900 and msg["android"]["ttl"].endswith("s")


async def test_data_only_job_has_no_notification_block(tmp_path, fake_fcm, pki):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}, title=None, body=None, priority="low"))
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED
    msg = fake_fcm.accepted[0].decoded
    assert "notification" not in msg and msg["android"]["priority"] == "normal"


async def test_one_oauth_token_serves_many_concurrent_sends(tmp_path, fake_fcm, pki):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    outcomes = await asyncio.gather(*(bridge.send(delivery({"platform": "fcm", "token": TOKEN})) for _ in range(40)))
    await bridge.close()
    assert all(o.kind is OutcomeKind.ACCEPTED for o in outcomes)
    assert fake_fcm.token_requests == 1 and bridge.refreshes == 1


async def test_refresh_runs_off_the_event_loop(tmp_path, fake_fcm, pki, monkeypatch):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    threads: list[str] = []
    original = bridge._creds.refresh

    def spy(request):
        threads.append(threading.current_thread().name)
        return original(request)

    monkeypatch.setattr(bridge._creds, "refresh", spy)
    assert (await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))).kind is OutcomeKind.ACCEPTED
    await bridge.close()
    assert threads and threads[0] != threading.main_thread().name


async def test_token_is_refreshed_before_it_expires(tmp_path, fake_fcm, pki, monkeypatch):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    assert fake_fcm.token_requests == 1
    monkeypatch.setattr(fcm, "_now", lambda: time.time() + 3599 - 200)  # 200 s before expiry
    assert (await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))).kind is OutcomeKind.ACCEPTED
    await bridge.close()
    assert fake_fcm.token_requests == 2
    assert not any(s.status == 401 for s in fake_fcm.seen)


async def test_401_unauthenticated_refreshes_once_and_resends(tmp_path, fake_fcm, pki):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    fake_fcm.expire_tokens()  # Google revoked the token before its expiry
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    assert outcome.kind is OutcomeKind.ACCEPTED
    assert [s.status for s in fake_fcm.seen] == [200, 401, 200]
    assert fake_fcm.token_requests == 2
    # A 401 that survives the refresh is a configuration problem, not a loop.
    fake_fcm.inject(TOKEN, "UNAUTHENTICATED", count=5)
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY
    assert fake_fcm.token_requests == 3


async def test_a_service_account_google_rejects_makes_the_bridge_unhealthy(tmp_path, fake_fcm, pki):
    other = FakeFcm(pki, key_name="another account")  # another key, same email: the signature does not verify
    sa = fake_fcm.service_account()
    sa["private_key"] = other.service_account()["private_key"]
    bridge = await make_bridge(tmp_path, fake_fcm, pki, service_account=sa)
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY and fake_fcm.accepted == []


async def test_token_endpoint_outage_is_transient(tmp_path, fake_fcm, pki):
    fake_fcm.token_injections.add("*", Injection(503, {"error": "temporarily_unavailable"}, count=10))
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.RETRY


async def test_fake_rejects_non_string_data_like_fcm(tmp_path, fake_fcm, pki):
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}, options={"data": {"n": 5}}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.FAILED and outcome.reason.startswith("INVALID_ARGUMENT")
    assert outcome.status == 400


async def test_fake_checks_the_oauth_assertion(fake_fcm, pki):
    ctx = __import__("ssl").create_default_context(cafile=str(pki.ca_file))
    async with httpx.AsyncClient(verify=ctx) as client:
        r = await client.post(f"{fake_fcm.endpoint}/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "e30.e30.x"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
        r = await client.post(f"{fake_fcm.endpoint}/v1/projects/{fake_fcm.project_id}/messages:send",
                              json={"message": {"token": TOKEN}}, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401


INVALID_TOKEN_DETAILS = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                          "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]}]


@pytest.mark.parametrize("code,kind,retry_after,message,details", [
    ("UNREGISTERED", OutcomeKind.INVALID_ADDRESS, None, "", None),
    ("SENDER_ID_MISMATCH", OutcomeKind.INVALID_ADDRESS, None, "", None),
    ("INVALID_ARGUMENT", OutcomeKind.FAILED, None, "Message is too big", None),
    ("INVALID_ARGUMENT", OutcomeKind.INVALID_ADDRESS, None, "The registration token is not a valid FCM registration token", None),
    ("INVALID_ARGUMENT", OutcomeKind.INVALID_ADDRESS, None, "Request contains an invalid argument.", INVALID_TOKEN_DETAILS),
    ("QUOTA_EXCEEDED", OutcomeKind.RETRY, 60.0, "", None),
    ("UNAVAILABLE", OutcomeKind.RETRY, None, "", None),
    ("INTERNAL", OutcomeKind.RETRY, None, "", None),
    ("THIRD_PARTY_AUTH_ERROR", OutcomeKind.UNHEALTHY, 60.0, "", None),
    ("PERMISSION_DENIED", OutcomeKind.UNHEALTHY, 60.0, "", None),
])
async def test_every_error_code_is_classified(tmp_path, fake_fcm, pki, code, kind, retry_after, message, details):
    fake_fcm.inject(TOKEN, code, message=message, details=details)
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is kind, outcome
    assert outcome.retry_after == retry_after


async def test_retry_after_is_honoured(tmp_path, fake_fcm, pki):
    fake_fcm.inject(TOKEN, "QUOTA_EXCEEDED", retry_after=12)
    fake_fcm.inject(TOKEN, "UNAVAILABLE", retry_after=3)
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    first = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    second = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    third = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    await bridge.close()
    assert (first.kind, first.retry_after, first.status) == (OutcomeKind.RETRY, 12.0, 429)
    assert (second.kind, second.retry_after, second.status) == (OutcomeKind.RETRY, 3.0, 503)
    assert third.kind is OutcomeKind.ACCEPTED


async def test_unregistered_token_and_options_cannot_retarget(tmp_path, fake_fcm, pki):
    fake_fcm.unregistered.add(TOKEN)
    bridge = await make_bridge(tmp_path, fake_fcm, pki)
    gone = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    retarget = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}, options={"topic": "all"}))
    await bridge.close()
    assert gone.kind is OutcomeKind.INVALID_ADDRESS and gone.status == 404
    assert retarget.kind is OutcomeKind.FAILED


async def test_wrong_project_is_unhealthy(tmp_path, fake_fcm, pki):
    bridge = await make_bridge(tmp_path, fake_fcm, pki, project_id="someone-else")
    outcome = await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
    await bridge.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY


async def test_no_secret_reaches_the_logs(tmp_path, fake_fcm, pki):
    with structlog.testing.capture_logs() as logs:
        bridge = await make_bridge(tmp_path, fake_fcm, pki)
        await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
        fake_fcm.expire_tokens()
        await bridge.send(delivery({"platform": "fcm", "token": TOKEN}))
        await bridge.close()
    text = json.dumps(logs, default=str)
    assert "fcm access token refreshed" in text
    for token in [s.request.headers["authorization"].split()[1] for s in fake_fcm.seen]:
        assert token not in text
    key_line = fake_fcm.service_account()["private_key"].splitlines()[1]
    assert key_line not in text and "PRIVATE KEY" not in text
