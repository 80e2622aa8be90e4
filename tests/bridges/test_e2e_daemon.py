"""End to end: the real daemon (subprocess) delivers jobs through the cloud bridges to the fakes.

Devices and jobs go in through the CLI (``devices add``, ``send --wait``, run in this
process) exactly as an operator would; the fakes run on their own loop in a thread and
record what arrived.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.apns import FakeApns
from tests.fakes.common import Pki
from tests.fakes.fcm import FakeFcm
from tests.fakes.thread import LoopThread
from tests.fakes.webpush import FakePushService
from tests.fakes.wns import FakeWns
from tests.helpers.cli import CliResult, cli_in_process

APNS_OK = "ab" * 32
APNS_GONE = "cd" * 32
APNS_BUSY = "ef" * 32
FCM_OK = "fcm-token-ok-" + "a" * 30
FCM_QUOTA = "fcm-token-quota-" + "b" * 30


class Fakes:
    def __init__(self, tmp: Path):
        self.pki = Pki(tmp / "pki")
        self.thread = LoopThread()
        self.apns = self.thread.start(FakeApns(self.pki))
        self.fcm = self.thread.start(FakeFcm(self.pki))
        self.wns = self.thread.start(FakeWns(self.pki))
        self.push = self.thread.start(FakePushService(self.pki))

    def stop(self) -> None:
        for fake in (self.apns, self.fcm, self.wns, self.push):
            self.thread.run(fake.stop())
        self.thread.stop()


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Fakes]:
    f = Fakes(tmp_path)
    yield f
    f.stop()


def cloud_config(tmp: Path, f: Fakes) -> dict[str, Any]:
    (tmp / "AuthKey.p8").write_text(f.apns.key_pem)
    (tmp / "sa.json").write_text(json.dumps(f.fcm.service_account()))
    (tmp / "wns-secret").write_text(f.wns.client_secret)
    ca = str(f.pki.ca_file)
    return {
        "dispatch": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        "bridges": {
            "simulation": {"enabled": False}, "mqtt": {"enabled": False},
            "apns": {"enabled": True, "team_id": f.apns.team_id, "key_id": f.apns.key_id,
                     "key_file": str(tmp / "AuthKey.p8"), "topic": f.apns.topic,
                     "endpoint": f.apns.endpoint, "ca_file": ca},
            "fcm": {"enabled": True, "service_account_file": str(tmp / "sa.json"),
                    "endpoint": f.fcm.endpoint, "ca_file": ca},
            "wns": {"enabled": True, "client_id": f.wns.client_id, "client_secret_file": str(tmp / "wns-secret"),
                    "token_url": f.wns.token_url(), "allowed_hosts": ["localhost"], "ca_file": ca},
            "webpush": {"enabled": True, "vapid_private_key_file": str(tmp / "var" / "vapid.pem"),
                        "allow_private_endpoints": True, "ca_file": ca},
        },
    }


def cli(gw: Any, *args: str) -> CliResult:
    """An operator's command against the daemon's config, run in this process (the same
    code and output as ``python -m gateway``, without an interpreter start each)."""
    return cli_in_process(gw.config, *args)


def add_device(gw: Any, device_id: str, *channels: tuple[str, str]) -> None:
    args = ["devices", "add", device_id]
    for platform, address in channels:
        args += ["--platform", platform, "--address", address]
    r = cli(gw, *args)
    assert r.returncode == 0, r.stderr


def send_wait(gw: Any, *devices: str, **extra: str) -> tuple[int, str]:
    args = ["send", "--title", "Config update", "--body", "Version 2.1.0", "--data", "config_version=2.1.0",
            "--wait", "--timeout", "40"]
    for d in devices:
        args += ["--device", d]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    r = cli(gw, *args)
    return r.returncode, r.stdout.strip().splitlines()[0] if r.stdout.strip() else r.stderr


@pytest.mark.slow
def test_jobs_reach_every_platform_fall_over_retry_and_keep_secrets(tmp_path, fakes, gateway_factory):
    gw = gateway_factory(cloud_config(tmp_path, fakes))
    sub = fakes.push.subscribe()
    add_device(gw, "ios-1", ("apns", APNS_OK))
    add_device(gw, "android-1", ("fcm", FCM_OK))
    add_device(gw, "win-1", ("wns", fakes.wns.new_channel()))
    add_device(gw, "web-1", ("webpush", json.dumps(sub)))

    # 1. One job to a device on each platform: every fake accepts exactly one push.
    code, job_id = send_wait(gw, "ios-1", "android-1", "win-1", "web-1")
    assert code == 0, (job_id, gw.log()[-3000:])
    assert len(fakes.apns.accepted) == len(fakes.fcm.accepted) == len(fakes.wns.accepted) == len(fakes.push.accepted) == 1
    assert fakes.apns.accepted[0].decoded["job_id"] == job_id
    assert fakes.fcm.accepted[0].decoded["data"]["job_id"] == job_id
    assert fakes.push.accepted[0].decoded["job_id"] == job_id

    # 2. APNs says 410 Unregistered: the channel is marked invalid and the same delivery
    #    falls over to the device's next channel (FCM).
    fakes.apns.unregistered[APNS_GONE] = int(time.time() * 1000)
    add_device(gw, "dual-1", ("apns", APNS_GONE), ("fcm", FCM_OK))
    code, job2 = send_wait(gw, "dual-1")
    assert code == 0, gw.log()[-3000:]
    assert [s.reason for s in fakes.apns.seen if s.request.path.endswith(APNS_GONE)] == ["Unregistered"]
    assert fakes.fcm.accepted[-1].decoded["data"]["job_id"] == job2
    shown = json.loads(cli(gw, "devices", "show", "dual-1", "--json").stdout)
    assert shown["channels"][0].get("invalid"), shown
    # ... and FCM's 404 UNREGISTERED falls over to Web Push the same way.
    fakes.fcm.unregistered.add("fcm-token-gone-" + "c" * 30)
    add_device(gw, "dual-2", ("fcm", "fcm-token-gone-" + "c" * 30), ("webpush", json.dumps(fakes.push.subscribe())))
    code, job3 = send_wait(gw, "dual-2")
    assert code == 0, gw.log()[-3000:]
    assert fakes.push.accepted[-1].decoded["job_id"] == job3
    assert json.loads(cli(gw, "devices", "show", "dual-2", "--json").stdout)["channels"][0].get("invalid")

    # 3. 503 with Retry-After (APNs) and 429 QUOTA_EXCEEDED with Retry-After (FCM) are
    #    retried after the time the platform asked for, then delivered.
    fakes.apns.inject(APNS_BUSY, 503, "ServiceUnavailable", retry_after=1)
    fakes.fcm.inject(FCM_QUOTA, "QUOTA_EXCEEDED", retry_after=1)
    add_device(gw, "ios-busy", ("apns", APNS_BUSY))
    add_device(gw, "android-quota", ("fcm", FCM_QUOTA))
    started = time.monotonic()
    code, _ = send_wait(gw, "ios-busy", "android-quota")
    assert code == 0, gw.log()[-3000:]
    assert time.monotonic() - started >= 1.0
    busy = [s for s in fakes.apns.seen if s.request.path.endswith(APNS_BUSY)]
    quota = [s for s in fakes.fcm.seen if s.decoded and s.decoded.get("token") == FCM_QUOTA]
    assert [s.status for s in busy] == [503, 200] and [s.status for s in quota] == [429, 200]

    # 4. The APNs provider JWT was signed once for all these requests, and FCM's OAuth
    #    token was fetched once.
    assert len(fakes.apns.jwts_seen) == 1 and len([s for s in fakes.apns.seen if s.status]) >= 4
    assert fakes.fcm.token_requests == 1

    # 5. No secret in the daemon's log: keys, client secret, access tokens, JWTs.
    assert gw.stop() == 0
    log = gw.log()
    secrets = [fakes.apns.key_pem.splitlines()[1], fakes.fcm.service_account()["private_key"].splitlines()[1],
               fakes.wns.client_secret, *fakes.apns.jwts_seen, *fakes.wns.tokens, *fakes.fcm.tokens,
               *fakes.push.vapid_tokens, (tmp_path / "var" / "vapid.pem").read_text().splitlines()[1]]
    leaked = [s[:12] for s in secrets if s in log]
    assert not leaked, leaked
    assert "PRIVATE KEY" not in log


@pytest.mark.slow
def test_configuration_error_pauses_the_bridge_and_keeps_the_work(tmp_path, fakes, gateway_factory):
    cfg = cloud_config(tmp_path, fakes)
    cfg["bridges"]["apns"]["topic"] = "com.example.wrong"  # Apple answers 400 TopicDisallowed
    cfg["dispatch"]["max_in_flight"] = 1
    gw = gateway_factory(cfg)
    devices = [f"ios-{i}" for i in range(5)]
    for d in devices:
        add_device(gw, d, ("apns", APNS_OK))
    r = cli(gw, "send", "--title", "T", "--body", "B", *[a for d in devices for a in ("--device", d)])
    job_id = r.stdout.strip()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not fakes.apns.seen:
        time.sleep(0.1)
    time.sleep(1.5)
    status = json.loads(cli(gw, "jobs", "show", job_id, "--json").stdout)
    assert status["counts"]["queued"] == 5 and status["counts"]["failed"] == 0, status
    assert len(fakes.apns.seen) == 1  # paused after the first answer, not hammered per delivery
    assert gw.log().count("bridge unhealthy; paused") == 1
    assert gw.stop() == 0
