"""A device is reached on its next channel while its first channel's platform is down:
the real daemon, the strict fakes (FCM refusing the service account's key, a Web Push
service that works), jobs and devices through the CLI."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.bridges.test_e2e_daemon import FCM_OK, add_device, cli, cloud_config, fakes  # noqa: F401  (fixture)
from tests.fakes.common import Injection

GRACE_S = 4.0


def fcm_and_webpush(tmp, f) -> dict:
    cfg = cloud_config(tmp, f)
    for name in ("apns", "wns"):
        cfg["bridges"][name]["enabled"] = False
    cfg["dispatch"]["fallback_after_s"] = GRACE_S
    return cfg


def reject_fcm_key(f) -> None:
    """Google refuses the service account's signed assertion (a revoked key): every token request."""
    f.fcm.token_injections.add("*", Injection(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                                              {}, count=10**6))


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def unhealthy_for(moved: str) -> float:
    """The seconds in "moved from fcm to webpush: fcm unhealthy for 4 s (…)"."""
    return float(re.search(r"unhealthy for (\d+) s", moved).group(1))


def deliveries(gw, job_id: str) -> dict[str, dict]:
    r = cli(gw, "jobs", "show", job_id, "--deliveries", "--json")
    assert r.returncode == 0, r.stderr
    return {d["device_id"]: d for d in json.loads(r.stdout)["deliveries"]}


def recorded(gw, job_id: str, device: str) -> dict:
    """The device's delivery once the gateway has recorded the send the push service took:
    the service's 201 comes before the writer's next commit."""
    return wait_for(lambda: (d := deliveries(gw, job_id)[device])["state"] != "queued" and d, 10,
                    f"{device}'s send recorded")


def send(gw, device: str, *extra: str) -> str:
    r = cli(gw, "send", "--title", "T", "--body", "B", "--device", device, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.slow
def test_a_phone_is_reached_by_web_push_while_fcm_refuses_the_key(tmp_path, fakes, gateway_factory):  # noqa: F811
    reject_fcm_key(fakes)
    gw = gateway_factory(fcm_and_webpush(tmp_path, fakes))
    add_device(gw, "phone-1", ("fcm", FCM_OK), ("webpush", json.dumps(fakes.push.subscribe())))
    add_device(gw, "android-only", ("fcm", FCM_OK))

    # ttl 0 ("now or never"): moves to Web Push at once, not after the grace.
    now_job = send(gw, "phone-1", "--ttl", "0")
    wait_for(lambda: len(fakes.push.accepted) == 1, 10, "ttl 0 delivery on Web Push")
    row = recorded(gw, now_job, "phone-1")
    assert row["state"] == "sent" and row["platform"] == "webpush", row
    assert row["moved"].startswith("moved from fcm to webpush: fcm unhealthy for "), row
    assert unhealthy_for(row["moved"]) < GRACE_S, row  # at once, not after the grace

    # A job with a TTL: queued, saying why, then on Web Push within the grace and a few seconds.
    job_id = send(gw, "phone-1", "--ttl", "600")
    only = send(gw, "android-only", "--ttl", "600")
    wait_for(lambda: len(fakes.push.accepted) == 2, GRACE_S + 10, "delivery moved to Web Push")
    row = recorded(gw, job_id, "phone-1")
    assert row["state"] == "sent" and row["platform"] == "webpush", row
    assert unhealthy_for(row["moved"]) >= GRACE_S, row  # not before the grace ran out
    assert "fcm unhealthy" in row["moved"] and "oauth token refresh refused" in row["moved"], row
    # A device with no other channel waits, and says why.
    waiting = wait_for(lambda: (d := deliveries(gw, only)["android-only"])["reason"] and d, 5, "a reason")
    assert waiting["state"] == "queued" and waiting["reason"].startswith("bridge fcm unhealthy"), waiting
    shown = cli(gw, "jobs", "show", only, "--deliveries").stdout
    assert "bridge fcm unhealthy" in shown, shown
    assert fakes.fcm.accepted == []
    assert gw.stop() == 0


@pytest.mark.slow
def test_a_broken_key_file_is_found_by_check_config_and_the_daemon_runs_with_fcm_down(tmp_path, fakes, gateway_factory):  # noqa: F811
    cfg = fcm_and_webpush(tmp_path, fakes)
    account = fakes.fcm.service_account()
    account["private_key"] = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    (tmp_path / "sa.json").write_text(json.dumps(account))
    gw = gateway_factory(cfg, start=False)
    r = cli(gw, "check-config")
    assert r.returncode != 0
    assert r.stderr.startswith("bridges.fcm.service_account_file: unusable service account"), r.stderr
    gw.start()  # runs (READY) with FCM unhealthy, instead of refusing to start
    add_device(gw, "phone-1", ("fcm", FCM_OK), ("webpush", json.dumps(fakes.push.subscribe())))
    job_id = send(gw, "phone-1", "--ttl", "600")
    wait_for(lambda: len(fakes.push.accepted) == 1, GRACE_S + 10, "delivery moved to Web Push")
    row = recorded(gw, job_id, "phone-1")
    assert row["platform"] == "webpush" and "unusable service account" in row["moved"], row
    assert fakes.fcm.seen == []
    assert "bridge cannot start" in gw.log()
    assert gw.stop() == 0
