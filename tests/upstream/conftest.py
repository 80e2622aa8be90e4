from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import LoadedConfig, parse_config
from gateway.storage import Database
from gateway.upstream.link import UpstreamLink
from tests.helpers import open_database, require_tool, until
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


# The suite's one polling wait (asyncio flavour), under the name these tests use.
wait_until = until


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
    async with open_database(tmp_path / "var") as database:
        yield database
