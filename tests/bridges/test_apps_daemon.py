"""Several apps per push platform, against the real daemon and the strict fakes.

Each app of ``[bridges.<platform>.apps.<name>]`` is its own bridge: the fakes accept a push
only with the credentials of the app the device belongs to (FCM: a token minted for that
project's service account; APNs: that app's key and topic; WNS: that client's token; Web
Push: the VAPID key the subscription is bound to), and one app's broken key leaves the
other apps of the platform delivering.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.mqttpub import publish_all
from gateway import vapid
from tests.bridges.test_e2e_daemon import APNS_OK, FCM_OK, Fakes, add_device, cli, cloud_config, fakes  # noqa: F401
from tests.bridges.test_fallback_daemon import deliveries, send, wait_for
from tests.helpers.cli import cli_in_process

SHOP_FCM = "fcm-token-shop-" + "d" * 30
SHOP_APNS = "5a" * 32
SHOP_PROJECT = "shop-project"
SHOP_TOPIC = "com.example.shop"
SHOP_KEY_ID = "SHOPKEY123"
SHOP_WNS = ("ms-app://s-1-15-2-shop", "shop-wns-secret")
GRACE_S = 4.0


def two_apps_config(tmp: Path, f: Fakes) -> dict[str, Any]:
    """The main credentials of every push platform plus a ``shop-app`` on each."""
    cfg = cloud_config(tmp, f)
    (tmp / "sa-shop.json").write_text(json.dumps(f.fcm.add_project(SHOP_PROJECT)))
    (tmp / "shop.p8").write_text(f.apns.add_app(SHOP_TOPIC, SHOP_KEY_ID))
    f.apns.device_topics[SHOP_APNS] = SHOP_TOPIC
    f.apns.device_topics[APNS_OK] = f.apns.topic
    f.wns.add_client(*SHOP_WNS)
    (tmp / "shop-wns-secret").write_text(SHOP_WNS[1])
    b = cfg["bridges"]
    b["fcm"]["apps"] = {"shop-app": {"service_account_file": str(tmp / "sa-shop.json")}}
    b["apns"]["apps"] = {"shop-app": {"key_id": SHOP_KEY_ID, "key_file": str(tmp / "shop.p8"), "topic": SHOP_TOPIC}}
    b["wns"]["apps"] = {"shop-app": {"client_id": SHOP_WNS[0], "client_secret_file": str(tmp / "shop-wns-secret")}}
    b["webpush"]["apps"] = {"shop-app": {"vapid_private_key_file": str(tmp / "var" / "shop-vapid.pem")}}
    cfg["http"] = {"bind": "127.0.0.1:0"}
    return cfg


def add(gw: Any, device_id: str, *channels: tuple[str, str, str]) -> None:
    args = ["devices", "add", device_id]
    for platform, address, app in channels:
        args += ["--platform", platform, "--address", address, "--app", app]
    r = cli(gw, *args)
    assert r.returncode == 0, r.stderr


def metrics(gw: Any) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_each_device_is_reached_with_its_own_apps_credentials(tmp_path, fakes, gateway_factory):  # noqa: F811
    gw = gateway_factory(two_apps_config(tmp_path, fakes), start=False)
    # The application server keys the browsers subscribe with, as an operator gets them.
    main_key = cli(gw, "vapid-keys").stdout.strip()
    shop_key = cli(gw, "vapid-keys", "--app", "shop-app").stdout.strip()
    assert main_key and shop_key and main_key != shop_key
    assert shop_key == vapid.public_key_b64(vapid.load_or_create(tmp_path / "var" / "shop-vapid.pem"))
    r = cli(gw, "vapid-keys", "--app", "nope")
    assert r.returncode != 0 and r.stderr.startswith("--app: no app 'nope' in [bridges.webpush.apps]"), r.stderr
    r = cli_in_process(gw.config, "users", "add", "ops", "--role", "admin", "--password-stdin", input="pa55word\n")
    assert r.returncode == 0, r.stderr
    gw.start()
    main_sub, shop_sub = fakes.push.subscribe(app_server_key=main_key), fakes.push.subscribe(app_server_key=shop_key)
    main_wns, shop_wns = fakes.wns.new_channel(), fakes.wns.new_channel(client_id=SHOP_WNS[0])
    add(gw, "android-main", ("fcm", FCM_OK, ""))
    add(gw, "android-shop", ("fcm", SHOP_FCM, "shop-app"))
    add(gw, "ios-main", ("apns", APNS_OK, ""))
    add(gw, "ios-shop", ("apns", SHOP_APNS, "shop-app"))
    add(gw, "win-main", ("wns", main_wns, ""))
    add(gw, "win-shop", ("wns", shop_wns, "shop-app"))
    add(gw, "web-main", ("webpush", json.dumps(main_sub), ""))
    add(gw, "web-shop", ("webpush", json.dumps(shop_sub), "shop-app"))

    listed = cli(gw, "devices", "list").stdout
    assert "fcm:shop-app" in listed and "apns:shop-app" in listed, listed
    devices = ["android-main", "android-shop", "ios-main", "ios-shop", "win-main", "win-shop", "web-main", "web-shop"]
    r = cli(gw, "send", "--title", "T", "--body", "B", "--wait", "--timeout", "40",
            *[a for d in devices for a in ("--device", d)])
    assert r.returncode == 0, (r.stdout, r.stderr, gw.log()[-3000:])
    rows = deliveries(gw, r.stdout.strip().splitlines()[0])
    assert {d: rows[d]["state"] for d in devices} == {d: "sent" for d in devices}, rows
    assert rows["android-shop"]["platform"] == "fcm:shop-app" and rows["android-main"]["platform"] == "fcm"

    # Every fake saw each app's device with that app's credentials, and nothing refused.
    fcm = fakes.fcm.accepted_by_project
    assert [s.decoded["token"] for s in fcm[fakes.fcm.project_id]] == [FCM_OK]
    assert [s.decoded["token"] for s in fcm[SHOP_PROJECT]] == [SHOP_FCM]
    apns = fakes.apns.accepted_by_topic
    assert [s.request.path for s in apns[fakes.apns.topic]] == [f"/3/device/{APNS_OK}"]
    assert [s.request.path for s in apns[SHOP_TOPIC]] == [f"/3/device/{SHOP_APNS}"]
    assert len(fakes.wns.accepted_by_client[fakes.wns.client_id]) == len(fakes.wns.accepted_by_client[SHOP_WNS[0]]) == 1
    assert len(fakes.push.accepted) == 2
    refused = [(s.status, s.reason) for fake in (fakes.fcm, fakes.apns, fakes.wns, fakes.push)
               for s in fake.seen if s.status not in (200, 201)]
    assert refused == []
    # Two token caches: one OAuth token per FCM project, one per WNS client.
    assert len(set(fakes.fcm.token_projects.values())) == 2 and len(set(fakes.wns.token_clients.values())) == 2

    # The app is a label of the bridge metrics; health and status list each app's bridge.
    samples = metrics(gw)
    assert samples[("homepot_bridge_sent_total", (("app", "shop-app"), ("platform", "fcm")))] == 1.0
    assert samples[("homepot_bridge_sent_total", (("app", ""), ("platform", "fcm")))] == 1.0
    info = json.loads(cli(gw, "status", "--json").stdout)
    assert info["bridges"]["fcm:shop-app"]["healthy"] is True and info["bridges"]["fcm:shop-app"]["app"] == "shop-app"

    # An app the config does not have is refused at registration, by its field.
    r = cli(gw, "devices", "add", "android-x", "--platform", "fcm", "--address", SHOP_FCM, "--app", "nope")
    assert r.returncode != 0 and r.stderr.startswith("--app: no app 'nope' in [bridges.fcm.apps]"), r.stderr
    req = urllib.request.Request(f"http://127.0.0.1:{gw.http_port}/v1/devices/android-x", method="PUT",
                                 data=json.dumps({"device_id": "android-x", "channels": [
                                     {"platform": "fcm", "token": SHOP_FCM, "app": "nope"}]}).encode(),
                                 headers={"content-type": "application/json",
                                          "authorization": "Basic " + base64.b64encode(b"ops:pa55word").decode()})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("an unknown app was accepted")
    except urllib.error.HTTPError as exc:
        code, body = exc.code, json.loads(exc.read())
    assert code == 400 and body["error"]["code"] == "invalid_device", body
    assert body["error"]["message"].startswith("channels.0.app: no app 'nope' in [bridges.fcm.apps]"), body
    assert gw.stop() == 0


def test_one_apps_broken_key_moves_only_its_devices(tmp_path, fakes, gateway_factory):  # noqa: F811
    cfg = two_apps_config(tmp_path, fakes)
    for name in ("apns", "wns"):
        cfg["bridges"][name]["enabled"] = False
    cfg["dispatch"]["fallback_after_s"] = GRACE_S
    account = json.loads((tmp_path / "sa-shop.json").read_text())
    account["private_key"] = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    (tmp_path / "sa-shop.json").write_text(json.dumps(account))
    gw = gateway_factory(cfg, start=False)
    r = cli(gw, "check-config")
    assert r.returncode != 0
    assert r.stderr.startswith("bridges.fcm.apps.shop-app.service_account_file: unusable service account"), r.stderr
    assert "bridges.fcm.service_account_file" not in r.stderr  # the main app's key is fine

    gw.start()  # runs with the shop app's FCM bridge unhealthy, the main one healthy
    # Over MQTT (contract §7), an unknown app is refused and a known one registered.
    register = lambda d, app: (f"homepot/site-t/devices/{d}/register", json.dumps(  # noqa: E731
        {"device_id": d, "channels": [{"platform": "fcm", "token": SHOP_FCM, "app": app}]}).encode())
    asyncio.run(publish_all(gw.port, [register("mqtt-nope", "nope"), register("mqtt-shop", "shop-app")], "test-apps"))
    wait_for(lambda: cli(gw, "devices", "show", "mqtt-shop").returncode == 0, 15, "the MQTT registration")
    assert cli(gw, "devices", "show", "mqtt-nope").returncode != 0
    assert "channels.0.app: no app 'nope' in [bridges.fcm.apps] (configured: shop-app)" in gw.log()
    add(gw, "android-main", ("fcm", FCM_OK, ""))
    add(gw, "phone-shop", ("fcm", SHOP_FCM, "shop-app"), ("webpush", json.dumps(fakes.push.subscribe()), ""))
    add(gw, "android-shop", ("fcm", SHOP_FCM, "shop-app"))
    job = send(gw, "android-main", "--device", "phone-shop", "--device", "android-shop", "--ttl", "600")

    # The main app's device is delivered at once; the shop app's phone moves to Web Push after
    # the grace; the shop device with no other channel waits, naming its app's bridge.
    wait_for(lambda: len(fakes.fcm.accepted) == 1, 15, "the main app's delivery")
    wait_for(lambda: len(fakes.push.accepted) == 1, GRACE_S + 15, "the shop phone moved to Web Push")
    # Both sends recorded (the services' answers come before the gateway's commit).
    def recorded() -> dict[str, Any] | None:
        rows = deliveries(gw, job)
        return rows if rows["android-main"]["state"] != "queued" and rows["phone-shop"]["state"] != "queued" else None

    rows = wait_for(recorded, 10, "the sends recorded")
    assert rows["android-main"]["state"] == "sent" and rows["android-main"]["platform"] == "fcm", rows
    assert rows["phone-shop"]["state"] == "sent" and rows["phone-shop"]["platform"] == "webpush", rows
    assert rows["phone-shop"]["moved"].startswith("moved from fcm:shop-app to webpush: fcm:shop-app unhealthy"), rows
    waiting = wait_for(lambda: (d := deliveries(gw, job)["android-shop"])["reason"] and d, 10, "a reason")
    assert waiting["state"] == "queued" and waiting["reason"].startswith("bridge fcm:shop-app unhealthy"), waiting
    assert [s.decoded["token"] for s in fakes.fcm.accepted] == [FCM_OK]
    assert SHOP_PROJECT not in fakes.fcm.token_projects.values()  # its broken key never minted a token

    info = json.loads(cli(gw, "status", "--json").stdout)
    assert info["bridges"]["fcm"]["healthy"] is True
    assert info["bridges"]["fcm:shop-app"]["healthy"] is False
    assert "bridges.fcm.apps.shop-app.service_account_file" in info["bridges"]["fcm:shop-app"]["reason"]
    samples = metrics(gw)
    assert samples[("homepot_bridge_healthy", (("app", "shop-app"), ("platform", "fcm")))] == 0.0
    assert samples[("homepot_bridge_healthy", (("app", ""), ("platform", "fcm")))] == 1.0
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=10)
        raise AssertionError("healthz said ok with an app unhealthy")
    except urllib.error.HTTPError as exc:
        code, detail = exc.code, json.loads(exc.read())["checks"]["bridges"]["detail"]
    assert code == 503
    assert detail.startswith("fcm:shop-app: bridges.fcm.apps.shop-app.service_account_file"), detail
    assert gw.stop() == 0
