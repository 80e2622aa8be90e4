"""Jobs and acks as they arrive from the network (contract §6, §9).

Pydantic models at the edge: unknown fields are errors, ``data`` values must be
strings, and every error is turned into one message that names the field, e.g.
``notification.tll: unknown field``. Both job shapes are accepted: the contract's and
the older orchestrator's ``push_notification`` shape.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator, model_validator

from devices.models import DEVICE_ID_RE, Device, app_problems
from gateway.ids import is_id, not_dot_segment
from gateway.timeutil import iso, parse_iso, utcnow

MAX_JOB_BYTES = 256 * 1024
MAX_ACK_BYTES = 16 * 1024
MAX_DEVICE_BYTES = 64 * 1024
# Ids become one MQTT topic level and one URL path segment: check them with fullmatch
# (``$`` also matches before a trailing newline, so ``re.match`` lets "id\n" through).
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# How deep a decoded document may nest (objects and arrays). json.loads itself stops only
# at the interpreter's recursion limit, and whatever reads the value later (the model, a
# bridge merging platform options, json.dumps) would each need that much stack again.
MAX_JSON_DEPTH = 32
MAX_OPTIONS_DEPTH = 16  # within one platform's options (options.apns, ...)
MAX_TTL = 28 * 24 * 3600  # FCM's and WNS's own ceiling


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem of one field, as data: ``field`` is its dotted path (``""`` = the input as
    a whole), ``message`` the API's words for it, field included (``"notification.ttl: ..."``).
    The operator page shows each next to its control without parsing the joined message."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class InputError(ValueError):
    """Input that cannot be accepted; ``code`` is machine-readable, ``message`` names the field,
    ``fields`` holds the same problems one per field (the message is their join)."""

    def __init__(self, code: str, message: str, fields: Sequence[FieldError] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields: tuple[FieldError, ...] = tuple(fields) if fields else (FieldError("", message),)

    @classmethod
    def at(cls, code: str, field: str, text: str) -> "InputError":
        """One problem of one field: the message is ``"<field>: <text>"``."""
        message = f"{field}: {text}"
        return cls(code, message, [FieldError(field, message)])

    @classmethod
    def from_validation(cls, code: str, exc: ValidationError, prefix: str = "") -> "InputError":
        fields = field_error_list(exc, prefix)
        return cls(code, "; ".join(f.message for f in fields), fields)

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DeviceId = Annotated[StrictStr, Field(pattern=DEVICE_ID_RE.pattern), AfterValidator(not_dot_segment)]
JobId = Annotated[StrictStr, Field(pattern=JOB_ID_RE.pattern), AfterValidator(not_dot_segment)]


PERSON_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # gateway.people.model's (contract §12)
PersonId = Annotated[StrictStr, Field(pattern=PERSON_ID_RE.pattern), AfterValidator(not_dot_segment)]
MAX_PEOPLE = 1000  # persons of one job: each is reached device by device


class Target(_Strict):
    devices: Annotated[list[DeviceId], Field(min_length=1, max_length=100_000)] | None = None
    segment: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    all: StrictBool | None = None
    people: Annotated[list[PersonId], Field(min_length=1, max_length=MAX_PEOPLE)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Target":
        given = [k for k in ("devices", "segment", "all", "people") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of devices, segment, all or people is required")
        if self.all is False:
            raise ValueError("all must be true when given")
        return self

    def as_json(self) -> dict[str, Any]:
        if self.devices is not None:
            # de-duplicated, sorted: expansion pages through it by device_id
            return {"devices": sorted(set(self.devices))}
        if self.segment is not None:
            return {"segment": self.segment}
        if self.people is not None:
            # de-duplicated, sorted: expansion pages through it by person_id
            return {"people": sorted(set(self.people))}
        return {"all": True}


class NotificationIn(_Strict):
    title: Annotated[StrictStr, Field(max_length=1024)] | None = None
    body: Annotated[StrictStr, Field(max_length=4096)] | None = None
    data: dict[Annotated[StrictStr, Field(min_length=1, max_length=256)], StrictStr] = Field(default_factory=dict)
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    ttl: Annotated[StrictInt, Field(ge=0, le=MAX_TTL)] = 3600
    collapse_key: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> "NotificationIn":
        """A job without a title, a body or data notifies nothing: refuse it rather than
        wake every target with an empty message (a data-only job is valid, contract §6)."""
        if not self.title and not self.body and not self.data:
            raise ValueError("nothing to notify: give notification.title, notification.body or notification.data")
        return self


class MqttOptions(_Strict):
    qos: Literal[0, 1, 2] | None = None  # None: the bridge's [bridges.mqtt] qos


class Options(_Strict):
    # Platform-specific extras are passed through to that platform's bridge, which
    # merges them into its request; their inner shape is the platform's.
    apns: dict[str, Any] = Field(default_factory=dict)
    fcm: dict[str, Any] = Field(default_factory=dict)
    wns: dict[str, Any] = Field(default_factory=dict)
    webpush: dict[str, Any] = Field(default_factory=dict)
    mqtt: MqttOptions = Field(default_factory=MqttOptions)

    @field_validator("apns", "fcm", "wns", "webpush")
    @classmethod
    def _shallow(cls, v: dict[str, Any]) -> dict[str, Any]:
        if json_depth(v) > MAX_OPTIONS_DEPTH:
            raise ValueError(f"nested deeper than {MAX_OPTIONS_DEPTH} levels")
        return v


class JobIn(_Strict):
    job_id: JobId | None = None
    target: Target
    notification: NotificationIn
    options: Options = Field(default_factory=Options)


class LegacyPush(_Strict):
    config_url: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    version: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    priority: Literal["low", "normal", "high", "critical"] = "normal"


class LegacyJobIn(_Strict):
    """The older orchestrator's shape (contract §6)."""

    job_id: JobId | None = None
    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    push_notification: LegacyPush
    target: Target

    def to_job(self) -> JobIn:
        push = self.push_notification
        return JobIn(
            job_id=self.job_id, target=self.target,
            notification=NotificationIn(
                title=f"Configuration update {push.version}",
                data={"config_url": push.config_url, "config_version": push.version},
                priority=push.priority),
        )


@dataclass(frozen=True)
class ParsedJob:
    job_id: str
    job: JobIn
    generated_id: bool


def field_errors(exc: ValidationError, prefix: str = "") -> str:
    """The message naming each field (the first five), ``"a.b: x; c: y"``."""
    return "; ".join(f.message for f in field_error_list(exc, prefix))


def field_error_list(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "model-"))))
        loc = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "job")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(FieldError(loc, f"{loc}: {msg}"))
    return parts


def decode_json_object(payload: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(payload) > limit:
        raise InputError.at("too_large", what, f"{len(payload)} bytes is over the {limit} byte limit")
    try:
        obj = json.loads(payload)
    except Exception as exc:  # noqa: BLE001 - whatever the parser refuses is the input's fault
        raise InputError.at("invalid_json", what, f"not valid JSON ({_why_not_json(exc)})") from None
    if not isinstance(obj, dict):
        raise InputError.at("invalid_json", what, "must be a JSON object")
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise InputError.at("invalid_json", what, f"nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _why_not_json(exc: Exception) -> str:
    """A short reason: the parser's own words are long (the digit limit's names a
    function to call) or absent."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 at byte {exc.start}"
    if isinstance(exc, ValueError) and "digits" in str(exc):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return exc.__class__.__name__


def json_depth(value: Any) -> int:
    """How deep ``value`` nests (a scalar is 0, ``{}`` and ``[]`` are 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def readable_job_id(obj: dict[str, Any]) -> str | None:
    """The job_id if the object carries a valid one (for addressing a rejection)."""
    job_id = obj.get("job_id")
    return job_id if is_id(JOB_ID_RE, job_id) else None


def parse_job(obj: dict[str, Any]) -> ParsedJob:
    try:
        if "push_notification" in obj:
            job = LegacyJobIn.model_validate(obj).to_job()
        else:
            job = JobIn.model_validate(obj)
    except ValidationError as exc:
        raise InputError.from_validation("invalid_job", exc) from None
    if job.job_id is None:
        return ParsedJob(str(uuid.uuid4()), job, True)
    return ParsedJob(job.job_id, job, False)


class AckIn(_Strict):
    message_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    status: Literal["received", "displayed", "opened", "dismissed", "failed"]
    at: datetime = Field(default_factory=utcnow)  # absent = when the gateway got it (contract §9)
    error: Annotated[StrictStr, Field(max_length=1024)] | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, v: Any) -> datetime:
        if not isinstance(v, str):
            raise ValueError("must be an ISO-8601 time string")
        try:
            return parse_iso(v)
        except ValueError:
            raise ValueError("not an ISO-8601 time") from None

    @field_validator("message_id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        return v.lower()


class AckVia(StrEnum):
    """How an ack reached the gateway. Only the MQTT channel proves which account sent it (a
    device account may publish on its own ack topic only); a signed ack URL proves only that
    its sender holds the URL."""

    MQTT = "mqtt"  # P/devices/<id>/ack
    ACK_URL = "ack-url"  # POST /v1/acks/<message_id>?sig=
    SIMULATION = "simulation"  # the simulation bridge's in-process devices
    ME = "me"  # POST /v1/me/inbox/<message_id>/open: the person the delivery's device belongs to


@dataclass(slots=True)
class Ack:
    """A validated ack, as :func:`parse_ack` gives it to the pipeline."""

    message_id: str  # lowercase
    status: str
    at: datetime  # aware, UTC
    error: str | None
    at_text: str  # ``at`` as stored and forwarded (gateway.timeutil.iso: UTC, ms, "Z")
    via: str = AckVia.MQTT  # the channel it came by (stored with it; names who acknowledged an alarm)

    @classmethod
    def of(cls, model: AckIn) -> "Ack":
        return cls(model.message_id, model.status, model.at, model.error, iso(model.at))


_ACK_KEYS = frozenset(AckIn.model_fields)
_ACK_STATUSES = frozenset(("received", "displayed", "opened", "dismissed", "failed"))
_CANONICAL_AT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def parse_ack(payload: bytes) -> Ack:
    """Validate an ack (contract §9) with :class:`AckIn`'s rules. An ack that plainly has
    the contract's shape (known keys only, plain strings within their limits, a status of
    the list, a readable ``at``) is checked here without running the model: the same
    checks, written out, at a fraction of the cost (an ack per delivery, 100,000 in a
    fan-out); an ``at`` already written as the gateway writes times is kept as it came.
    Anything else goes through the model, which gives the error that names the field;
    both paths give the same result (tests/pipeline/test_ack_parse.py)."""
    obj = decode_json_object(payload, MAX_ACK_BYTES, "ack")
    mid, status, at, error = obj.get("message_id"), obj.get("status"), obj.get("at"), obj.get("error")
    if (type(mid) is str and 0 < len(mid) <= 64 and type(status) is str and status in _ACK_STATUSES
            and type(at) is str and (error is None or (type(error) is str and len(error) <= 1024))
            and _ACK_KEYS.issuperset(obj)):
        try:
            when = parse_iso(at)
        except ValueError:
            pass  # the model says why
        else:
            return Ack(mid.lower(), status, when, error, at if _CANONICAL_AT.fullmatch(at) else iso(when))
    try:
        return Ack.of(AckIn.model_validate(obj))
    except ValidationError as exc:
        raise InputError.from_validation("invalid_ack", exc) from None


def parse_device(payload: bytes, topic_device_id: str | None = None,
                 apps: Mapping[str, Collection[str]] | None = None) -> Device:
    """Validate a Device (contract §7). A payload within the size limit is first given
    to the model as JSON (``model_validate_json``: pydantic-core parses and validates in
    one pass, about half the cost of ``json.loads`` and ``model_validate``; a
    registration burst is thousands a second). Whatever that refuses (invalid JSON in
    any form, a wrong field) is judged again the usual way, which gives the error that
    names the field; both paths give the same device or the same error
    (tests/pipeline/test_registration_parse.py). With ``apps`` (platform → the names of its
    ``[bridges.<platform>.apps]``), a channel naming another app is refused by its field."""
    device: Device | None = None
    if len(payload) <= MAX_DEVICE_BYTES:
        try:
            device = Device.model_validate_json(payload)
        except (ValueError, RecursionError):  # ValidationError is a ValueError
            pass
    if device is None:
        obj = decode_json_object(payload, MAX_DEVICE_BYTES, "device")
        try:
            device = Device.model_validate(obj)
        except ValidationError as exc:
            raise InputError.from_validation("invalid_device", exc) from None
    if topic_device_id is not None and device.device_id != topic_device_id:
        raise InputError.at("invalid_device", "device_id",
                            f"{device.device_id!r} does not match the topic's {topic_device_id!r}")
    if apps is not None:
        unknown = app_problems(device, apps)
        if unknown:
            raise InputError("invalid_device", "; ".join(f"{f}: {m}" for f, m in unknown),
                             [FieldError(f, f"{f}: {m}") for f, m in unknown])
    return device
