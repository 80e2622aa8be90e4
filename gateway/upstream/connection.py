"""The MQTT connection to the cloud controller's broker.

A :class:`~gateway.mqtt.GatewayClient` (same reconnect loop, routing and manual acks as
the local link) with two additions the WAN needs:

* **Failures an operator can act on, once.** The base client logs a failed connect once
  per distinct error message. Raw errors are unhelpful or unstable here: a client
  certificate rejected under TLS 1.3 only shows after the handshake, as a socket error
  that paho logs on every retry and that otherwise surfaces as a 10 s "Operation timed
  out". So paho's own logger is switched off (its lines are kept at debug), a connection
  closed before CONNACK fails the attempt at once with the socket error that closed it,
  and every failure is rephrased with the configuration keys to check. Same cause, same
  text: one warning line, then quiet retries with jittered exponential backoff.
* **A prompt "lost" signal.** aiomqtt leaves pending publishes waiting for their timeout
  when the connection drops; the drain watches :attr:`UpstreamClient.lost` to stop and
  resend from the outbox instead.
* **Backoff that a kick cannot reset.** Some cloud brokers (AWS IoT, HiveMQ) accept the
  connection and drop it on the first publish they deny. Resetting the backoff on every
  successful CONNACK turns that into a reconnect storm (hundreds a second). Here the
  backoff resets only once a session has proved healthy: the drain saw a PUBACK for an
  outbox row (:meth:`UpstreamClient.progress`), or the connection stayed up for
  ``healthy_after_s``. Until then every reconnect waits, doubling up to ``backoff_max``,
  and the "connection lost" warning is logged once, then at most once a minute with a count.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from gateway.mqtt_url import MqttUrl
from gateway.mqtt import ConnectionSettings, GatewayClient, NotConnected, Probe

log = structlog.get_logger(__name__)

_AUTH_CODES = {4, 5, 134, 135}  # 3.1.1 bad user name or password / not authorised, and 5.0 equivalents
_CLIENT_ID_CODES = {2, 133}
_CLIENT_CERT_REJECTED = (
    "alert certificate required", "alert unknown ca", "alert bad certificate",
    "alert certificate expired", "alert certificate revoked", "alert certificate unknown",
    "alert access denied", "alert decrypt error", "alert handshake failure",
)
_PLAINTEXT_ANSWER = ("wrong_version_number", "wrong version number", "packet length mismatch",
                     "record layer failure", "http request")
_CLOSED_IN_HANDSHAKE = ("unexpected_eof_while_reading", "unexpected eof while reading",
                        "eof occurred in violation of protocol", "connection reset")
_HOSTNAME_MISMATCH = ("hostname mismatch", "ip address mismatch", "doesn't match", "does not match")
_CERT_EXPIRED = ("certificate has expired", "certificate is not yet valid")
_SERVER_CERT_UNTRUSTED = ("certificate_verify_failed", "certificate verify failed")
LOGIN_CLOSED = "the cloud broker closed the connection during login"
_UNREACHABLE = ("connection refused", "timed out", "no route to host", "name or service not known",
                "temporary failure in name resolution", "network is unreachable")


def _code(exc: BaseException) -> int | None:
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):
        return rc
    return None


def cause(exc: BaseException, settings: ConnectionSettings) -> str | None:
    """The likely cause of a failed connect and the keys to check, in one stable sentence
    (None when the error says nothing we can add to)."""
    low = (str(exc) or type(exc).__name__).lower()
    code = _code(exc)
    if isinstance(exc, MqttConnectError) or code is not None:
        if code in _AUTH_CODES:
            return ("the cloud broker refused our credentials (check upstream.username, "
                    "upstream.password_file and the broker's ACL)")
        if code in _CLIENT_ID_CODES:
            return "the cloud broker refused our client id (check upstream.client_id)"
        if isinstance(exc, MqttConnectError):
            return "the cloud broker refused the connection"
    if any(marker in low for marker in _CLIENT_CERT_REJECTED):
        return ("the cloud broker rejected our client certificate (check upstream.cert_file, "
                "upstream.key_file and the CA the broker trusts)")
    tls = MqttUrl(settings.url).tls
    if tls and any(marker in low for marker in _PLAINTEXT_ANSWER):
        # Not a certificate problem: the other end answered, but not in TLS.
        return ("the port in upstream.url does not speak TLS (it answered in plaintext; mqtts:// needs the "
                "broker's TLS port, usually 8883)")
    if tls and "closed before connack" not in low and any(marker in low for marker in _CLOSED_IN_HANDSHAKE):
        return ("the cloud broker closed the connection in the TLS handshake without a TLS alert (is the port "
                "in upstream.url a plaintext MQTT port? mqtts:// needs the TLS port, usually 8883)")
    if any(marker in low for marker in _HOSTNAME_MISMATCH):
        return ("the cloud broker's certificate is not for this host (check the host name in upstream.url "
                "against the certificate's names)")
    if any(marker in low for marker in _CERT_EXPIRED):
        return "the cloud broker's certificate has expired or is not valid yet (check it, and this host's clock)"
    if any(marker in low for marker in _SERVER_CERT_UNTRUSTED):
        return "cannot verify the cloud broker's certificate: it is not signed by a CA we trust (check upstream.ca_file)"
    if "closed before connack" in low or "connection reset" in low:
        hint = ("client certificate, credentials, client id" if tls else
                "credentials, client id; or the port expects TLS: use mqtts://")
        return f"{LOGIN_CLOSED} (check {hint})"
    if any(marker in low for marker in _UNREACHABLE):
        return "the cloud broker is unreachable"
    return None


def explain(exc: BaseException, settings: ConnectionSettings) -> str:
    """One stable sentence naming the likely cause and the keys to check, plus the raw error."""
    text = str(exc) or type(exc).__name__
    why = cause(exc, settings)
    return f"{why}: {text}" if why else text


class PublishRefused(Exception):
    """The cloud broker answered a publish with a PUBACK reason code of 0x80 or more (MQTT
    5.0): it will not take this message, and sending it again will not change that. The link
    itself is fine."""

    def __init__(self, reason: ReasonCode):
        super().__init__(f"PUBACK 0x{reason.value:02x} {reason}")
        self.code = reason.value


class UpstreamClient(GatewayClient):
    """The cloud link's client: clear one-line failures and a prompt ``lost`` signal."""

    LOST_WARNING_INTERVAL_S = 60.0

    def __init__(self, settings: ConnectionSettings, *, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, healthy_after_s: float = 30.0, storage_probe: Probe | None = None):
        super().__init__(settings, name="upstream", backoff_initial=backoff_initial, backoff_max=backoff_max,
                         storage_probe=storage_probe)
        self.healthy_after_s = healthy_after_s
        self.connects = 0  # connections that came up (CONNACK accepted)
        self.drops = 0  # of those, how many ended without us closing them
        self._session_started = 0.0  # monotonic time the current connection came up
        self._healthy = False
        self._closing = False
        self._lost_warned_at: float | None = None
        self._lost_since_warning = 0
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._failures_logged: set[str] = set()
        self._login_closed_seen = False  # a bare "closed during login" held back (see _first_of_cause)
        self._cause: str | None = None  # the explained cause of the last failed connect
        # ``up``: connected (CONNACK accepted); ``lost``: the connection that was up dropped.
        # Both flip in paho's callbacks, i.e. the moment the socket goes, not when the
        # reconnect loop notices.
        self.up = asyncio.Event()
        self.lost = asyncio.Event()
        self._socket_error: str | None = None
        # The cloud broker's Receive Maximum (5.0 CONNACK): the drain keeps no more in flight,
        # or the broker disconnects it (0x93). 3.1.1 brokers queue instead: no bound.
        self.receive_maximum: int | None = None
        self.on_connect(self._mark_up)

    def progress(self) -> None:
        """The cloud broker confirmed an outbox row: this session is healthy (resets backoff)."""
        self._healthy = True

    async def disconnect(self) -> None:
        self._closing = True
        await super().disconnect()

    # ------------------------------------------------------------------ GatewayClient.run's hooks
    def _connect_failed(self, message: str) -> None:
        key = self._cause or message
        self._cause = None
        if self._first_of_cause(key):
            log.warning("mqtt connect failed", link=self.name, url=self.settings.url, error=message)

    def _connected(self, delay: float) -> float:
        """Counters reset, but not the backoff: a session that ends before it proved healthy
        (a cloud broker that kicks us on one publish) keeps backing off."""
        self._failures_logged.clear()
        self._login_closed_seen = False
        self.connects += 1
        self._healthy = self._closing = False
        self.backoff_s = 0.0
        self._session_started = time.monotonic()
        return delay

    async def _session_ended(self, stop: asyncio.Event, error: str | None, delay: float) -> float:
        healthy = self._healthy or time.monotonic() - self._session_started >= self.healthy_after_s
        if not self._closing:
            self.drops += 1
            self._warn_lost(error or "closed", healthy)
        if healthy:
            return self._backoff_initial
        return await self._wait(stop, delay)

    def _first_of_cause(self, key: str) -> bool:
        """Whether a failed connect is the first of its cause since the last connection, so
        it gets the one warning line. The raw error of one cause varies between attempts: a
        rejected client certificate shows as the TLS alert, or only as the EOF after it (a
        connection closed during login, which names no cause). So a bare "closed during
        login" is said only if a second one comes before anything more specific, and not at
        all once a specific cause was said."""
        if key in self._failures_logged:
            return False
        if key.startswith(LOGIN_CLOSED):
            if self._failures_logged:
                return False
            if not self._login_closed_seen:
                self._login_closed_seen = True
                return False
        self._failures_logged.add(key)
        return True

    def _warn_lost(self, error: str, healthy: bool) -> None:
        """One warning, then at most one a minute with how many drops it stands for."""
        self._lost_since_warning += 1
        now = time.monotonic()
        if self._lost_warned_at is not None and now - self._lost_warned_at < self.LOST_WARNING_INTERVAL_S:
            return
        log.warning("mqtt connection lost", link=self.name, error=error, drops=self._lost_since_warning,
                    healthy=healthy,
                    hint=None if healthy else "the cloud broker closed the connection before any outbox row was "
                    "confirmed; reconnecting with backoff (a broker that drops clients on a denied publish does this)")
        self._lost_warned_at = now
        self._lost_since_warning = 0

    async def _mark_up(self, _client: GatewayClient) -> None:
        if not self.lost.is_set():
            self.up.set()

    def _make_client(self) -> aiomqtt.Client:
        client = super()._make_client()
        inner = client._client  # noqa: SLF001 - the paho client; GatewayClient uses it already
        # The drain bounds what is in flight itself (its window); paho's own limit would
        # only add a queue, and a scan of every pending message on each PUBACK.
        inner.max_inflight_messages_set(0)
        inner.disable_logger()
        inner.on_log = self._on_paho_log
        aiomqtt_on_disconnect = inner.on_disconnect
        aiomqtt_on_publish = inner.on_publish
        aiomqtt_on_connect = inner.on_connect
        acks: dict[int, asyncio.Future[None]] = {}  # this connection's publish_nowait futures
        self._acks = acks
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def on_connect(pc: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            maximum = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
            self.receive_maximum = int(maximum) if maximum else (65535 if self._v5 else None)
            if aiomqtt_on_connect is not None:
                aiomqtt_on_connect(pc, userdata, flags, reason, properties)

        def on_publish(pc: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            fut = acks.pop(mid, None)
            if fut is not None:
                refused = isinstance(reason, ReasonCode) and reason.is_failure
                _settle(loop, loop_thread, fut, PublishRefused(reason) if refused else None)
            if aiomqtt_on_publish is not None:
                aiomqtt_on_publish(pc, userdata, mid, reason, properties)

        def on_disconnect(pc: paho.Client, userdata: Any, flags: Any, reason: Any,
                          properties: Any = None) -> None:
            pending = getattr(client, "_connected", None)
            if isinstance(pending, asyncio.Future) and not pending.done():
                # Closed during login: fail the attempt now (aiomqtt would wait for its timeout).
                detail = self._socket_error or str(reason)
                pending.set_exception(aiomqtt.MqttError(f"connection closed before CONNACK: {detail}"))
            else:
                self.up.clear()
                self.lost.set()
            error = NotConnected(f"{self.name}: connection lost before the PUBACK ({reason})")
            for fut in acks.values():
                _settle(loop, loop_thread, fut, error)
            acks.clear()
            if aiomqtt_on_disconnect is not None:
                aiomqtt_on_disconnect(pc, userdata, flags, reason, properties)

        inner.on_publish = on_publish
        inner.on_disconnect = on_disconnect
        inner.on_connect = on_connect
        return client

    @property
    def _v5(self) -> bool:
        return self.protocol_version == aiomqtt.ProtocolVersion.V5

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """Hand one QoS 1 publish to paho now; the future resolves on its PUBACK.

        It fails with :class:`NotConnected` when the connection drops first, and with
        :class:`PublishRefused` when a 5.0 PUBACK refuses the message. Unlike
        :meth:`publish` there is no task, no timeout and no aiomqtt bookkeeping per
        message: the drain keeps hundreds in flight and watches their age itself.
        Raises :class:`NotConnected` at once if there is no connection.
        """
        client = self._state.client
        if client is None or not self.connected:
            raise NotConnected(f"{self.name}: not connected")
        info = client._client.publish(topic, payload, 1, retain)  # noqa: SLF001
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise NotConnected(f"{self.name}: publish failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        return fut

    def _on_paho_log(self, _client: paho.Client, _userdata: Any, level: int, message: str) -> None:
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING):
            self._socket_error = message
            log.debug("paho", link=self.name, message=message)

    async def connect_once(self) -> aiomqtt.Client:
        """Connect and subscribe; every failure is an :class:`aiomqtt.MqttError` with advice."""
        self._socket_error = None
        try:
            client = await super().connect_once()
        except aiomqtt.MqttError as exc:
            self._cause = cause(exc, self.settings)
            raise aiomqtt.MqttError(explain(exc, self.settings)) from exc
        except OSError as exc:  # ssl.SSLError / FileNotFoundError building the TLS context
            self._cause = "cannot load the TLS files"
            raise aiomqtt.MqttError(
                "cannot load the TLS files (check upstream.ca_file, upstream.cert_file, "
                f"upstream.key_file): {exc}") from exc
        # paho formats a debug line for every packet when a log callback is set; the
        # socket errors it carries are only needed to explain a failed login.
        client._client.on_log = None  # noqa: SLF001
        self.lost.clear()
        return client



def _settle(loop: asyncio.AbstractEventLoop, loop_thread: int, fut: asyncio.Future[None],
            error: BaseException | None) -> None:
    """Resolve a publish future from a paho callback (normally already on the loop's thread)."""
    def settle() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    if threading.get_ident() == loop_thread:
        settle()
    else:
        loop.call_soon_threadsafe(settle)
