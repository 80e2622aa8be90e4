"""Retention: finished jobs (completed, acknowledged, rejected), their deliveries and acks
are deleted ``[storage] retention_days`` after their last change, and their retained
status topics cleared.

A site box runs for years on flash: without this the tables and the broker's retained
store grow for ever. Pruning runs off the hot path: a pass every few minutes (sooner for
a short retention), in small transactions (``BATCH_ROWS`` rows each) with a yield in
between, so it never holds the writer for long. The empty retained payload that clears
``P/jobs/<id>/status`` is owed in SQLite (``status_clears``) and published by the status
publisher, also later if the broker is away now.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

import structlog

from gateway import clock
from gateway.pipeline import acks, deliveries, jobs
from gateway.storage import Database, FailureEpisode, is_storage_error

log = structlog.get_logger(__name__)

BATCH_ROWS = 2000
MAX_INTERVAL_S = 300.0


class Pruner:
    def __init__(self, db: Database, retention_days: float, on_pruned: Callable[[], None]):
        self.db = db
        self.retention_s = retention_days * 86400.0
        self.on_pruned = on_pruned
        # A pass every quarter of the retention (at least 1 s apart, at most 5 minutes).
        self.interval = min(MAX_INTERVAL_S, max(1.0, self.retention_s / 4))
        self.pruned = 0
        self.failures = FailureEpisode(log, "pruning old jobs")

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            # First pass one interval after the start: the start itself is busy enough.
            try:
                await asyncio.wait_for(stopping.wait(), self.interval)
            except TimeoutError:
                pass
            if stopping.is_set():
                break
            try:
                await self.prune_all(stopping)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                self.failures.note(exc)
            else:
                self.failures.ok()

    async def prune_all(self, stopping: asyncio.Event | None = None) -> int:
        total = 0
        while stopping is None or not stopping.is_set():
            now = clock.now()
            cutoff = now - self.retention_s
            job_ids = await self.db.run(lambda conn: prune(conn, cutoff, now, BATCH_ROWS))
            if job_ids:
                total += len(job_ids)
                self.on_pruned()
            more = await self.db.run(lambda conn: bool(jobs.finished_before(conn, cutoff, 1)))
            if not more:
                break
            await asyncio.sleep(0.05)  # let the hot path have the writer
        if total:
            self.pruned += total
            log.info("pruned finished jobs", jobs=total, retention_days=round(self.retention_s / 86400, 6))
        return total


def prune(conn: sqlite3.Connection, cutoff: float, now: float, max_rows: int = 2000) -> list[str]:
    """Delete finished jobs last changed before ``cutoff`` with their deliveries and acks,
    touching about ``max_rows`` rows (one small transaction; a big job takes several).
    Returns the job_ids whose job row went: their retained status is now owed a clear
    (``status_clears``), published by the status publisher."""
    pruned: list[str] = []
    budget = max_rows
    with deliveries.DeliveryWriter(conn, now) as writer:
        for job_id in jobs.finished_before(conn, cutoff):
            if budget <= 0:
                break
            ids = deliveries.of_job(conn, job_id, budget)
            acks.delete_of(conn, ids)
            writer.delete(ids)
            if len(ids) >= budget:
                break  # more rows of this job next time
            budget -= len(ids) + 1
            jobs.delete_job(conn, job_id, now)
            pruned.append(job_id)
    if pruned:
        from gateway.pipeline import reach

        reach.delete_of_jobs(conn, pruned)  # who of a people job was reached goes with it
        jobs.bump(conn, "jobs_pruned", len(pruned))
    return pruned
