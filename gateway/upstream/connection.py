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
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttUrl
from gateway.mqtt import ConnectionSettings, GatewayClient

log = structlog.get_logger(__name__)

_AUTH_CODES = {4, 5, 134, 135}  # 3.1.1 bad user name or password / not authorised, and 5.0 equivalents
_CLIENT_ID_CODES = {2, 133}
_CLIENT_CERT_REJECTED = (
    "alert certificate required", "alert unknown ca", "alert bad certificate",
    "alert certificate expired", "alert certificate revoked", "alert certificate unknown",
    "alert access denied", "alert decrypt error", "alert handshake failure",
)
_SERVER_CERT_UNTRUSTED = ("certificate_verify_failed", "certificate verify failed", "hostname mismatch",
                          "wrong_version_number", "wrong version number")
_UNREACHABLE = ("connection refused", "timed out", "no route to host", "name or service not known",
                "temporary failure in name resolution", "network is unreachable", "connection reset")


def _code(exc: BaseException) -> int | None:
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):
        return rc
    return None


def explain(exc: BaseException, settings: ConnectionSettings) -> str:
    """One stable sentence naming the likely cause and the keys to check, plus the raw error."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    code = _code(exc)
    if isinstance(exc, MqttConnectError) or code is not None:
        if code in _AUTH_CODES:
            return ("the cloud broker refused our credentials (check upstream.username, "
                    f"upstream.password_file and the broker's ACL): {text}")
        if code in _CLIENT_ID_CODES:
            return f"the cloud broker refused our client id (check upstream.client_id): {text}"
        if isinstance(exc, MqttConnectError):
            return f"the cloud broker refused the connection: {text}"
    if any(marker in low for marker in _CLIENT_CERT_REJECTED):
        return ("the cloud broker rejected our client certificate (check upstream.cert_file, "
                f"upstream.key_file and the CA the broker trusts): {text}")
    if any(marker in low for marker in _SERVER_CERT_UNTRUSTED):
        return ("cannot verify the cloud broker's certificate (check upstream.ca_file and the host "
                f"name in upstream.url): {text}")
    if "closed before connack" in low:
        hint = "client certificate, credentials, client id" if MqttUrl(settings.url).tls else \
            "credentials, client id"
        return f"the cloud broker closed the connection during login (check {hint}): {text}"
    if any(marker in low for marker in _UNREACHABLE):
        return f"the cloud broker is unreachable: {text}"
    return text


class UpstreamClient(GatewayClient):
    """The cloud link's client: clear one-line failures and a prompt ``lost`` signal."""

    def __init__(self, settings: ConnectionSettings, *, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0):
        super().__init__(settings, name="upstream", backoff_initial=backoff_initial, backoff_max=backoff_max)
        # ``up``: connected (CONNACK accepted); ``lost``: the connection that was up dropped.
        # Both flip in paho's callbacks, i.e. the moment the socket goes, not when the
        # reconnect loop notices.
        self.up = asyncio.Event()
        self.lost = asyncio.Event()
        self._socket_error: str | None = None
        self.on_connect(self._mark_up)

    async def _mark_up(self, _client: GatewayClient) -> None:
        if not self.lost.is_set():
            self.up.set()

    def _make_client(self) -> aiomqtt.Client:
        client = super()._make_client()
        # The drain keeps up to 100 publishes awaiting PUBACK by design; aiomqtt's
        # "pending publish calls" warning (default above 10) would fire on every batch.
        client.pending_calls_threshold = max(client.pending_calls_threshold, self.settings.max_inflight + 10)
        inner = client._client  # noqa: SLF001 - the paho client; GatewayClient uses it already
        inner.disable_logger()
        inner.on_log = self._on_paho_log
        aiomqtt_on_disconnect = inner.on_disconnect

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
            if aiomqtt_on_disconnect is not None:
                aiomqtt_on_disconnect(pc, userdata, flags, reason, properties)

        inner.on_disconnect = on_disconnect
        return client

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
            raise aiomqtt.MqttError(explain(exc, self.settings)) from exc
        except OSError as exc:  # ssl.SSLError / FileNotFoundError building the TLS context
            raise aiomqtt.MqttError(
                "cannot load the TLS files (check upstream.ca_file, upstream.cert_file, "
                f"upstream.key_file): {exc}") from exc
        self.lost.clear()
        return client
