"""Shared HTTP plumbing of the cloud bridges: TLS contexts, HTTP clients, answer helpers.

Every cloud bridge must be pointable at a private deployment or a test fake (contract
§4: endpoint/token URL overridable, ``ca_file`` trusted), so the TLS context is built in
one place: the system's trust store *plus* the configured CA, TLS 1.2 or newer. The
helpers that read ``Retry-After`` and classify transport errors are shared so that every
bridge turns the same network failure into the same :class:`~bridges.base.Outcome`.

Two clients: httpx (Web Push and WNS, whose endpoints come from devices and so go through
the SSRF-guarded transports of :mod:`bridges.ssrf`) and :class:`PushClient` (APNs and FCM,
fixed configured hosts): libcurl with nghttp2 through ``curl_cffi``, which needs about a
quarter of httpx's CPU per HTTP/2 request (``bench/README.md``, "Push bridges").
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from bridges.base import Outcome

# A push request is small; a slow platform must not hold a delivery slot for long.
DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=10.0)


def tls_context(ca_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client TLS context trusting the system CAs and ``ca_file``; optional client cert."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None and str(ca_file):
        ctx.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None and str(cert_file):
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file and str(key_file) else None)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def async_client(ca_file: Path | None = None, *, http1: bool = True, http2: bool = False,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 max_connections: int = 100, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.AsyncClient:
    """One long-lived pooled client per bridge (connections are the expensive part).

    ``trust_env`` is off: a daemon must not silently route pushes through a proxy picked
    up from the environment of whoever started it.
    """
    if transport is None:
        transport = httpx.AsyncHTTPTransport(
            verify=tls_context(ca_file, cert_file, key_file), http1=http1, http2=http2,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            trust_env=False)
    return httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False,
                             follow_redirects=False)


# Requests one PushClient runs at once (one curl handle each); more wait for a free handle.
# Above the dispatcher's default max_in_flight (200), so the bridge is never what queues.
PUSH_MAX_IN_FLIGHT = 256


class NotHttp2(Exception):
    """An answer that did not come over HTTP/2 where HTTP/2 is mandatory (APNs)."""


class Answer(Protocol):
    """What the bridges read from an HTTP answer (an httpx or a curl_cffi response)."""

    status_code: int

    @property
    def headers(self) -> Any: ...

    def json(self) -> Any: ...


class PushClient:
    """The HTTP/2 client of the APNs and FCM bridges: libcurl (nghttp2, BoringSSL) via curl_cffi.

    Why not httpx here: with httpx/httpcore/h2 each request costs 2.4–3.6 ms of CPU in
    Python (client layer, connection pool, h2 state machine, HPACK, anyio), which caps a
    bridge at about 300 requests/s on one core; libcurl does the HTTP/2 framing, HPACK and
    TLS in C, and one request costs about 0.6 ms, most of it curl_cffi's Python glue.
    APNs and FCM are fixed, configured hosts, so the SSRF guard of the device-given Web
    Push/WNS endpoints (httpcore-based) is not needed on this path.

    What is kept from the httpx client: the same trust (the system CAs plus ``ca_file``,
    verified, TLS 1.2 or newer), the optional client certificate (APNs certificate auth),
    no proxy from the environment, no redirects, the same timeouts. ``http2_only`` (APNs)
    offers only ``h2`` in ALPN and speaks nothing else; an answer that is not HTTP/2
    raises :class:`NotHttp2`. Requests on one host share connections: each carries up to
    100 concurrent streams (curl's default), and ``PIPEWAIT`` makes requests that start
    together wait for the first connection to multiplex on it rather than each opening one.
    Transport failures raise one of :attr:`errors`.
    """

    def __init__(self, ca_file: Path | None = None, *, http2_only: bool,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 max_in_flight: int = PUSH_MAX_IN_FLIGHT,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT):
        # Load the TLS material once with the ssl module: unreadable files raise OSError /
        # ValueError here, at start(), as they did with httpx, not on the first push.
        tls_context(ca_file, cert_file, key_file)
        from curl_cffi import CurlError, CurlHttpVersion, CurlOpt, CurlSslVersion
        from curl_cffi.requests import AsyncSession

        self.errors: tuple[type[Exception], ...] = (CurlError, NotHttp2)
        self._http2_only = http2_only
        self._v2 = CurlHttpVersion.V2_0
        system = ssl.get_default_verify_paths()
        options: dict[Any, Any] = {CurlOpt.PIPEWAIT: 1, CurlOpt.SSLVERSION: CurlSslVersion.TLSv1_2}
        if ca_file is not None and str(ca_file):
            cainfo = str(ca_file)
            if system.capath and Path(system.capath).is_dir():
                options[CurlOpt.CAPATH] = system.capath  # and the system's CAs, as tls_context()
        else:
            cainfo = system.cafile or ""
        if timeout.connect is not None:
            options[CurlOpt.CONNECTTIMEOUT_MS] = int(timeout.connect * 1000)
        cert = None
        if cert_file is not None and str(cert_file):
            cert = (str(cert_file), str(key_file)) if key_file and str(key_file) else str(cert_file)
        self._session: Any = AsyncSession(
            max_clients=max_in_flight,
            # A path, never True: True would let REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE replace it.
            verify=cainfo or True,
            trust_env=False, allow_redirects=False, default_headers=False,
            http_version=CurlHttpVersion.V2_PRIOR_KNOWLEDGE if http2_only else CurlHttpVersion.V2TLS,
            cert=cert, timeout=timeout.read or 15.0, curl_options=options)

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> Any:
        """POST ``body``; the answer (``status_code``, ``headers``, ``content``, ``json()``)."""
        response = await self._session.post(url, headers=headers, data=body, accept_encoding=None)
        if self._http2_only and response.http_version != self._v2:
            raise NotHttp2(f"answered over HTTP version code {response.http_version}")
        return response

    async def aclose(self) -> None:
        await self._session.close()


def retry_after(headers: Any, default: float | None = None,
                now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP-date, RFC 9110 §10.2.3)."""
    raw = headers.get("retry-after")
    if raw is None:
        return default
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def transport_outcome(exc: Exception) -> Outcome:
    """A request that got no HTTP answer is transient: let the pipeline back off.

    The reason names the exception class only; messages can carry URLs with tokens.
    """
    return Outcome.retry(f"transport: {type(exc).__name__}")


def json_or_empty(response: Answer) -> dict[str, Any]:
    """The answer's JSON object, or ``{}`` when the body is empty or not a JSON object."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["DEFAULT_TIMEOUT", "PUSH_MAX_IN_FLIGHT", "Answer", "NotHttp2", "PushClient", "async_client", "json_or_empty", "retry_after", "tls_context",
           "transport_outcome"]
