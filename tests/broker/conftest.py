from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.broker.embedded import EmbeddedBroker
from tests.broker.helpers import start_broker


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    """An embedded broker in the test's loop: one anonymous-admin TCP listener."""
    b = await start_broker(tmp_path)
    yield b
    await b.stop()
