"""The single writer for delivery outcomes and acks, committing them in batches.

A commit costs an fsync (synchronous=FULL); one per delivery would cap a site at a few
hundred deliveries a second. Callers await their own item's commit, so nothing is
acknowledged (to a device, or as done to the dispatcher) before it is on disk; items
that arrive while a commit runs simply join the next batch.

A batch that cannot commit (disk full, database locked) fails every item's future with
the storage error: the dispatcher keeps its results and records them again later, an
MQTT ack stays unacknowledged to the device (which sends it again). One ack that cannot
be stored on its own (``NotStored`` from the upstream buffer) fails only its own future.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.pipeline import store
from gateway.pipeline.models import AckIn
from gateway.storage import Database, FailureEpisode, NotStored, is_storage_error

log = structlog.get_logger(__name__)

MAX_BATCH = 2000


@dataclass(slots=True)
class _Item:
    kind: str  # "result" | "ack"
    payload: Any
    future: asyncio.Future[Any]


class Recorder:
    def __init__(self, db: Database, forward: store.Forwarder | None = None, acks_topic: str | None = None):
        self._db = db
        self._forward = forward
        self._acks_topic = acks_topic
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.batches = 0
        self.on_commit: list[Any] = []  # callables() run after each commit
        self.failures = FailureEpisode(log, "recording outcomes and acks")

    async def result(self, result: store.Result) -> None:
        await self._submit("result", result)

    async def ack(self, device_id: str, ack: AckIn) -> store.AckResult:
        return await self._submit("ack", (device_id, ack))

    async def _submit(self, kind: str, payload: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(kind, payload, fut))
        return await fut

    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        """Runs until cancelled; a batch in progress is committed before cancellation lands."""
        while True:
            first = await self._queue.get()
            items = [first]
            while len(items) < MAX_BATCH and not self._queue.empty():
                items.append(self._queue.get_nowait())
            await asyncio.shield(self._commit(items))

    async def flush(self) -> None:
        """Commit whatever is queued now (used at shutdown)."""
        items = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        if items:
            await self._commit(items)

    async def _commit(self, items: list[_Item]) -> None:
        results = [i.payload for i in items if i.kind == "result"]
        acks = [i.payload for i in items if i.kind == "ack"]
        forward, topic = self._forward, self._acks_topic

        def work(conn: Any) -> list[store.AckResult]:
            now = time.time()
            if results:
                store.apply_results(conn, results, now)
            return store.apply_acks(conn, acks, now, forward, topic) if acks else []

        try:
            ack_results = await self._db.run(work)
        except Exception as exc:
            if is_storage_error(exc):
                self.failures.note(exc, items=len(items))  # logged once per episode
            else:
                log.exception("recording outcomes failed")
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.failures.ok()
        self.batches += 1
        ack_iter = iter(ack_results)
        for item in items:
            ack_result = next(ack_iter) if item.kind == "ack" else None
            if item.future.done():  # its waiter was cancelled
                continue
            if ack_result is None:
                item.future.set_result(None)
            elif ack_result.not_stored:
                item.future.set_exception(NotStored(ack_result.reason))
            else:
                item.future.set_result(ack_result)
        for callback in self.on_commit:
            callback()
