"""CONNECT → CONNACK for MQTT 3.1.1 and 5.0 (§3.1, §3.2).

Nothing of a session is touched before the client is authenticated: a client with a bad
password can neither take over nor wipe someone's session. Refusals get the CONNACK code
of the client's protocol level (3.1.1: 0x01–0x05; 5.0: 0x84, 0x85, 0x86, 0x87, 0x8C) and
the connection is closed [MQTT-3.2.2-5], [MQTT-3.2.2-7].

5.0 specifics: Clean Start and Session Expiry Interval replace CleanSession (a session
outlives its connection only when the interval is above 0) [MQTT-3.1.2-23]; a client
without a client id gets one and is told it (Assigned Client Identifier) [MQTT-3.2.2-16];
the client's Receive Maximum and Maximum Packet Size bound what the broker sends it; the
CONNACK carries the broker's Receive Maximum and Topic Alias Maximum. Enhanced
authentication (an Authentication Method) is not supported: CONNACK 0x8C [MQTT-4.12.0-1].
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from gateway.broker.wire import properties as P
from gateway.broker.wire.codec import CONNECT, V5, V311, Body, Malformed, Reason, send_connack
from gateway.broker.wire.properties import Prop
from gateway.config import MQTT_MAX_PACKET

if TYPE_CHECKING:
    from gateway.broker.wire.connection import Connection

log = structlog.get_logger(__name__)

NEVER_EXPIRES = 0xFFFFFFFF


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes = b""               # 5.0 properties passed through to subscribers (encoded)
    expiry_s: int | None = None      # Message Expiry Interval
    delay_s: int = 0                 # Will Delay Interval [MQTT-3.1.3-9]


@dataclass
class ConnectPacket:
    version: int
    clean_start: bool
    keepalive: int
    client_id: str
    username: str | None = None
    password: str | None = None
    will: Will | None = None
    props: P.Properties = field(default_factory=dict)

    @property
    def session_expiry(self) -> int | None:
        """Seconds the session outlives the connection: 0 (ends with it), None (never ends)."""
        if self.version != V5:
            return 0 if self.clean_start else None
        value = self.props.get(Prop.SESSION_EXPIRY_INTERVAL, 0)
        return None if value == NEVER_EXPIRES else value


class Refused(Exception):
    """A CONNECT that is answered with a refusing CONNACK (``version`` is the form to use)."""

    def __init__(self, reason: Reason, version: int, message: str):
        super().__init__(message)
        self.reason = reason
        self.version = version


def decode(data: bytes) -> ConnectPacket:
    """The CONNECT body; :class:`Malformed` (close) or :class:`Refused` (CONNACK, close)."""
    body = Body(data)
    name = body.binary("protocol name")
    level = body.u8("protocol level")
    if name != b"MQTT":
        # [MQTT-3.1.2-1]: not MQTT (3.1's "MQIsdp" included): refused as an unsupported level.
        raise Refused(Reason.UNSUPPORTED_PROTOCOL_VERSION, V311, f"protocol name {name!r}")
    if level not in (V311, V5):
        raise Refused(Reason.UNSUPPORTED_PROTOCOL_VERSION, V311, f"protocol level {level}")  # [MQTT-3.1.2-2]
    flags = body.u8("connect flags")
    if flags & 0x01:
        raise Malformed("reserved connect flag set")  # [MQTT-3.1.2-3]
    keepalive = body.u16("keep alive")
    props = P.decode(body, CONNECT) if level == V5 else {}
    client_id = body.text("client identifier")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    will: Will | None = None
    if will_flag:
        if will_qos == 3:
            raise Malformed("will QoS 3")  # [MQTT-3.1.2-14]
        will_props = P.decode(body, P.WILL) if level == V5 else {}
        topic = body.text("will topic")
        payload = body.binary("will payload")
        will = Will(topic, payload, will_qos, will_retain, P.passed_through(will_props),
                    will_props.get(Prop.MESSAGE_EXPIRY_INTERVAL), will_props.get(Prop.WILL_DELAY_INTERVAL, 0))
        if will_props.get(Prop.PAYLOAD_FORMAT_INDICATOR) == 1 and not _is_utf8(payload):
            raise Refused(Reason.PAYLOAD_FORMAT_INVALID, level, "will payload is not UTF-8")
    elif will_qos or will_retain:
        raise Malformed("will QoS or retain without a will")  # [MQTT-3.1.2-11], [MQTT-3.1.2-13]
    username = body.text("user name") if flags & 0x80 else None
    if flags & 0x40:
        if level == V311 and username is None:
            raise Malformed("password without a user name")  # [MQTT-3.1.2-22]
        password: str | None = body.binary("password").decode("utf-8", "replace")
    else:
        password = None
    if body.remaining:
        raise Malformed("bytes after the CONNECT payload")
    return ConnectPacket(level, bool(flags & 0x02), keepalive, client_id, username, password, will, props)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_REFUSALS = {
    Reason.BAD_USER_NAME_OR_PASSWORD: "bad user name or password",
    Reason.SERVER_BUSY: "too many failed logins or protocol violations: try again later",
}


def _refuse(conn: Connection, packet: ConnectPacket, reason: int, why: str) -> None:
    """A refusing CONNACK; a 5.0 client is told why in a Reason String unless it set Request
    Problem Information to 0 (a CONNACK may carry one even then [MQTT-3.1.2-29]; we honour the
    client's wish). The string names the rule, never a secret."""
    props = b""
    if packet.version == V5 and packet.props.get(Prop.REQUEST_PROBLEM_INFORMATION, 1):
        props = P.encode({Prop.REASON_STRING: why})
    conn.write(send_connack(packet.version, False, reason, props))


def _keepalive(packet: ConnectPacket, maximum: int) -> tuple[int, bool]:
    """The Keep Alive the broker holds the client to, and whether it differs from the asked one
    (then a 5.0 client is told it as Server Keep Alive, which it MUST use [MQTT-3.2.2-21]; without
    one the broker uses the asked value [MQTT-3.2.2-22]). ``maximum`` 0: none."""
    asked = packet.keepalive
    if maximum and (asked == 0 or asked > maximum):
        return maximum, True
    return asked, False


async def handle(conn: Connection, body: bytes) -> bool:
    """Decode, authenticate, open the session and answer; True when the client is in."""
    gw = conn.gw
    try:
        packet = decode(body)
    except Malformed as exc:
        gw.metrics.protocol_errors += 1
        log.info("connection refused: malformed CONNECT", remote=conn.remote, error=str(exc))
        return False
    except Refused as exc:
        gw.metrics.protocol_errors += 1
        log.info("connection refused", remote=conn.remote, error=str(exc), reason_code=f"0x{int(exc.reason):02x}")
        conn.write(send_connack(exc.version, False, exc.reason))
        return False
    conn.version = packet.version
    conn.connect = packet
    v5 = packet.version == V5
    if v5 and Prop.AUTHENTICATION_METHOD in packet.props:
        log.info("connection refused: enhanced authentication is not supported", remote=conn.remote,
                 method=packet.props[Prop.AUTHENTICATION_METHOD])
        _refuse(conn, packet, Reason.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported")
        return False
    assigned = None
    if not packet.client_id:
        if packet.version == V311 and not packet.clean_start:
            # [MQTT-3.1.3-8]: a zero-length id needs CleanSession=1.
            conn.write(send_connack(V311, False, Reason.CLIENT_IDENTIFIER_NOT_VALID))
            return False
        # [MQTT-3.1.3-6], [MQTT-3.2.2-16]: a unique id, told to a 5.0 client.
        packet.client_id = assigned = "auto-" + secrets.token_hex(12)
    role, reason, account_hash = await gw.authorize(packet.username, packet.password, conn.section, conn.remote)
    if conn.closed:
        return False   # aborted while its password was checked or it waited its turn (shutdown)
    if role is None:
        gw.metrics.auth_failures += 1
        if reason != Reason.SERVER_BUSY:   # that one is logged by the broker, once a minute per address
            log.info("mqtt connection refused", client_id=packet.client_id, username=packet.username,
                     listener=conn.section.name, reason_code=f"0x{int(reason):02x}")
        _refuse(conn, packet, reason, _REFUSALS.get(reason, "not authorized on this listener"))
        return False
    owner = gw.owner_of(packet.username, conn.section)
    refusal = gw.ownership_refusal(packet.client_id, owner)
    if refusal is not None:
        # Nothing was touched: the session, its queue and its live connection stay as they are.
        gw.metrics.sessions_refused += 1
        log.warning("mqtt connection refused: " + refusal, client_id=packet.client_id, username=packet.username,
                    role=role, listener=conn.section.name, reason_code="0x87")
        _refuse(conn, packet, Reason.NOT_AUTHORIZED, refusal)
        return False
    limit = gw.quota_refusal(packet, role, owner)
    if limit is not None:
        # 3.1.1: CONNACK 0x03 (server unavailable); 5.0: the limit's reason (0x97 quota exceeded).
        reason = Reason(limit.verdict.v5_reason)
        gw.limit_log.hit(limit, packet.client_id, username=packet.username, role=role, listener=conn.section.name,
                         reason_code=f"0x{int(reason):02x}")
        _refuse(conn, packet, reason, f"limit reached: {limit.value}")
        return False
    keepalive, overridden = _keepalive(packet, gw.limits_of(role, owner).max_keepalive)
    if overridden and not v5:
        # 3.1.1 has no way to tell the client a shorter Keep Alive; held to one it does not
        # know, it would be dropped again and again. Refused as Mosquitto does (0x02).
        log.info("mqtt connection refused: keep alive above the role's max_keepalive", client_id=packet.client_id,
                 username=packet.username, role=role, keepalive=packet.keepalive, max_keepalive=keepalive)
        conn.write(send_connack(V311, False, Reason.CLIENT_IDENTIFIER_NOT_VALID))
        return False
    conn.set_keepalive(keepalive)
    props: P.Properties = {}
    if v5:
        conn.problem_info = bool(packet.props.get(Prop.REQUEST_PROBLEM_INFORMATION, 1))
        conn.send_quota = packet.props.get(Prop.RECEIVE_MAXIMUM, 65535)
        conn.max_packet_out = packet.props.get(Prop.MAXIMUM_PACKET_SIZE)
        conn.topic_alias_max_out = packet.props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0)
        props[Prop.RECEIVE_MAXIMUM] = conn.receive_maximum
        props[Prop.TOPIC_ALIAS_MAXIMUM] = conn.topic_alias_maximum
        if assigned is not None:
            props[Prop.ASSIGNED_CLIENT_IDENTIFIER] = assigned
        if overridden:
            props[Prop.SERVER_KEEP_ALIVE] = keepalive   # the client MUST use it [MQTT-3.2.2-21]
        # Request Response Information: no Response Information is sent (the standard leaves
        # it to the server, §3.1.2.11.7; Mosquitto sends none either): request/response on
        # this broker uses Response Topic and Correlation Data, which pass through.
    cs, present = gw.open_session(conn, packet, role, owner, account_hash)
    conn.client = cs
    conn.limit_packets_in(cs.limits.max_packet_size)   # [broker.limits] of its role, from now on
    gw.metrics.clients_connected += 1
    gw.metrics.connections_total += 1
    if v5 and conn.max_packet_in is not None and conn.max_packet_in < MQTT_MAX_PACKET:
        # Its role's max_packet_size, told as the broker's Maximum Packet Size (the whole packet:
        # the limit is on the remaining length, so the fixed header's 5 bytes are added).
        props[Prop.MAXIMUM_PACKET_SIZE] = min(conn.max_packet_in + 5, 268_435_460)
    conn.write(send_connack(packet.version, present, Reason.SUCCESS, P.encode(props) if v5 else b""))
    cs.attach(conn)   # resends in-flight messages, then drains the queue
    log.debug("client connected", client_id=cs.client_id, username=cs.username, role=role,
              protocol="5.0" if v5 else "3.1.1", clean_start=packet.clean_start, session_present=present)
    return True
