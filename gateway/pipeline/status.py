"""Job status out: retained ``P/jobs/<id>/status``, at most once a second per job plus the
final one, locally and (with an upstream link) to the cloud.

What is owed is a flag on the job row, set in the same transaction as the change it
reports: ``status_dirty`` for the local broker, ``cloud_dirty`` for the cloud. This
publisher's pass turns the flags into messages. The cloud's copy is put into the
upstream outbox by the pass itself, in one transaction with clearing its flag, whatever
the local broker does: so a status change reaches the cloud while the local broker is
unreachable, survives a crash (the flag is durable), and keeps the 1/s throttle (a flag
per change, not a message per change: 10,000 acks do not queue 10,000 snapshots).

The pass also writes the job lifecycle to the log (accepted, rejected, completed,
acknowledged; a job that matched no device is a warning), and publishes the empty
retained payloads that clear the status topics of pruned jobs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog

from gateway import clock
from gateway.mqtt import GatewayClient, NotConnected
from gateway.pipeline import acks, jobs
from gateway.storage import Database, FailureEpisode, NotStored, is_storage_error
from gateway.states import FINAL_JOB_STATES, JobState
from gateway.topics import Topics

log = structlog.get_logger(__name__)

THROTTLE_S = 1.0
LOGGED_STATES = frozenset({JobState.ACCEPTED, *FINAL_JOB_STATES})


def _due(row: Any, published_at: str, published_state: str, now: float, force: bool) -> bool:
    return (force or now - row[published_at] >= THROTTLE_S
            or (row["state"] in FINAL_JOB_STATES and row["state"] != row[published_state]))


class StatusPublisher:
    def __init__(self, db: Database, client: GatewayClient, topics: Topics,
                 forward: acks.Forwarder | None = None, tick: float = 0.2):
        self.db = db
        self.client = client
        self.topics = topics
        self.forward = forward
        self.tick = tick
        self.wake = asyncio.Event()
        self.published = 0
        self.cleared = 0
        self.clears_owed = True  # look at start; then when the pruner says it pruned (see clears_due)
        self.failures = FailureEpisode(log, "publishing job status")

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            try:
                await self.publish_due()
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                delay = self.failures.failed(exc)
            else:
                self.failures.ok()
                delay = self.tick
            try:
                await asyncio.wait_for(self.wake.wait(), delay)
            except TimeoutError:
                pass
            await asyncio.sleep(0)  # let a burst of wake-ups coalesce

    async def publish_due(self, force: bool = False) -> int:
        now = clock.now()
        forward = self.forward
        where = "status_dirty = 1 OR cloud_dirty = 1" if forward is not None else "status_dirty = 1"

        def take(conn: Any) -> list[Any]:
            """Read what is owed; queue the cloud's copies and log lifecycle changes, in one
            transaction (the local publish comes after, and may fail on its own)."""
            rows = conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY status_published_at LIMIT 500").fetchall()
            for row in rows:
                if forward is not None and row["cloud_dirty"] and _due(row, "cloud_published_at",
                                                                      "cloud_published_state", now, force):
                    payload = json.dumps(jobs.status_from_row(row)).encode()
                    conn.execute("SAVEPOINT cloud")
                    try:
                        forward.enqueue(conn, "status", self.topics.job_status(row["job_id"]), payload, True,
                                        row["job_id"])
                    except NotStored:  # the outbox refuses it now: stays owed, local publishing goes on
                        conn.execute("ROLLBACK TO cloud")
                        conn.execute("RELEASE cloud")
                    else:
                        conn.execute("RELEASE cloud")
                        conn.execute("UPDATE jobs SET cloud_published_at = ?, cloud_published_state = ?, "
                                     "cloud_dirty = CASE WHEN updated_at = ? THEN 0 ELSE 1 END WHERE job_id = ?",
                                     (now, row["state"], row["updated_at"], row["job_id"]))
                if _loggable(row):
                    conn.execute("UPDATE jobs SET logged_state = ? WHERE job_id = ?",
                                 (_logged_as(row), row["job_id"]))
            return rows

        rows = await self.db.run(take)
        for row in rows:
            if _loggable(row):
                _log_lifecycle(row)
        count = 0
        for row in rows:
            if not row["status_dirty"] or not _due(row, "status_published_at", "status_published_state", now, force):
                continue
            status = jobs.status_from_row(row)
            payload = json.dumps(status).encode()
            topic = self.topics.job_status(row["job_id"])
            try:
                await self.client.publish(topic, payload, qos=1, retain=True)
            except NotConnected:
                return count  # stays dirty; published when the broker is back
            updated_at = row["updated_at"]

            def done(conn: Any, job_id: str = row["job_id"], state: str = row["state"], u: float = updated_at) -> None:
                # Only clear the flag if nothing changed since we read the row.
                conn.execute("UPDATE jobs SET status_published_at = ?, status_published_state = ?, "
                             "status_dirty = CASE WHEN updated_at = ? THEN 0 ELSE 1 END"
                             + ("" if forward is not None else ", cloud_dirty = 0") + " WHERE job_id = ?",
                             (clock.now(), state, u, job_id))

            await self.db.run(done)
            count += 1
            self.published += 1
        await self._publish_clears()
        return count

    def clears_due(self) -> None:
        """The pruner deleted jobs: their retained status topics are owed a clear."""
        self.clears_owed = True
        self.wake.set()

    async def _publish_clears(self) -> None:
        """Empty retained payloads for pruned jobs (retention); owed in SQLite until sent."""
        if not self.clears_owed:
            return
        job_ids = await self.db.run(jobs.owed_clears)
        if not job_ids:
            self.clears_owed = False
            return
        sent: list[str] = []
        try:
            for job_id in job_ids:
                await self.client.publish(self.topics.job_status(job_id), b"", qos=1, retain=True)
                sent.append(job_id)
        except NotConnected:
            pass  # still owed (in SQLite, and clears_owed stays set)
        finally:
            if sent:
                await self.db.run(lambda conn: jobs.clears_done(conn, sent))
                self.cleared += len(sent)


def _logged_as(row: Any) -> str:
    return row["state"] if row["state"] in LOGGED_STATES else JobState.ACCEPTED


def _loggable(row: Any) -> bool:
    return row["logged_state"] != _logged_as(row) and not (
        row["logged_state"] is not None and _logged_as(row) == JobState.ACCEPTED)


def _log_lifecycle(row: Any) -> None:
    """One info line per lifecycle step (accepted with its target count, then the final
    state with the counts); a job that matched no device is a warning."""
    status = jobs.status_from_row(row)
    state, counts, error = status["state"], status["counts"], status["error"]
    if row["logged_state"] is None and state != JobState.REJECTED:
        log.info("job accepted", job_id=row["job_id"], source=row["source"], targets=counts["targets"])
    if state == JobState.REJECTED:
        log.info("job rejected", job_id=row["job_id"], source=row["source"], code=error and error["code"],
                 error=error and error["message"])
    elif state in FINAL_JOB_STATES:
        if error and error.get("code") == "no_targets":
            log.warning("job matched no device", job_id=row["job_id"], error=error["message"])
        log.info(f"job {state}", job_id=row["job_id"], **counts)


async def publish_error(client: GatewayClient, topics: Topics, topic: str, code: str, message: str) -> None:
    payload = json.dumps({"topic": topic, "error": {"code": code, "message": message}}).encode()
    await client.publish(topics.gateway_errors, payload, qos=1, retain=False)
