"""An in-process fleet of fake devices, for demos, tests and benchmarks.

Each delivery "reaches" its device after ``latency_ms``; a seeded fault mix answers
some deliveries like a real platform would (invalid address, throttled with
Retry-After, transient server error), and with ``ack = true`` the device acks through
the same path as an MQTT ack. No network: 100,000 devices cost only memory and CPU.

A simulated device behaves like an MQTT client whose ack got no PUBACK: when the
gateway cannot store the ack (disk full, ``NotStored``) it sends it again later, until
it is stored or the bridge closes.

Acks go out in batches: due acks wait in one queue and a single task hands all that are
due to the daemon at once (``on_acks``: one recorder item, one commit, each ack parsed
and stored exactly like an MQTT ack). A task and a future per ack cost more than the
ack's share of the commit; 100,000 devices acking within a second is the point of the
simulation.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque

import structlog

from bridges.base import Bridge, BridgeContext, Delivery, Outcome
from gateway.config import SimulationBridge
from gateway.secret_files import Problems
from gateway.storage import is_storage_error
from gateway.timeutil import iso, utcnow

log = structlog.get_logger(__name__)


_ACCEPTED = Outcome.accepted(status=200)  # immutable: one for every accepted delivery


class SimulatedFleet(Bridge):
    platform = "simulation"
    default_max_in_flight = 500

    def __init__(self, section: SimulationBridge, ctx: BridgeContext):
        self.cfg = section
        self.ctx = ctx
        self.rng = random.Random(section.seed)
        self._ack_tasks: set[asyncio.Task[None]] = set()
        # (due monotonic time, retry delay, device_id, Ack JSON), in due order
        self._due_acks: deque[tuple[float, float, str, bytes]] = deque()
        self._ack_flusher: asyncio.Task[None] | None = None
        self.received: int = 0
        self.ack_retries: int = 0

    def _fault(self, delivery: Delivery) -> Outcome | None:
        c = self.cfg
        if delivery.attempt <= c.transient_attempts:
            return Outcome.retry("simulated 503", retry_after=c.retry_after_s, status=503)
        roll = self.rng.random()
        if roll < c.invalid_rate:
            return Outcome.invalid_address("simulated Unregistered", status=410)
        roll -= c.invalid_rate
        if roll < c.throttle_rate:
            return Outcome.retry("simulated 429", retry_after=c.retry_after_s, status=429)
        roll -= c.throttle_rate
        if roll < c.fail_rate:
            return Outcome.retry("simulated 503", status=503)
        return None

    async def send(self, delivery: Delivery) -> Outcome:
        if self.cfg.latency_ms:
            await asyncio.sleep(self.cfg.latency_ms / 1000)
        fault = self._fault(delivery)
        if fault is not None:
            return fault
        self.received += 1
        if self.cfg.ack and self.ctx.on_acks is not None:
            self._queue_ack(delivery)
        elif self.cfg.ack and self.ctx.on_ack is not None:
            task = asyncio.create_task(self._ack(delivery))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
        return _ACCEPTED

    def _queue_ack(self, delivery: Delivery) -> None:
        # The device's side of the bench: in a real fleet this runs on the device, here its
        # CPU is charged to the daemon, so it is kept small: the ack's JSON written out (the
        # message_id JSON-escaped as json.dumps would) and the device's clock as the gateway
        # writes times.
        at = iso(utcnow())
        payload = f'{{"message_id": {json.dumps(delivery.message_id)}, "status": "received", "at": "{at}"}}'.encode()
        self._due_acks.append((time.monotonic() + self.cfg.latency_ms / 1000, 0.2, delivery.device_id, payload))
        if self._ack_flusher is None or self._ack_flusher.done():
            self._ack_flusher = asyncio.create_task(self._flush_acks())

    async def _flush_acks(self) -> None:
        """Hand every due ack to the daemon in one call; those not stored come back later
        (doubling delay), as a device without a PUBACK would send them again."""
        assert self.ctx.on_acks is not None
        due = self._due_acks
        while due:
            wait = due[0][0] - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            batch = []
            while due and due[0][0] <= now and len(batch) < 1000:
                batch.append(due.popleft())
            try:
                stored = await self.ctx.on_acks([(device_id, payload) for _, _, device_id, payload in batch])
            except Exception as exc:
                if not is_storage_error(exc):
                    log.exception("simulated acks failed", acks=len(batch))
                    continue
                stored = [False] * len(batch)
            retry = [(now + delay, min(delay * 2, 5.0), device_id, payload)
                     for (_, delay, device_id, payload), ok in zip(batch, stored) if not ok]
            if retry:
                self.ack_retries += len(retry)
                # Not stored (no "PUBACK"): tried again after the delay, in due order.
                merged = sorted([*due, *retry], key=lambda item: item[0])
                due.clear()
                due.extend(merged)

    async def _ack(self, delivery: Delivery) -> None:
        if self.cfg.latency_ms:
            await asyncio.sleep(self.cfg.latency_ms / 1000)
        payload = json.dumps({"message_id": delivery.message_id, "status": "received", "at": iso(utcnow())}).encode()
        assert self.ctx.on_ack is not None
        delay = 0.2
        while True:
            try:
                await self.ctx.on_ack(delivery.device_id, payload)
                return
            except Exception as exc:
                if not is_storage_error(exc):
                    log.exception("simulated ack failed", message_id=delivery.message_id)
                    return
                self.ack_retries += 1  # not stored (not "PUBACKed"): the device tries again
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        tasks = set(self._ack_tasks)
        if self._ack_flusher is not None and not self._ack_flusher.done():
            tasks.add(self._ack_flusher)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()


def load_secrets(section: SimulationBridge, problems: Problems, key: str = "") -> None:
    """A simulated fleet needs no secret."""
    return None


def build(section: SimulationBridge, ctx: BridgeContext, secrets: None = None, key: str = "") -> Bridge:
    return SimulatedFleet(section, ctx)
