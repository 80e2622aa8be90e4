"""Several apps per push platform, in process: the config of ``[bridges.<platform>.apps]``,
one bridge per app built from it, and the strict fakes refusing one app's push sent with
another app's credentials (the daemon-level proof is tests/bridges/test_apps_daemon.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridges import keys, registry
from bridges.base import OutcomeKind
from gateway import vapid
from gateway.config import ConfigError
from gateway.pipeline.models import InputError, parse_device
from gateway.pipeline.routing import channel_for, choose_channel, route_of
from tests.bridges.conftest import bridge_config, context, delivery, write_json

FCM_TOKEN = "fcm-token-" + "a" * 40
APNS_TOKEN = "ab" * 32


def fcm_sections(tmp_path: Path, fake: Any, pki: Any, shop_account: dict[str, Any]) -> dict[str, Any]:
    return {"fcm": {"enabled": True, "service_account_file": str(write_json(tmp_path / "sa.json", fake.service_account())),
                    "endpoint": fake.endpoint, "ca_file": str(pki.ca_file),
                    "apps": {"shop": {"service_account_file": str(write_json(tmp_path / "shop.json", shop_account))}}}}


async def started(tmp_path: Path, sections: dict[str, Any]) -> dict[str, Any]:
    cfg, secrets = bridge_config(tmp_path, {"simulation": {"enabled": False}, "mqtt": {"enabled": False}, **sections})
    assert dict(secrets.bridge_faults) == {}
    bridges = registry.build_bridges(cfg, secrets, context(tmp_path))
    for b in bridges.values():
        await b.start()
    return bridges


async def close(bridges: dict[str, Any]) -> None:
    for b in bridges.values():
        await b.close()


def test_app_sections_are_validated_and_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        bridge_config(tmp_path, {"fcm": {"apps": {"bad name": {"service_account_file": "x"}}}})
    assert err.value.lines() == ["bridges.fcm.apps: app name 'bad name' must match [A-Za-z0-9_-]{1,64}"]
    with pytest.raises(ConfigError) as err:
        bridge_config(tmp_path, {"apns": {"apps": {"shop": {"key_id": "K"}}},
                                 "wns": {"apps": {"shop": {"client_id": "x", "secret": "y"}}}})
    assert sorted(err.value.lines()) == ["bridges.apns.apps.shop.topic: Field required",
                                         "bridges.wns.apps.shop.client_secret_file: Field required",
                                         "bridges.wns.apps.shop.secret: unknown key"]


def test_an_app_inherits_the_sections_keys_it_does_not_set(tmp_path):
    (tmp_path / "k.p8").write_text("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
    cfg, _ = bridge_config(tmp_path, {"apns": {"enabled": True, "team_id": "TEAM", "key_id": "K1",
                                               "key_file": str(tmp_path / "k.p8"), "topic": "com.a",
                                               "environment": "sandbox", "apps": {"b": {"topic": "com.b"}}}})
    sections = {b.name: b for b in registry.bridge_sections(cfg)}
    assert list(sections) == [name for name in sections if name in ("simulation", "mqtt", "apns", "apns:b")]
    app = sections["apns:b"]
    assert app.key == "bridges.apns.apps.b" and app.platform == "apns"
    assert (app.section.topic, app.section.team_id, app.section.key_id, app.section.environment) == ("com.b", "TEAM", "K1", "sandbox")
    assert app.section.apps == {} and sections["apns"].section.topic == "com.a"
    assert registry.app_names(cfg)["apns"] == frozenset({"b"}) and registry.app_names(cfg)["fcm"] == frozenset()


def test_a_broken_key_of_an_app_is_that_apps_fault_named_by_its_key(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps({"client_email": "a@p", "private_key": "x", "token_uri": "https://t",
                                                    "project_id": "p"}))
    cfg, secrets = bridge_config(tmp_path, {"fcm": {"enabled": True, "service_account_file": str(tmp_path / "good.json"),
                                                    "apps": {"shop": {"service_account_file": str(tmp_path / "no.json")}}},
                                            "webpush": {"enabled": True, "vapid_private_key_file": str(tmp_path / "v.pem"),
                                                        "apps": {"shop": {"vapid_private_key_file": str(tmp_path / "bad.pem")}}}})
    (tmp_path / "bad.pem").write_text("not a key")
    assert dict(secrets.bridge_faults) == {
        "fcm:shop": f"bridges.fcm.apps.shop.service_account_file: file not found: {tmp_path / 'no.json'}"}
    found = keys.problems(cfg, secrets)
    assert ("bridges.webpush.apps.shop.vapid_private_key_file", "unusable key (ValueError)") in found
    assert registry.bridge_of_key("bridges.fcm.apps.shop.service_account_file") == "fcm:shop"
    assert registry.bridge_of_key("bridges.fcm.service_account_file") == "fcm"


def test_a_channel_names_its_app_and_routes_to_that_apps_bridge():
    apps = {"fcm": frozenset({"shop"}), "apns": frozenset()}
    dev = parse_device(json.dumps({"device_id": "d", "channels": [{"platform": "fcm", "token": "t", "app": "shop"},
                                                                  {"platform": "fcm", "token": "u"}]}).encode(), "d", apps)
    assert dev.channels[0].app == "shop" and dev.channels[1].app is None
    with pytest.raises(InputError) as err:
        parse_device(json.dumps({"device_id": "d", "channels": [{"platform": "mqtt"},
                                                                {"platform": "apns", "token": APNS_TOKEN, "app": "x"}]}).encode(),
                     "d", apps)
    assert err.value.code == "invalid_device"
    assert [f.field for f in err.value.fields] == ["channels.1.app"]
    assert err.value.message == "channels.1.app: no app 'x' in [bridges.apns.apps] (configured: none)"
    with pytest.raises(InputError) as err:
        parse_device(b'{"device_id": "d", "channels": [{"platform": "fcm", "token": "t", "app": "a b"}]}', "d", apps)
    assert err.value.fields[0].field.startswith("channels.0")

    stored = [{"platform": "fcm", "token": "t", "app": "shop"}, {"platform": "fcm", "token": "u"}]
    assert choose_channel(stored, {}, {"fcm:shop", "fcm"}).platform == "fcm:shop"
    assert choose_channel(stored, {}, {"fcm"}).channel.token == "u"  # the app's bridge is not there: next channel
    assert route_of(json.dumps(stored), "{}", {"fcm"}) == "fcm"
    assert route_of(json.dumps(stored), "{}", {"fcm:shop", "fcm"}) == "fcm:shop"
    assert channel_for(stored, {}, "fcm:shop").channel.token == "t" and channel_for(stored, {}, "fcm").channel.token == "u"


async def test_fcm_apps_send_with_their_own_token_and_project(tmp_path, fake_fcm, pki):
    shop = fake_fcm.add_project("shop-project")
    bridges = await started(tmp_path, fcm_sections(tmp_path, fake_fcm, pki, shop))
    try:
        assert (await bridges["fcm"].send(delivery({"platform": "fcm", "token": FCM_TOKEN}))).kind is OutcomeKind.ACCEPTED
        shop_d = delivery({"platform": "fcm", "token": FCM_TOKEN, "app": "shop"})
        assert (await bridges["fcm:shop"].send(shop_d)).kind is OutcomeKind.ACCEPTED
        assert {p: len(v) for p, v in fake_fcm.accepted_by_project.items()} == {fake_fcm.project_id: 1, "shop-project": 1}
        # One token per app, each minted for its own account.
        assert bridges["fcm"].refreshes == bridges["fcm:shop"].refreshes == 1
        assert sorted(fake_fcm.token_projects.values()) == sorted([fake_fcm.project_id, "shop-project"])
        # The fake refuses the main account's token for the shop project (the other app's credentials).
        main_token = await bridges["fcm"]._access_token()
        bridges["fcm:shop"]._tokens._token = main_token
        outcome = await bridges["fcm:shop"].send(shop_d)
        assert outcome.kind is OutcomeKind.UNHEALTHY and outcome.reason.startswith("PERMISSION_DENIED"), outcome
    finally:
        await close(bridges)


async def test_apns_apps_sign_with_their_own_key_for_their_own_topic(tmp_path, fake_apns, pki):
    shop_pem = fake_apns.add_app("com.example.shop", "SHOPKEY123")
    fake_apns.device_topics[APNS_TOKEN] = "com.example.shop"
    (tmp_path / "main.p8").write_text(fake_apns.key_pem)
    (tmp_path / "shop.p8").write_text(shop_pem)
    base = {"enabled": True, "team_id": fake_apns.team_id, "key_id": fake_apns.key_id, "key_file": str(tmp_path / "main.p8"),
            "topic": fake_apns.topic, "endpoint": fake_apns.endpoint, "ca_file": str(pki.ca_file)}
    sections = {"apns": {**base, "apps": {
        "shop": {"key_id": "SHOPKEY123", "key_file": str(tmp_path / "shop.p8"), "topic": "com.example.shop"},
        "stolen": {"topic": "com.example.shop"}}}}  # the shop's topic with the main app's key
    bridges = await started(tmp_path, sections)
    try:
        d = delivery({"platform": "apns", "token": APNS_TOKEN, "app": "shop"})
        assert (await bridges["apns:shop"].send(d)).kind is OutcomeKind.ACCEPTED
        [seen] = fake_apns.accepted
        assert seen.request.header("apns-topic") == "com.example.shop"
        outcome = await bridges["apns:stolen"].send(d)
        assert outcome.kind is OutcomeKind.UNHEALTHY and outcome.reason == "InvalidProviderToken", outcome
        # The main app's topic for the shop's device token: refused for that device.
        outcome = await bridges["apns"].send(delivery({"platform": "apns", "token": APNS_TOKEN}))
        assert outcome.kind is OutcomeKind.INVALID_ADDRESS and outcome.reason == "DeviceTokenNotForTopic", outcome
    finally:
        await close(bridges)


async def test_wns_apps_use_their_own_clients_token(tmp_path, fake_wns, pki):
    fake_wns.add_client("ms-app://shop", "shop-secret")
    (tmp_path / "main").write_text(fake_wns.client_secret)
    (tmp_path / "shop").write_text("shop-secret")
    sections = {"wns": {"enabled": True, "client_id": fake_wns.client_id, "client_secret_file": str(tmp_path / "main"),
                        "token_url": fake_wns.token_url(), "allowed_hosts": ["localhost"], "ca_file": str(pki.ca_file),
                        "apps": {"shop": {"client_id": "ms-app://shop", "client_secret_file": str(tmp_path / "shop")}}}}
    bridges = await started(tmp_path, sections)
    try:
        uri = fake_wns.new_channel(client_id="ms-app://shop")
        assert (await bridges["wns:shop"].send(delivery({"platform": "wns", "channel_uri": uri, "app": "shop"}))).kind \
            is OutcomeKind.ACCEPTED
        assert len(fake_wns.accepted_by_client["ms-app://shop"]) == 1
        # The main client's token for the shop's channel: 403, never accepted.
        outcome = await bridges["wns"].send(delivery({"platform": "wns", "channel_uri": uri}))
        assert outcome.kind is not OutcomeKind.ACCEPTED and outcome.status == 403, outcome
        assert bridges["wns"].token_fetches >= 1 and bridges["wns:shop"].token_fetches == 1
    finally:
        await close(bridges)


async def test_web_push_apps_sign_with_their_own_vapid_key(tmp_path, fake_push, pki):
    shop_key = vapid.load_or_create(tmp_path / "shop.pem")
    sections = {"webpush": {"enabled": True, "vapid_private_key_file": str(tmp_path / "main.pem"),
                            "allow_private_endpoints": True, "ca_file": str(pki.ca_file),
                            "apps": {"shop": {"vapid_private_key_file": str(tmp_path / "shop.pem")}}}}
    bridges = await started(tmp_path, sections)
    try:
        sub = fake_push.subscribe(app_server_key=vapid.public_key_b64(shop_key))
        d = delivery({"platform": "webpush", "subscription": sub, "app": "shop"})
        assert (await bridges["webpush:shop"].send(d)).kind is OutcomeKind.ACCEPTED
        outcome = await bridges["webpush"].send(d)  # the main app's VAPID key
        assert outcome.kind is OutcomeKind.INVALID_ADDRESS and outcome.status == 403, outcome
        assert len(fake_push.accepted) == 1
    finally:
        await close(bridges)
