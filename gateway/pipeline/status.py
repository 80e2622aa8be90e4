"""Job status out: retained ``P/jobs/<id>/status``, at most once a second per job plus
the final one. What is owed is the ``status_dirty`` flag in SQLite, so a status that a
crash kept from going out is published after the restart."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog

from gateway.mqtt import GatewayClient, NotConnected
from gateway.pipeline import store
from gateway.storage import Database
from gateway.topics import Topics

log = structlog.get_logger(__name__)

THROTTLE_S = 1.0
FINAL_STATES = frozenset({"completed", "acknowledged"})


class StatusPublisher:
    def __init__(self, db: Database, client: GatewayClient, topics: Topics,
                 forward: store.Forwarder | None = None, tick: float = 0.2):
        self.db = db
        self.client = client
        self.topics = topics
        self.forward = forward
        self.tick = tick
        self.wake = asyncio.Event()
        self.published = 0

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.publish_due()
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), self.tick)
            except TimeoutError:
                pass
            await asyncio.sleep(0)  # let a burst of wake-ups coalesce

    async def publish_due(self, force: bool = False) -> int:
        now = time.time()

        def due(conn: Any) -> list[Any]:
            rows = conn.execute("SELECT * FROM jobs WHERE status_dirty = 1 LIMIT 500").fetchall()
            return [r for r in rows if force or now - r["status_published_at"] >= THROTTLE_S
                    or (r["state"] in FINAL_STATES and r["state"] != r["status_published_state"])]

        rows = await self.db.run(due)
        count = 0
        for row in rows:
            status = store.status_from_row(row)
            payload = json.dumps(status).encode()
            topic = self.topics.job_status(row["job_id"])
            try:
                await self.client.publish(topic, payload, qos=1, retain=True)
            except NotConnected:
                return count  # stays dirty; published when the broker is back
            updated_at = row["updated_at"]

            def done(conn: Any, job_id: str = row["job_id"], state: str = row["state"], t: str = topic,
                     p: bytes = payload, u: float = updated_at) -> None:
                # Only clear the flag if nothing changed since we read the row.
                conn.execute("UPDATE jobs SET status_published_at = ?, status_published_state = ?, "
                             "status_dirty = CASE WHEN updated_at = ? THEN 0 ELSE 1 END WHERE job_id = ?",
                             (time.time(), state, u, job_id))
                if self.forward is not None:
                    self.forward.enqueue(conn, "status", t, p, True, job_id)

            await self.db.run(done)
            count += 1
            self.published += 1
        return count


async def publish_rejection(client: GatewayClient, topics: Topics, job_id: str, code: str, message: str) -> None:
    payload = json.dumps(store.rejected_status(job_id, code, message)).encode()
    await client.publish(topics.job_status(job_id), payload, qos=1, retain=True)


async def publish_error(client: GatewayClient, topics: Topics, topic: str, code: str, message: str) -> None:
    payload = json.dumps({"topic": topic, "error": {"code": code, "message": message}}).encode()
    await client.publish(topics.gateway_errors, payload, qos=1, retain=False)
