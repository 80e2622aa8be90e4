"""WNS bridge against the strict fake: both token flows, toast/tile/badge/raw, answers, host rules."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import structlog

from bridges import wns
from bridges.base import OutcomeKind
from tests.bridges.conftest import bridge_config, build_bridge, context, delivery
from tests.fakes.common import Pki
from tests.fakes.wns import FakeWns


async def make_bridge(tmp_path: Path, fake: FakeWns, pki: Pki, **overrides: object) -> wns.WnsBridgeImpl:
    secret = tmp_path / "wns-secret"
    secret.write_text(str(overrides.pop("secret", fake.client_secret)))
    auth = str(overrides.get("auth", "live"))
    section = {"enabled": True, "client_id": fake.client_id, "client_secret_file": str(secret),
               "token_url": fake.token_url(auth), "allowed_hosts": ["localhost"], "ca_file": str(pki.ca_file),
               **overrides}
    if auth == "entra":
        section.setdefault("tenant_id", fake.tenant)
    bridge = build_bridge(wns, tmp_path, "wns", section)
    await bridge.start()
    return bridge  # type: ignore[return-value]


def channel(uri: str) -> dict[str, str]:
    return {"platform": "wns", "channel_uri": uri}


async def test_toast_is_escaped_xml_with_launch_args_and_headers(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    uri = fake_wns.new_channel()
    d = delivery(channel(uri), title='Update <b>&"now"', body="A & B </text><script/>", priority="high",
                 ttl=120, collapse_key="a-very-long-collapse-key")
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome
    [seen] = fake_wns.accepted
    h = seen.request.headers
    assert seen.request.http_version == "1.1" and h["content-length"] == str(len(seen.request.body))
    assert h["x-wns-type"] == "wns/toast" and h["content-type"] == "text/xml"
    assert h["x-wns-ttl"] in ("119", "120") and h["x-wns-priority"] == "1"
    assert h["x-wns-requestforstatus"] == "true" and len(h["x-wns-tag"]) == 16
    toast = seen.decoded
    texts = [t.text for t in toast.iter("text")]
    assert texts == ['Update <b>&"now"', "A & B </text><script/>"]  # survived as text, not markup
    launch = parse_qs(toast.get("launch"))
    assert launch["message_id"] == [d.message_id] and launch["job_id"] == ["job-1"]


async def test_data_only_job_is_a_raw_notification_carrying_the_envelope(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    d = delivery(channel(fake_wns.new_channel()), title=None, body=None, ttl=0)
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED
    [seen] = fake_wns.accepted
    assert seen.request.headers["x-wns-type"] == "wns/raw"
    assert seen.request.headers["content-type"] == "application/octet-stream"
    assert seen.request.headers["x-wns-cache-policy"] == "no-cache" and "x-wns-ttl" not in seen.request.headers
    envelope = json.loads(seen.decoded)
    assert envelope["message_id"] == d.message_id and envelope["job_id"] == "job-1"


async def test_tile_and_badge_via_options(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    uri = fake_wns.new_channel()
    tile = '<tile><visual><binding template="TileMedium"><text>Hi</text></binding></visual></tile>'
    r1 = await bridge.send(delivery(channel(uri), options={"type": "tile", "xml": tile}))
    r2 = await bridge.send(delivery(channel(uri), options={"type": "badge", "badge": 7}))
    r3 = await bridge.send(delivery(channel(uri), options={"type": "tile", "xml": "<toast/>"}))
    r4 = await bridge.send(delivery(channel(uri), options={"tpye": "tile"}))
    await bridge.close()
    assert (r1.kind, r2.kind) == (OutcomeKind.ACCEPTED, OutcomeKind.ACCEPTED)
    assert r3.kind is OutcomeKind.FAILED and r4.kind is OutcomeKind.FAILED and "tpye" in r4.reason
    assert [s.request.headers["x-wns-type"] for s in fake_wns.accepted] == ["wns/tile", "wns/badge"]
    assert fake_wns.accepted[1].decoded.get("value") == "7"


async def test_token_is_cached_and_401_fetches_a_new_one_once(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    uri = fake_wns.new_channel()
    for _ in range(3):
        assert (await bridge.send(delivery(channel(uri)))).kind is OutcomeKind.ACCEPTED
    assert fake_wns.token_requests == 1
    fake_wns.revoke_tokens()
    assert (await bridge.send(delivery(channel(uri)))).kind is OutcomeKind.ACCEPTED
    assert fake_wns.token_requests == 2
    fake_wns.inject(uri, 401, count=3)
    outcome = await bridge.send(delivery(channel(uri)))
    await bridge.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY and fake_wns.token_requests == 3


async def test_entra_flow_and_flows_are_not_interchangeable(tmp_path, pki):
    fake = await FakeWns(pki, flow="entra").start()
    try:
        good = await make_bridge(tmp_path, fake, pki, auth="entra")
        assert (await good.send(delivery(channel(fake.new_channel())))).kind is OutcomeKind.ACCEPTED
        await good.close()
        assert fake.token_forms[0]["scope"] == "https://wns.windows.com/.default"
        live = await make_bridge(tmp_path, fake, pki, auth="live")
        outcome = await live.send(delivery(channel(fake.new_channel())))
        await live.close()
        assert outcome.kind is OutcomeKind.UNHEALTHY  # a live token at an Entra app: 401 twice
    finally:
        await fake.stop()


async def test_wrong_client_secret_is_unhealthy_and_never_logged(tmp_path, fake_wns, pki):
    with structlog.testing.capture_logs() as logs:
        bridge = await make_bridge(tmp_path, fake_wns, pki, secret="not-the-secret-xyz")
        outcome = await bridge.send(delivery(channel(fake_wns.new_channel())))
        await bridge.close()
        good = await make_bridge(tmp_path, fake_wns, pki)
        await good.send(delivery(channel(fake_wns.new_channel())))
        await good.close()
    assert outcome.kind is OutcomeKind.UNHEALTHY and "invalid_client" in outcome.reason
    text = json.dumps(logs, default=str)
    assert "wns access token obtained" in text
    assert "not-the-secret-xyz" not in text and fake_wns.client_secret not in text
    for token in fake_wns.tokens:
        assert token not in text


@pytest.mark.parametrize("status,headers,kind,retry_after", [
    (404, {}, OutcomeKind.INVALID_ADDRESS, None),
    (410, {}, OutcomeKind.INVALID_ADDRESS, None),
    (406, {"retry-after": "30"}, OutcomeKind.RETRY, 30.0),
    (406, {}, OutcomeKind.RETRY, 60.0),
    (400, {}, OutcomeKind.FAILED, None),
    (413, {}, OutcomeKind.FAILED, None),
    # A 403 before WNS ever accepted a token of ours: this channel or our credentials?
    # Not known yet, so this one delivery backs off (README "WNS 403"; more in test_wns_403).
    (403, {}, OutcomeKind.RETRY, None),
    (500, {}, OutcomeKind.RETRY, None),
    (503, {"retry-after": "5"}, OutcomeKind.RETRY, 5.0),
    (200, {"x-wns-status": "channelthrottled"}, OutcomeKind.RETRY, 60.0),
    (200, {"x-wns-status": "dropped"}, OutcomeKind.FAILED, None),
])
async def test_every_answer_is_classified(tmp_path, fake_wns, pki, status, headers, kind, retry_after):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    uri = fake_wns.new_channel()
    fake_wns.inject(uri, status, headers)
    outcome = await bridge.send(delivery(channel(uri)))
    await bridge.close()
    assert outcome.kind is kind and outcome.retry_after == retry_after


async def test_expired_and_unknown_channels_are_invalid(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    uri = fake_wns.new_channel()
    fake_wns.expired_channels.add(uri.rsplit("=", 1)[1])
    gone = await bridge.send(delivery(channel(uri)))
    unknown = await bridge.send(delivery(channel(uri.rsplit("=", 1)[0] + "=nope")))
    await bridge.close()
    assert (gone.kind, gone.status) == (OutcomeKind.INVALID_ADDRESS, 410)
    assert (unknown.kind, unknown.status) == (OutcomeKind.INVALID_ADDRESS, 404)


async def test_channel_uri_host_must_be_allowed(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki, allowed_hosts=["notify.windows.com"])
    port = fake_wns.server.port
    outcomes = [await bridge.send(delivery(channel(uri))) for uri in (
        fake_wns.new_channel("localhost"),
        f"https://notify.windows.com.attacker.example:{port}/w/?token=x",
        f"https://evilnotify.windows.com:{port}/w/?token=x",
    )]
    await bridge.close()
    assert all(o.kind is OutcomeKind.INVALID_ADDRESS for o in outcomes)
    assert all("not under an allowed host" in o.reason for o in outcomes)
    assert fake_wns.seen == [] and fake_wns.token_requests == 0


async def test_allowed_name_resolving_to_loopback_is_refused_at_connect(tmp_path, fake_wns, pki):
    async def rebinding_resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # db5.notify.windows.com "resolves" to loopback

    secret = tmp_path / "s"
    secret.write_text(fake_wns.client_secret)
    cfg, secrets = bridge_config(tmp_path, {"wns": {"enabled": True, "client_id": fake_wns.client_id,
                                           "client_secret_file": str(secret), "token_url": fake_wns.token_url(),
                                           "ca_file": str(pki.ca_file)}})
    bridge = wns.WnsBridgeImpl(cfg.bridges.wns, context(tmp_path), secrets.bridge("wns"),
                               resolver=rebinding_resolver)
    await bridge.start()
    outcome = await bridge.send(delivery(channel(f"https://db5.notify.windows.com:{fake_wns.server.port}/w/?token=x")))
    await bridge.close()
    assert outcome.kind is OutcomeKind.INVALID_ADDRESS and "non-public" in outcome.reason
    assert fake_wns.seen == []


async def test_oversize_body_is_failed_before_sending(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    outcome = await bridge.send(delivery(channel(fake_wns.new_channel()), body="x" * 5100))
    await bridge.close()
    assert outcome.kind is OutcomeKind.FAILED and fake_wns.seen == []


# ---------------------------------------------------------------- 403 (README "WNS 403")
FOREIGN = {"x-wns-error-description": "The channel belongs to another application"}


async def test_403_for_one_foreign_channel_marks_only_that_channel(tmp_path, fake_wns, pki):
    """Once WNS accepted our token for some channel, a 403 is the channel's fault: it is an
    invalid address (the device falls over), and the bridge keeps sending to the others."""
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    good, foreign = fake_wns.new_channel(), fake_wns.new_channel()
    fake_wns.inject(foreign, 403, FOREIGN, count=5)
    assert (await bridge.send(delivery(channel(good)))).kind is OutcomeKind.ACCEPTED
    outcome = await bridge.send(delivery(channel(foreign)))
    after = await bridge.send(delivery(channel(good)))
    await bridge.close()
    assert outcome.kind is OutcomeKind.INVALID_ADDRESS and outcome.status == 403
    assert "another app" in outcome.reason and "belongs to another application" in outcome.reason
    assert after.kind is OutcomeKind.ACCEPTED
    foreign_id = foreign.rsplit("=", 1)[1]
    assert len([s for s in fake_wns.seen if s.request.path.endswith(foreign_id)]) == 1  # no resend
    assert fake_wns.token_requests == 1


async def test_403_before_any_success_backs_off_that_delivery_then_marks_the_channel(tmp_path, fake_wns, pki):
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    good, foreign = fake_wns.new_channel(), fake_wns.new_channel()
    fake_wns.inject(foreign, 403, FOREIGN, count=5)
    first = await bridge.send(delivery(channel(foreign)))  # a fresh token refused: which side is wrong?
    assert first.kind is OutcomeKind.RETRY and first.retry_after is None  # the pipeline's backoff
    assert (await bridge.send(delivery(channel(good)))).kind is OutcomeKind.ACCEPTED  # our credentials work
    second = await bridge.send(delivery(channel(foreign)))
    await bridge.close()
    assert second.kind is OutcomeKind.INVALID_ADDRESS


async def test_403_from_every_channel_is_a_configuration_error(tmp_path, fake_wns, pki):
    """Wrong package credentials: every channel refuses. A cached token is replaced once
    first; a second channel refusing a fresh token pauses the bridge (work kept)."""
    bridge = await make_bridge(tmp_path, fake_wns, pki)
    a, b = fake_wns.new_channel(), fake_wns.new_channel()
    fake_wns.inject(a, 403, count=5)
    fake_wns.inject(b, 403, count=5)
    first = await bridge.send(delivery(channel(a)))
    second = await bridge.send(delivery(channel(b)))  # cached token → one new token, resend
    await bridge.close()
    assert first.kind is OutcomeKind.RETRY
    assert second.kind is OutcomeKind.UNHEALTHY and second.retry_after == 60.0
    assert "client_id" in second.reason
    assert fake_wns.token_requests == 2
    b_id = b.rsplit("=", 1)[1]
    assert len([s for s in fake_wns.seen if s.request.path.endswith(b_id)]) == 2
