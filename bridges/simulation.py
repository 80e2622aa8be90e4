"""An in-process fleet of fake devices, for demos, tests and benchmarks.

Each delivery "reaches" its device after ``latency_ms``; a seeded fault mix answers
some deliveries like a real platform would (invalid address, throttled with
Retry-After, transient server error), and with ``ack = true`` the device acks through
the same path as an MQTT ack. No network: 100,000 devices cost only memory and CPU.

A simulated device behaves like an MQTT client whose ack got no PUBACK: when the
gateway cannot store the ack (disk full, ``NotStored``) it sends it again later, until
it is stored or the bridge closes.
"""

from __future__ import annotations

import asyncio
import json
import random

import structlog

from bridges.base import Bridge, BridgeContext, Delivery, Outcome
from gateway.config import SimulationBridge
from gateway.storage import is_storage_error
from gateway.timeutil import iso, utcnow

log = structlog.get_logger(__name__)


class SimulatedFleet(Bridge):
    platform = "simulation"

    def __init__(self, section: SimulationBridge, ctx: BridgeContext):
        self.cfg = section
        self.ctx = ctx
        self.rng = random.Random(section.seed)
        self._ack_tasks: set[asyncio.Task[None]] = set()
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
        if self.cfg.ack and self.ctx.on_ack is not None:
            task = asyncio.create_task(self._ack(delivery))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)
        return Outcome.accepted(status=200)

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
        if self._ack_tasks:
            _, pending = await asyncio.wait(set(self._ack_tasks), timeout=2)
            for task in pending:
                task.cancel()


def build(section: SimulationBridge, ctx: BridgeContext) -> Bridge:
    return SimulatedFleet(section, ctx)
