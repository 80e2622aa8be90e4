"""Fixtures for the cloud bridge tests: a test CA, the strict fakes, configured bridges."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bridges import apns
from bridges.base import BridgeContext, Delivery, Notification
from gateway.config import parse_config
from gateway.timeutil import utcnow
from gateway.topics import Topics
from tests.fakes.apns import FakeApns
from tests.fakes.common import Pki
from tests.fakes.fcm import FakeFcm
from tests.fakes.webpush import FakePushService
from tests.fakes.wns import FakeWns


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _fresh_jwt_cache() -> None:
    apns.JWTS.clear()


def bridge_config(tmp_path: Path, bridges: dict[str, Any]) -> Any:
    """A full config (as the daemon parses it) with the given [bridges.*] sections."""
    data = {"gateway": {"site_id": "site-t", "data_dir": str(tmp_path / "var")},
            "broker": {"listeners": [{"name": "l", "bind": "127.0.0.1:1883"}]},
            "bridges": bridges}
    return parse_config(data, environ={})


def build_bridge(module: Any, tmp_path: Path, platform: str, section: dict[str, Any]) -> Any:
    """``module.build`` with the section and the secrets the config loader read for it."""
    cfg, secrets = bridge_config(tmp_path, {platform: section})
    return module.build(getattr(cfg.bridges, platform), context(tmp_path), secrets.bridge(platform))


def context(tmp_path: Path) -> BridgeContext:
    return BridgeContext(client=None, topics=Topics("homepot/site-t"), data_dir=tmp_path / "var")


def delivery(channel: Any, *, title: str | None = "Config update", body: str | None = "Version 2.1.0 is ready",
             data: dict[str, str] | None = None, priority: str = "normal", ttl: int = 3600,
             collapse_key: str | None = None, options: dict[str, Any] | None = None,
             ack_url: str | None = None) -> Delivery:
    from pydantic import TypeAdapter

    from devices.models import Channel

    now = utcnow()
    return Delivery(
        message_id=str(uuid.uuid4()), job_id="job-1", device_id="dev-1",
        channel=TypeAdapter(Channel).validate_python(channel),
        notification=Notification(title=title, body=body, data=data if data is not None else {"config_version": "2.1.0"},
                                  priority=priority, ttl=ttl, collapse_key=collapse_key),
        options=options or {}, sent_at=now, expires_at=now + timedelta(seconds=ttl), ack_url=ack_url)


@pytest.fixture
async def fake_apns(pki: Pki) -> AsyncIterator[FakeApns]:
    fake = await FakeApns(pki).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_fcm(pki: Pki) -> AsyncIterator[FakeFcm]:
    fake = await FakeFcm(pki).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_wns(pki: Pki) -> AsyncIterator[FakeWns]:
    fake = await FakeWns(pki).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_push(pki: Pki) -> AsyncIterator[FakePushService]:
    fake = await FakePushService(pki).start()
    yield fake
    await fake.stop()


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path
