from __future__ import annotations

import asyncio
import time
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import LoadedConfig, parse_config
from gateway.storage import Database
from gateway.upstream.link import UpstreamLink
from tests.support import require_tool
from tests.upstream.cloud import Cloud

# Short backoff so reconnects in tests take fractions of a second, not minutes.
FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "poll_interval": 0.2, "publish_timeout": 5.0}


class RecordingIntake:
    """Stands in for the pipeline: records what the link hands over, in order."""

    def __init__(self) -> None:
        self.jobs: list[tuple[bytes, str]] = []
        self.registrations: list[tuple[str, bytes, str]] = []
        self.changed = asyncio.Event()

    async def submit_job(self, payload: bytes, source: str) -> dict[str, Any]:
        self.jobs.append((payload, source))
        self.changed.set()
        return {"state": "accepted"}

    async def register_device(self, device_id: str, payload: bytes, source: str) -> None:
        self.registrations.append((device_id, payload, source))
        self.changed.set()

    async def wait(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()


async def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``predicate`` (cheap, in-process state) every 20 ms until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def make_config(cloud: Cloud, tmp: Path, **upstream: Any) -> LoadedConfig:
    return parse_config(cloud.config_data(tmp, **upstream), environ={})


@contextlib.asynccontextmanager
async def running(link: UpstreamLink) -> AsyncIterator[UpstreamLink]:
    stopping = asyncio.Event()
    task = asyncio.create_task(link.run(stopping))
    try:
        yield link
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def cloud_factory(tmp_path: Path) -> Iterator:
    require_tool("mosquitto")  # a missing tool fails the test (make test installs it)
    clouds: list[Cloud] = []

    def make(require_certificate: bool = False, start: bool = True) -> Cloud:
        c = Cloud(tmp_path / f"cloud-{len(clouds)}", require_certificate=require_certificate)
        clouds.append(c)
        return c.start() if start else c

    yield make
    for c in clouds:
        c.stop()


@pytest.fixture
def cloud(cloud_factory) -> Cloud:
    return cloud_factory()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    (tmp_path / "var").mkdir(exist_ok=True)
    database = await Database(tmp_path / "var" / "gateway.db").open()
    yield database
    await database.close()
