"""The single writer for delivery outcomes, acks and device registrations, committing them
in batches.

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
from dataclasses import dataclass
from typing import Any

import structlog

from gateway import clock
from gateway.pipeline import deliveries
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline import registry as pipeline_registry
from gateway.pipeline.models import Ack
from gateway.storage import Database, FailureEpisode, NotStored, is_storage_error

log = structlog.get_logger(__name__)

MAX_BATCH = 2000


@dataclass(slots=True)
class _Item:
    kind: str  # "result" | "results" (a list, one future) | "ack" | "acks" (a list, one future) | "device" | "remove"
    payload: Any
    future: asyncio.Future[Any]


SHOWN_IDS = 10  # device ids named in a "devices registered" line


def _log_registered(registry: list[_Item]) -> None:
    """One info line per commit for its registrations (the per-device line is at debug):
    how many, and the first device ids with their sources, so a lone registration is
    still named."""
    devices = [i.payload for i in registry if i.kind == "device"]
    if devices:
        log.info("devices registered", count=len(devices),
                 devices=[f"{d.device_id} ({source})" for d, source in devices[:SHOWN_IDS]],
                 more=max(0, len(devices) - SHOWN_IDS))


class Recorder:
    def __init__(self, db: Database, forward: pipeline_acks.Forwarder | None = None, acks_topic: str | None = None):
        self._db = db
        self._forward = forward
        self._acks_topic = acks_topic
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.batches = 0
        self.on_commit: list[Any] = []  # callables() run after each commit
        self.failures = FailureEpisode(log, "recording outcomes and acks")

    async def result(self, result: deliveries.Result) -> None:
        await self._submit("result", result)

    async def results(self, results: list[deliveries.Result]) -> None:
        """Many results, one future (the dispatcher's results of one loop iteration): the
        same commit as :meth:`result`, without a future and a waiting coroutine per delivery."""
        if results:
            await self._submit("results", results)

    async def ack(self, device_id: str, ack: Ack) -> pipeline_acks.AckResult:
        return await self._submit("ack", (device_id, ack))

    async def acks(self, acks: list[tuple[str, Ack]]) -> list[pipeline_acks.AckResult]:
        """Many acks, one future (a bridge's batch of device acks): the same commit as
        :meth:`ack`; an ack that could not be stored alone comes back ``not_stored``."""
        if not acks:
            return []
        return await self._submit("acks", acks)

    async def register(self, device: Any, source: str) -> None:
        """Insert or update a device; returns once committed (then the sender may be acked)."""
        await self._submit("device", (device, source))

    async def remove(self, device_id: str) -> bool:
        """Remove a device; True if it existed. Returns once committed."""
        return await self._submit("remove", device_id)

    async def _submit(self, kind: str, payload: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(kind, payload, fut))
        return await fut

    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        """Runs until cancelled; a batch in progress is committed before cancellation lands."""
        while True:
            items = [await self._queue.get()]
            try:
                # One turn of the event loop before the batch is cut: what the callbacks and
                # tasks already due in this turn hand over joins it (the dispatcher's results
                # of a wave of sends and the acks those sends caused meet in one batch, where
                # a send and its first ack are written once: pipeline_acks.apply_batch).
                await asyncio.sleep(0)
            finally:  # also when cancelled there: the items taken are committed first
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
        results: list[deliveries.Result] = []
        for i in items:
            if i.kind == "result":
                results.append(i.payload)
            elif i.kind == "results":
                results += i.payload
        acks: list[tuple[str, Ack]] = []
        for i in items:
            if i.kind == "ack":
                acks.append(i.payload)
            elif i.kind == "acks":
                acks += i.payload
        registry = [i for i in items if i.kind in ("device", "remove")]
        forward, topic = self._forward, self._acks_topic

        def work(conn: Any) -> tuple[list[pipeline_acks.AckResult], list[Any]]:
            now = clock.now()
            # Registrations first, in arrival order (a device registered and acked in the
            # same batch is known to the ack), in the batch's transaction, so a burst of
            # registrations costs one fsync per batch. Each run of registrations between
            # removals is one pipeline_registry.upsert_devices (a SELECT per 500, one executemany).
            changed: list[Any] = []
            run: list[tuple[Any, str]] = []
            for i in registry:
                if i.kind == "device":
                    run.append(i.payload)
                    changed.append(None)
                    continue
                if run:
                    pipeline_registry.upsert_devices(conn, run, now)
                    run = []
                changed.append(pipeline_registry.remove_device(conn, i.payload))
            if run:
                pipeline_registry.upsert_devices(conn, run, now)
            return pipeline_acks.apply_batch(conn, results, acks, now, forward, topic), changed

        try:
            ack_results, changed = await self._db.run(work)
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
        if registry:
            _log_registered(registry)
        ack_at = 0
        changed_iter = iter(changed)
        for item in items:
            ack_result = None
            if item.kind == "ack":
                ack_result = ack_results[ack_at]
                ack_at += 1
            elif item.kind == "acks":
                got = ack_results[ack_at:ack_at + len(item.payload)]
                ack_at += len(item.payload)
                if not item.future.done():
                    item.future.set_result(got)
                continue
            registered = next(changed_iter) if item.kind in ("device", "remove") else None
            if item.future.done():  # its waiter was cancelled
                continue
            if item.kind == "remove":
                item.future.set_result(registered)
            elif ack_result is None:
                item.future.set_result(None)
            elif ack_result.not_stored:
                item.future.set_exception(NotStored(ack_result.reason))
            else:
                item.future.set_result(ack_result)
        for callback in self.on_commit:
            callback()
