"""The pipeline as a daemon service: wires intake, expander, dispatcher, recorder,
status publisher, pruner and bridges together, and stops them in the right order.

Stopping fits a fixed budget (about 5 s of the daemon's 10) whatever hangs: sends still
running after DRAIN_S are cancelled (their deliveries stay queued and go out after the
restart), the last commit and the final status publish get a second each, and bridges
half a second to close."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from bridges.base import Bridge, BridgeConfigError, BridgeContext
from bridges.registry import app_names, build_bridges, platform_of
from devices.models import split_bridge_key
from gateway import clock
from gateway.config import Config, Secrets
from gateway.mqtt import GatewayClient
from gateway.pipeline import acks as pipeline_acks
from gateway.people.gate import PeopleGate
from gateway.pipeline.dispatcher import Dispatcher, Expander
from gateway.pipeline.intake import Intake
from gateway.pipeline.models import AckVia
from gateway.pipeline.recorder import Recorder
from gateway.pipeline.retention import Pruner
from gateway.pipeline.status import StatusPublisher
from gateway.storage import Database
from gateway.topics import Topics

log = structlog.get_logger(__name__)

DRAIN_S = 2.0  # in-flight sends may finish
FLUSH_S = 1.0  # the recorder's last commit
FINAL_STATUS_S = 1.0  # the final status publish
CLOSE_S = 0.5  # bridges close (in parallel)


class Pipeline:
    """Service ``pipeline``. Besides running, it is the entry point of the other services:
    jobs, registrations and acks from the HTTP API and the cloud link (the methods below
    ``intake API``), commit notifications (:meth:`on_commit`), bridge health
    (:meth:`bridge_health`) and wake-ups for jobs written straight to SQLite
    (:meth:`wake_for_new_jobs`). ``ack_url`` signs each delivery's ack URL (``[http]``)."""

    name = "pipeline"
    started: asyncio.Event | None = None  # serves once running; ``ready`` gates its inputs

    def __init__(self, cfg: Config, db: Database, forward: pipeline_acks.Forwarder | None = None,
                 ack_url: Callable[[str], str] | None = None, secrets: Secrets | None = None):
        self.cfg = cfg
        # Without loaded secrets only secret-less platforms (simulation, mqtt) can start;
        # the others refuse with a BridgeConfigError naming the key.
        self.secrets = secrets if secrets is not None else Secrets()
        self.db = db
        self.topics = Topics(cfg.prefix)
        self.forward = forward
        self.recorder = Recorder(db, forward, self.topics.acks)
        self.bridges: dict[str, Bridge] = {}
        self.ready = asyncio.Event()
        self.client: GatewayClient | None = None
        self.intake: Intake | None = None
        self.dispatcher: Dispatcher | None = None
        self.expander: Expander | None = None
        self.status: StatusPublisher | None = None
        self.pruner: Pruner | None = None
        self.ack_url = ack_url  # message_id → signed ack URL (with [http])

    # ----------------------------------------------------------------- set-up
    def attach(self, client: GatewayClient) -> None:
        self.client = client
        self.status = StatusPublisher(self.db, client, self.topics, self.forward)
        self.pruner = Pruner(self.db, self.cfg.storage.retention_days, self.status.clears_due)
        self.intake = Intake(self.db, client, self.topics, self.recorder, on_job=self._wake_expander,
                             on_status=self.status.wake.set, forward=self.forward, apps=app_names(self.cfg))
        client.route(self.topics.jobs, self._gate(self.intake.on_jobs_message), qos=1)
        client.route(self.topics.device_register(), self._gate(self.intake.on_register_message), qos=1)
        client.route(self.topics.device_ack(), self._gate(self.intake.on_ack_message), qos=1)
        ctx = BridgeContext(client=client, topics=self.topics, data_dir=self.cfg.data_dir,
                            on_ack=self._bridge_ack, on_acks=self._bridge_acks)
        self.bridges = build_bridges(self.cfg, self.secrets, ctx)
        self.expander = Expander(self.db, self.cfg.dispatch.batch_size, self._on_page, platforms=list(self.bridges),
                                 reach_after_s=self.cfg.people.reach_after_s)
        resend = {name for name in self.bridges if getattr(self.cfg.bridges, platform_of(name)).resend_unacked}
        self.people = PeopleGate(self.cfg.people.quiet_hours_default, self.cfg.people.reach_after_s)
        self.dispatcher = Dispatcher(self.cfg.dispatch, self.db, self.bridges, self.recorder, resend=resend,
                                     people=self.people)
        self.dispatcher.ack_url = self.ack_url

    def _gate(self, handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        """Messages that arrive before the schema exists wait for it."""
        async def gated(message: Any) -> None:
            await self.ready.wait()
            await handler(message)
        return gated

    def _wake_expander(self) -> None:
        if self.expander is not None:
            self.expander.wake.set()

    def _on_page(self) -> None:
        assert self.dispatcher is not None and self.status is not None
        self.dispatcher.new_rows()
        self.status.wake.set()

    async def _bridge_ack(self, device_id: str, payload: bytes) -> None:
        assert self.intake is not None
        # Only the simulation bridge acks in process (for its simulated devices).
        await self.intake.ack(device_id, payload, self.topics.device_ack(device_id), AckVia.SIMULATION)

    async def _bridge_acks(self, acks: list[tuple[str, bytes]]) -> list[bool]:
        """A bridge's batch of device acks: one recorder item, one commit (see Intake.acks).
        Bad input counts as handled (True), as an MQTT broker would PUBACK it."""
        assert self.intake is not None
        results = await self.intake.acks([(d, p, self.topics.device_ack(d)) for d, p in acks], AckVia.SIMULATION)
        return [r is None or not r.not_stored for r in results]

    # ----------------------------------------------------------------- intake API (upstream link)
    async def submit_job(self, payload: bytes, source: str) -> str | None:
        await self.ready.wait()
        assert self.intake is not None
        return await self.intake.submit_job(payload, source)

    async def register_device(self, device_id: str, payload: bytes, source: str) -> bool:
        await self.ready.wait()
        assert self.intake is not None
        return await self.intake.register_device(device_id, payload, source)

    async def ack(self, device_id: str, payload: bytes, source: str, via: AckVia) -> pipeline_acks.AckResult | None:
        """One device ack from outside MQTT (the HTTP ack URL), stored with the channel it
        came by; None if it is bad input."""
        await self.ready.wait()
        assert self.intake is not None
        return await self.intake.ack(device_id, payload, source, via)

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every commit of outcomes or acks (job statuses may have changed)."""
        self.recorder.on_commit.append(callback)

    def wake_for_new_jobs(self) -> None:
        """Jobs were written straight into SQLite (the alarms): expand and report them now
        instead of at the next poll."""
        if self.expander is not None:
            self.expander.wake.set()
        if self.status is not None:
            self.status.wake.set()

    def bridge_health(self) -> dict[str, dict[str, Any]]:
        """Per enabled bridge (a platform, or ``<platform>:<app>`` for each app of one): its
        platform and app, healthy (no pause episode running), pause reason, in flight, sent."""
        if self.dispatcher is None:
            return {}
        now = clock.now()  # paused_until is on the gateway's clock
        out: dict[str, dict[str, Any]] = {}
        for name, slot in self.dispatcher.slots.items():
            unhealthy = slot.unhealthy or slot.paused_until > now
            paused_for: float | None = 0.0
            if slot.paused_until > now:
                paused_for = None if slot.paused_until == float("inf") else round(slot.paused_until - now, 1)
            platform, app = split_bridge_key(name)
            out[name] = {"platform": platform, "app": app, "healthy": not unhealthy, "reason": (slot.pause_reason or None) if unhealthy else None,
                         "paused_for_s": paused_for, "in_flight": slot.in_flight, "sent": slot.sent,
                         "outcomes": dict(slot.outcomes)}
        return out

    # ----------------------------------------------------------------- run
    async def run(self, stopping: asyncio.Event) -> None:
        assert self.dispatcher and self.expander and self.status and self.pruner
        for name, bridge in list(self.bridges.items()):
            fault = self.secrets.bridge_faults.get(name)
            if fault is not None:
                log.error("bridge cannot start; its deliveries wait or fall over", platform=name, error=fault)
                self.dispatcher.pause(name, fault)
                continue
            try:
                await bridge.start()
            except BridgeConfigError as exc:
                # Its deliveries wait (as for an unhealthy bridge) instead of failing. The
                # pause is in memory only: fix the key, restart, and they go out.
                log.error("bridge cannot start; its deliveries wait", platform=name, error=str(exc))
                self.dispatcher.pause(name, str(exc))
        self.ready.set()
        self.status.wake.set()
        recorder_task = asyncio.create_task(self.recorder.run(), name="recorder")
        self.recorder.on_commit.append(self.status.wake.set)
        loops = [
            asyncio.create_task(self.expander.run(stopping), name="expander"),
            asyncio.create_task(self.dispatcher.run(stopping), name="dispatcher"),
            asyncio.create_task(self.status.run(stopping), name="status"),
            asyncio.create_task(self.pruner.run(stopping), name="pruner"),
        ]
        log.info("pipeline running", bridges=sorted(self.bridges))
        try:
            done, _ = await asyncio.wait([*loops, asyncio.ensure_future(stopping.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task in loops and task.exception():
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in loops:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self.dispatcher.drain(DRAIN_S)
            await _bounded(self._last_commit(recorder_task), FLUSH_S, "last commit incomplete; "
                           "unrecorded deliveries stay queued and go out again after the restart")
            # The flags stay set if this does not finish; published after the restart.
            await _bounded(self.status.publish_due(force=True), FINAL_STATUS_S, "final status publish incomplete")
            await _bounded(asyncio.gather(*(self._close(n, b) for n, b in self.bridges.items())), CLOSE_S,
                           "bridges did not close in time")

    async def _last_commit(self, recorder_task: asyncio.Task[None]) -> None:
        await self.recorder.flush()
        recorder_task.cancel()
        await asyncio.gather(recorder_task, return_exceptions=True)
        await self.recorder.flush()

    @staticmethod
    async def _close(name: str, bridge: Bridge) -> None:
        try:
            await bridge.close()
        except Exception as exc:
            log.warning("bridge close failed", platform=name, error=repr(exc))

    def metrics(self) -> dict[str, Any]:
        assert self.dispatcher is not None and self.intake is not None
        return {"bridges": self.dispatcher.metrics(), "recorder_batches": self.recorder.batches,
                "jobs_rejected": self.intake.rejected, "input_errors": self.intake.errors,
                "jobs_pruned": self.pruner.pruned if self.pruner else 0}


async def _bounded(aw: Any, timeout: float, warning: str) -> None:
    """Await with a deadline (shutdown must fit its budget); log once if it did not finish."""
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning(warning, timeout_s=timeout)
    except Exception as exc:
        log.warning(warning, error=repr(exc))
