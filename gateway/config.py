"""Configuration: ``config.toml`` validated against the contract (§4).

Every problem is reported as ``KEY: message`` with the dotted key, so an operator
can fix a file without reading a traceback.

The file's schema and what it points at are kept apart: the models here are frozen and
hold only what the file says; the secrets named by ``*_file`` keys are read once by
:func:`load_config` into a :class:`Secrets` (the broker and cloud passwords here, each push
platform's own by its ``load_secrets`` in ``bridges/<platform>.py``), held as
:class:`pydantic.SecretStr` and never logged. A reload builds a new pair.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.mqtt_url import MqttUrl as MqttUrl  # re-exported
from gateway.people.model import QuietWindow
from gateway.rule_schema import RuleSection, check_rules
from gateway.secret_files import Problems, given, read_secret, require_file

ENV_PREFIX = "HOMEPOT_"
CONFIG_ENV = "HOMEPOT_GATEWAY_CONFIG"
DEFAULT_PATHS = (Path("config.toml"), Path("/etc/homepot-gateway/config.toml"))

SITE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConfigError(Exception):
    """Invalid configuration; ``problems`` holds ``(key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))

    def lines(self) -> list[str]:
        return [f"{k}: {m}" if k else m for k, m in self.problems]


class _Section(BaseModel):
    """Frozen: the loaded configuration is a value; a reload builds a new one."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.ip_address(host[1:-1])
    elif not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- sections


class GatewaySection(_Section):
    site_id: str = Field(default="site-001",
        description="The site's id, `[A-Za-z0-9_-]{1,64}`; part of every topic (P = `<topic_prefix>/<site_id>`).")
    topic_prefix: str = Field(default="homepot",
        description="First level of every topic the gateway uses: a non-empty topic without wildcards, `$` or a leading/trailing `/`.")
    data_dir: Path = Field(default=Path("./var"),
        description="SQLite database, broker state, keys, the daemon lock and `runtime.json`. Relative to the working directory.")

    @field_validator("site_id")
    @classmethod
    def _site_id(cls, v: str) -> str:
        if not SITE_ID_RE.fullmatch(v):
            raise ValueError("must match [A-Za-z0-9_-]{1,64}")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c in v for c in "+#\0") or v.startswith("$") or v.startswith("/") or v.endswith("/"):
            raise ValueError("must be a non-empty topic without wildcards, '$' or leading/trailing '/'")
        if any(not c.isprintable() for c in v):  # a newline, tab or control character
            raise ValueError(f"must be printable: {v!r} has a control character")
        return v


class ListenerSection(_Section):
    name: str = Field(description="The listener's name, unique; errors name it (`broker.listeners[lan].bind`).")
    type: Literal["tcp", "tls", "ws", "wss"] = Field(default="tcp",
        description="`tcp`, `tls`, `ws` or `wss`; TLS is 1.2 or newer.")
    bind: str = Field(default="127.0.0.1:1883", description="`HOST:PORT` to listen on.")
    allow_anonymous: bool = Field(default=False,
        description="Let clients in without credentials, with the role `anonymous_role`.")
    anonymous_role: str = Field(default="anonymous",
        description="The role of anonymous clients on this listener.")
    certfile: Path | None = Field(default=None,
        description="Server certificate (PEM); required for `tls`/`wss`.")
    keyfile: Path | None = Field(default=None,
        description="Server private key (PEM); required for `tls`/`wss`.")
    cafile: Path | None = Field(default=None,
        description="CA that signs client certificates; required with `require_client_cert`.")
    require_client_cert: bool = Field(default=False,
        description="Refuse TLS clients without a certificate signed by `cafile`.")

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        return _check_host_port(v)

    @model_validator(mode="after")
    def _tls(self) -> "ListenerSection":
        if self.type in ("tls", "wss"):
            if self.certfile is None or self.keyfile is None:
                raise ValueError(f"a {self.type} listener needs certfile and keyfile")
        if self.require_client_cert and self.cafile is None:
            raise ValueError("require_client_cert needs cafile")
        return self

    @property
    def secure(self) -> bool:
        return self.type in ("tls", "wss")


class AuthSection(_Section):
    password_file: Path = Field(default=Path("./var/passwd"),
        description="Broker accounts, `NAME:HASH:ROLE` with argon2id hashes; written by `users add`, re-read when it changes and on SIGHUP. Keep it in the data dir.")


class AclRule(_Section):
    publish: list[str] = Field(default_factory=list,
        description="Topic filters this role may publish to; `{prefix}` and `{username}` are substituted.")
    subscribe: list[str] = Field(default_factory=list,
        description="Topic filters this role may subscribe to; `{prefix}` and `{username}` are substituted.")
    deny: list[str] = Field(default_factory=list,
        description="Filters this role may neither publish, subscribe to, nor receive.")


USER_ROLE = "user"  # a person's account (contract §5, §12): the HTTP API's /v1/me and /me only


def default_acl() -> dict[str, AclRule]:
    """Contract §5 defaults; a role given in the config replaces its default."""
    tech = AclRule(publish=["{prefix}/jobs", "{prefix}/devices/+/register",
                            "{prefix}/alarms/+/+/ack"],  # acknowledge an alarm (contract §5, §11)
                   subscribe=["{prefix}/#"])
    return {
        "device": AclRule(
            publish=[
                "{prefix}/devices/{username}/ack",
                "{prefix}/devices/{username}/register",
                "{prefix}/devices/{username}/telemetry/#",
            ],
            subscribe=["{prefix}/devices/{username}/#"],
        ),
        "technician": tech,
        "controller": tech.model_copy(deep=True),
        # Read-only: every notification's payload carries its signed ack URL (a capability to
        # acknowledge it, and so to stop an alarm's escalation), so the devices' notify
        # topics are not the monitor's to read. It still sees job status, alarms, gateway
        # status and $SYS.
        "monitor": AclRule(subscribe=["{prefix}/#", "$SYS/#"], deny=["{prefix}/devices/+/notify"]),
        "admin": AclRule(publish=["#"], subscribe=["#"]),
        # A person (contract §12): logs in to the HTTP API's /v1/me routes and the /me page,
        # which check the role by name; nothing on MQTT unless [broker.acl.user] grants it.
        USER_ROLE: AclRule(),
        "anonymous": AclRule(),
    }


class _MqttLinkSection(_Section):
    """A connection the gateway makes as an MQTT client (its broker, the cloud's)."""

    url: str = Field(default="mqtt://127.0.0.1:1883",
        description="The broker to connect to: `mqtt://HOST[:PORT]`, `mqtts://`, `ws://` or `wss://`.")
    username: str = Field(default="", description="The gateway's own username on that broker.")
    password_file: Path | None = Field(default=None,
        description="File holding the gateway's password on that broker; read once at start, never logged.")
    ca_file: Path | None = Field(default=None, description="Extra CA to trust for `mqtts://`/`wss://`.")
    cert_file: Path | None = Field(default=None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(default=None, description="Client private key for mutual TLS.")
    reconnect_initial_s: float = Field(default=0.5, gt=0, le=3600,
        description="After a failed connect (the broker down, also at start) the next attempt comes after a "
                    "random wait between half this and this many seconds; each further failure doubles it, up to "
                    "`reconnect_max_s`. A connection that comes up starts again from here.")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600,
        description="The longest wait between two connect attempts, in seconds (jittered the same way).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_mqtt_url(v)

    @model_validator(mode="after")
    def _reconnect(self) -> "_MqttLinkSection":
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self


MQTT_MAX_PACKET = 268_435_455   # the largest "remaining length" MQTT can express (§2.2.3)


class RoleLimits(_Section):
    """A ``[broker.limits.<role>]`` table: any key given replaces the ``[broker.limits]`` value
    for clients of that role; a key left out keeps it. The ``admin`` role (and the gateway's own
    client, always) is limited only by the keys its table names."""

    max_packet_size: int | None = Field(
        default=None, ge=16, le=MQTT_MAX_PACKET,
        description="Largest MQTT packet (bytes, fixed header excluded) a client of this role may send; "
            "checked from the fixed header before any body byte is read, the client is disconnected.")
    max_connections: int | None = Field(
        default=None, ge=0, description="Clients of this role connected at once; 0 = no limit.")
    max_sessions_per_account: int | None = Field(
        default=None, ge=0, description="Persistent sessions one principal of this role may hold; 0 = no limit.")
    session_expiry_s: float | None = Field(
        default=None, ge=0, description="Seconds a disconnected persistent session is kept; 0 = for ever.")
    max_queued_bytes: int | None = Field(
        default=None, ge=0, description="Payload bytes queued per session beside `max_queued_messages`; 0 = no limit.")
    max_retained_per_principal: int | None = Field(
        default=None, ge=0, description="Retained topics one principal may hold; 0 = no limit.")
    max_retained_bytes_per_principal: int | None = Field(
        default=None, ge=0, description="Bytes (topic + payload) of retained messages one principal may hold; 0 = no limit.")
    max_keepalive: int | None = Field(
        default=None, ge=0, le=65535, description="Longest Keep Alive (seconds) a client of this role may ask for; 0 = no maximum.")
    max_publish_rate: float | None = Field(
        default=None, ge=0, description="PUBLISH packets per second per client; 0 = no limit.")
    max_publish_bytes_rate: float | None = Field(
        default=None, ge=0, description="PUBLISH packet bytes (topic and payload) per second per client; 0 = no limit.")


class BrokerLimits(_Section):
    """``[broker.limits]``: what one client may cost the embedded broker (contract §4).

    Every key also exists in ``[broker.limits.<role>]`` tables (:class:`RoleLimits`), which
    are collected into ``roles`` (a table key that is not a known limit is a role table)."""

    max_packet_size: int = Field(
        default=1_048_576, ge=16, le=MQTT_MAX_PACKET,
        description="Largest MQTT packet (bytes, fixed header excluded) a client may send; checked from the "
            "fixed header before any body byte is read, the client is disconnected. Roles device and "
            "anonymous default to 65536.")
    max_connections: int = Field(
        default=10_000, ge=1, description="Clients connected at once (the gateway's own client and admin not counted against it); "
            "also caps connections still sending CONNECT.")
    max_sessions_per_account: int = Field(
        default=10, ge=0, description="Persistent sessions one principal (username, or anonymous on a listener) may hold; a new "
            "one replaces the principal's longest-offline session, or is refused when all are "
            "connected; 0 = no limit.")
    session_expiry_s: float = Field(
        default=604_800, ge=0, description="Seconds a disconnected persistent session (MQTT 3.1.1 CleanSession=0 included) is kept "
            "before it is forgotten; 0 = for ever.")
    max_queued_bytes: int = Field(
        default=16_777_216, ge=0, description="Payload bytes queued per session, beside `broker.max_queued_messages`; oldest dropped; 0 "
            "= no limit.")
    max_retained_per_principal: int = Field(
        default=1000, ge=0, description="Retained topics one principal may hold; beyond, a retained message is delivered live but "
            "not kept; 0 = no limit.")
    max_retained_bytes_per_principal: int = Field(
        default=1_048_576, ge=0, description="Bytes (topic + payload) of retained messages one principal may hold; 0 = no limit.")
    max_keepalive: int = Field(
        default=0, ge=0, le=65535, description="Longest Keep Alive (seconds) a client may ask for, as Mosquitto's `max_keepalive`: an MQTT "
            "5.0 client asking for more, or for none (0), is told this value as Server Keep Alive in CONNACK and held "
            "to it; a 3.1.1 client cannot be told, and is refused (CONNACK 0x02); 0 = no maximum.")
    max_publish_rate: float = Field(
        default=0, ge=0, description="PUBLISH packets per second per client; a faster client is slowed down (its connection is "
            "not read until it is within the rate); 0 = no limit. Roles device and anonymous default to 1000 (set "
            "it in their `[broker.limits.<role>]` table to change it; 0 there lifts it).")
    max_publish_bytes_rate: float = Field(
        default=0, ge=0, description="PUBLISH packet bytes (topic and payload) per second per client, slowed down the same way; 0 = no limit.")
    roles: dict[str, RoleLimits] = Field(
        default_factory=dict, description="Per-role overrides, written as `[broker.limits.<role>]` tables.")

    @model_validator(mode="before")
    @classmethod
    def _role_tables(cls, data: Any) -> Any:
        """``[broker.limits.device]`` is a table inside ``[broker.limits]``: move every table
        under a key that is not a limit into ``roles`` (a misspelt scalar key stays, and is
        reported as an unknown key)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        roles = dict(data.get("roles") or {})
        for key in [k for k, v in data.items() if isinstance(v, dict) and k not in cls.model_fields]:
            roles[key] = data.pop(key)
        if roles:
            data["roles"] = roles
        return data


class BrokerSection(_MqttLinkSection):
    url: str = Field(default="",
        description="The broker the gateway's own client connects to: `mqtt://HOST[:PORT]`, `mqtts://`, `ws://` or "
            "`wss://`. Embedded mode: leave it out and it is derived from the listeners (the first `tcp` one, "
            "else `tls`, `ws`, `wss`; a wildcard bind is reached on loopback); when given it must point at one of "
            "them. External mode: the broker's URL (default `mqtt://127.0.0.1:1883`).")
    mode: Literal["embedded", "external"] = Field(default="embedded",
        description="`embedded` runs the MQTT broker inside the gateway; `external` uses an existing broker at `url` and embeds none.")
    max_queued_messages: int = Field(default=1000, ge=1,
        description="Messages kept per offline persistent session; the oldest are dropped and counted.")
    protocol: Literal["auto", "5", "3.1.1"] = Field(default="auto",
        description="The MQTT version of the gateway's own client: `5`, `3.1.1`, or `auto` (5 when the broker offers it; the embedded broker does).")
    listeners: list[ListenerSection] = Field(default_factory=list,
        description="Embedded mode: the broker's listeners (`[[broker.listeners]]`, keys below); at least one.")
    auth: AuthSection = Field(default_factory=AuthSection,
        description="Embedded mode: where the broker's accounts are (`[broker.auth]`).")
    acl: dict[str, AclRule] = Field(default_factory=dict,
        description="Per-role ACLs (`[broker.acl.<role>]`, keys below); a role given here replaces that role's defaults; new roles may be added.")
    limits: BrokerLimits = Field(default_factory=BrokerLimits,
        description="Embedded mode: what one client may cost the broker (`[broker.limits]`, keys below).")

    @model_validator(mode="after")
    def _limit_roles(self) -> "BrokerSection":
        unknown = sorted(set(self.limits.roles) - set(self.roles()))
        if unknown:
            raise ValueError(f"[broker.limits.{unknown[0]}] names no role (known: {', '.join(sorted(self.roles()))})")
        return self

    @model_validator(mode="after")
    def _listeners(self) -> "BrokerSection":
        names = [listener.name for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError("listener names must be unique")
        # Port 0 is "any free port": each such listener gets its own from the kernel.
        binds = [listener.bind for listener in self.listeners if split_host_port(listener.bind)[1] != 0]
        if len(set(binds)) != len(binds):
            raise ValueError("two listeners bind the same address")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_mqtt_url(v) if v else v

    @model_validator(mode="after")
    def _client_url(self) -> "BrokerSection":
        """One place to change a port: the client's URL follows the listeners unless set,
        and a URL set by hand that reaches none of them is an error here, not a "Bad user
        name or password" from whatever else listens on that port."""
        if not self.url:
            if self.mode == "external" or not self.listeners:  # no listener: reported by parse_config
                url = "mqtt://127.0.0.1:1883"
            else:
                url = listener_url(_preferred_listener(self.listeners))
            self.__dict__["url"] = url  # not an assignment: validate_assignment would re-enter here
        return self

    def url_problem(self) -> str | None:
        """Embedded mode: why ``url`` reaches none of the listeners, or None."""
        if self.mode != "embedded" or not self.listeners:
            return None
        if any(url_reaches(self.url, listener) for listener in self.listeners):
            return None
        listed = ", ".join(f"{lst.name} {lst.type} {lst.bind}" for lst in self.listeners)
        return (f"{self.url} points at none of the listeners ({listed}); leave broker.url out to derive "
                "it from them")

    def roles(self) -> dict[str, AclRule]:
        merged = default_acl()
        merged.update(self.acl)
        return merged


def _check_mqtt_url(v: str) -> str:
    m = re.fullmatch(r"^(mqtt|mqtts|ws|wss)://([^/:]+|\[[0-9a-fA-F:]+\])(:(\d{1,5}))?/?$", v)
    if not m:
        raise ValueError("expected mqtt://HOST[:PORT] or mqtts://, ws://, wss://")
    return v


_SCHEME_OF = {"tcp": "mqtt", "tls": "mqtts", "ws": "ws", "wss": "wss"}
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _preferred_listener(listeners: list[ListenerSection]) -> ListenerSection:
    for kind in ("tcp", "tls", "ws", "wss"):
        for listener in listeners:
            if listener.type == kind:
                return listener
    return listeners[0]


def listener_url(listener: ListenerSection) -> str:
    """The URL a client on this host uses to reach ``listener`` (a wildcard bind on loopback)."""
    host, port = split_host_port(listener.bind)
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{_SCHEME_OF[listener.type]}://{host}:{port}"


def url_reaches(url: str, listener: ListenerSection) -> bool:
    """Whether a client connecting to ``url`` lands on ``listener``: same port and scheme,
    and the listener's address (a wildcard one takes any, loopback included)."""
    target = MqttUrl(url)
    host, port = split_host_port(listener.bind)
    if target.port != port or target.scheme != _SCHEME_OF[listener.type]:
        return False
    want = target.host.strip("[]")
    if host.strip("[]") in _WILDCARDS:
        return True
    return want == host.strip("[]") or (want in _LOOPBACK and host.strip("[]") in _LOOPBACK)


class UpstreamSection(_MqttLinkSection):
    url: str = Field(description="The cloud controller's broker, e.g. `mqtts://cloud.example.com:8883`.")
    client_id: str = Field(default="", description="Client id on the cloud broker (persistent session).")
    reconnect_initial_s: float = Field(default=1.0, gt=0, le=3600,
        description="After a failed connect to the cloud broker (or a session that ended before it proved healthy) "
                    "the next attempt comes after a random wait between half this and this many seconds; each "
                    "further failure doubles it, up to `reconnect_max_s`.")
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600,
        description="The longest wait between two connect attempts to the cloud broker, in seconds.")
    buffer_max_mb: float = Field(default=256, gt=0,
        description="Store-and-forward cap on disk for what is owed to the cloud, in MB.")
    overflow: Literal["drop-oldest", "refuse-new"] = Field(default="drop-oldest",
        description="At the cap: `drop-oldest` coalesces, then drops the oldest (counted); `refuse-new` drops nothing: device acks are stored at once and their copies for the cloud wait outside the buffer until there is room.")
    allow_plaintext: bool = Field(default=False,
        description="Allow a password over `mqtt://` or `ws://`, where it travels in clear.")
    max_inflight: int = Field(default=1000, ge=1, le=10000,
        description="Publishes awaiting the cloud's PUBACK at once (the drain's window; with MQTT 5.0 at most the cloud broker's Receive Maximum).")
    protocol: Literal["auto", "5", "3.1.1"] = Field(default="auto",
        description="The cloud link's MQTT version: `5`, `3.1.1`, or `auto` (5 when the cloud broker offers it, else 3.1.1). With 5.0 a publish the cloud refuses (PUBACK reason 0x80 or above) is set aside at once instead of being retried.")

    def plaintext_problems(self) -> list[tuple[str, str]]:
        """``mqtt://``/``ws://`` with secrets or TLS files: (key, message) for each.

        Without TLS a password goes over the wire in clear and a CA or client certificate
        is silently unused; both are configuration mistakes until proven otherwise.
        """
        url = MqttUrl(self.url)
        if url.tls:
            return []
        problems: list[tuple[str, str]] = []
        if self.password_file is not None and str(self.password_file) and not self.allow_plaintext:
            problems.append(("upstream.password_file",
                             f"a password over {url.scheme}:// is sent in clear; use mqtts:// (or wss://) "
                             "or set upstream.allow_plaintext = true"))
        for attr in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, attr)
            if value is not None and str(value):
                problems.append((f"upstream.{attr}",
                                 f"{url.scheme}:// does not use TLS, so this file would be ignored; "
                                 "use mqtts:// (or wss://)"))
        return problems


class DispatchSection(_Section):
    batch_size: int = Field(default=500, ge=1, le=10000,
        description="Devices read per transaction when expanding a job.")
    max_in_flight: int | None = Field(default=None, ge=1, le=100000,
        description="Concurrent sends per bridge; unset = each bridge's own default "
                    "(500 for `simulation` and `mqtt`, 200 for the HTTP push platforms).")
    max_attempts: int = Field(default=10, ge=1, description="Attempts (sends and resends) per delivery.")
    backoff_initial_s: float = Field(default=1.0, gt=0,
        description="First retry backoff in seconds (full jitter, doubling).")
    backoff_max_s: float = Field(default=300.0, gt=0,
        description="Largest retry backoff in seconds; also the longest pause of an unhealthy bridge.")
    ack_timeout_s: float = Field(default=60.0, ge=0,
        description="A sent, unacked delivery of a bridge with `resend_unacked` is sent again (same message_id) after this; `0` = never.")
    fallback_after_s: float = Field(default=30.0, ge=0,
        description="A delivery waiting on a bridge that has been unhealthy (or unable to start) for this long "
                    "moves to the device's next channel; `ttl = 0` jobs move at once.")

    @model_validator(mode="after")
    def _backoff(self) -> "DispatchSection":
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self


class SimulationBridge(_Section):
    enabled: bool = Field(default=True,
        description="In-process fake device fleet, for demos, tests and benchmarks.")
    resend_unacked: bool = Field(default=False,
        description="Resend sent, unacked deliveries after `dispatch.ack_timeout_s`.")
    latency_ms: float = Field(default=20, ge=0, description="Time each simulated send takes.")
    ack: bool = Field(default=True, description="Simulated devices ack what they receive.")
    fail_rate: float = Field(default=0.0, ge=0, le=1,
        description="Fraction of deliveries (0..1) answered with a 503 (fault injection).")
    invalid_rate: float = Field(default=0.0, ge=0, le=1,
        description="Fraction of deliveries (0..1) reported as an invalid address.")
    throttle_rate: float = Field(default=0.0, ge=0, le=1,
        description="Fraction of deliveries (0..1) answered with a 429 and `retry_after_s`.")
    retry_after_s: float = Field(default=1.0, ge=0,
        description="The Retry-After of injected 429s and transient 503s.")
    transient_attempts: int = Field(default=0, ge=0,
        description="The first N attempts of every delivery get a 503 with `retry_after_s`.")
    seed: int | None = Field(default=None,
        description="Seed of the fault-injection random generator; unset = random.")


class MqttBridge(_Section):
    enabled: bool = Field(default=True, description="Deliver to devices over MQTT (`P/devices/<id>/notify`).")
    resend_unacked: bool = Field(default=True,
        description="Resend sent, unacked deliveries after `dispatch.ack_timeout_s`: a publish to a device without a session is lost silently.")
    qos: Literal[0, 1, 2] = Field(default=1,
        description="QoS of notify publishes unless the job's `options.mqtt.qos` says otherwise.")


APP_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_app_names(apps: Any) -> Any:
    if isinstance(apps, dict):
        for name in apps:
            if not APP_NAME_RE.fullmatch(name):
                raise ValueError(f"app name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
    return apps


def _apps_field(platform: str) -> Any:
    """The ``apps`` table of one push platform's section, documented the same way for each."""
    return Field(default_factory=dict,
        description=f"More apps on this platform, each `[bridges.{platform}.apps.<name>]` with its own credentials "
                    "(the keys of this section; one left out is the section's). A device channel names its "
                    "app with `\"app\": \"<name>\"`.")


_AppT = typing.TypeVar("_AppT")
# A platform's ``apps`` table: names checked before the apps themselves are validated.
AppsOf = typing.Annotated[dict[str, _AppT], BeforeValidator(_check_app_names)]


class _App(_Section):
    """Another app's credentials on a push platform (``[bridges.<platform>.apps.<name>]``).

    A key left out is the section's own: two iOS apps of one team share the ``.p8`` key
    and differ in ``topic`` only. The section's transport keys (endpoint, CA, allowed
    hosts, ``enabled``, ``resend_unacked``) are not per app."""

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude_unset=True).items() if v is not None}


class FcmApp(_App):
    service_account_file: Path = Field(description="This app's service account JSON; required.")
    project_id: str | None = Field(default=None,
        description="This app's FCM project; read from its service account unless set.")


class ApnsApp(_App):
    team_id: str | None = Field(default=None, description="This app's Apple team id (default: the section's).")
    key_id: str | None = Field(default=None, description="Key id of this app's `.p8` key (default: the section's).")
    key_file: Path | None = Field(default=None, description="This app's `.p8` signing key (default: the section's).")
    cert_file: Path | None = Field(default=None,
        description="This app's client certificate (certificate auth; default: the section's).")
    cert_key_file: Path | None = Field(default=None, description="Private key of this app's `cert_file`.")
    topic: str = Field(min_length=1, description="This app's bundle id (`apns-topic`); required.")


class WnsApp(_App):
    client_id: str = Field(min_length=1, description="This app's client id (package SID); required.")
    client_secret_file: Path = Field(description="File holding this app's client secret; required.")
    auth: Literal["live", "entra"] | None = Field(default=None,
        description="`live` or `entra` for this app (default: the section's).")
    tenant_id: str | None = Field(default=None, description="Entra tenant of this app (default: the section's).")
    token_url: str | None = Field(default=None, description="This app's token endpoint (default: the section's).")


class WebpushApp(_App):
    vapid_private_key_file: Path = Field(
        description="This app's VAPID private key (PEM); required; created at start if missing.")
    subject: str | None = Field(default=None, description="This app's VAPID `sub` (default: the section's).")

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("mailto:") or v.startswith("https://")):
            raise ValueError("must start with mailto: or https:")
        return v


class FcmBridge(_Section):
    enabled: bool = Field(default=False, description="Deliver through Firebase Cloud Messaging.")
    resend_unacked: bool = Field(default=False,
        description="Resend sent, unacked deliveries after `dispatch.ack_timeout_s`.")
    service_account_file: Path | None = Field(default=None,
        description="The service account JSON; required when enabled.")
    project_id: str = Field(default="", description="FCM project; read from the service account unless set.")
    endpoint: str = Field(default="https://fcm.googleapis.com",
        description="FCM API base URL (private deployments, tests).")
    ca_file: Path | None = Field(default=None, description="Extra CA to trust, besides the system's.")
    apps: AppsOf[FcmApp] = _apps_field("fcm")


class ApnsBridge(_Section):
    enabled: bool = Field(default=False, description="Deliver through Apple Push Notification service.")
    resend_unacked: bool = Field(default=False,
        description="Resend sent, unacked deliveries after `dispatch.ack_timeout_s`.")
    team_id: str = Field(default="", description="Apple team id (token auth).")
    key_id: str = Field(default="", description="Key id of the `.p8` key (token auth).")
    key_file: Path | None = Field(default=None,
        description="The `.p8` signing key (token auth); or use `cert_file`.")
    cert_file: Path | None = Field(default=None,
        description="Client certificate (certificate auth) instead of a token.")
    cert_key_file: Path | None = Field(default=None, description="Private key of `cert_file`, if not in it.")
    topic: str = Field(default="", description="The app's bundle id; required when enabled.")
    environment: Literal["production", "sandbox"] = Field(default="production",
        description="`production` or `sandbox`: which APNs host.")
    endpoint: str = Field(default="", description="Overrides the environment's host.")
    ca_file: Path | None = Field(default=None, description="Extra CA to trust, besides the system's.")
    apps: AppsOf[ApnsApp] = _apps_field("apns")


class WnsBridge(_Section):
    enabled: bool = Field(default=False, description="Deliver through Windows Push Notification Services.")
    resend_unacked: bool = Field(default=False,
        description="Resend sent, unacked deliveries after `dispatch.ack_timeout_s`.")
    client_id: str = Field(default="",
        description="The app's client id (package SID); required when enabled.")
    client_secret_file: Path | None = Field(default=None,
        description="File holding the client secret; required when enabled.")
    auth: Literal["live", "entra"] = Field(default="live",
        description="`live` (login.live.com) or `entra` (Microsoft Entra ID; needs `tenant_id`).")
    tenant_id: str = Field(default="", description="Entra tenant, for `auth = \"entra\"`.")
    token_url: str = Field(default="", description="Overrides the token endpoint of `auth`.")
    allowed_hosts: list[str] = Field(default_factory=lambda: ["notify.windows.com"],
        description="A channel URI's host must equal or be a subdomain of one of these.")
    ca_file: Path | None = Field(default=None, description="Extra CA to trust, besides the system's.")
    apps: AppsOf[WnsApp] = _apps_field("wns")


class WebpushBridge(_Section):
    enabled: bool = Field(default=False, description="Deliver through Web Push (VAPID).")
    resend_unacked: bool = Field(default=False,
        description="Resend sent, unacked deliveries after `dispatch.ack_timeout_s`.")
    vapid_private_key_file: Path = Field(default=Path("./var/vapid_private.pem"),
        description="The VAPID key pair's private key (PEM); created by `vapid-keys` or at start if missing.")
    subject: str = Field(default="mailto:ops@example.com",
        description="VAPID `sub`: a `mailto:` or `https:` contact.")
    allow_private_endpoints: bool = Field(default=False,
        description="Allow push endpoints on loopback or private addresses.")
    ca_file: Path | None = Field(default=None, description="Extra CA to trust, besides the system's.")
    apps: AppsOf[WebpushApp] = _apps_field("webpush")

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        if not (v.startswith("mailto:") or v.startswith("https://")):
            raise ValueError("must start with mailto: or https:")
        return v


class BridgesSection(_Section):
    simulation: SimulationBridge = Field(default_factory=SimulationBridge,
        description="`[bridges.simulation]`.")
    mqtt: MqttBridge = Field(default_factory=MqttBridge, description="`[bridges.mqtt]`.")
    fcm: FcmBridge = Field(default_factory=FcmBridge, description="`[bridges.fcm]`.")
    apns: ApnsBridge = Field(default_factory=ApnsBridge, description="`[bridges.apns]`.")
    wns: WnsBridge = Field(default_factory=WnsBridge, description="`[bridges.wns]`.")
    webpush: WebpushBridge = Field(default_factory=WebpushBridge, description="`[bridges.webpush]`.")


class HttpSection(_Section):
    bind: str = Field(default="127.0.0.1:8080", description="`HOST:PORT` the HTTP API listens on.")
    public_url: str = Field(default="",
        description="How devices reach the API; ack URLs start with it. Empty = `http(s)://<bind>`.")
    ack_secret_file: Path | None = Field(default=None,
        description="HMAC key of signed ack URLs; unset = `<data_dir>/ack_secret`, created 0600.")
    certfile: Path | None = Field(default=None,
        description="HTTPS (TLS 1.2+) certificate; together with `keyfile`.")
    keyfile: Path | None = Field(default=None, description="HTTPS private key; together with `certfile`.")
    max_streams_per_account: int = Field(default=20, ge=1, le=10_000,
        description="Open event streams (`/ui/api/events`, `/v1/jobs/<id>/events`) one account may hold, "
                    "whether it logs in on the page or sends HTTP Basic; the excess is answered 429. "
                    "The gateway holds at most 200 in all.")

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        return _check_host_port(v)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        if v and not re.fullmatch(r"^https?://[^/?#\s@]+(/[^?#\s]*)?$", v):
            raise ValueError("expected http(s)://HOST[:PORT][/PATH] without query or user info")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _tls_pair(self) -> "HttpSection":
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together (HTTPS needs both)")
        return self

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def base_url(self) -> str:
        """``public_url``, else ``http(s)://<bind>`` (what ack URLs start with)."""
        if self.public_url:
            return self.public_url
        return f"{'https' if self.tls else 'http'}://{self.bind}"


class StorageSection(_Section):
    retention_days: float = Field(default=30.0, gt=0,
        description="Finished jobs, their deliveries and acks are pruned after this many days (fractions allowed) and their retained status topics cleared. Alarms use it too.")


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = Field(default="info",
        description="`debug`, `info`, `warning`, `error` or `critical`; applied at once on SIGHUP.")
    format: Literal["json", "console"] = Field(default="json",
        description="`json` lines (for the journal) or readable `console`.")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class CliSection(_Section):
    confirm_above: int = Field(default=100, ge=0,
        description="`send` to more devices than this (and always to `--all`) asks for confirmation on a terminal; "
            "without a terminal it needs `--yes`. 0 asks for every job.")


class PeopleSection(_Section):
    quiet_hours_default: list[QuietWindow] = Field(default_factory=list,
        description="Quiet hours of a person who has none of their own (contract §12), each "
                    "`{ days = [\"mon\", ...], from = \"22:00\", to = \"06:00\" }` in the person's time zone; "
                    "a window whose `to` is not after its `from` ends the next day. Empty: no quiet hours.")
    reach_after_s: float = Field(default=120.0, ge=0, le=86400,
        description="A person's next device gets the notification when the previous one has not acked "
                    "within this many seconds (for a person who sets no `reach_after_s` of their own); "
                    "0 = all their devices at once.")


class Config(_Section):
    gateway: GatewaySection = Field(default_factory=GatewaySection, description="`[gateway]`.")
    broker: BrokerSection = Field(default_factory=BrokerSection, description="`[broker]`.")
    upstream: UpstreamSection | None = Field(default=None,
        description="`[upstream]`: the cloud controller's broker; absent = no cloud link.")
    dispatch: DispatchSection = Field(default_factory=DispatchSection, description="`[dispatch]`.")
    bridges: BridgesSection = Field(default_factory=BridgesSection, description="`[bridges.*]`.")
    http: HttpSection | None = Field(default=None, description="`[http]`: the HTTP API; absent = off.")
    storage: StorageSection = Field(default_factory=StorageSection, description="`[storage]`.")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="`[logging]`.")
    cli: CliSection = Field(default_factory=CliSection, description="`[cli]`: how the command line guards big sends.")
    people: PeopleSection = Field(default_factory=PeopleSection,
        description="`[people]`: defaults for persons (contract §12).")
    rules: list[RuleSection] = Field(default_factory=list,
        description="`[[rules]]`: sensor alarms, any number.")

    # Where the file was read from; relative paths in it are relative to the cwd,
    # like Mosquitto's, so `make run` from the repo works as documented.
    source: Path | None = Field(default=None, exclude=True)

    @property
    def prefix(self) -> str:
        """``P`` of the contract: ``<topic_prefix>/<site_id>``."""
        return f"{self.gateway.topic_prefix}/{self.gateway.site_id}"

    @property
    def data_dir(self) -> Path:
        return self.gateway.data_dir

    @property
    def db_path(self) -> Path:
        return self.gateway.data_dir / "gateway.db"


# --------------------------------------------------------------------------- loading


def find_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The contract's search order: --config, $HOMEPOT_GATEWAY_CONFIG, ./config.toml, /etc."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]


def shadow_note(explicit: str | os.PathLike[str] | None) -> str | None:
    """One line for stderr when ``./config.toml`` was picked while the service's file exists.

    The contract's order lets a checkout's config win over ``/etc``; an operator who runs
    the CLI from a checkout would otherwise act on the dev database without a hint.
    """
    if explicit or os.environ.get(CONFIG_ENV):
        return None
    local, system = DEFAULT_PATHS
    if not (local.exists() and system.exists()):
        return None
    try:
        if local.resolve() == system.resolve():
            return None
    except OSError:
        pass
    return (f"note: using {local.resolve()} (./config.toml comes before {system}); "
            f"pass --config {system} to act on the installed service")


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Map ``SECTION_KEY`` env suffixes to (dotted path, annotation), derived from the models."""
    out: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name, info in model.model_fields.items():
        if info.exclude or name == "source":
            continue
        path = prefix + (name,)
        ann = info.annotation
        sub = _model_of(ann)
        if sub is not None:
            out.update(_leaf_paths(sub, path))
        else:
            out["_".join(path).upper()] = (path, ann)
    return out


def _model_of(ann: Any) -> type[BaseModel] | None:
    """The section model behind ``Model`` or ``Model | None``; lists and dicts of models are leaves."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0]
    return None


def _is_text(ann: Any) -> bool:
    """True when a field takes text as given: str, paths, secrets, string Literals (None aside)."""
    if ann is type(None):
        return True
    if isinstance(ann, type):
        return issubclass(ann, (str, os.PathLike, SecretStr))
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return all(isinstance(v, str) for v in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return all(_is_text(a) for a in typing.get_args(ann))
    if origin is typing.Annotated:
        return _is_text(typing.get_args(ann)[0])
    return False


def _parse_env_value(raw: str, ann: Any = None) -> Any:
    """An override typed from the schema: a text field gets the raw string
    (``HOMEPOT_GATEWAY_SITE_ID=1234`` is the site id "1234"); numbers, booleans, lists and
    tables are read as TOML values (``true``, ``5``, ``["a","b"]``), and what does not parse
    is handed to validation as the string, so the error names the key."""
    if ann is not None and _is_text(ann):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env(data: dict[str, Any], environ: dict[str, str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    leaves = _leaf_paths(Config)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        leaf = leaves.get(name[len(ENV_PREFIX):])
        if leaf is None:
            problems.append((name, "unknown configuration override (no such key)"))
            continue
        path, ann = leaf
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append((name, f"{'.'.join(path[:-1])} is not a table"))
                break
            node = nxt
        else:
            node[path[-1]] = _parse_env_value(raw, ann)
    return problems


def _loc(err_loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """Render a pydantic location as the TOML key; listeners by name when known."""
    parts: list[str] = []
    node: Any = data
    for item in err_loc:
        if isinstance(item, int) and parts and parts[-1] == "listeners":
            name = None
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts[-1] = f"listeners[{name or item}]"
        elif isinstance(item, int) and parts and parts[-1] == "rules":
            name = None
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts[-1] = f"rules[{name if isinstance(name, str) and name else item}]"
        elif isinstance(item, int) and parts and parts[0].startswith("rules["):
            parts[-1] += f"[{item}]"
        elif isinstance(item, str) and not item.startswith(("function-", "model-")):
            parts.append(item)
        if isinstance(node, dict):
            node = node.get(item)
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            node = node[item]
        else:
            node = None
    return ".".join(parts)


@dataclass(frozen=True)
class LinkSecrets:
    """What a ``password_file`` of an MQTT link (``[broker]``, ``[upstream]``) holds."""

    password: SecretStr | None = None


@dataclass(frozen=True)
class Secrets:
    """Everything the configuration's ``*_file`` keys hold, read once at load time.

    ``bridges`` maps an enabled bridge (as ``bridge_faults``) to what its module's ``load_secrets`` returned
    (its own typed object, or ``None`` when it has no secret). ``bridge_faults``: push
    bridges whose key file cannot be used (bridge → "key: message"; a bridge is a platform,
    or ``<platform>:<app>`` for an app of ``[bridges.<platform>.apps]``): not a config error
    for ``run`` (the daemon starts with that bridge unhealthy and its devices fall over to
    their next channel); ``check-config`` reports them.
    """

    broker: LinkSecrets = LinkSecrets()
    upstream: LinkSecrets = LinkSecrets()
    bridges: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    bridge_faults: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))

    def bridge(self, platform: str) -> Any:
        return self.bridges.get(platform)


class LoadedConfig(typing.NamedTuple):
    """A validated configuration and the secrets its files hold; replaced whole on reload.

    A pair, so ``cfg, secrets = load_config(...)`` reads naturally.
    """

    config: Config
    secrets: Secrets


def _load_link_secrets(section: _MqttLinkSection, key: str, problems: Problems,
                       check_tls_files: bool) -> LinkSecrets:
    password = None
    if given(section.password_file):
        assert section.password_file is not None
        secret = read_secret(section.password_file, f"{key}.password_file", problems)
        if secret is not None:
            password = SecretStr(secret)
    if check_tls_files:
        for attr in ("ca_file", "cert_file", "key_file"):
            value = getattr(section, attr)
            if given(value):
                require_file(value, f"{key}.{attr}", problems)
    return LinkSecrets(password=password)


def _load_secrets(cfg: Config, problems: Problems) -> Secrets:
    """Read the core's ``*_file`` secrets and check its files, then each enabled platform's
    (``bridges.registry.load_secrets``); record missing or bad ones by key."""
    from bridges.registry import load_secrets as load_bridge_secrets  # the bridges import this module

    broker = _load_link_secrets(cfg.broker, "broker", problems, check_tls_files=cfg.broker.mode == "external")
    for listener in cfg.broker.listeners:
        key = f"broker.listeners[{listener.name}]"
        if cfg.broker.mode == "embedded":
            for attr in ("certfile", "keyfile", "cafile"):
                value = getattr(listener, attr)
                if value is not None:
                    require_file(value, f"{key}.{attr}", problems)
    upstream = LinkSecrets()
    if cfg.upstream is not None:
        upstream = _load_link_secrets(cfg.upstream, "upstream", problems, check_tls_files=True)
        problems.extend(cfg.upstream.plaintext_problems())
    bridges = load_bridge_secrets(cfg, problems)
    if cfg.http is not None:
        for attr in ("certfile", "keyfile"):
            value = getattr(cfg.http, attr)
            if value is not None:
                require_file(value, f"http.{attr}", problems)
    return Secrets(broker=broker, upstream=upstream, bridges=types.MappingProxyType(bridges))


def _blank_paths_to_none(data: Any) -> Any:
    """TOML has no null: ``key_file = ""`` means unset, as in the contract's sample."""
    if isinstance(data, dict):
        return {
            k: (None if (k.endswith("file") and v == "") else _blank_paths_to_none(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_blank_paths_to_none(v) for v in data]
    return data


# A push bridge's credential files: one that is missing or broken stops that bridge only.
BRIDGE_KEY_FILES = frozenset({"service_account_file", "key_file", "cert_file", "cert_key_file",
                              "client_secret_file", "vapid_private_key_file"})


def parse_config(data: dict[str, Any], environ: dict[str, str] | None = None,
                 source: Path | None = None) -> LoadedConfig:
    """Validate a config mapping (after env overrides) and read the secrets it names;
    raise :class:`ConfigError` with every problem."""
    environ = dict(os.environ if environ is None else environ)
    problems = apply_env(data, environ)
    data = _blank_paths_to_none(data)
    cfg: Config | None = None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            key = _loc(tuple(err["loc"]), data)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            problems.append((key.replace("broker.limits.roles.", "broker.limits."), msg))
    secrets: Secrets | None = None
    if cfg is not None:
        cfg = cfg.model_copy(update={"source": source})
        if cfg.broker.mode == "embedded" and not cfg.broker.listeners:
            problems.append(("broker.listeners", "embedded mode needs at least one listener"))
        url_problem = cfg.broker.url_problem()
        if url_problem:
            problems.append(("broker.url", url_problem))
        secret_problems: list[tuple[str, str]] = []
        secrets = _load_secrets(cfg, secret_problems)
        faults: dict[str, str] = {}
        for key, msg in secret_problems:
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "bridges" and parts[2] in BRIDGE_KEY_FILES:
                faults.setdefault(parts[1], f"{key}: {msg}")
            elif len(parts) == 5 and parts[0] == "bridges" and parts[2] == "apps" and parts[4] in BRIDGE_KEY_FILES:
                faults.setdefault(f"{parts[1]}:{parts[3]}", f"{key}: {msg}")  # that app only
            else:
                problems.append((key, msg))
        secrets = dataclasses.replace(secrets, bridge_faults=types.MappingProxyType(faults))
        problems += check_rules(cfg.rules)
    if problems:
        raise ConfigError(problems)
    assert cfg is not None and secrets is not None
    return LoadedConfig(cfg, secrets)


def load_config(path: str | os.PathLike[str] | None = None,
                environ: dict[str, str] | None = None) -> LoadedConfig:
    """Read, validate and load the configuration file found by :func:`find_config_path`."""
    cfg_path = find_config_path(path)
    try:
        raw = cfg_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([("", f"config file not found: {cfg_path}")]) from None
    except OSError as exc:
        raise ConfigError([("", f"cannot read {cfg_path}: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"{cfg_path}: not valid TOML: {exc}")]) from None
    return parse_config(data, environ, source=cfg_path)
