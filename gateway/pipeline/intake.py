"""What comes in: jobs, device registrations and acks, from MQTT, the upstream link
and the CLI. Each is validated at the edge, committed to SQLite, and only then
acknowledged.

Two kinds of failure, kept apart: bad input (:class:`InputError`) is answered — a job
with a readable job_id is stored as ``rejected`` (its status is published like any
other, also later if the broker is away now), anything else gets ``P/gateway/errors`` —
and the handler returns, so the message is acknowledged. A storage failure (disk full,
database locked, ``NotStored``) propagates: the MQTT client then does not acknowledge
the message and the sender keeps it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import aiomqtt
import structlog

from gateway.ids import NOT_DOTS, is_id
from gateway.mqtt import GatewayClient, NotConnected
from gateway.pipeline import jobs
from gateway.pipeline import acks as pipeline_acks
from gateway.pipeline.models import (
    DEVICE_ID_RE,
    Ack,
    AckVia,
    MAX_JOB_BYTES,
    InputError,
    decode_json_object,
    parse_ack,
    parse_device,
    parse_job,
    readable_job_id,
)
from gateway.pipeline.recorder import Recorder
from gateway.pipeline.status import publish_error
from gateway.states import JobState
from gateway.storage import Database
from gateway.topics import Topics

log = structlog.get_logger(__name__)
# The same logger through the stdlib, for a level check that works whether or not
# structlog is configured (gateway.logs routes structlog through these loggers).
_stdlog = logging.getLogger(__name__)


class Intake:
    def __init__(self, db: Database, client: GatewayClient, topics: Topics, recorder: Recorder,
                 on_job: Callable[[], None], on_status: Callable[[], None],
                 forward: pipeline_acks.Forwarder | None = None, apps: Mapping[str, Collection[str]] | None = None):
        self.db = db
        # platform → its [bridges.<platform>.apps] names: a channel naming another is refused.
        self.apps = apps
        self.client = client
        self.topics = topics
        self.recorder = recorder
        self.on_job = on_job
        self.on_status = on_status
        self.forward = forward
        self.rejected = 0
        self.errors = 0

    # ----------------------------------------------------------------- jobs
    async def submit_job(self, payload: bytes, source: str, topic: str | None = None) -> str | None:
        """Validate and store a job; returns its job_id when accepted or already known."""
        topic = topic or self.topics.jobs
        job_id: str | None = None
        try:
            obj = decode_json_object(payload, MAX_JOB_BYTES, "job")
            job_id = readable_job_id(obj)
            if job_id is not None and await self._republish_if_known(job_id):
                return job_id
            parsed = parse_job(obj)
        except InputError as err:
            await self._reject(job_id, topic, source, err)
            return None
        inserted = await self.db.run(lambda conn: jobs.submit_job(conn, parsed, source))
        if not inserted:
            log.info("job already known; status re-published", job_id=parsed.job_id, source=source)
        # "job accepted" (with its target count) is logged by the status publisher's pass,
        # which also sees jobs that the CLI wrote.
        self.on_job()
        self.on_status()
        return parsed.job_id

    async def _republish_if_known(self, job_id: str) -> bool:
        """A known, accepted job_id: re-publish its status (idempotency). A *rejected* one
        is not final: the new payload is judged on its own, so a fixed typo can be sent again."""
        def known(conn: Any) -> bool:
            row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row["state"] == JobState.REJECTED:
                return False
            jobs.mark_dirty(conn, job_id)
            return True

        if await self.db.run(known):
            log.info("job already known; status re-published", job_id=job_id)
            self.on_status()
            return True
        return False

    async def _reject(self, job_id: str | None, topic: str, source: str, err: InputError) -> None:
        self.rejected += 1
        if job_id is not None:
            # Stored (state rejected, with its error) before the message is acknowledged;
            # the status publisher publishes it locally and queues it for the cloud.
            await self.db.run(lambda conn: jobs.reject_job(conn, job_id, source, err.code, err.message))
            self.on_status()
            return
        log.info("job rejected", code=err.code, error=err.message, source=source)
        try:
            await publish_error(self.client, self.topics, topic, err.code, err.message)
        except NotConnected:
            log.warning("could not publish error: broker unreachable", topic=topic, code=err.code)

    # ----------------------------------------------------------------- devices
    async def register_device(self, device_id: str, payload: bytes, source: str) -> bool:
        topic = self.topics.device_register(device_id)
        try:
            if not is_id(DEVICE_ID_RE, device_id):
                raise InputError.at("invalid_device", "device_id",
                                    f"{device_id!r} in the topic must match [A-Za-z0-9._:-]{{1,128}} {NOT_DOTS}")
            if not payload:
                removed = await self.recorder.remove(device_id)
                log.info("device removed" if removed else "device to remove was unknown", device_id=device_id)
                return removed
            device = parse_device(payload, device_id, self.apps)
        except InputError as err:
            await self._error(topic, err)
            return False
        await self.recorder.register(device, source)  # in the recorder's next batched commit
        # Per device at debug; at info the recorder logs one "devices registered" line per
        # commit: a burst of thousands a second would otherwise cost
        # ~25-60 us of the event loop per device and overrun journald's rate limit, which
        # then drops the gateway's other lines too.
        if _stdlog.isEnabledFor(logging.DEBUG):
            log.debug("device registered", device_id=device_id, source=source,
                      channels=[c.platform for c in device.channels])
        return True

    # ----------------------------------------------------------------- acks
    async def ack(self, device_id: str, payload: bytes, topic: str,
                  via: AckVia = AckVia.MQTT) -> pipeline_acks.AckResult | None:
        """``via``: the channel it came by, stored with it (who acknowledged an alarm)."""
        try:
            ack = parse_ack(payload)
        except InputError as err:
            await self._error(topic, err)
            return None
        ack.via = via
        result = await self.recorder.ack(device_id, ack)
        if not result.accepted:
            log.info("ack refused", device_id=device_id, message_id=ack.message_id, reason=result.reason)
        elif not result.repeat:  # a repeat changes no status
            self.on_status()
        return result

    async def acks(self, items: list[tuple[str, bytes, str]],
                   via: AckVia = AckVia.MQTT) -> list[pipeline_acks.AckResult | None]:
        """Many acks (device_id, payload, topic) in one recorder item: each parsed and
        stored exactly as :meth:`ack` does, committed before this returns. None for a
        payload refused as bad input (answered on the errors topic); an ack that could not
        be stored alone comes back ``not_stored``. A storage failure of the batch raises."""
        parsed: list[tuple[str, Ack]] = []
        where: list[int] = []
        out: list[pipeline_acks.AckResult | None] = [None] * len(items)
        for n, (device_id, payload, topic) in enumerate(items):
            try:
                ack = parse_ack(payload)
                ack.via = via
                parsed.append((device_id, ack))
                where.append(n)
            except InputError as err:
                await self._error(topic, err)
        results = await self.recorder.acks(parsed)
        stored = False
        for n, (device_id, ack), result in zip(where, parsed, results):
            out[n] = result
            if result.accepted and not result.repeat:
                stored = True
            elif not result.not_stored:
                log.info("ack refused", device_id=device_id, message_id=ack.message_id, reason=result.reason)
        if stored:
            self.on_status()
        return out

    async def _error(self, topic: str, err: InputError) -> None:
        self.errors += 1
        log.info("input refused", topic=topic, code=err.code, error=err.message)
        try:
            await publish_error(self.client, self.topics, topic, err.code, err.message)
        except NotConnected:
            pass

    # ----------------------------------------------------------------- MQTT handlers
    async def on_jobs_message(self, message: aiomqtt.Message) -> None:
        await self.submit_job(message.payload, "mqtt", message.topic.value)

    async def on_register_message(self, message: aiomqtt.Message) -> None:
        device_id = self.topics.device_id_of(message.topic.value) or ""
        await self.register_device(device_id, message.payload, "mqtt")

    async def on_ack_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        device_id = self.topics.device_id_of(topic) or ""
        await self.ack(device_id, message.payload, topic)


__all__ = ["Intake"]
