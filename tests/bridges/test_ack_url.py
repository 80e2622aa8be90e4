"""Every platform's payload carries the signed ack URL where the device can read it (contract §8).

Checked on what the strict fakes received (decrypted for Web Push, parsed XML for WNS), with
job data and options that try to overwrite it: the gateway's ack_url always wins.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from bridges import apns, fcm, webpush, wns
from bridges.base import OutcomeKind
from tests.bridges.conftest import delivery
from tests.bridges.test_apns import TOKEN as APNS_TOKEN
from tests.bridges.test_apns import make_bridge as make_apns
from tests.bridges.test_fcm import TOKEN as FCM_TOKEN
from tests.bridges.test_fcm import make_bridge as make_fcm
from tests.bridges.test_webpush import make_bridge as make_webpush
from tests.bridges.test_wns import make_bridge as make_wns

ACK_URL = "https://gw.example:8443/v1/acks/{mid}?sig=" + "ab" * 32
SPOOF = {"ack_url": "https://attacker.example/x", "message_id": "not-it"}


async def test_fcm_data_carries_ack_url(tmp_path, fake_fcm, pki):
    bridge = await make_fcm(tmp_path, fake_fcm, pki)
    d = delivery({"platform": "fcm", "token": FCM_TOKEN}, data=dict(SPOOF), ack_url=ACK_URL,
                 options={"data": dict(SPOOF)})
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome
    data = fake_fcm.accepted[0].decoded["data"]
    assert data["ack_url"] == ACK_URL and data["message_id"] == d.message_id
    assert isinstance(bridge, fcm.FcmBridgeImpl)


async def test_apns_custom_key_carries_ack_url(tmp_path, fake_apns, pki):
    bridge = await make_apns(tmp_path, fake_apns, pki)
    d = delivery({"platform": "apns", "token": APNS_TOKEN}, data={"config_version": "2"}, ack_url=ACK_URL,
                 options=dict(SPOOF))
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome
    body = fake_apns.accepted[0].decoded
    assert body["ack_url"] == ACK_URL and body["message_id"] == d.message_id
    assert isinstance(bridge, apns.ApnsBridgeImpl)


async def test_webpush_envelope_carries_ack_url(tmp_path, fake_push, pki):
    bridge = await make_webpush(tmp_path, pki)
    d = delivery({"platform": "webpush", "subscription": fake_push.subscribe()}, ack_url=ACK_URL)
    outcome = await bridge.send(d)
    await bridge.close()
    assert outcome.kind is OutcomeKind.ACCEPTED, outcome
    envelope = fake_push.accepted[0].decoded
    assert envelope["ack_url"] == ACK_URL and envelope["message_id"] == d.message_id
    assert isinstance(bridge, webpush.WebPushBridgeImpl)


async def test_wns_toast_launch_args_and_raw_body_carry_ack_url(tmp_path, fake_wns, pki):
    bridge = await make_wns(tmp_path, fake_wns, pki)
    uri = fake_wns.new_channel()
    toast = delivery({"platform": "wns", "channel_uri": uri}, ack_url=ACK_URL, options={"launch": dict(SPOOF)})
    raw = delivery({"platform": "wns", "channel_uri": uri}, title=None, body=None, ack_url=ACK_URL)
    assert (await bridge.send(toast)).kind is OutcomeKind.ACCEPTED
    assert (await bridge.send(raw)).kind is OutcomeKind.ACCEPTED
    await bridge.close()
    launch = parse_qs(fake_wns.accepted[0].decoded.get("launch"))
    assert launch["ack_url"] == [ACK_URL] and launch["message_id"] == [toast.message_id]
    envelope = json.loads(fake_wns.accepted[1].decoded)
    assert envelope["ack_url"] == ACK_URL and envelope["message_id"] == raw.message_id
    assert isinstance(bridge, wns.WnsBridgeImpl)


def test_without_http_the_envelope_has_no_ack_url():
    d = delivery({"platform": "mqtt"})
    assert "ack_url" not in d.envelope() and set(d.ids()) == {"message_id", "job_id"}
